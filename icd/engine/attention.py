"""Attention specificity of an ICD teacher side over a dataset: lift and distinctness.

The frozen teacher detector gives the FPN maps of each image (in its own input frame: resize,
normalise, pad; its detector family's ``frame`` and ``features``), the distiller's teacher side
attends from each real instance, and ``icd.nn.attention_stats.AttentionStats`` reduces the maps
to lift and distinctness, overall and per FPN level (see that module for the definitions).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from icd.data.coco import CocoDetection
from icd.detection.adapters import DEFAULT_FAMILY, family_of, get_family
from icd.engine.feature_cache import TeacherFeatureCache
from icd.errors import ConfigError
from icd.nn.attention_stats import AttentionStats
from icd.ops import padding_mask

AUX_SEED = 0  # the fake instances and jitter of the auxiliary statistics


@torch.no_grad()
def attention_statistics(
    distiller: nn.Module,
    teacher: nn.Module,
    dataset: CocoDetection,
    level_names: Sequence[str],
    *,
    max_images: int | None = None,
    batch_size: int = 8,
    feature_cache: TeacherFeatureCache | None = None,
    detailed: bool = False,
    teacher_spec: Any = None,
    auxiliary: bool | None = None,
) -> dict[str, float]:
    """Mean lift and distinctness of ``distiller``'s real-instance attention on ``dataset``.

    Args:
        distiller: an ``icd.nn.ICDDistiller`` (its teacher side is used; nothing trains).
        teacher: the frozen teacher detector, built from ``teacher_spec`` (None: a torchvision
            detector); its family's ``frame`` and ``features`` give the maps.
        dataset: evaluation images and boxes (labels 0..C-1).
        level_names: names of the FPN levels, e.g. ["P3", ..., "P7"].
        max_images: use the first ``max_images`` images only (None: all).
        batch_size: images per teacher forward.
        feature_cache: reuse the teacher's maps of earlier calls (a run that evaluates the same
            teacher on the same images again); None: one teacher forward per batch.
        detailed: also the statistics per instance size, where the attention mass goes and
            what the auxiliary task makes of real and fake instances (``AttentionStats``'s
            ``detailed`` and ``add_auxiliary``; the fakes and jitter drawn from a generator seeded
            with ``AUX_SEED``, so that every evaluation of a run sees the same instances).
        auxiliary: the auxiliary task's statistics (overall; per size with ``detailed``);
            None: with ``detailed``.

    Returns:
        {"lift", "lift_P3", ..., "distinctness", "distinctness_P3", ..., "peak", "lift_count",
        "distinctness_count", "peak_count"}: means over the real instances (counts: how many
        instances); peak of the distillation weights, at the distiller's mask_temperature; with
        ``detailed`` the per-size and mass keys of ``AttentionStats``. Cells sit at the
        distiller's ``strides`` (when it has them).
    """
    family = get_family(DEFAULT_FAMILY) if teacher_spec is None else family_of(teacher_spec.detector)
    device = next(teacher.parameters()).device

    def compute(batch: torch.Tensor) -> list[torch.Tensor]:
        return family.features(teacher, teacher_spec, batch)

    was_training = teacher.training
    teacher.eval()
    stats = AttentionStats(level_names, detailed=detailed)
    strides = getattr(distiller, "strides", None)  # the levels' true strides (None: inferred)
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    auxiliary = detailed if auxiliary is None else auxiliary
    generator = torch.Generator(device=device).manual_seed(AUX_SEED) if auxiliary else None
    for start in range(0, count, batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, count))]
        items = [item for item in items if item is not None]  # skipped bad images
        if not items:
            continue
        images = [image.to(device) for image, _ in items]
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for _, t in items]
        frame = family.frame(teacher, teacher_spec, images, targets)
        features = compute(frame.images) if feature_cache is None else feature_cache.features(compute, images, frame)
        sizes, padded = frame.image_sizes.to(device), frame.padded_size
        boxes, labels = frame.boxes, frame.labels
        maps, shapes = distiller.instance_attention_maps(features, boxes, labels, sizes, padded, per_head=True)
        weights = maps
        if distiller.mask_temperature != 1.0:  # the distillation weights differ from the attention
            weights, _ = distiller.instance_attention_maps(
                features, boxes, labels, sizes, padded, temperature=distiller.mask_temperature, per_head=True
            )
        valid = ~padding_mask(sizes, shapes, padded, strides)
        for i, image_maps in enumerate(maps):
            stats.add_image(image_maps.mean(dim=1), boxes[i], valid[i], shapes, padded, weights[i], strides)
        if auxiliary:
            slots, logit, bce, error = distiller.auxiliary_slot_losses(
                features, boxes, labels, sizes, padded, generator=generator
            )
            for i in range(len(items)):
                stats.add_auxiliary(slots.boxes[i], slots.is_real[i], slots.is_valid[i], logit[i], bce[i], error[i])
    teacher.train(was_training)
    return stats.summary()


def checkpoint_attention_statistics(
    checkpoint: dict, teacher_path: str | None, dataset: CocoDetection, device: torch.device
) -> dict[str, float]:
    """Attention statistics of the ICD teacher side saved in ``checkpoint``: an ``icd train
    --distill icd`` checkpoint (its ``distiller``) or ``icd pretrain``'s teacher_side.pth /
    checkpoint.pth (its ``teacher_side``). The teacher is ``teacher_path`` or the run's own."""
    from icd.engine.run_spec import distiller_of_run, load_frozen_teacher

    run_args = checkpoint.get("args", {})
    state = checkpoint.get("distiller", checkpoint.get("teacher_side"))
    if state is None or run_args.get("distill", "icd") != "icd":
        raise ConfigError(
            "attention statistics need an ICD teacher side: an `icd train --distill icd` checkpoint "
            "or a file of `icd pretrain`"
        )
    teacher_path = teacher_path or run_args.get("teacher")
    if not teacher_path:
        raise ConfigError("attention statistics: the checkpoint names no teacher; give --teacher")
    teacher, spec = load_frozen_teacher(teacher_path, dataset.num_classes, device)
    distiller = distiller_of_run(run_args, spec, dataset.num_classes).to(device)
    distiller.load_state_dict(state, strict="distiller" in checkpoint)
    distiller.eval()
    names = family_of(spec.detector).feature_layout(spec).names
    return attention_statistics(distiller, teacher, dataset, names, teacher_spec=spec)
