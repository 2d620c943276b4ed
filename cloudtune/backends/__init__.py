"""Backends by name. Each is imported only when chosen, so its heavy client library stays unloaded."""
from __future__ import annotations

from ..errors import CloudtuneError
from .base import Backend

BACKENDS = ("local", "ssh", "skypilot")


def get_backend(name: str, **options) -> Backend:
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(**options)
    if name == "ssh":
        from .ssh.backend import SSHBackend

        return SSHBackend(**options)
    if name == "skypilot":
        from .skypilot import SkyPilotBackend

        return SkyPilotBackend(**options)
    raise CloudtuneError(f"unknown backend '{name}'.", f"Choose one of: {', '.join(BACKENDS)}.")
