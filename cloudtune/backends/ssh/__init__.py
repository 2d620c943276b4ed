"""The SSH backend: train on any machine you can log in to. See backend.py for the picture.

  options.py     its options (host, key, ...): pydantic only, cheap for the CLI to import
  state.py       what a run remembers in the ledger (SSHState)
  transport.py   addresses, host keys, the connection and reconnecting (the only paramiko import)
  transfer.py    resumable, checksummed uploads and downloads
  remote_env.py  where the training runs: the machine's Python (PythonEnv) or a container (DockerEnv)
  commands.py    the programs of scripts/ and cloudtune.remote as command lines, and their answers
  backend.py     SSHBackend: the lifecycle mapped onto the pieces above

This module stays light: the names below are imported on first use, so importing
`cloudtune.backends.ssh.options` never loads paramiko.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "SSHBackend": "backend", "REMOTE_PYTHON_ENV": "backend", "REMOTE_ROOT_ENV": "backend",
    "KNOWN_HOSTS_ENV": "transport", "parse_host": "transport", "Unreachable": "transport",
    "SSHOptions": "options", "SSHState": "state",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_LAZY[name]}", __name__), name)
