"""The SSH backend's options, as the CLI and the registry see them.

Imports neither paramiko nor the rest of the backend, so the CLI can build its flags from this model
without paying for them.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class SSHOptions(BaseModel):
    """How to reach the machine, and what to leave on it."""

    model_config = ConfigDict(extra="forbid")

    host: str | None = Field(None, description="the machine to train on, user@ip[:port].")
    key: Path | None = Field(None, description="private key file (default: ssh-agent, then ~/.ssh/id_*).")
    trust_new_host: bool = Field(False, description="accept a host key not yet in known_hosts, and record it.")
    keep_remote: bool = Field(False, description="keep the run's directory on the machine "
                                                 "(secrets are removed anyway).")
