"""Abilities only some backends have. Callers ask `isinstance(backend, Capability)`, never a backend's name.

A backend opts in by inheriting the mixin and implementing its method (dstack's `ComputeWith*`
mixins, SkyPilot's `CloudImplementationFeatures` are the models).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import CloudtuneError
from .base import Quote, RunContext

if TYPE_CHECKING:
    from ..recipe import Recipe
    from .base import Backend


class DryRuns(ABC):
    """Can show what a run would rent and launch without renting anything (`run --dry-run`)."""

    @abstractmethod
    def dry_run(self, quote: Quote) -> dict[str, Any]:
        """The launch as it would happen: `chosen`, `fallbacks`, `task` (secrets redacted), `yaml`, `notes`."""


class ListsMachines(ABC):
    """Knows machines by itself, beyond the ledger (a cloud's cluster list), so `down` can find lost ones."""

    # What a user can do by hand when the list cannot be read.
    check_by_hand: ClassVar[str] = "check for ct-... machines there by hand"

    @abstractmethod
    def list_machines(self) -> dict[str, str]:
        """Every machine this backend holds that cloudtune named (`ct-...`), with the backend's status word."""

    def shared_machines(self) -> dict[str, str]:
        """Machines the backend runs for cloudtune's runs and others alike (SkyPilot's jobs controller):
        name -> what to know about it. `down` lists them and leaves them alone."""
        return {}


class KeepsCheckpoints(ABC):
    """Can copy a stopped run's newest checkpoint off its machine before teardown, so `run --resume` can
    continue it on another machine (the machine itself is not kept, and not paid for, meanwhile)."""

    @abstractmethod
    def fetch_checkpoint(self, ctx: RunContext, dest: Path) -> Path | None:
        """The newest complete checkpoint under the machine's out/checkpoints, copied to dest/<its name>;
        None when the training saved none."""


class ChecksSetup(ABC):
    """Can say what it can rent on and what is missing for the rest (`cloudtune check`)."""

    @abstractmethod
    def check_setup(self) -> dict[str, Any]:
        """`clouds`: name -> {enabled, missing (what to set up), extra (the pip install that adds its
        libraries)}; `server`: where the backend's service runs and whether it answers."""


class SpansMachines(ABC):  # noqa: B024 - an ability without a method of its own: the backend's task carries it
    """Can train one run on several machines (compute.num_nodes > 1): starts them together and gives each
    its node rank and the others' addresses, for torchrun's rendezvous (SkyPilot's `num_nodes`)."""


def check_machines(backend: Backend, recipe: Recipe) -> None:
    """Refuse compute.num_nodes > 1, before anything is read or rented, on a backend that has one machine."""
    nodes = recipe.compute.num_nodes
    if nodes > 1 and not isinstance(backend, SpansMachines):
        raise CloudtuneError(f"compute.num_nodes {nodes}: the {backend.name} backend trains on one machine, so a run "
                             "cannot span several.",
                             "Set compute.num_nodes to 1 (the run trains on every GPU of that machine), or train on "
                             "SkyPilot's clouds or cluster (--backend skypilot), which start several machines.")
