"""What the SSH backend remembers of one run, kept in the ledger so `logs` and `down` can reattach.

The address fields also read the keys earlier versions wrote (`ssh_user`, `ssh_host`, `ssh_port`,
`ssh_key`), so machines recorded by them can still be followed and torn down.
"""
from __future__ import annotations

from pydantic import AliasChoices, Field

from ..base import MachineState


def _also(name: str) -> AliasChoices:
    """The field's name, or the key earlier versions wrote for it."""
    return AliasChoices(name, f"ssh_{name}")


class SSHState(MachineState):
    """One run on one SSH machine. Everything is optional: a run can stop before any of it is known."""

    user: str | None = Field(None, validation_alias=_also("user"), description="login user on the machine.")
    host: str | None = Field(None, validation_alias=_also("host"), description="the machine's address (name or IP).")
    port: int = Field(22, validation_alias=_also("port"), description="its SSH port.")
    key: str | None = Field(None, validation_alias=_also("key"), description="absolute path of the private key; "
                                                                              "None: ssh-agent and ~/.ssh/id_*.")
    known_hosts: str | None = Field(None, description="the known_hosts file the host key was checked against.")
    keep_remote: bool = Field(False, description="keep the run's directory at teardown (secrets go anyway); also "
                                                 "set when a pull fails, as the machine then holds the only copy.")
    base_python: str | None = Field(None, description="the machine's own interpreter, found by the probe; runs the "
                                                      "control programs.")
    remote_root: str | None = Field(None, description="absolute remote root: bundles/, envs/, runs/, models/, home/.")
    remote_dir: str | None = Field(None, description="this run's directory, remote_root/runs/<run id>.")
    remote_python: str | None = Field(None, description="the interpreter that trains: base_python, a venv's, or "
                                                        "one inside the image.")
    pid: int | None = Field(None, description="process group id of the detached training (Python mode).")
    container: str | None = Field(None, description="name of the training container (Docker mode); set means "
                                                    "Docker mode.")
    docker_image: str | None = Field(None, description="the image the container runs (compute.image).")
    docker_user: str | None = Field(None, description="uid:gid the container runs as: the login user's, so "
                                                      "everything it writes stays removable.")
    docker_gpus: bool = Field(False, description="whether the container gets the GPUs (`--gpus all`).")

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def started(self) -> bool:
        """Whether there may be a training to look at or stop: a process group, or a container."""
        return bool(self.pid or self.container)
