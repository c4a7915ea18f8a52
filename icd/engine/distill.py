"""The two distillers the trainer offers: ICD (icd.nn.ICDDistiller) and plain FPN feature MSE.

Both take the same call as ICDDistiller::

    distiller(teacher_features, student_features, boxes, labels, image_sizes, padded_size)
        -> dict of named losses

with L maps [N, C_t, H_l, W_l] / [N, C_s, H_l, W_l] of the same levels and sizes, boxes N x
[n_i, 4] in the padded input frame, labels N x [n_i] in 0..C-1, image_sizes [N, 2].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

DISTILL_METHODS = ("icd", "fpn-mse")
# SPEC 4.4: lambda = 8 for the one-stage detectors, 3 for Faster R-CNN.
ICD_LOSS_WEIGHT = {"retinanet": 8.0, "fcos": 8.0, "fasterrcnn": 3.0, "maskrcnn": 3.0}
FPN_MSE_LOSS_WEIGHT = 1.0


class FpnMseDistiller(nn.Module):
    """Mean squared error between adapted student FPN maps and the teacher's, averaged over levels.

    A 1x1 conv per level maps C_s to C_t when they differ (identity otherwise). The whole
    module is student side: it trains with the student's optimiser.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_levels: int,
        loss_weight: float = FPN_MSE_LOSS_WEIGHT,
    ) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        if student_channels == teacher_channels:
            self.adapters = nn.ModuleList(nn.Identity() for _ in range(num_levels))
        else:
            self.adapters = nn.ModuleList(
                nn.Conv2d(student_channels, teacher_channels, 1) for _ in range(num_levels)
            )

    def forward(
        self,
        teacher_features: Sequence[Tensor],
        student_features: Sequence[Tensor],
        boxes=None,
        labels=None,
        image_sizes=None,
        padded_size=None,
    ) -> dict[str, Tensor]:
        if len(teacher_features) != len(self.adapters) or len(student_features) != len(
            self.adapters
        ):
            raise ValueError(
                f"FpnMseDistiller: got {len(teacher_features)} teacher and {len(student_features)} "
                f"student levels; expected {len(self.adapters)} each"
            )
        losses = []
        for adapter, t, s in zip(self.adapters, teacher_features, student_features, strict=True):
            if t.shape[-2:] != s.shape[-2:]:
                raise ValueError(
                    f"FpnMseDistiller: level sizes differ, teacher {list(t.shape)} "
                    f"student {list(s.shape)}"
                )
            losses.append(nn.functional.mse_loss(adapter(s).float(), t.detach().float()))
        return {"distill": self.loss_weight * torch.stack(losses).mean()}

    def student_side_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def teacher_side_parameters(self) -> list[nn.Parameter]:
        return []

    def step(self) -> None:
        """No warm-up: nothing to count."""


def build_distiller(
    method: str,
    *,
    detector: str,
    num_classes: int,
    teacher_channels: int,
    student_channels: int,
    num_levels: int,
    loss_weight: float | None,
    warmup_iters: int,
    annotation_file: str | None = None,
    heads: int = 8,
    num_layers: int = 1,
    max_labels: int | None = None,
    neg_ratio: float = 5.0,
    backend: str | None = None,
    static_shapes: bool = False,
) -> nn.Module:
    """ICD (with the class prior of the training annotations) or the FPN-MSE peer.

    ``static_shapes``: ICD's fixed instance-slot layout (for torch.compile / CUDA graphs).
    """
    if method == "fpn-mse":
        weight = FPN_MSE_LOSS_WEIGHT if loss_weight is None else loss_weight
        return FpnMseDistiller(student_channels, teacher_channels, num_levels, weight)
    if method != "icd":
        raise ValueError(f"distill method {method!r}; expected one of {DISTILL_METHODS}")
    from icd.nn import ClassPrior, ICDDistiller

    prior = (
        ClassPrior.from_coco(annotation_file, num_classes=num_classes)
        if annotation_file
        else ClassPrior.uniform(num_classes)
    )
    if max_labels is None:
        max_labels = 100 if detector in ("fasterrcnn", "maskrcnn") else 300
    return ICDDistiller(
        num_classes,
        teacher_channels=teacher_channels,
        student_channels=student_channels,
        heads=heads,
        loss_weight=ICD_LOSS_WEIGHT[detector] if loss_weight is None else loss_weight,
        warmup_iters=warmup_iters,
        neg_ratio=neg_ratio,
        max_labels=max_labels,
        prior=prior,
        num_layers=num_layers,
        backend=backend,
        static_shapes=static_shapes,
    )
