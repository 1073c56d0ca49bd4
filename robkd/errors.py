"""Exception hierarchy: every user-facing failure is a :class:`RobkdError`.

The CLI turns a :class:`RobkdError` into one line on stderr and exit code 2
(a traceback only with ``--debug``). Library code raises these instead of using
``assert`` so that bad input always produces a clear message.
"""

from __future__ import annotations


class RobkdError(Exception):
    """Base class of all errors caused by user input or environment."""

    exit_code = 2


class UsageError(RobkdError, ValueError):
    """A flag, option or argument has a bad value (bad eps string, unknown key...)."""


class ModelLoadError(RobkdError):
    """A model file is missing, corrupt, of unknown format, or does not match its architecture."""


class ArchitectureError(RobkdError, KeyError):
    """An architecture name is unknown or cannot be created."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it plain
        return str(self.args[0]) if self.args else ""


class IncompatibleModelsError(RobkdError):
    """Teacher and student cannot be compared (classes or input shape differ)."""


class DataError(RobkdError):
    """A dataset is missing, malformed, normalised already, or a subset is empty."""


class UnsupportedModelError(RobkdError):
    """An analysis (e.g. bound propagation) does not support some operators of the model.

    ``unsupported`` lists every offending operator, collected in one pass.
    """

    def __init__(self, message: str, unsupported: list[str] | None = None) -> None:
        super().__init__(message)
        self.unsupported = list(unsupported or [])


class EvaluationError(RobkdError):
    """An evaluation is unreliable (sanity check failed under ``--strict``)."""
