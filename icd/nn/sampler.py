"""Instance sampler: the real and fake instances of a batch, in K padded slots (docs/method.md 4.1).

Image i gets n_eff = min(max(1, floor(n_gt * (neg_ratio + 1))), max(max_labels, n_gt))
instances: its n_gt real ones (ground truth) and n_eff - n_gt fake ones. Two slot layouts:

- dynamic (default): K = the largest n_eff of the batch; per image the real instances in
  the given order, then the fake ones, then padding. Counts are read from the boxes' shapes
  on the host, so K (and every shape after it) changes from batch to batch.
- static (``static_shapes=True``): K = max_labels always, whatever the boxes. Fake
  candidates are drawn for every slot and the first n_eff - n_gt slots not taken by a real
  instance keep theirs: the choice is a mask computed on the device, never a count read on
  the host, so torch.compile sees one graph and a CUDA graph can replay it. An image may
  then hold at most max_labels real instances.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icd.nn.prior import ClassPrior
from icd.nn.validation import (
    check_instances,
    check_padded_instances,
    check_valid_regions,
    clip_boxes,
    region_sizes,
)

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
        image_origins: float [N, 2] (x, y) top-left corner of each image's valid region in
            the padded input (letterbox offsets); None means (0, 0).
    """

    boxes: Tensor
    labels: Tensor
    centers: Tensor  # public field names keep "center" (and normalized_centers); the prose says centre
    is_real: Tensor
    is_valid: Tensor
    image_sizes: Tensor
    image_origins: Tensor | None = None

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
        """float [N, K, 2] jittered centres as fractions of each image's own valid (w, h),
        measured from its valid region's top-left corner."""
        centres = self.centers
        if self.image_origins is not None:
            centres = centres - self.image_origins[:, None, :]
        return centres / self.image_sizes.flip(-1)[:, None, :]


def instance_count(num_gt: int | Tensor, neg_ratio: float, max_labels: int) -> int | Tensor:
    """n_eff: real plus fake instances of an image with ``num_gt`` ground-truth boxes.

    ``num_gt`` an int, or an int64 tensor of counts (then computed on its device, in float64
    like the int version, so both agree exactly).
    """
    # the small epsilon keeps e.g. 10 * 1.3 = 12.9999... from losing an instance
    if isinstance(num_gt, Tensor):
        scaled = torch.floor(num_gt.double() * (neg_ratio + 1.0) + 1e-9).long()
        return torch.minimum(scaled.clamp_min(1), num_gt.clamp_min(max_labels))
    scaled = math.floor(num_gt * (neg_ratio + 1.0) + 1e-9)
    return min(max(1, scaled), max(max_labels, num_gt))


def pad_instances(
    boxes: Sequence[Tensor], labels: Sequence[Tensor], slots: int
) -> tuple[Tensor, Tensor]:
    """Per-image boxes [n_i, 4] and labels [n_i] -> padded boxes [N, slots, 4] and labels
    [N, slots] (zeros and -1 after row n_i): the fixed-shape input of the static layout.

    Run it outside a compiled region (e.g. in the data loader's collate): its own work
    depends on the n_i. Raises ValueError when an image has more than ``slots`` boxes.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"`boxes` has {len(boxes)} entries and `labels` {len(labels)}; expected one per image")
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[0] > slots:
            raise ValueError(
                f"`boxes[{i}]` has shape {list(b.shape)}; expected [n_i, 4] with n_i <= {slots} slots "
                "(raise max_labels, or use the dynamic layout)"
            )
    device = boxes[0].device if len(boxes) else None
    out_boxes = torch.zeros(len(boxes), slots, 4, device=device)
    out_labels = torch.full((len(boxes), slots), -1, dtype=torch.long, device=device)
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        out_boxes[i, : b.shape[0]] = b
        out_labels[i, : lab.shape[0]] = lab
    return out_boxes, out_labels


def unpad_instances(boxes: Tensor, labels: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """The inverse of pad_instances: the rows whose label is >= 0, per image (a host sync)."""
    real = labels >= 0
    return [b[r] for b, r in zip(boxes, real, strict=True)], [lab[r] for lab, r in zip(labels, real, strict=True)]


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
        static_shapes: the static layout (K = max_labels for every batch; see the module
            docstring) instead of the dynamic one.

    Fake instances: class ~ prior.class_freq; centre ~ U(0.03, 0.97) of the image; width and
    height ~ Normal(class mean, class std), clipped to mean +- 2 std and then to
    [0.002, 0.7] of the image. All sizes are relative to each image's own valid size, and
    fake centres lie inside its valid region (a letterboxed image's box, when given).
    """

    def __init__(
        self,
        prior: ClassPrior,
        neg_ratio: float = 5.0,
        max_labels: int = 300,
        sample_range: float = 0.3,
        clamp_fakes: bool = False,
        static_shapes: bool = False,
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
        self.static_shapes = bool(static_shapes)

    @property
    def num_classes(self) -> int:
        return self.prior.num_classes

    def forward(
        self,
        boxes: Sequence[Tensor] | Tensor,
        labels: Sequence[Tensor] | Tensor,
        image_sizes: Tensor | Sequence[Sequence[int]],
        *,
        with_fakes: bool = True,
        jitter: bool | None = None,
        generator: torch.Generator | None = None,
        static_shapes: bool | None = None,
    ) -> InstanceBatch:
        """Sample the instances of a batch.

        Args:
            boxes: N float tensors [n_i, 4], (x1, y1, x2, y2) in input pixels, or one padded
                tensor [N, M, 4] (see ``pad_instances``); boxes slightly outside their image's
                valid region are clipped to it, boxes far outside raise ValueError.
            labels: N int64 tensors [n_i], 0 <= label < num_classes, or [N, M] with -1 (any
                label < 0) in the empty rows of padded boxes.
            image_sizes: [N, 2] valid (h, w) of each image (top-left), or [N, 4] valid boxes
                (x1, y1, x2, y2) in input pixels (letterboxed images).
            with_fakes: False gives the real instances only (dynamic: K = max n_gt, at least 1).
            jitter: jitter the centres; default: in training mode.
            generator: optional random generator, on the prior's device.
            static_shapes: the slot layout of this call; default: the sampler's.

        Returns:
            InstanceBatch with K slots per image.
        """
        device = self.prior.class_freq.device
        regions = check_valid_regions(image_sizes, None, None, device)
        jitter = self.training if jitter is None else jitter
        static = self.static_shapes if static_shapes is None else static_shapes
        if static:
            if not isinstance(boxes, Tensor):
                boxes, labels = pad_instances(boxes, labels, self.max_labels)
            elif boxes.dim() == 3 and boxes.shape[1] > self.max_labels:
                raise ValueError(
                    f"`boxes` has shape {list(boxes.shape)}; the static layout holds at most "
                    f"max_labels = {self.max_labels} boxes per image (raise max_labels)"
                )
            boxes, labels = check_padded_instances(boxes, labels, regions, self.num_classes)
            return self._static_slots(boxes, labels, regions, with_fakes, jitter, generator)
        if isinstance(boxes, Tensor):
            boxes, labels = unpad_instances(boxes, labels)
        real_boxes, real_labels = check_instances(boxes, labels, regions, self.num_classes)
        return self._dynamic_slots(real_boxes, real_labels, regions, with_fakes, jitter, generator)

    @torch.compiler.disable(reason="the dynamic layout reads instance counts on the host")
    def _dynamic_slots(
        self,
        real_boxes: list[Tensor],
        real_labels: list[Tensor],
        regions: Tensor,
        with_fakes: bool,
        jitter: bool,
        generator: torch.Generator | None,
    ) -> InstanceBatch:
        """K = the largest n_eff; real, then fake, then padding (counts from the shapes).

        regions: float [N, 4] valid boxes (x1, y1, x2, y2) of the images.
        """
        device = regions.device
        per_image_boxes, per_image_labels, counts = [], [], []
        for b, lab, region in zip(real_boxes, real_labels, regions, strict=True):
            n_gt = b.shape[0]
            n_fake = (
                instance_count(n_gt, self.neg_ratio, self.max_labels) - n_gt if with_fakes else 0
            )
            fake_boxes, fake_labels = self._sample_fakes(n_fake, region, generator)
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
        centres = self._centres(out_boxes, is_valid, jitter, generator)
        return InstanceBatch(
            out_boxes, out_labels, centres, is_real, is_valid, region_sizes(regions), regions[:, :2]
        )

    def _static_slots(
        self,
        boxes: Tensor,
        labels: Tensor,
        regions: Tensor,
        with_fakes: bool,
        jitter: bool,
        generator: torch.Generator | None,
    ) -> InstanceBatch:
        """K = max_labels; the M padded input rows first, fakes in the first free slots.

        boxes [N, M, 4] clipped, labels [N, M] (-1 empty), M <= max_labels; regions float
        [N, 4] valid boxes (x1, y1, x2, y2). Only device ops with shapes fixed by (N, max_labels).
        """
        k = self.max_labels
        boxes = F.pad(boxes, (0, 0, 0, k - boxes.shape[1]))
        labels = F.pad(labels, (0, k - labels.shape[1]), value=-1)
        is_real = labels >= 0
        is_valid = is_real
        if with_fakes:
            n_gt = is_real.sum(dim=1)
            n_fake = instance_count(n_gt, self.neg_ratio, self.max_labels) - n_gt
            free = ~is_real
            is_fake = free & (free.cumsum(dim=1) <= n_fake[:, None])
            fake_boxes, fake_labels = self._sample_fake_slots(regions, k, generator)
            boxes = torch.where(is_fake[..., None], fake_boxes, boxes)
            labels = torch.where(is_fake, fake_labels, labels)
            is_valid = is_real | is_fake
        centres = self._centres(boxes, is_valid, jitter, generator)
        return InstanceBatch(boxes, labels, centres, is_real, is_valid, region_sizes(regions), regions[:, :2])

    def _centres(
        self, boxes: Tensor, is_valid: Tensor, jitter: bool, generator: torch.Generator | None
    ) -> Tensor:
        """[N, K, 2] box centres, jittered when asked; 0 in padding slots."""
        centres = (boxes[..., :2] + boxes[..., 2:]) / 2
        if jitter and self.sample_range > 0:
            wh = boxes[..., 2:] - boxes[..., :2]
            u = torch.rand(*boxes.shape[:2], 2, device=boxes.device, generator=generator)
            centres = centres + (u - 0.5) * 2 * self.sample_range * wh
        return centres * is_valid[..., None]

    def _sample_fakes(
        self, count: int, region: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """``count`` fake boxes [count, 4] (pixels) and labels [count] inside the valid box
        ``region`` [4] (x1, y1, x2, y2) of an image."""
        prior = self.prior
        device = prior.class_freq.device
        if count == 0:
            return torch.zeros(0, 4, device=device), torch.zeros(0, dtype=torch.long, device=device)
        labels = torch.multinomial(prior.class_freq, count, replacement=True, generator=generator)
        centre_u = torch.rand(count, 2, device=device, generator=generator)
        size_z = torch.randn(count, 2, device=device, generator=generator)
        return self._fake_boxes(labels, centre_u, size_z, region), labels

    def _sample_fake_slots(
        self, regions: Tensor, slots: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """A fake candidate for every slot: boxes [N, slots, 4] and labels [N, slots], inside
        each image's valid box (regions [N, 4], x1, y1, x2, y2).

        The class is drawn by inverting the prior's cumulative frequencies (no host sync,
        fixed shapes), the rest as in the dynamic layout.
        """
        n = regions.shape[0]
        device = regions.device
        u = torch.rand(n, slots, device=device, generator=generator)
        labels = (u[..., None] >= self._class_thresholds()).sum(dim=-1)
        centre_u = torch.rand(n, slots, 2, device=device, generator=generator)
        size_z = torch.randn(n, slots, 2, device=device, generator=generator)
        return self._fake_boxes(labels, centre_u, size_z, regions[:, None, :]), labels

    def _class_thresholds(self) -> Tensor:
        """[C - 1]: class c is drawn for U(0, 1) in [t_{c-1}, t_c) (t_{-1} = 0, t_{C-1} = 1).

        t_c is the cumulative frequency up to class c, or +inf when no later class has a
        positive frequency, so rounding never draws a class of frequency 0.
        """
        freq = self.prior.class_freq
        later = freq.flip(0).cumsum(0).flip(0)[1:]  # total frequency of the classes after c
        return torch.where(later > 0, freq.cumsum(0)[:-1], math.inf)

    def _fake_boxes(self, labels: Tensor, centre_u: Tensor, size_z: Tensor, region: Tensor) -> Tensor:
        """Fake boxes [..., 4] in pixels from labels [...], U(0, 1) [..., 2] for the centre and
        N(0, 1) [..., 2] for the size, inside valid boxes (x1, y1, x2, y2) = region (broadcast
        to [..., 4]): centre and size are fractions of the region's (w, h) from its corner."""
        prior = self.prior
        low, high = FAKE_CENTRE_RANGE
        centre = low + (high - low) * centre_u
        mean, std = prior.size_mean[labels], prior.size_std[labels]
        size = mean + std * size_z
        size = torch.minimum(torch.maximum(size, mean - 2 * std), mean + 2 * std)
        size = size.clamp(*FAKE_SIZE_RANGE)
        wh = region[..., 2:] - region[..., :2]  # (w, h)
        centre, size = centre * wh + region[..., :2], size * wh
        fakes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
        if self.clamp_fakes:
            fakes = clip_boxes(fakes, region)
        return fakes
