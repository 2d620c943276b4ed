"""The errors a user sees as a message, and the one boundary (`handle`) where every entry point (the
`cloudtune` command and the `python -m` ones) turns an error into its text, its hint and its exit code."""
from __future__ import annotations

import re
import sys
import traceback
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1
EXIT_UNEXPECTED = 1  # a bug or a failure of something cloudtune relies on, not the user's input
DEBUG_FLAG = "--debug"

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
    # Under torchrun, an error rank 0 found and sent to every rank: rank 0 prints it, the others only stop.
    told_by_main = False

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


Show = Callable[[str, str | None], None]


def _show_plain(message: str, hint: str | None) -> None:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def handle(exc: BaseException, *, debug: bool, show: Show = _show_plain,
           redact: Callable[[str], str] = str) -> int:
    """What the user reads for an error that reached an entry point, and the exit code to leave with.

    A CloudtuneError says what is wrong and what to do; anything else is unexpected and says so,
    naming the exception. The traceback is printed only with --debug, redacted like the message.
    """
    if debug:
        sys.stderr.write(redact("".join(traceback.format_exception(exc))))
    if isinstance(exc, CloudtuneError):
        show(redact(exc.message), redact(exc.hint) if exc.hint else None)
        return exc.exit_code
    detail = printable(redact(str(exc))) or "(no message)"
    show(f"unexpected {type(exc).__name__}: {detail}",
         None if debug else f"Run again with {DEBUG_FLAG} for the traceback, and report it if the message does "
                            "not say what to change.")
    return EXIT_UNEXPECTED


def entry_point(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a `python -m cloudtune...` module's main inside the boundary; `--debug` anywhere on its
    command line shows tracebacks."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    try:
        return main([arg for arg in args if arg != DEBUG_FLAG]) or 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the boundary: every error ends here as a message
        return handle(exc, debug=debug)
