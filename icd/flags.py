"""Checked value types of ``icd`` flags and the check that distillation flags have a teacher.

The types are argparse ``type=`` callables that :mod:`icd.config` also applies to a preset's
values, so ``--batch-size 0`` and ``batch_size = 0`` in a ``--config`` file are the same error::

    p.add_argument("--batch-size", type=int_at_least(1))     # "0: expected an integer >= 1"
    p.add_argument("--lr", type=finite_float(above=0.0))     # "nan: expected a finite number > 0"
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from typing import Any

from icd.errors import ConfigError
from icd.ops.validation import in_range, range_text


class CheckedType:
    """A callable argparse type: converts with ``base`` (int or float), then checks the range.

    ``base`` lets :mod:`icd.config` tell which TOML values fit (integers for int flags, numbers
    for float flags) before the range is checked.
    """

    def __init__(
        self,
        base: type,
        *,
        minimum: float | None = None,
        above: float | None = None,
        maximum: float | None = None,
        below: float | None = None,
    ) -> None:
        self.base = base
        self.bounds = {"minimum": minimum, "above": above, "maximum": maximum, "below": below}
        self.expected = range_text(base is int, **self.bounds)
        self.__name__ = base.__name__  # argparse names the type in its "invalid ... value" error

    def __call__(self, text: Any) -> int | float:
        try:
            value = self.base(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {self.expected}") from None
        if not in_range(value, **self.bounds):
            raise argparse.ArgumentTypeError(f"{text}: expected {self.expected}")
        return value

    def __repr__(self) -> str:
        return f"CheckedType({self.expected})"


def int_at_least(minimum: int) -> CheckedType:
    """An integer >= ``minimum`` (sizes, counts, frequencies)."""
    return CheckedType(int, minimum=minimum)


def finite_float(
    *, minimum: float | None = None, above: float | None = None, maximum: float | None = None,
    below: float | None = None,
) -> CheckedType:  # fmt: skip
    """A finite float within the given bounds (lr, momentum, weight decay, loss weights)."""
    return CheckedType(float, minimum=minimum, above=above, maximum=maximum, below=below)


DATA_WORKERS = 4  # torchvision's references/detection default, capped by default_workers()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or taskset's share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """``--workers``' default: 4 data loading processes, at most the CPUs available (more make torch's
    DataLoader warn and only compete with the training process)."""
    return min(DATA_WORKERS, available_cpus())


# flags that only mean something with --teacher: every --icd-*, --distill*, --teacher-*,
# --<method>-* flag of a registered distillation method (icd.nn.methods; so flags added later are
# covered) and --inherit-teacher
_TEACHER_ONLY_PREFIXES = ("icd_", "distill", "teacher_")
_TEACHER_ONLY = ("inherit_teacher",)


def teacher_only(dest: str) -> bool:
    """Whether the train flag stored in ``dest`` needs --teacher."""
    from icd.nn.methods import METHODS  # imported here: `icd --help` imports no torch

    methods = tuple(name.replace("-", "_") + "_" for name in METHODS)
    return dest.startswith(_TEACHER_ONLY_PREFIXES + methods) or dest in _TEACHER_ONLY


def check_teacher_flags(
    args: argparse.Namespace, given: Iterable[str], preset: str | None = None
) -> None:
    """ConfigError when a distillation flag is set (``given``: dests set on the command line or
    by the --config preset) but --teacher is not."""
    if getattr(args, "teacher", None):
        return
    stray = sorted(dest for dest in set(given) if teacher_only(dest))
    if not stray:
        return
    flags = ", ".join(f"--{d.replace('_', '-')} {_shown(getattr(args, d, None))}" for d in stray)
    where = f" (command line or --config {preset})" if preset else ""
    raise ConfigError(
        f"{flags}{where}: distillation flags need --teacher CKPT; without a teacher the run is plain "
        "training and they would be ignored"
    )


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)
