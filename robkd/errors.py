"""Exception hierarchy: every user-facing failure is a :class:`RobkdError`.

The CLI turns a :class:`RobkdError` into one line on stderr and exit code 2
(a traceback only with ``--debug``). Library code raises these instead of using
``assert`` so that bad input always produces a clear message.

Exit codes of every ``robkd`` command (one table, shown by ``robkd --help`` and the README):

====  ===========================================================================================
0     success; every gate passed (or no gate was given)
1     a gate failed (or the default verdict under ``--enforce-default-verdict``), and nothing else
2     bad input or environment: flags, specs, gates, model or data files, a model that fails or
      returns malformed outputs, filesystem errors (read-only, disk full), out of memory, a locked
      ``--out``, a ``--time-limit`` reached (finished work kept for ``--resume``); one line on stderr
3     sanity flags raised under ``--strict`` (results are still written)
4     internal error: a bug in robkd (one line; ``--debug`` shows the traceback; please report it)
130   interrupted (Ctrl-C)
====  ===========================================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_SANITY = 3
EXIT_INTERNAL = 4
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """exit codes:
  0    success; every gate passed (or no gate was given)
  1    a gate failed (or the default verdict under --enforce-default-verdict),
       and nothing else
  2    bad input or environment: flags, specs, gates, model or data files, a model that
       fails or returns malformed outputs, training that diverged, filesystem errors,
       out of memory, an --out another run is writing, a --time-limit reached
       (finished work kept for --resume); one line on stderr
  3    sanity flags under --strict (results are still written)
  4    internal error: a robkd bug (rerun with --debug and report it)
  130  interrupted
"""


class RobkdError(Exception):
    """Base class of all errors caused by user input or environment."""

    exit_code = EXIT_BAD_INPUT


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


class ModelRuntimeError(RobkdError):
    """A user's model failed while robkd ran it (raised, returned malformed outputs, failed under
    gradients, ran out of memory)."""


class OutputError(RobkdError):
    """An output location cannot be written (read-only, not a directory, disk full, locked by another run)."""


class TrainingDivergedError(RobkdError):
    """Training reached a non-finite loss or non-finite weights; it stopped, keeping the last good training state."""
