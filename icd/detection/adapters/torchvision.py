"""torchvision's detectors (RetinaNet, FCOS, Faster R-CNN, Mask R-CNN on ResNet + FPN) as a family.

The adapter of ``icd.detection.models`` (build, ``DetectorSpec``), ``feature_tap`` (the student's
FPN maps and frame), ``input_contract`` (the ``GeneralizedRCNNTransform`` settings teacher and
student must share) and ``inherit`` (neck and head). The distilled features are the FPN's
P_min..P_max, stride 2**l, ``fpn_channels`` wide; the input frame is the one
``GeneralizedRCNNTransform`` makes (resized to min_size/max_size, normalised, padded to a multiple
of 32). The two-stage detectors keep label 0 for the background: this adapter adds
``DetectorSpec.label_offset`` to the dataset's labels on the way in and removes it on the way out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from icd.detection.adapters.base import DetectorFamily, FeatureLayout, InputFrame
from icd.detection.feature_tap import FeatureTap
from icd.detection.inherit import INHERITABLE_PARTS, part_prefixes
from icd.detection.input_contract import TRANSFORM_FIELDS, _transform_fields
from icd.detection.models import (
    BACKBONES,
    DEFAULT_LEVELS,
    DETECTORS,
    MASK_DETECTORS,
    TWO_STAGE_DETECTORS,
    DetectorSpec,
    build_detector,
)

# The SGD learning rate per 16 images of torchvision's references/detection recipes.
BASE_LR_PER_16_IMAGES = {"retinanet": 0.01, "fcos": 0.01, "fasterrcnn": 0.02, "maskrcnn": 0.02}
# ICD's defaults per detector (docs/method.md 4.4): lambda = 8 for the one-stage detectors, 3 for
# Faster R-CNN; instance slots (real + fake instances per image) 300, 100 for the two-stage ones.
ICD_LOSS_WEIGHT = {"retinanet": 8.0, "fcos": 8.0, "fasterrcnn": 3.0, "maskrcnn": 3.0}
ICD_MAX_LABELS = {"retinanet": 300, "fcos": 300, "fasterrcnn": 100, "maskrcnn": 100}
_SPEC_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DetectorSpec)}


def spec_from_flags(values: Mapping[str, Any], num_classes: int) -> DetectorSpec:
    """The ``DetectorSpec`` of ``icd train``'s flags (``vars(args)`` or a checkpoint's saved ``args``;
    a flag absent or None takes DetectorSpec's default).

    Unset ``--norm``: ``frozen_bn`` with ``--backbone-weights``, else ``gn``; unset
    ``--trainable-backbone-layers``: 3 with ``--backbone-weights``, else 5.
    """

    def get(key: str) -> Any:
        value = values.get(key)
        return _SPEC_DEFAULTS[key] if value is None else value

    weights = values.get("backbone_weights")
    trainable = values.get("trainable_backbone_layers")
    return DetectorSpec(
        detector=get("detector"),
        backbone=get("backbone"),
        num_classes=num_classes,
        fpn_channels=get("fpn_channels"),
        min_level=values.get("min_level"),
        max_level=values.get("max_level"),
        norm=values.get("norm") or ("frozen_bn" if weights else "gn"),
        trainable_layers=(3 if weights else 5) if trainable is None else trainable,
        min_size=get("min_size"),  # a list or one int: DetectorSpec makes it a tuple
        max_size=get("max_size"),
        score_thresh=get("score_thresh"),
    )


class TorchvisionFamily(DetectorFamily):
    """torchvision's RetinaNet, FCOS, Faster R-CNN and Mask R-CNN (``icd.detection.models``)."""

    name = "torchvision"
    detectors = DETECTORS
    backbones = BACKBONES
    spec_type = DetectorSpec
    inheritable_parts = INHERITABLE_PARTS
    scale_settings = ("transform.min_size", "transform.max_size")

    # -- the spec -------------------------------------------------------------------------------
    def spec_from_args(self, values: Mapping[str, Any], num_classes: int) -> DetectorSpec:
        return spec_from_flags(values, num_classes)

    # -- building -------------------------------------------------------------------------------
    def build(
        self, spec: DetectorSpec, backbone_weights: Mapping[str, Tensor] | None = None,
        source: str = "backbone weights",
    ) -> nn.Module:
        return build_detector(spec, backbone_weights, source)

    # -- features and frame ---------------------------------------------------------------------
    def feature_layout(self, spec: DetectorSpec) -> FeatureLayout:
        levels = tuple(spec.levels)
        return FeatureLayout(levels, tuple(float(2**level) for level in levels), (spec.fpn_channels,) * len(levels))

    def tap(self, model: nn.Module, spec: DetectorSpec) -> FeatureTap:
        return FeatureTap(model, label_offset=spec.label_offset)

    def features(self, model: nn.Module, spec: DetectorSpec, images: Tensor) -> list[Tensor]:
        return list(model.backbone(images).values())

    def frame(
        self, model: nn.Module, spec: DetectorSpec, images: list[Tensor], targets: list[dict] | None = None, *,
        augment: bool = False,
    ) -> InputFrame:
        transform = model.transform
        was_training = transform.training
        transform.train(augment)  # multi-scale resizing only in training mode
        try:
            image_list, resized = transform(images, targets)
        finally:
            transform.train(was_training)
        device = image_list.tensors.device
        sizes = torch.tensor([list(s) for s in image_list.image_sizes], dtype=torch.long, device=device)
        boxes = labels = None
        if resized is not None:
            boxes = [t["boxes"] for t in resized]
            labels = [t["labels"] for t in resized]
        return InputFrame(image_list.tensors, sizes, boxes, labels)

    def set_input_size(self, model: nn.Module, min_size: Sequence[int] | None, max_size: int | None) -> None:
        if min_size is not None:
            model.transform.min_size = tuple(min_size)
        if max_size is not None:
            model.transform.max_size = max_size

    def frame_settings(self, model: nn.Module) -> dict[str, Any]:
        fields = _transform_fields(model, type(model).__name__)
        return {f"transform.{name}": fields[name] for name in TRANSFORM_FIELDS}

    # -- training -------------------------------------------------------------------------------
    def losses(
        self, model: nn.Module, spec: DetectorSpec, images: list[Tensor], targets: list[dict]
    ) -> dict[str, Tensor]:
        offset = spec.label_offset
        if offset:
            targets = [{**t, "labels": t["labels"] + offset} for t in targets]
        return dict(model(images, targets))

    def compiled_parts(self, model: nn.Module) -> list[nn.Module]:
        """The ResNet body and the FPN (the bulk of the work, with fixed-rank tensor inputs; the
        transform, anchors, losses and post-processing stay eager, they depend on box counts)."""
        return [model.backbone.body, model.backbone.fpn]

    def feature_module(self, model: nn.Module) -> nn.Module:
        return model.backbone

    # -- inheritance ----------------------------------------------------------------------------
    def part_prefixes(self, spec: DetectorSpec, parts: Iterable[str]) -> tuple[str, ...]:
        return part_prefixes(spec.detector, parts)

    # -- defaults -------------------------------------------------------------------------------
    def default_levels(self, detector: str) -> tuple[int, int]:
        return DEFAULT_LEVELS[detector]

    def method_defaults(self, detector: str, method: str) -> dict[str, Any]:
        if method == "icd":
            return {"loss_weight": ICD_LOSS_WEIGHT[detector], "max_labels": ICD_MAX_LABELS[detector]}
        return {}

    def base_lr(self, detector: str) -> float:
        return BASE_LR_PER_16_IMAGES[detector]

    # -- evaluation -----------------------------------------------------------------------------
    def needs_masks(self, detector: str) -> bool:
        return detector in MASK_DETECTORS

    def best_metric(self, detector: str, metrics: Mapping[str, float]) -> str:
        """Mask AP for Mask R-CNN (when the val split has segmentations), else box AP."""
        return "segm_AP" if detector in MASK_DETECTORS and "segm_AP" in metrics else "AP"

    def predict(self, model: nn.Module, spec: DetectorSpec, images: list[Tensor]) -> list[dict[str, Tensor]]:
        outputs = [dict(out) for out in model(images)]
        if spec.label_offset:
            for out in outputs:
                out["labels"] = out["labels"] - spec.label_offset
        return outputs


__all__ = ["BASE_LR_PER_16_IMAGES", "ICD_LOSS_WEIGHT", "ICD_MAX_LABELS", "TWO_STAGE_DETECTORS", "TorchvisionFamily"]
