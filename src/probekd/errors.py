"""The project's exception types: every error a user can cause says what is wrong and where."""

from __future__ import annotations


class ProbekdError(Exception):
    """Base class for errors caused by input or environment; the CLI prints the message and exits with code 2."""


class DataError(ProbekdError):
    """A task file or example is malformed: the message names the file and line (or example id)."""

    def __init__(self, what: str, where: str | None = None) -> None:
        self.what = what
        self.where = where
        super().__init__(f"{what} at {where}" if where else what)


class ModelError(ProbekdError):
    """A model name cannot be resolved, a packaged model is missing, or a checksum does not match."""


class ConfigError(ProbekdError):
    """A configuration field or command-line option has an unknown name or a bad value."""


class MissingExtraError(ProbekdError):
    """An optional package is not installed: the message names the `probekd[...]` extra that installs it."""
