"""The SSH backend's options, apart from the backend so the CLI can build its flags without paramiko."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from ..errors import CloudtuneError
from .base import BackendOptions


class SSHOptions(BackendOptions):
    # Optional here: a backend rebuilt from the ledger (`logs`, `down`) reads the machine from there.
    host: str | None = Field(None, description="the machine to train on, user@ip[:port].")
    key: Path | None = Field(None, description="private key file (default: ssh-agent, then ~/.ssh/id_*).")
    trust_new_host: bool = Field(False, description="accept a host key not yet in known_hosts, and record it.")
    keep_remote: bool = Field(False, description="keep the run's directory on the machine (secrets are removed "
                                                 "anyway).")

    def check_for_launch(self) -> None:
        if not self.host:
            raise CloudtuneError("--backend ssh needs the machine: --host user@ip[:port].",
                                 "Add --key PATH unless ssh-agent or ~/.ssh/id_* holds the key.")
