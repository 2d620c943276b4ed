"""Abilities only some backends have. Callers ask `isinstance(backend, Capability)`, never a backend's name.

A backend opts in by inheriting the mixin and implementing its method (dstack's `ComputeWith*`
mixins, SkyPilot's `CloudImplementationFeatures` are the models).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from .base import Quote


class DryRuns(ABC):
    """Can show what a run would rent and launch without renting anything (`run --dry-run`)."""

    @abstractmethod
    def dry_run(self, quote: Quote) -> dict[str, Any]:
        """The launch as it would happen: `chosen`, `fallbacks`, `task` (secrets redacted), `yaml`, `notes`."""


class ListsMachines(ABC):
    """Knows machines by itself, beyond the ledger (a cloud's cluster list), so `down` can find lost ones."""

    @abstractmethod
    def list_machines(self) -> dict[str, str]:
        """Every machine this backend holds that cloudtune named (`ct-...`), with the backend's status word."""

