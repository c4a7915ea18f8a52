"""The registry of distillation methods: one ``DistillMethod`` entry per ``--distill`` name.

An entry holds everything the rest of icd needs to offer a method:

- ``config``: a dataclass of the method's settings, each with its default (stated once, here);
- ``config_from_args``: that config from a run's flags (``vars(args)`` of ``icd train`` /
  ``icd pretrain``, or a checkpoint's saved ``args``; a flag missing from an old dict takes the
  config's default);
- ``build``: the distiller from the config and the detector's features (``DistillTarget``), or
  None for ``none``;
- ``add_flags``: its flags, added to a command's argparse group (``icd train --help`` lists them).

The engine (``icd/engine/distill.py``, ``run_spec.py``), ``icd/cli.py`` and ``icd study`` read
``METHODS``; a new method is one module (its distiller, config, builder, flags) and one entry
(``register_method``). Every distiller takes the call::

    distiller(teacher_features, student_features, boxes, labels, image_sizes, padded_size)
        -> dict of named losses ("distill" and any more)

and has ``student_side_parameters()``, ``teacher_side_parameters()`` and ``step()``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from icd.errors import ConfigError


@dataclass(frozen=True)
class DistillTarget:
    """What a method is built for: the detector pair's distilled features and the run's settings.

    detector: the student's detector name (``retinanet``, ...), for per-detector defaults.
    num_classes: C, labels in 0..C-1.
    teacher_channels / student_channels: the FPN widths (channels) of the two sides.
    num_levels: L, the levels distilled (P_l pairs of equal sizes).
    strides: the levels' strides in input pixels (2**l for P_l); None: inferred per batch.
    warmup_iters: iterations with the student's features detached (methods that warm up).
    annotation_file: the training annotations (ICD's class prior); None: uniform.
    backend: the ``icd.ops`` backend; None: the device's default.
    static_shapes: fixed instance-slot layouts (torch.compile / CUDA graphs).
    """

    detector: str
    num_classes: int
    teacher_channels: int
    student_channels: int
    num_levels: int
    strides: Sequence[float] | None = None
    warmup_iters: int = 0
    annotation_file: str | None = None
    backend: str | None = None
    static_shapes: bool = False


@dataclass(frozen=True)
class DistillMethod:
    """One ``--distill`` method: see this module's docstring.

    name: the ``--distill`` value.
    summary: its words in ``--distill``'s help.
    weight_default: its ``--distill-weight`` default in words (``--distill-weight``'s help).
    config: its settings dataclass (``loss_weight: float | None``, None: the method's default).
    config_from_args: (run flags mapping) -> config.
    build: (config, DistillTarget) -> distiller module; None: the method has no distiller.
    add_flags: (argparse group, command "train" or "pretrain") -> None.
    """

    name: str
    summary: str
    weight_default: str
    config: type
    config_from_args: Callable[[Mapping[str, Any]], Any]
    build: Callable[[Any, DistillTarget], nn.Module] | None
    add_flags: Callable[[Any, str], None] = lambda group, command: None


METHODS: dict[str, DistillMethod] = {}


def register_method(method: DistillMethod) -> DistillMethod:
    """Add ``method`` to ``METHODS`` (``--distill`` offers it from the next parser built); a name
    taken already is a ValueError."""
    if method.name in METHODS:
        raise ValueError(f"register_method: a distillation method {method.name!r} is registered already")
    if not dataclasses.is_dataclass(method.config):
        raise ValueError(f"register_method: {method.name!r}'s config {method.config!r} is not a dataclass")
    METHODS[method.name] = method
    return method


def get_method(name: str, where: str = "--distill") -> DistillMethod:
    """The entry of ``name``; a ConfigError naming ``where`` and the registered names if none."""
    method = METHODS.get(name)
    if method is None:
        raise ConfigError(f"{where} {name}", f"no such distillation method; expected one of {list(METHODS)}")
    return method


def config_from_flags(config: type, args: Mapping[str, Any], flags: Mapping[str, str]) -> Any:
    """``config(**{field: args[flag]})`` for the ``flag -> field`` pairs present in ``args`` (and not
    None); the other fields keep their defaults. ``loss_weight`` comes from ``distill_weight``."""
    pairs = {"distill_weight": "loss_weight", **flags}
    values = {field: args[flag] for flag, field in pairs.items() if args.get(flag) is not None}
    return config(**values)


@dataclass(frozen=True)
class NoConfig:
    """The settings of ``none``: nothing but the (unused) loss weight."""

    loss_weight: float | None = None


NONE = DistillMethod(
    name="none",
    summary="none (no distillation loss: with --inherit-teacher, the inheritance-only control)",
    weight_default="none: unused",
    config=NoConfig,
    config_from_args=lambda args: NoConfig(),
    build=None,
)


def distilling_methods() -> list[str]:
    """The registered names that build a distiller (all but ``none``), in registration order."""
    return [name for name, method in METHODS.items() if method.build is not None]


def add_method_flags(group: argparse._ArgumentGroup, command: str) -> None:
    """Every registered method's flags for ``command`` ("train" or "pretrain"), in registration order."""
    for method in METHODS.values():
        method.add_flags(group, command)
