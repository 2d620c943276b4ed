"""Plumbing every backend's local side needs, written once: reading a growing log, keeping a redacted
copy of it, and finding the cloudtune wheel in a bundle."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TextIO

from ..errors import CloudtuneError
from ..secrets import Redactor
from .base import LOG_FILE, Bundle, RunContext


class LineBuffer:
    """Bytes in, whole lines out. Split on bytes, so a line (or a UTF-8 character) cut between two reads
    is kept until its rest arrives and decoded whole."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        return [line.decode(errors="replace") for line in lines]

    def flush(self) -> list[str]:
        rest, self.pending = self.pending, b""
        return [rest.decode(errors="replace")] if rest else []


def tail(poll: Callable[[int], tuple[bool, bytes]], follow: bool, interval: float) -> Iterator[str]:
    """The lines of a log that may still grow, from its start.

    poll(offset) returns (finished, the bytes from offset on): finished is learnt BEFORE reading, so the
    last bytes written before the end are still read. Without follow, stops at the current end.
    """
    offset, buffer = 0, LineBuffer()
    while True:
        finished, chunk = poll(offset)
        if chunk:
            offset += len(chunk)
            yield from buffer.feed(chunk)
            continue
        if finished or not follow:
            yield from buffer.flush()
            return
        time.sleep(interval)


class LogCopy:
    """A redacted copy of the training log in the run's local work dir, for `cloudtune logs` once the
    machine has forgotten it. Only the process that knows the secrets' values writes one."""

    def __init__(self, ctx: RunContext, secrets: dict[str, str] | list[str]):
        self.path = ctx.work_dir / LOG_FILE
        self.redact = Redactor(secrets)
        self._handle: TextIO | None = None

    def __enter__(self) -> LogCopy:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("w")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def write(self, line: str) -> None:
        # A progress bar redraws its line after each \r: the copy keeps what a terminal ends up showing.
        shown = line.rstrip("\r").rsplit("\r", 1)[-1]
        self._handle.write(self.redact(shown) + "\n")
        self._handle.flush()

    def write_text(self, text: str) -> None:
        """The whole log at once (redacted whole, so a value spanning lines is caught too)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.redact(text))


def saved_log(ctx: RunContext) -> Iterator[str]:
    """The lines of the local copy LogCopy wrote, if any."""
    copy = ctx.work_dir / LOG_FILE
    if copy.is_file():
        yield from copy.read_text(errors="replace").splitlines()


def bundle_wheel(bundle: Bundle) -> str:
    """The bundle's cloudtune wheel (its name inside the bundle's folder), which the machine installs."""
    wheels = [name for name in bundle.files if name.endswith(".whl")]
    if len(wheels) != 1:
        raise CloudtuneError("the bundle carries no cloudtune wheel for the machine to install.")
    return wheels[0].removeprefix("bundle/")
