"""The errors a user sees as a message. The CLI turns each into its text, its hint and its exit code."""
from __future__ import annotations

import re

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1

# What a message may carry to the terminal: escape sequences, lone surrogates (which make the console's
# UTF-8 encoder raise) and other control characters come from file names, column names and values a
# user did not type, so they are shown as escapes instead of being sent raw.
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")
MAX_MESSAGE_CHARS = 4000


def printable(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text` safe to print: unprintable characters escaped, at most `limit` characters kept."""
    safe = _UNPRINTABLE.sub(lambda found: f"\\u{ord(found.group()):04x}", text)
    if len(safe) > limit:
        safe = f"{safe[:limit]}… ({len(safe) - limit:,} more characters)"
    return safe


class CloudtuneError(Exception):
    """A user-facing error: `message` says what is wrong, `hint` says what to do about it.

    The default exit code (2) says the user's input was wrong; subclasses for things that went wrong
    while acting on valid input use 1.
    """

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, hint: str | None = None):
        message = printable(str(message))
        hint = printable(str(hint)) if hint is not None else None
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n{self.hint}" if self.hint else self.message


class RunFailed(CloudtuneError):
    """The training itself failed; the message carries the log tail."""

    exit_code = EXIT_RUN_FAILED


class PullFailed(RunFailed):
    """Training finished but its outputs did not arrive intact; the machine is left up so they are not lost."""


class TeardownIncomplete(CloudtuneError):
    """Some machines could not be removed or verified gone; each was reported with what to do."""

    exit_code = EXIT_RUN_FAILED
