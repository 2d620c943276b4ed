"""The trainer's own stdout and stderr, redacted before they reach any file, and kept to what a user reads.

Redacting where the log is read is not enough: train.log stays on the machine (and on this one, for
the local backend), and `cloudtune logs` from a shell without the secrets exported cannot know the
values. So the trainer swaps its file descriptors 1 and 2 for pipes and passes everything through a
Redactor: prints, warnings, tracebacks, and what native code and child processes write all go
through the same filter.

The same pipes sort the lines: the streamed log (train.log) keeps our step lines, the warnings that
matter to the user and errors; dependencies' noise (liger-kernel's backend import notices, Python
warnings about a library's own code) goes only to debug.log beside the outputs, which keeps every
line, redacted too.
"""
from __future__ import annotations

import os
import re
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
DEBUG_LOG = "debug.log"  # in the trainer's --out, pulled with the outputs
# Lines of dependencies that say nothing a user can act on.
LIBRARY_NOISE = re.compile(
    r"Backend impl '[^']*' for op '[^']*' could not be imported"  # liger-kernel probing cutedsl, ascend, ...
    r"|^(?!.*cloudtune/)\S[^:]*:\d+: (Syntax|Deprecation|PendingDeprecation|Future)Warning: ")  # not our code


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
def redacted_output(values: list[str], debug_log: Path | None = None) -> Iterator[None]:
    """Within the block, whatever this process (or its children) writes to fd 1 and 2 is redacted; with
    `debug_log`, library noise goes only there, and every line goes there too."""
    if not values and debug_log is None:
        yield
        return
    redact = Redactor(values)
    debug = DebugLog(debug_log) if debug_log is not None else None
    pumps = [_divert(fd, redact, debug) for fd in (1, 2)]
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved, _ in pumps:
            os.dup2(saved, fd)  # drops this process's write end of the pipe, so the pump sees its end
        deadline = time.monotonic() + DRAIN_SECONDS
        drained = True
        for _, saved, pump in pumps:
            pump.join(timeout=max(0.0, deadline - time.monotonic()))
            if not pump.is_alive():
                os.close(saved)  # else the pump still writes there until the process ends
            drained = drained and not pump.is_alive()
        if debug is not None and drained:
            debug.close()


class DebugLog:
    """debug.log in the trainer's --out, opened once the trainer has made that folder: a run refused
    before it starts (a CPU asked for qlora, a missing token) leaves no folder behind. Until then the
    lines wait here, and a run that never makes it writes none."""

    def __init__(self, path: Path):
        self.path, self.fd, self.waiting, self.lock = path, None, [], threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.fd is None and not self._open():
                if sum(map(len, self.waiting)) < MAX_PENDING_BYTES:
                    self.waiting.append(data)
                return
            os.write(self.fd, data)

    def _open(self) -> bool:
        if not self.path.parent.is_dir():
            return False
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for data in self.waiting:
            os.write(self.fd, data)
        self.waiting.clear()
        return True

    def close(self) -> None:
        with self.lock:
            if self.fd is not None or self._open():
                os.close(self.fd)


def _divert(fd: int, redact: Redactor, debug: DebugLog | None) -> tuple[int, int, threading.Thread]:
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, saved, redact, debug), daemon=True,
                            name=f"redact-fd{fd}")
    pump.start()
    return fd, saved, pump


def _pump(read_end: int, target: int, redact: Redactor, debug: DebugLog | None) -> None:
    pending = b""
    noise = [False]  # whether the last line was noise: a Python warning's source line follows it, indented
    with os.fdopen(read_end, "rb", buffering=0) as source:
        while chunk := source.read(65536):
            pending += chunk
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
            if not cut and len(pending) >= MAX_PENDING_BYTES:
                cut = len(pending)
            if cut:
                _write(target, redact, pending[:cut], debug, noise)
                pending = pending[cut:]
    if pending:
        _write(target, redact, pending, debug, noise)


def _write(target: int, redact: Redactor, data: bytes, debug: DebugLog | None, noise: list[bool]) -> None:
    # surrogateescape keeps bytes that are not UTF-8 exactly as they were, around the redacted values
    text = redact(data.decode("utf-8", "surrogateescape"))
    if debug is None:
        os.write(target, text.encode("utf-8", "surrogateescape"))
        return
    debug.write(text.encode("utf-8", "surrogateescape"))
    kept = []
    for line in text.splitlines(keepends=True):
        noise[0] = bool(LIBRARY_NOISE.search(line)) or (noise[0] and line[:1] in (" ", "\t"))
        if not noise[0]:
            kept.append(line)
    if kept:
        os.write(target, "".join(kept).encode("utf-8", "surrogateescape"))
