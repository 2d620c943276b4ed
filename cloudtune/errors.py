"""The one exception type for mistakes a user can fix; the CLI turns it into a message and exit 2."""


class CloudtuneError(Exception):
    """A user-facing error: `message` says what is wrong, `hint` says what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n{self.hint}" if self.hint else self.message
