"""The trainer's own stdout and stderr, redacted before they reach any file.

Redacting where the log is read is not enough: train.log stays on the machine (and on this one, for
the local backend), and `cloudtune logs` from a shell without the secrets exported cannot know the
values. So the trainer swaps its file descriptors 1 and 2 for pipes and passes everything through a
Redactor: prints, warnings, tracebacks, and what native code and child processes write all go
through the same filter.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from ..secrets import Redactor

# A line without an end (a progress bar, a huge dump) is passed on once this long; a secret cut at that
# point could survive, but holding unbounded text back would hide a hung trainer's last words.
MAX_PENDING_BYTES = 1 << 20
# What is in the pipes drains in well under this; a child that outlives the trainer (W&B's service) holds
# them open, and waiting for its end would delay every run's exit. Its words after that are lost.
DRAIN_SECONDS = 1.0


def secret_values(recipe_path: Path) -> list[str]:
    """The values of the recipe's `secrets` names found in this environment.

    Read straight from the YAML (cloudtune wrote it), before the recipe is validated, so that even a
    failure to load it prints nothing secret.
    """
    try:
        names = yaml.safe_load(recipe_path.read_text()).get("secrets") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    return [os.environ[name] for name in names if isinstance(name, str) and os.environ.get(name)]


@contextmanager
def redacted_output(values: list[str]) -> Iterator[None]:
    """Within the block, whatever this process (or its children) writes to fd 1 and 2 is redacted."""
    if not values:
        yield
        return
    redact = Redactor(values)
    pumps = [_divert(fd, redact) for fd in (1, 2)]
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved, _ in pumps:
            os.dup2(saved, fd)  # drops this process's write end of the pipe, so the pump sees its end
        deadline = time.monotonic() + DRAIN_SECONDS
        for _, saved, pump in pumps:
            pump.join(timeout=max(0.0, deadline - time.monotonic()))
            if not pump.is_alive():
                os.close(saved)  # else the pump still writes there until the process ends


def _divert(fd: int, redact: Redactor) -> tuple[int, int, threading.Thread]:
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, saved, redact), daemon=True, name=f"redact-fd{fd}")
    pump.start()
    return fd, saved, pump


def _pump(read_end: int, target: int, redact: Redactor) -> None:
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as source:
        while chunk := source.read(65536):
            pending += chunk
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
            if not cut and len(pending) >= MAX_PENDING_BYTES:
                cut = len(pending)
            if cut:
                _write(target, redact, pending[:cut])
                pending = pending[cut:]
    if pending:
        _write(target, redact, pending)


def _write(target: int, redact: Redactor, data: bytes) -> None:
    # surrogateescape keeps bytes that are not UTF-8 exactly as they were, around the redacted values
    text = redact(data.decode("utf-8", "surrogateescape"))
    os.write(target, text.encode("utf-8", "surrogateescape"))
