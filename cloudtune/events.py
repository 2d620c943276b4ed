"""What the core reports while it works. The CLI renders these, tests record them, the core never prints."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext


class Events:
    """Every hook is optional: a caller that cares about none of them passes a plain `Events()`."""

    def phase(self, name: str, detail: str = "") -> None:  # noqa: B027 - optional hook
        """A step of the run begins (plan, provision, sync, train, pull, teardown)."""

    def note(self, message: str) -> None:  # noqa: B027
        """A detail of the step under way, worth a line but not a warning."""

    def log(self, line: str) -> None:  # noqa: B027
        """One line of the training's own log, already redacted."""

    def warn(self, message: str) -> None:  # noqa: B027
        """Something the user should act on or know went wrong."""

    def progress(self, label: str, done: int, total: int) -> None:  # noqa: B027
        """A transfer's progress in bytes (uploads, downloads); done == total when it completes."""

    def busy(self, what: str) -> AbstractContextManager:
        """Work that may take seconds with nothing else to show (importing SkyPilot, building the wheel):
        `with events.busy("what is happening"): ...`."""
        return nullcontext()
