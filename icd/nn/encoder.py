"""Instance encoder: descriptor of each instance slot, then an MLP to a query vector (docs/method.md 4.1).

Descriptor of an instance, num_classes + 266 values:
  one-hot class (num_classes)
  ++ sine embedding of the jittered centre x (128), then y (128), as fractions of the
     image's own width and height: angle_j = 2*pi*c / 10000^(2j/128), j = 0..63, giving the
     64 sin(angle_j) then the 64 cos(angle_j)
  ++ scale indicator: for the box width, then height, in pixels:
     bin = clamp(floor(log2(size) - 5), 0, 4), one-hot of 5 each (10 values).
Padding slots get an all-zero descriptor.

``position_scale`` s (default 1, the paper's) multiplies the centre fractions before the sine
embedding (angle_j = 2*pi*s*c / 10000^(2j/128)), so that its finest period is 1/s of the image
instead of the whole image; the decoder's key position embedding takes the same s
(``ICDDistiller``). Dense scenes of small objects need it: neighbours a few pixels apart are
otherwise a fraction of a radian apart at the finest frequency (docs/training.md, Dense scenes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icd.nn.mlp import MLP
from icd.nn.sampler import InstanceBatch

CENTRE_FEATS = 128  # sine features per coordinate
CENTRE_TEMPERATURE = 10000.0
SCALE_BINS = 5
SCALE_OFFSET = 5  # log2(32): boxes up to 64 px fall in bin 0


def centre_embedding(coord: Tensor, num_feats: int = CENTRE_FEATS, position_scale: float = 1.0) -> Tensor:
    """Sine embedding of coordinates in [0, 1]: [...] -> [..., num_feats] (sin half, cos half);
    ``position_scale`` multiplies the coordinates first."""
    half = num_feats // 2
    j = torch.arange(half, device=coord.device, dtype=torch.float32)
    freq = CENTRE_TEMPERATURE ** (2 * j / num_feats)
    angles = 2 * math.pi * position_scale * coord.float()[..., None] / freq
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def scale_indicator(size_px: Tensor) -> Tensor:
    """One-hot log2 size bin of each box side: [..., 2] (w, h) pixels -> [..., 10]."""
    log_size = torch.log2(size_px.float().clamp_min(1e-6))
    bins = torch.floor(log_size - SCALE_OFFSET).clamp(0, SCALE_BINS - 1).long()
    return F.one_hot(bins, SCALE_BINS).flatten(-2).float()


def instance_descriptor(instances: InstanceBatch, num_classes: int, position_scale: float = 1.0) -> Tensor:
    """float [N, K, num_classes + 266] descriptor of every slot (zeros in padding)."""
    one_hot = F.one_hot(instances.labels.clamp_min(0), num_classes).float()
    centre = instances.normalized_centers
    position = torch.cat(
        [
            centre_embedding(centre[..., 0], position_scale=position_scale),
            centre_embedding(centre[..., 1], position_scale=position_scale),
        ],
        dim=-1,
    )
    scale = scale_indicator(instances.box_sizes)
    descriptor = torch.cat([one_hot, position, scale], dim=-1)
    return descriptor * instances.is_valid[..., None]


def descriptor_size(num_classes: int) -> int:
    return num_classes + 2 * CENTRE_FEATS + 2 * SCALE_BINS


class InstanceEncoder(nn.Module):
    """Instance descriptor -> query vector: MLP(num_classes + 266, C, C, 3 layers, ReLU).

    Args:
        num_classes: classes of the one-hot part.
        channels: C, the decoder width (the teacher's FPN channels).
        position_scale: multiplies the centre fractions before their sine embedding (module
            docstring).
    """

    def __init__(self, num_classes: int, channels: int, position_scale: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.position_scale = float(position_scale)
        self.mlp = MLP(descriptor_size(num_classes), channels, channels, num_layers=3)

    def forward(self, instances: InstanceBatch) -> Tensor:
        """InstanceBatch with K slots -> queries [N, K, C]."""
        descriptor = instance_descriptor(instances, self.num_classes, self.position_scale)
        return self.mlp(descriptor.to(self.mlp.layers[0].weight.dtype))
