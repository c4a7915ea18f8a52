"""Errors a user causes and can fix: the ``icd`` command prints them as one line, no traceback.

``icd`` exits with :attr:`IcdError.exit_code` (2: the input was rejected; 1: the run failed)
after printing ``icd: error: <message>``; ``--debug`` or ``ICD_DEBUG=1`` shows the traceback too.
Any other exception is an internal error and keeps its traceback.
"""

from __future__ import annotations


class IcdError(Exception):
    """Base of the errors a user can act on; the message names the flag, file or field."""

    exit_code = 2


class ConfigError(IcdError, ValueError):
    """Flags, presets or checkpoints that do not fit together (a missing --teacher, a resume
    into other settings, a teacher of other levels, weights of another shape)."""


class OutputDirError(IcdError, OSError):
    """An --output-dir that holds another run, or cannot be written."""


class NothingDoneError(IcdError, RuntimeError):
    """A run that made no optimiser step, or an evaluation over no image."""


class NonFiniteError(IcdError, FloatingPointError):
    """A loss or parameter became NaN or infinite: the run stops before writing it."""

    exit_code = 1


class WeightsMismatchError(ConfigError, KeyError):
    """A checkpoint whose tensors do not fit the model built from the flags (names or shapes)."""
