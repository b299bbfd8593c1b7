"""Errors descgen shows to users: each carries a one-line message naming the file (and line)."""


class DescgenError(Exception):
    """Base of every error the CLI turns into a one-line message and exit code 1."""


class BankError(DescgenError):
    """A bank file is missing, unreadable, invalid or cannot be written."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class GenerationError(DescgenError):
    """The LLM could not be loaded or produced nothing usable within its budget."""
