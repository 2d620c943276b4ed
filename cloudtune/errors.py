"""The errors a user sees as a message. The CLI turns each into its text, its hint and its exit code."""

EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1


class CloudtuneError(Exception):
    """A user-facing error: `message` says what is wrong, `hint` says what to do about it.

    The default exit code (2) says the user's input was wrong; subclasses for things that went wrong
    while acting on valid input use 1.
    """

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, hint: str | None = None):
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
