"""One spec of a run: the detector and the distiller a checkpoint holds, read in one place.

An ``icd train`` checkpoint stores its architecture as ``detector_spec`` (its detector family's
spec as a dict, with the family's name under ``"family"``: ``icd.detection.adapters``; a dict
without one is torchvision's ``DetectorSpec``) and its flags as ``args``; ``icd pretrain``'s
files store ``args``. Everything that
rebuilds a model from a file (the trainer's teacher, ``icd eval``, ``icd pretrain``, the
attention statistics, the demo's figure) goes through these functions::

    detector_spec_from_args(args, num_classes)    the spec ``icd train`` builds from its flags
    checkpoint_detector_spec(ckpt, source, ...)   the spec of a checkpoint (the rules below)
    load_detector(ckpt, ...)                      that detector with the checkpoint's weights
    load_frozen_teacher(path, ...)                ... checked finite, on a device, frozen
    checkpoint_categories(ckpt)                   its class names and category ids (or None)
    distiller_kwargs(run_args, teacher_spec, C)   ``build_distiller``'s arguments of a run

The spec of a checkpoint is the first of:

1. its ``detector_spec`` (every ``icd train`` checkpoint has one), read by its family;
2. its saved ``args`` of ``icd train``, read as the trainer read them when it trained
   (``detector_spec_from_args``, the family of its ``--detector``: for torchvision's, norm ``gn``
   unless it had ``--backbone-weights``), the number of classes from the data;
3. for a bare state dict: the caller's model flags (``icd train --teacher-*``, ``icd eval
   --detector/--backbone/...``), norm ``frozen_bn`` unless given (``BARE_STATE_DICT_NORM``:
   torchvision's detectors, where bare state dicts come from);

else a ``ConfigError`` naming the flags to give.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from icd.detection.adapters import family_of, family_of_spec
from icd.engine.checkpoint import load_checkpoint
from icd.engine.distill import build_distiller
from icd.engine.finite import first_non_finite
from icd.errors import ConfigError, NonFiniteError
from icd.nn.methods import get_method

BARE_STATE_DICT_NORM = "frozen_bn"  # rule 3's norm when no flag gives one
DEFAULT_DETECTOR = "retinanet"  # --detector's default, for saved args without one


def detector_spec_from_args(args: argparse.Namespace | Mapping[str, Any], num_classes: int) -> Any:
    """The detector ``icd train`` builds from its flags (a parsed Namespace or the saved ``args``
    dict of a checkpoint; a key missing from an old dict takes the spec's default): the spec of
    the family of ``--detector`` (``DetectorFamily.spec_from_args``).

    torchvision's: unset ``--norm``: ``frozen_bn`` with ``--backbone-weights``, else ``gn``; unset
    ``--trainable-backbone-layers``: 3 with ``--backbone-weights``, else 5.
    """
    values = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    return family_of(values.get("detector") or DEFAULT_DETECTOR).spec_from_args(values, num_classes)


def checkpoint_detector_spec(
    ckpt: Mapping[str, Any],
    source: str,
    num_classes: int | None = None,
    *,
    flags: Any = None,
    flags_hint: str = "give the detector's flags",
) -> Any:
    """The architecture of ``ckpt`` (its family's spec) by the rules of this module's docstring.

    Args:
        ckpt: a loaded checkpoint dict or bare state dict.
        source: how errors name it, e.g. ``"--teacher runs/t/checkpoint.pth"``.
        num_classes: the data's number of classes: checked against the spec (None: not checked;
            rule 2 then cannot apply).
        flags: rule 3's spec, from the caller's model flags (None: they were not given).
        flags_hint: the end of rule 3's error, which flags to give.
    """
    if "detector_spec" in ckpt:
        saved = ckpt["detector_spec"]
        spec = family_of_spec(saved, f"{source}: detector_spec").spec_from_dict(saved)
    elif _is_train_args(ckpt.get("args")) and num_classes is not None:
        spec = detector_spec_from_args(ckpt["args"], num_classes)
    elif flags is not None:
        spec = flags
    else:
        raise ConfigError(f"{source} holds no detector_spec (not written by icd train); {flags_hint}")
    if num_classes is not None and spec.num_classes != num_classes:
        raise ConfigError(f"{source} has {spec.num_classes} classes; the data has {num_classes}")
    return spec


def checkpoint_categories(ckpt: Mapping[str, Any]) -> list[dict] | None:
    """The ``[{"id", "name"}]`` of the classes a checkpoint was trained on, in label order; None for
    a checkpoint without them (a bare state dict, or written before icd saved class names)."""
    categories = ckpt.get("categories")
    if not isinstance(categories, list) or not all(
        isinstance(c, Mapping) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str) for c in categories
    ):
        return None
    return [{"id": int(c["id"]), "name": str(c["name"])} for c in categories]


def _is_train_args(args: Any) -> bool:
    return isinstance(args, Mapping) and args.get("detector") is not None and args.get("backbone") is not None


def build_loaded_detector(
    spec: Any, ckpt: Mapping[str, Any], what: str = "loaded", source: str = "the checkpoint"
) -> nn.Module:
    """The detector of ``spec`` (built by its family) with the checkpoint's weights loaded strictly
    (its ``model`` entry, or the bare state dict); ``what`` names the detector and ``source`` the
    file in a mismatch error."""
    family = family_of(spec.detector)
    model = family.build(spec)
    family.load_weights(model, ckpt, what=what, source=source)
    return model


def load_detector(
    checkpoint: str | Mapping[str, Any],
    num_classes: int | None = None,
    *,
    flags: Any = None,
    flags_hint: str = "give the detector's flags",
    what: str = "loaded",
    flag: str | None = None,
) -> tuple[nn.Module, Any]:
    """The detector of a checkpoint (a path or a loaded dict) with its weights, and its spec
    (``checkpoint_detector_spec``'s rules); in train mode, on the CPU, as its family builds it.
    ``flag`` (``"--teacher"``) names where the path came from in errors."""
    if isinstance(checkpoint, str):
        ckpt = load_checkpoint(checkpoint, flag)
        source = f"{flag} {checkpoint}" if flag else checkpoint
    else:
        ckpt, source = checkpoint, "the checkpoint"
    spec = checkpoint_detector_spec(ckpt, source, num_classes, flags=flags, flags_hint=flags_hint)
    return build_loaded_detector(spec, ckpt, what, source), spec


def load_frozen_teacher(
    path: str,
    num_classes: int,
    device: torch.device,
    *,
    flags: Any = None,
    flags_hint: str = "give --teacher-detector and --teacher-backbone",
) -> tuple[nn.Module, Any]:
    """The teacher of ``path`` in eval mode on ``device``, no parameter requiring gradients;
    NonFiniteError when a weight is NaN or inf."""
    teacher, spec = load_detector(
        path, num_classes, flags=flags, flags_hint=flags_hint, what="teacher", flag="--teacher"
    )
    bad = first_non_finite(teacher.state_dict().items())
    if bad is not None:
        raise NonFiniteError(f"--teacher {path}: its weight {bad} has NaN or inf values; it cannot teach")
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, spec


def distiller_kwargs(run_args: Mapping[str, Any], teacher_spec: Any, num_classes: int) -> dict[str, Any]:
    """``icd.engine.distill.build_distiller``'s arguments that fix the distiller of a run, from
    its flags (``vars(args)`` of a live ``icd train`` / ``icd pretrain``, or a checkpoint's saved
    ``args``): ``method`` (``--distill``, icd for ``icd pretrain``), the student's detector and
    feature widths (the teacher's for ``icd pretrain``, which has no student), the teacher's levels
    and strides (its family's ``feature_layout``), and the fields of the method's config (its
    registry entry's ``config_from_args``: the loss weight and its own flags, absent flags taking
    the config's defaults; ``build_distiller`` fills those left None from the detector family's
    ``method_defaults``). What only
    running needs (``warmup_iters``, ``annotation_file``, ``backend``, ``static_shapes``) the
    caller adds.
    """
    method = run_args.get("distill") or "icd"
    config = get_method(method).config_from_args(run_args)
    teacher_layout = family_of(teacher_spec.detector).feature_layout(teacher_spec)
    student_spec = teacher_spec
    if run_args.get("detector"):
        student_spec = detector_spec_from_args(run_args, num_classes)
    student = family_of(student_spec.detector)
    return {
        "method": method,
        "detector": student_spec.detector,
        "num_classes": num_classes,
        "teacher_channels": teacher_layout.width,
        "student_channels": student.feature_layout(student_spec).width,
        "num_levels": len(teacher_layout.levels),
        # the levels' true strides: the padded size need not be a multiple of P6/P7's
        "strides": list(teacher_layout.strides),
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(config)},
    }


def distiller_of_run(
    run_args: Mapping[str, Any], teacher_spec: Any, num_classes: int, *, warmup_iters: int = 0
) -> nn.Module:
    """The distiller a finished run built (``distiller_kwargs``), freshly initialised: load the
    checkpoint's ``distiller`` (or ``icd pretrain``'s ``teacher_side``) state dict into it."""
    return build_distiller(**distiller_kwargs(run_args, teacher_spec, num_classes), warmup_iters=warmup_iters)
