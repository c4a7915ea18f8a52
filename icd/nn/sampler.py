"""Instance sampler: the real and fake instances of a batch, in K padded slots (SPEC 4.1).

Slot order per image: the n_gt real instances (ground truth, in the given order), then the
fake ones, then padding up to K = the largest count in the batch. Image i gets
n_eff = min(max(1, floor(n_gt * (neg_ratio + 1))), max(max_labels, n_gt)) instances.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from icd.nn.prior import ClassPrior
from icd.nn.validation import check_image_sizes, check_instances

FAKE_CENTRE_RANGE = (0.03, 0.97)  # fake centres, fractions of the image
FAKE_SIZE_RANGE = (0.002, 0.7)  # fake widths and heights, fractions of the image


@dataclass
class InstanceBatch:
    """The instances of a batch in K slots per image (real, then fake, then padding).

    Attributes:
        boxes: float [N, K, 4] (x1, y1, x2, y2) in input pixels; 0 in padding slots.
        labels: int64 [N, K]; -1 in padding slots.
        centers: float [N, K, 2] jittered centres (cx', cy') in input pixels; 0 in padding.
        is_real: bool [N, K], the ground-truth slots.
        is_valid: bool [N, K], real or fake (not padding).
        image_sizes: float [N, 2] valid (h, w) of each image.
    """

    boxes: Tensor
    labels: Tensor
    centers: Tensor
    is_real: Tensor
    is_valid: Tensor
    image_sizes: Tensor

    @property
    def num_slots(self) -> int:
        """K."""
        return self.labels.shape[1]

    @property
    def box_sizes(self) -> Tensor:
        """float [N, K, 2] box (width, height) in pixels."""
        return self.boxes[..., 2:] - self.boxes[..., :2]

    @property
    def normalized_centers(self) -> Tensor:
        """float [N, K, 2] jittered centres as fractions of each image's own (w, h)."""
        return self.centers / self.image_sizes.flip(-1)[:, None, :]


def instance_count(num_gt: int, neg_ratio: float, max_labels: int) -> int:
    """n_eff: real plus fake instances of an image with ``num_gt`` ground-truth boxes."""
    # the small epsilon keeps e.g. 10 * 1.3 = 12.9999... from losing an instance
    scaled = math.floor(num_gt * (neg_ratio + 1.0) + 1e-9)
    return min(max(1, scaled), max(max_labels, num_gt))


class InstanceSampler(nn.Module):
    """Real plus fake instances with jittered centres, as an ``InstanceBatch``.

    Args:
        prior: ClassPrior of the fake classes and sizes (its buffers are part of state_dict).
        neg_ratio: fake instances per real one (before the max_labels cap).
        max_labels: cap of real + fake instances per image (unless n_gt is larger).
        sample_range: jitter amplitude, fraction of the box size: centre' = centre +
            (U(0, 1) - 0.5) * 2 * sample_range * (w, h). Applied in training mode only.
        clamp_fakes: clip each fake box to its image, as the published code does (a fake
            near a border then gets a smaller box and a centre nearer the image).

    Fake instances: class ~ prior.class_freq; centre ~ U(0.03, 0.97) of the image; width and
    height ~ Normal(class mean, class std), clipped to mean +- 2 std and then to
    [0.002, 0.7] of the image. All sizes are relative to each image's own valid size.
    """

    def __init__(
        self,
        prior: ClassPrior,
        neg_ratio: float = 5.0,
        max_labels: int = 300,
        sample_range: float = 0.3,
        clamp_fakes: bool = False,
    ) -> None:
        super().__init__()
        if neg_ratio < 0:
            raise ValueError(f"InstanceSampler: neg_ratio = {neg_ratio}; expected >= 0")
        if max_labels < 1:
            raise ValueError(f"InstanceSampler: max_labels = {max_labels}; expected >= 1")
        if not 0 <= sample_range < 0.5:
            raise ValueError(
                f"InstanceSampler: sample_range = {sample_range}; expected 0 <= sample_range < 0.5"
            )
        self.prior = prior
        self.neg_ratio = float(neg_ratio)
        self.max_labels = int(max_labels)
        self.sample_range = float(sample_range)
        self.clamp_fakes = bool(clamp_fakes)

    @property
    def num_classes(self) -> int:
        return self.prior.num_classes

    def forward(
        self,
        boxes: Sequence[Tensor],
        labels: Sequence[Tensor],
        image_sizes: Tensor | Sequence[Sequence[int]],
        *,
        with_fakes: bool = True,
        jitter: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> InstanceBatch:
        """Sample the instances of a batch.

        Args:
            boxes: N float tensors [n_i, 4], (x1, y1, x2, y2) in input pixels; boxes slightly
                outside their image are clipped to it, boxes far outside raise ValueError.
            labels: N int64 tensors [n_i], 0 <= label < num_classes.
            image_sizes: [N, 2] valid (h, w) of each image.
            with_fakes: False gives the real instances only (K = max n_gt, at least 1).
            jitter: jitter the centres; default: in training mode.
            generator: optional random generator, on the prior's device.

        Returns:
            InstanceBatch with K slots per image.
        """
        device = self.prior.class_freq.device
        sizes = check_image_sizes(image_sizes, None, None, device)
        real_boxes, real_labels = check_instances(boxes, labels, sizes, self.num_classes)
        jitter = self.training if jitter is None else jitter

        per_image_boxes, per_image_labels, counts = [], [], []
        for b, lab, size in zip(real_boxes, real_labels, sizes, strict=True):
            n_gt = b.shape[0]
            n_fake = (
                instance_count(n_gt, self.neg_ratio, self.max_labels) - n_gt if with_fakes else 0
            )
            fake_boxes, fake_labels = self._sample_fakes(n_fake, size, generator)
            per_image_boxes.append(torch.cat([b, fake_boxes]))
            per_image_labels.append(torch.cat([lab, fake_labels]))
            counts.append((n_gt, n_gt + n_fake))

        n = len(counts)
        k = max([total for _, total in counts] + [1])
        out_boxes = torch.zeros(n, k, 4, device=device)
        out_labels = torch.full((n, k), -1, dtype=torch.long, device=device)
        is_real = torch.zeros(n, k, dtype=torch.bool, device=device)
        is_valid = torch.zeros(n, k, dtype=torch.bool, device=device)
        for i, ((n_gt, total), b, lab) in enumerate(
            zip(counts, per_image_boxes, per_image_labels, strict=True)
        ):
            out_boxes[i, :total] = b
            out_labels[i, :total] = lab
            is_real[i, :n_gt] = True
            is_valid[i, :total] = True

        centers = (out_boxes[..., :2] + out_boxes[..., 2:]) / 2
        if jitter and self.sample_range > 0:
            wh = out_boxes[..., 2:] - out_boxes[..., :2]
            u = torch.rand(n, k, 2, device=device, generator=generator)
            centers = centers + (u - 0.5) * 2 * self.sample_range * wh
        centers = centers * is_valid[..., None]
        return InstanceBatch(out_boxes, out_labels, centers, is_real, is_valid, sizes)

    def _sample_fakes(
        self, count: int, image_size: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """``count`` fake boxes [count, 4] (pixels) and labels [count] for an image of (h, w)."""
        prior = self.prior
        device = prior.class_freq.device
        if count == 0:
            return torch.zeros(0, 4, device=device), torch.zeros(0, dtype=torch.long, device=device)
        labels = torch.multinomial(prior.class_freq, count, replacement=True, generator=generator)
        low, high = FAKE_CENTRE_RANGE
        centre = low + (high - low) * torch.rand(count, 2, device=device, generator=generator)
        mean, std = prior.size_mean[labels], prior.size_std[labels]
        size = mean + std * torch.randn(count, 2, device=device, generator=generator)
        size = torch.minimum(torch.maximum(size, mean - 2 * std), mean + 2 * std)
        size = size.clamp(*FAKE_SIZE_RANGE)
        wh = image_size.flip(0)  # (w, h)
        centre, size = centre * wh, size * wh
        fakes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
        if self.clamp_fakes:
            fakes = torch.minimum(fakes.clamp(min=0), wh.repeat(2))
        return fakes, labels
