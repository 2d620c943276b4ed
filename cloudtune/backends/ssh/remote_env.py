"""Where the training runs on the machine: its own Python (or a venv over it), or a Docker container.

A RemoteEnv is the strategy the backend asks for everything that differs between the two: getting the
packages, installing this run's cloudtune, starting the training detached, checking it is alive,
stopping it. The machine's Python runs the small control programs in both (probe, stop checks).

Docker mode: the remote root is mounted at the same path, so every path reads the same inside and out,
and the container runs as the login user, so everything it writes stays removable. Packages the image
lacks go into envs/docker-<hash>/, built once with the image's own pip.
"""
from __future__ import annotations

import json
import shlex
from abc import ABC, abstractmethod
from typing import Any

from ...errors import CloudtuneError
from ...remote.make_venv import venv_key
from .commands import MARK, marked, marks, python, sh, with_env
from .state import SSHState
from .transport import Connection

MIN_PYTHON = (3, 10)
STOP_GRACE_SECONDS = 10
CONTAINER_PREFIX = "cloudtune-"
PIP_QUIET = ["-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--disable-pip-version-check"]


class RemoteEnv(ABC):
    """The training's environment on one machine, for one run (its SSHState)."""

    interpreter: str  # the Python the packages are checked with; trains unless a venv is needed
    label: str  # what the packages were looked for in, for messages and the venv's key
    fail_on_error = True  # a failing package check is "a command failed" (not no_python's error)
    venv_prefix = ""  # of the venvs' folder names under envs/

    def __init__(self, conn: Connection, state: SSHState, events: Any):
        self.conn = conn
        self.state = state
        self.events = events

    def setup(self, run_id: str, image: str) -> None:  # noqa: B027 - nothing to check by default
        """Check at provision that the machine can run this environment; record what reattaching needs."""

    def inside(self) -> list[str]:
        """The command a Python of this environment runs inside (none: the machine's own)."""
        return []

    def prepare(self, requirements: list[str]) -> str:
        """The Python to train with: the environment's own when it has the requirements, else a venv built
        once per (environment, requirement set) under the remote root and reused by later runs."""
        self.before_prepare()
        needed = json.dumps(requirements)
        _, output = self.conn.run(python(self.interpreter, "remote:missing_requirements", needed, MARK,
                                         inside=self.inside()), check=self.fail_on_error)
        missing = json.loads(marked(output) or "null")
        if missing is None:
            raise self.no_python(output)
        if not missing:
            self.events.phase("env", f"{self.label} already has the training packages")
            return self.interpreter
        venv = f"{self.state.remote_root}/envs/{self.venv_prefix}{venv_key(self.label, requirements)}"
        self.events.phase("env", self.venv_message(venv, missing))
        _, output = self.conn.run(python(self.interpreter, "remote:make_venv", MARK, venv, needed,
                                         inside=self.inside()), on_line=self.events.log)
        return marked(output) or f"{venv}/bin/python"

    def before_prepare(self) -> None:  # noqa: B027 - nothing to fetch by default
        """Whatever must be on the machine before its packages can be checked."""

    @abstractmethod
    def no_python(self, output: str) -> CloudtuneError:
        """The error for a package check that said nothing."""

    @abstractmethod
    def venv_message(self, venv: str, missing: list[str]) -> str:
        """What the env phase says when it builds (or reuses) a venv."""

    def install(self, python_path: str, wheel: str, site: str) -> None:
        """This run's cloudtune into its own site/ (not the shared venv), so runs of different cloudtune
        versions can train side by side on one machine."""
        self.conn.run(shlex.join([*self.inside(), python_path, *PIP_QUIET, "--target", site, wheel]))

    @abstractmethod
    def start(self, env: dict[str, str], resume: bool) -> None:
        """Start `bundle/run.sh` detached in the run's directory; record what finds it again in the state."""

    @abstractmethod
    def stop_command(self, grace: float | str) -> str:
        """A command that prints MARK alive|gone; with a grace, it first TERMs the training and KILLs what
        remains once the grace has passed; with "check", it only looks."""

    def alive(self) -> bool:
        _, output = self.conn.run(self.stop_command("check"))
        return marked(output) == "alive"

    def stop(self) -> bool:
        """TERM the training, KILL what remains after a grace period; True once it is gone."""
        _, output = self.conn.run(self.stop_command(STOP_GRACE_SECONDS))
        return marked(output) == "gone"


class PythonEnv(RemoteEnv):
    """The machine's own Python, or a venv over it (system site-packages visible, so its torch is reused)."""

    @property
    def interpreter(self) -> str:
        return self.state.base_python

    label = interpreter

    def no_python(self, output: str) -> CloudtuneError:
        return CloudtuneError(f"could not check the Python packages on {self.conn.where}:\n{output[-2000:]}")

    def venv_message(self, venv: str, missing: list[str]) -> str:
        return f"{venv}: a venv for {', '.join(missing)} (built once, reused by later runs)"

    def start(self, env: dict[str, str], resume: bool) -> None:
        command = sh("start_detached.sh", MARK, self.state.remote_dir, *(["--resume"] if resume else []))
        _, output = self.conn.run(with_env(env, command))
        pid = marked(output)
        if not pid or not pid.isdigit():
            raise CloudtuneError(f"could not start the training on {self.conn.where}:\n{output[-2000:]}")
        self.state.pid = int(pid)

    def stop_command(self, grace: float | str) -> str:
        return python(self.state.base_python, "remote:stop_group", self.state.pid, grace, MARK)


class DockerEnv(RemoteEnv):
    """A container of compute.image, run as the login user with the remote root at its own path."""

    interpreter = "python3"
    fail_on_error = False
    venv_prefix = "docker-"

    @property
    def label(self) -> str:
        return self.state.docker_image

    def setup(self, run_id: str, image: str) -> None:
        _, output = self.conn.run(sh("docker_check.sh", MARK), check=False)
        said = dict(mark.partition(" ")[::2] for mark in marks(output))
        if "docker" not in said:
            complaint = "\n".join(line for line in output.splitlines() if not line.startswith(MARK))[-1500:]
            raise CloudtuneError(f"{self.state.host}: compute.remote_env is docker, but Docker does not answer "
                                 f"there for {self.state.user}:\n{complaint}",
                                 "Install Docker there (and the NVIDIA container toolkit for GPUs) and let the SSH "
                                 "user run it (the docker group), or set compute.remote_env: python.")
        self.state.docker_image = image
        self.state.docker_user = said.get("user", "0:0")
        self.state.docker_gpus = "gpus" in said
        self.state.container = f"{CONTAINER_PREFIX}{run_id}"
        self.events.phase("connected", f"Docker {said['docker']}; training in {image}"
                                       f"{' with the GPUs' if self.state.docker_gpus else ''}")

    def options(self, env: dict[str, str] | None = None) -> list[str]:
        """`docker run` options and the image: the login user's ids, the remote root at its own path."""
        state, root = self.state, self.state.remote_root
        env = {"HOME": f"{root}/home", "USER": state.user, **(env or {})}
        options = ["--user", state.docker_user, "--network", "host", "--ipc", "host", "-v", f"{root}:{root}",
                   "-w", state.remote_dir] + (["--gpus", "all"] if state.docker_gpus else [])
        for name, value in env.items():  # never a secret: those reach the training through secrets.env
            options += ["-e", f"{name}={value}"]
        return options + [state.docker_image]

    def inside(self) -> list[str]:
        return ["docker", "run", "--rm", *self.options()]

    def before_prepare(self) -> None:
        """The image, pulled once, and the containers' HOME."""
        self.conn.run(shlex.join(["mkdir", "-p", f"{self.state.remote_root}/home"]))
        code, output = self.conn.run(sh("docker_pull.sh", self.label), check=False, on_line=self.events.log)
        if code != 0:
            raise CloudtuneError(f"could not get the image {self.label} on {self.conn.where}:\n{output[-1500:]}",
                                 "Check compute.image (a pinned tag or digest) and that the machine can reach its "
                                 "registry (`docker login` there for a private one).")

    def no_python(self, output: str) -> CloudtuneError:
        return CloudtuneError(f"the image {self.label} could not run python3 on {self.conn.where}:\n{output[-1500:]}",
                              f"The image needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]} as python3 on its PATH; "
                              "the repository's Dockerfile builds one with every training package.")

    def venv_message(self, venv: str, missing: list[str]) -> str:
        return f"{venv}: a venv over {self.label} for {', '.join(missing)} (built once, reused)"

    def start(self, env: dict[str, str], resume: bool) -> None:
        # TINI_KILL_PROCESS_GROUP: the init passes `docker stop`'s TERM to the whole process group.
        options = self.options({**env, "TINI_KILL_PROCESS_GROUP": "1"})
        _, output = self.conn.run(sh("docker_start.sh", MARK, self.state.remote_dir, self.state.container,
                                     "--resume" if resume else "", *options), check=False)
        if not marked(output):
            hint = ("The machine's Docker cannot reach its GPUs: install the NVIDIA container toolkit there."
                    if "gpu" in output.lower() else None)
            raise CloudtuneError(f"could not start the training container on {self.conn.where}:\n{output[-1500:]}",
                                 hint)

    def stop_command(self, grace: float | str) -> str:
        return sh("docker_stop.sh", MARK, self.state.container, grace if grace == "check" else int(grace))


ENVS: dict[str, type[RemoteEnv]] = {"python": PythonEnv, "docker": DockerEnv}


def environment(conn: Connection, state: SSHState, events: Any) -> RemoteEnv:
    """The environment a provisioned run trains in: Docker once a container was named, else Python."""
    return (DockerEnv if state.container else PythonEnv)(conn, state, events)
