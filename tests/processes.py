"""Stopping the daemons the fixtures start (sshd, dockerd, the Slurm daemons)."""
from __future__ import annotations

import subprocess


def stop_process(process: subprocess.Popen, grace_seconds: float) -> None:
    """SIGTERM, then SIGKILL once the grace is spent: a daemon that ignores the first must not outlive the tests."""
    process.terminate()
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
