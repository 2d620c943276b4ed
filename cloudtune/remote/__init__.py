"""Helpers that run on the training machine, whatever the backend.

Standard library only, and written once: a backend runs them as `python -m cloudtune.remote.NAME`
where cloudtune is installed, or ships the file itself (importlib.resources) to a machine that does
not have cloudtune yet, e.g. `python -c "$(source)" ARGS`. Each module stands alone; the trainer
imports `watchdog` too.
"""
from __future__ import annotations

from importlib import resources


def source(name: str) -> str:
    """The text of the helper `name` (e.g. "stop_group"), to run it where cloudtune is not installed."""
    return resources.files(__name__).joinpath(f"{name}.py").read_text()
