"""The SSH backend's options, as the CLI and the registry see them.

Imports neither paramiko nor the rest of this package, so the CLI can build its `run` flags from this
model (see registry.py) without paying for them.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ...errors import CloudtuneError
from ..base import BackendOptions


class SSHOptions(BackendOptions):
    """How to reach the machine, and what to leave on it. All optional here: a backend rebuilt from the
    ledger (`logs`, `down`) reads the machine from the run's SSHState."""

    host: str | None = Field(None, description="the machine to train on, user@ip[:port].")
    key: Path | None = Field(None, description="private key file (default: ssh-agent, then ~/.ssh/id_*).")
    trust_new_host: bool = Field(False, description="accept a host key not yet in known_hosts, and record it.")
    keep_remote: bool = Field(False, description="keep the run's directory on the machine (secrets are removed "
                                                 "anyway).")

    def check_for_launch(self) -> None:
        if not self.host:
            raise CloudtuneError("--backend ssh needs the machine: --host user@ip[:port].",
                                 "Add --key PATH unless ssh-agent or ~/.ssh/id_* holds the key.")
