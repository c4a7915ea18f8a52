"""The engine's side of the distillation methods of ``icd.nn.methods`` (the registry).

Every method's distiller takes the same call as ICDDistiller::

    distiller(teacher_features, student_features, boxes, labels, image_sizes, padded_size)
        -> dict of named losses

with L maps [N, C_t, H_l, W_l] / [N, C_s, H_l, W_l] of the same levels and sizes, boxes N x
[n_i, 4] in the padded input frame, labels N x [n_i] in 0..C-1, image_sizes [N, 2]. The names,
settings, defaults, builders and flags are the registry's entries; this module builds from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import nn

from icd.detection.adapters import family_of
from icd.detection.adapters.torchvision import ICD_LOSS_WEIGHT  # noqa: F401  (torchvision's lambda per detector)
from icd.errors import ConfigError
from icd.nn.methods import METHODS, DistillTarget, get_method
from icd.nn.methods.fpn_mse import (  # noqa: F401  (the names the engine offered before the registry)
    FPN_MSE_LOSS_WEIGHT,
    FPN_MSE_NORMS,
    NORM_EPS,
    FpnMseDistiller,
    _valid_maps,
)
from icd.nn.methods.icd import PRETRAINED_MASK_TEMPERATURE, check_icd_heads  # noqa: F401

DISTILL_METHODS = tuple(METHODS)  # the names registered when the engine was imported


def check_static_slots(distiller: nn.Module, most_instances: int, where: str) -> None:
    """ICD's static layout holds at most ``max_labels`` boxes per image: refuse a training set
    with more (``most_instances`` in one image of ``where``) before any step, rather than at the
    step that meets that image."""
    sampler = getattr(distiller, "sampler", None)
    if sampler is None or not sampler.static_shapes or most_instances <= sampler.max_labels:
        return
    raise ConfigError(
        f"--icd-static-shapes: an image of {where} has {most_instances} annotations, more than the "
        f"{sampler.max_labels} instance slots (--icd-max-labels); raise --icd-max-labels or drop "
        "--icd-static-shapes"
    )


def build_distiller(
    method: str,
    *,
    detector: str,
    num_classes: int,
    teacher_channels: int,
    student_channels: int,
    num_levels: int,
    warmup_iters: int = 0,
    annotation_file: str | None = None,
    backend: str | None = None,
    static_shapes: bool = False,
    strides: Sequence[float] | None = None,
    **settings: Any,
) -> nn.Module:
    """The distiller of the registered ``method`` (``icd.nn.methods.METHODS``) for these features.

    ``settings``: fields of the method's config dataclass (``loss_weight``, ICD's ``heads``,
    FPN-MSE's ``norm``, ...), as ``run_spec.distiller_kwargs`` gives them; the ones not given or
    None take the detector family's ``method_defaults`` for ``detector``, then the config's own.
    ``strides``: the level strides in input pixels (2**l for P_l; None: inferred per batch). A
    method without a distiller (``none``) is a ValueError: the trainer then only inherits from the
    teacher.
    """
    entry = get_method(method)
    if entry.build is None:
        names = " or ".join(n for n, m in METHODS.items() if m.build is not None)
        raise ValueError(f"distill method {method!r}: no distiller to build; expected {names}")
    fields = {f.name for f in dataclasses.fields(entry.config)}
    for key, value in family_of(detector).method_defaults(detector, method).items():
        if key in fields and settings.get(key) is None:
            settings[key] = value
    try:
        config = entry.config(**settings)
    except TypeError as err:
        raise ConfigError(f"--distill {method}", f"settings {sorted(settings)}: {err}") from None
    target = DistillTarget(
        detector=detector,
        num_classes=num_classes,
        teacher_channels=teacher_channels,
        student_channels=student_channels,
        num_levels=num_levels,
        strides=None if strides is None else [float(s) for s in strides],
        warmup_iters=warmup_iters,
        annotation_file=annotation_file,
        backend=backend,
        static_shapes=static_shapes,
    )
    return entry.build(config, target)
