"""The local backend: this machine is the "rented" one. No cloud, no network; the demo and the tests.

It lays the run out exactly as a remote backend does (bundle unpacked, secrets file, run.sh, log and
exit-status files), so the same lifecycle is exercised end to end.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from ..manifest import NOT_PULLED
from ..remote import checkpoints
from ..remote.stop_group import group_alive, stop_group
from ..remote.watchdog import LAUNCHER_ENV
from .base import (
    EXIT_FILE,
    LOG_FILE,
    SECRETS_FILE,
    Backend,
    Bundle,
    MachineState,
    Quote,
    RunContext,
    write_secrets_file,
)
from .capabilities import KeepsCheckpoints
from .common import tail

STOP_GRACE_SECONDS = 10
POLL_SECONDS = 0.2


class LocalState(MachineState):
    root: str | None = Field(None, description="The run's directory, standing in for the rented machine.")
    pid: int | None = Field(None, description="The run script's process, leader of the training's process group.")


class LocalBackend(Backend, KeepsCheckpoints):
    name = "local"
    State = LocalState

    def __init__(self, options=None, events=None) -> None:
        super().__init__(options, events)
        self._children: dict[str, subprocess.Popen] = {}

    def quote(self, recipe, report) -> Quote:
        from ..planning.budget import local_price_fields
        from ..recipe import QUANTISED_METHODS, quantising_needs_a_gpu

        if recipe.method in QUANTISED_METHODS and not may_have_an_nvidia_gpu():
            raise quantising_needs_a_gpu(recipe.method)  # now, not after bundling, from the trainer's log
        if recipe.compute.price_per_hour is not None:
            return super().quote(recipe, report)
        return Quote(summary="this machine (local backend): nothing rented, $0", recipe=recipe,
                     price=dict(local_price_fields()))

    @staticmethod
    def root(ctx: RunContext) -> Path:
        return ctx.work_dir / "machine"

    def provision(self, ctx: RunContext) -> None:
        self.root(ctx).mkdir(parents=True, exist_ok=True)
        ctx.state.root = str(self.root(ctx))

    def sync(self, ctx: RunContext, bundle: Bundle, secrets: dict[str, str]) -> None:
        root = self.root(ctx)
        with tarfile.open(bundle.path) as tar:
            tar.extractall(root, filter="data")
        if secrets:
            write_secrets_file(root / SECRETS_FILE, secrets)

    def start(self, ctx: RunContext, resume: bool = False) -> None:
        root = self.root(ctx)
        (root / EXIT_FILE).unlink(missing_ok=True)
        # This process is the launcher: a training that outlives it would run on unwatched and unpulled.
        env = {**os.environ, "CLOUDTUNE_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1",
               LAUNCHER_ENV: str(os.getpid()), **ctx.train_env}
        args = ["sh", str(root / "bundle" / "run.sh")] + (["--resume"] if resume else [])
        child = subprocess.Popen(args, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        self._children[ctx.run_id] = child
        ctx.state.pid = child.pid

    def _running(self, ctx: RunContext) -> bool:
        """Any process of the training's group, not only the run script: the script can be gone while
        the trainer still writes its checkpoint."""
        child = self._children.get(ctx.run_id)
        if child is not None:
            child.poll()  # reaps the script once it exits, so it does not linger as a zombie
        pid = ctx.state.pid
        return bool(pid) and group_alive(pid)

    def exit_code(self, ctx: RunContext) -> int | None:
        path = self.root(ctx) / EXIT_FILE
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def logs(self, ctx: RunContext, follow: bool = True) -> Iterator[str]:
        path = self.root(ctx) / LOG_FILE
        while follow and not path.exists() and self._running(ctx):
            time.sleep(POLL_SECONDS)
        if not path.exists():
            return

        def poll(offset: int) -> tuple[bool, bytes]:
            finished = not self._running(ctx)
            with path.open("rb") as handle:
                handle.seek(offset)
                return finished, handle.read(1 << 20)

        yield from tail(poll, follow, POLL_SECONDS)

    def pull(self, ctx: RunContext, staging: Path) -> None:
        shutil.copytree(self.root(ctx) / "out", staging, ignore=shutil.ignore_patterns(*NOT_PULLED),
                        dirs_exist_ok=True)

    def fetch_checkpoint(self, ctx: RunContext, dest: Path) -> Path | None:
        found = checkpoints.complete(self.root(ctx) / "out")
        if not found:
            return None
        shutil.copytree(found[-1], dest / found[-1].name, dirs_exist_ok=True)
        return dest / found[-1].name

    def stop(self, ctx: RunContext) -> None:
        if ctx.state.pid:
            stop_group(ctx.state.pid, STOP_GRACE_SECONDS, poll=POLL_SECONDS)

    def remove_secrets(self, ctx: RunContext) -> None:
        (self.root(ctx) / SECRETS_FILE).unlink(missing_ok=True)

    def teardown(self, ctx: RunContext) -> bool:
        self.remove_secrets(ctx)
        self.stop(ctx)
        child = self._children.pop(ctx.run_id, None)
        if child is not None:
            child.wait(timeout=5)
        if self._running(ctx):
            return False
        # The outputs were pulled (or given up, with `down`): as a rented machine would, this one keeps
        # nothing of the run but its log and exit status.
        clean_machine(self.root(ctx), keep_outputs=False)
        return True


def may_have_an_nvidia_gpu() -> bool:
    """Whether CUDA can be on this machine, asked without importing torch: the NVIDIA driver's control device
    (Linux, and containers given a GPU) or WSL's GPU bridge. Where neither is, the trainer would refuse."""
    return any(Path(device).exists() for device in ("/dev/nvidiactl", "/dev/dxg"))


def clean_machine(root: Path, keep_outputs: bool) -> None:
    """Remove the secrets and the copied bundle (recipe, dataset) from a local run's directory; out/ too
    unless its outputs may still be pulled. train.log and the exit status stay for `cloudtune logs`."""
    (root / SECRETS_FILE).unlink(missing_ok=True)
    shutil.rmtree(root / "bundle", ignore_errors=True)
    if not keep_outputs:
        shutil.rmtree(root / "out", ignore_errors=True)


def sweep_dead(state: dict) -> bool:
    """A run whose CLI died (SIGKILL, a crash, a full disk): once its training is gone too, remove its
    secrets and bundle. The outputs stay for `cloudtune pull`. Cheap: one process check, no imports."""
    root, pid = state.get("root"), state.get("pid")
    if not root or (pid and group_alive(pid)):
        return False
    clean_machine(Path(root), keep_outputs=True)
    return True
