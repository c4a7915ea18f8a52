"""Auxiliary task that trains the teacher-side encoder and decoder (docs/method.md 4.3).

A head MLP(C, C, 5, 3 layers) on each decoded instance: output 0 tells real from fake
instances, outputs 1..4 regress the box from the jittered centre.
  L_conf = BCE-with-logits(logit, is_real), mean over the non-padding slots.
  t      = (cx' - x1, cy' - y1, x2 - cx', y2 - cy') / (w_i, h_i, w_i, h_i)
  L_reg  = sum over real slots of sum_j |sigmoid(out_j) - t_j| / (t_j + t_swap(j)),
           t_swap = t[2, 3, 0, 1] (the box width or height), / number of real slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icd.nn.mlp import MLP
from icd.nn.sampler import InstanceBatch

MIN_BOX_SIDE_PX = 1.0  # divisor floor of L_reg, so a zero-width box gives a finite loss


def regression_targets(instances: InstanceBatch) -> tuple[Tensor, Tensor]:
    """Targets t [N, K, 4] and their divisors t + t_swap [N, K, 4], fractions of the image."""
    image_wh = instances.image_sizes.flip(-1)[:, None, :]  # [N, 1, 2] (w, h)
    centre, boxes = instances.centers, instances.boxes
    near = (centre - boxes[..., :2]) / image_wh
    far = (boxes[..., 2:] - centre) / image_wh
    targets = torch.cat([near, far], dim=-1)
    side = (
        torch.maximum(boxes[..., 2:] - boxes[..., :2], torch.full_like(near, MIN_BOX_SIDE_PX))
        / image_wh
    )
    return targets, side.repeat(1, 1, 2)


class AuxiliaryTask(nn.Module):
    """Real/fake identification and box regression on the decoded instances.

    Args:
        channels: C, the width of the decoder's features.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.head = MLP(channels, channels, 5, num_layers=3)

    def forward(self, features: Tensor, instances: InstanceBatch) -> dict[str, Tensor]:
        """features [N, K, C] (a decoder layer's x2) -> {"aux_conf", "aux_reg"} (0-dim fp32).

        Slots without a target give 0 (connected to the head's parameters): no valid slot
        for aux_conf, no real slot for aux_reg.
        """
        _, bce, err = self.slot_losses(features, instances)
        valid, real = instances.is_valid, instances.is_real
        # masked sums rather than boolean indexing: fixed shapes, no host sync
        conf = torch.where(valid, bce, 0.0).sum() / valid.sum().clamp_min(1)
        reg = torch.where(real, err, 0.0).sum() / real.sum().clamp_min(1)
        return {"aux_conf": conf, "aux_reg": reg}

    def slot_losses(self, features: Tensor, instances: InstanceBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Each slot's terms: the real/fake logit, its BCE against "is real" and the box error
        (L_reg's sum over the four sides), all fp32 [N, K]; the error means something in real
        slots only, and neither in padding slots."""
        out = self.head(features)
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # [N, K, 5]
        logit = out[..., 0]
        bce = F.binary_cross_entropy_with_logits(logit, instances.is_real.to(out.dtype), reduction="none")
        targets, divisor = regression_targets(instances)
        err = ((out[..., 1:].sigmoid() - targets).abs() / divisor).sum(dim=-1)
        return logit, bce, err
