"""Stop a process group: SIGTERM, a grace period for it to exit (and checkpoint), then SIGKILL.

    python -m cloudtune.remote.stop_group PGID GRACE [MARK]   # stop, then print MARK + alive|gone
    python -m cloudtune.remote.stop_group PGID check [MARK]   # only look

Python rather than `ps`, which slim container images lack. Zombies do not count as running: they
have exited and only wait for their parent to read the status. Standard library only, so a backend
can ship this file to a machine before cloudtune is installed there.
"""
from __future__ import annotations

import os
import signal
import sys
import time

POLL_SECONDS = 0.2
AFTER_KILL_SECONDS = 0.5


def _stat_fields(pid: str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is running (a zombie is not)."""
    if not os.path.isdir("/proc/self"):  # no procfs: ask the kernel, which counts zombies too
        try:
            os.killpg(pgid, 0)
            return True
        except OSError:
            return False
    for pid in os.listdir("/proc"):
        fields = _stat_fields(pid) if pid.isdigit() else None
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _send(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def stop_group(pgid: int, grace: float, poll: float = POLL_SECONDS) -> bool:
    """TERM the group, KILL what remains after `grace` seconds; True once nothing of it runs."""
    if not group_alive(pgid):
        return True
    _send(pgid, signal.SIGTERM)
    deadline = time.time() + grace
    while group_alive(pgid) and time.time() < deadline:
        time.sleep(poll)
    if group_alive(pgid):
        _send(pgid, signal.SIGKILL)
        time.sleep(AFTER_KILL_SECONDS)
    return not group_alive(pgid)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or not argv[0].isdigit():
        print("usage: stop_group PGID GRACE|check [MARK]", file=sys.stderr)
        return 2
    pgid, grace, mark = int(argv[0]), argv[1], argv[2] if len(argv) == 3 else ""
    gone = not group_alive(pgid) if grace == "check" else stop_group(pgid, float(grace))
    print(mark + ("gone" if gone else "alive"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
