"""Errors a user causes and can fix: the ``icd`` command prints them as one line, no traceback.

``icd`` exits with :attr:`IcdError.exit_code` (2: the input was rejected; 1: the run failed;
130: stopped by Ctrl-C) after printing ``icd: error: <message>``; ``--debug`` or ``ICD_DEBUG=1``
shows the traceback too. Any other exception is an internal error and keeps its traceback.

Input a user gives (flags, configs, data files, checkpoints, environment variables, API
arguments) that cannot be used raises a :class:`UserInputError`, whose message has one shape,
``<where>: <what>``: where names the flag, file (and line or field) or argument, what says what
was found and what was expected::

    raise CheckpointError("--teacher runs/t/checkpoint.pth", "not a torch checkpoint (truncated)")
"""

from __future__ import annotations


class IcdError(Exception):
    """Base of the errors a user can act on; the message names the flag, file or field."""

    exit_code = 2


class UserInputError(IcdError):
    """Input that icd cannot use, found where it is read: ``<where>: <what>``.

    Built as ``UserInputError(where, what)``, or ``UserInputError(message)`` with the message
    already in that shape.
    """

    def __init__(self, where: str, what: str | None = None) -> None:
        super().__init__(where if what is None else f"{where}: {what}")
        self.where = where if what is not None else None
        self.what = what


class ConfigError(UserInputError, ValueError):
    """Flags, presets or checkpoints that do not fit together (a missing --teacher, a resume
    into other settings, a teacher of other levels, weights of another shape)."""


class ArgumentError(UserInputError, ValueError):
    """A library argument out of its range (``ICDDistiller(heads=0)``, ``eps=inf``); the
    message names the function and the argument."""


class DataFileError(UserInputError, ValueError):
    """A data file (annotations, labels, images) that cannot be used; the message names the file
    and the line, field or id."""


class EnvironmentSettingError(UserInputError, ValueError):
    """An ``ICD_*`` environment variable with a value icd does not know."""


class CheckpointError(UserInputError, ValueError):
    """A file given as a checkpoint (``--teacher``, ``--resume``, ``--icd-init``, ``--checkpoint``,
    ``--backbone-weights``) that is no readable torch checkpoint, or not of the expected kind."""


class OutputDirError(UserInputError, OSError):
    """An --output-dir that holds another run, is in use, or cannot be written."""


class NothingDoneError(IcdError, RuntimeError):
    """A run that made no optimiser step, or an evaluation over no image."""


class RunFailedError(IcdError, RuntimeError):
    """A run that ``icd study`` or ``icd demo`` started ended with an error; the message has its
    name, its exit status, the last line of its log and the log's path."""

    exit_code = 1


class NonFiniteError(IcdError, FloatingPointError):
    """A loss or parameter became NaN or infinite: the run stops before writing it."""

    exit_code = 1


class InterruptedRun(IcdError):
    """Ctrl-C (SIGINT) during a run: it stopped cleanly with a checkpoint to ``--resume`` from."""

    exit_code = 130


class WeightsMismatchError(ConfigError, KeyError):
    """A checkpoint whose tensors do not fit the model built from the flags (names or shapes)."""
