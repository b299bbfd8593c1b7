"""Errors trainer shows to users: a one-line message the CLI prints as `Error: ...` (exit 1)."""

from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

from descgen.errors import DescgenError


class TrainerError(Exception):
    """Base of every error the CLI turns into a one-line message and exit code 1."""


class ConfigError(TrainerError):
    """A config file or override is missing, malformed or invalid."""


class DataError(TrainerError):
    """A dataset, class-names or template file is missing or inconsistent."""


class RunDirError(TrainerError):
    """A run directory exists (without --resume) or cannot be resumed."""


class NonFiniteError(TrainerError):
    """A loss, a gradient norm or a weight to be saved is NaN or infinite."""


class WriteError(TrainerError):
    """A run's file cannot be written (permission, full disk, ...); earlier files are left intact."""


def fail(message: str) -> NoReturn:
    """The CLIs' way out: `Error: <message>` as one line on stderr (whitespace folded), exit code 1."""
    Console(stderr=True, soft_wrap=True).print(
        Text.assemble(("Error: ", "bold red"), " ".join(str(message).split()))
    )
    raise typer.Exit(1)


# What the CLIs turn into one line: trainer's own errors and descgen's (bank files).
USER_ERRORS: tuple[type[Exception], ...] = (TrainerError, DescgenError)
