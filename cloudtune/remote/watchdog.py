"""The trainer stops when the process that launched it is gone.

A CLI killed with SIGKILL cannot stop what it started, so the training watches it instead: within a
few seconds of the launcher's end it sends itself SIGTERM, which the training loop answers with a
checkpoint and a clean stop. Backends whose training is meant to outlive the CLI (a detached run on
an SSH machine, a cloud job) do not name a launcher.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path

LAUNCHER_ENV = "CLOUDTUNE_LAUNCHER_PID"
POLL_SECONDS = 1.0
# After the launcher is gone, how long the training may take to reach the end of its step and write
# its checkpoint before it is killed: a step of thousands of micro-batches would otherwise run on,
# unwatched, for as long as it takes (the checkpoint of the step before stays).
STOP_GRACE_ENV = "CLOUDTUNE_STOP_GRACE_S"
STOP_GRACE_SECONDS = 120.0


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; it only waits for its parent to read the status
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def watch_launcher(environ: Mapping[str, str] = os.environ) -> threading.Thread | None:
    """Start watching the launcher named in the environment, if any."""
    pid = environ.get(LAUNCHER_ENV, "")
    if not pid.isdigit():
        return None
    watcher = threading.Thread(target=_stop_when_gone, args=(int(pid),), name="launcher-watchdog", daemon=True)
    watcher.start()
    return watcher


def watch_parent(environ: Mapping[str, str] = os.environ) -> threading.Thread | None:
    """Under torchrun: die with it. torchrun starts each rank in a session of its own, out of reach of the
    process-group signals that stop a run (cloudtune/remote/stop_group.py), and a torchrun killed outright
    cannot stop its ranks; a rank whose parent is gone kills itself within a second, as a killed group would."""
    if "TORCHELASTIC_RUN_ID" not in environ:
        return None
    parent = os.getppid()
    watcher = threading.Thread(target=_kill_when_orphaned, args=(parent,), name="parent-watchdog", daemon=True)
    watcher.start()
    return watcher


def _kill_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


def _stop_when_gone(pid: int) -> None:
    while process_alive(pid):
        time.sleep(POLL_SECONDS)
    print(f"cloudtune: the process that started this training ({pid}) is gone; stopping with a checkpoint",
          flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    grace = float(os.environ.get(STOP_GRACE_ENV, STOP_GRACE_SECONDS))
    time.sleep(grace)  # a training that stops in time exits, and this thread with it
    print(f"cloudtune: the training did not reach the end of its step within {grace:.0f} s; killed (the last "
          "checkpoint written before stays)", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
