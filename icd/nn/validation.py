"""Argument checks of icd.nn: ground-truth instances, image sizes and FPN feature lists.

Each error names the argument, what was received and what was expected. Boxes a little
outside their image (within ``box_tolerance``) are clipped to it; boxes further out are an
error, since they usually mean the boxes are in another frame (normalised, or of the
un-resized image).

Shape, dtype and device checks always run. Checks that read values (sizes >= 1, labels in
range, finite boxes inside their image) follow ``icd.ops.validation.value_checks``: by
default they run on CPU tensors only, so an accelerator's launch queue never waits for them
(``ICD_CHECKS=full`` runs them everywhere, ``ICD_CHECKS=off`` nowhere). Clipping is a tensor
op and always happens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from icd.ops.validation import value_checks


def box_tolerance(side: float) -> float:
    """How far (pixels) a box may overshoot an image side of ``side`` pixels: 1 px + 1%."""
    return 1.0 + 0.01 * side


def check_padded_size(padded_size: Sequence[int]) -> tuple[int, int]:
    if len(padded_size) != 2 or min(int(x) for x in padded_size) < 1:
        raise ValueError(f"`padded_size` = {tuple(padded_size)}; expected (Hp, Wp), both >= 1")
    return int(padded_size[0]), int(padded_size[1])


def check_padded_size_fits_levels(
    padded: tuple[int, int], level_shapes: Sequence[tuple[int, int]], strides: Sequence[float] | None = None
) -> None:
    """Each level (H_l, W_l) covers (Hp, Wp) at one stride r_l: H_l ~ Hp / r_l and W_l ~ Wp / r_l.

    A level may have one cell more or fewer than Hp / r_l on each axis (rounding of strided
    convolutions), so the strides allowed by the rows, [Hp / (H_l + 1), Hp / (H_l - 1)], and
    by the columns must overlap. Catches (W, H) given for (H, W) and the padded size of
    another resolution (e.g. the images before resizing).

    ``strides`` (one per level, e.g. 2**l) given: there must be one per level, and each level
    must hold ceil(Hp / r_l) rows and ceil(Wp / r_l) columns, give or take one.
    """
    hp, wp = padded
    if strides is not None:
        if len(strides) != len(level_shapes):
            raise ValueError(
                f"`strides` = {list(strides)} has {len(strides)} entries for {len(level_shapes)} feature levels; "
                "expected one stride per level"
            )
        for lvl, ((h_l, w_l), r) in enumerate(zip(level_shapes, strides, strict=True)):
            if abs(h_l - math.ceil(hp / r)) > 1 or abs(w_l - math.ceil(wp / r)) > 1:
                raise ValueError(
                    f"level {lvl} of (H, W) = ({h_l}, {w_l}) does not have stride {r:g} in `padded_size` = "
                    f"(Hp, Wp) = {padded}: expected about ({math.ceil(hp / r)}, {math.ceil(wp / r)}) cells; "
                    "are `strides` those of these levels?"
                )
    for lvl, (h_l, w_l) in enumerate(level_shapes):
        low = max(hp / (h_l + 1), wp / (w_l + 1))
        high = min(hp / (h_l - 1) if h_l > 1 else math.inf, wp / (w_l - 1) if w_l > 1 else math.inf)
        if low >= high:
            raise ValueError(
                f"`padded_size` = (Hp, Wp) = {padded} does not fit level {lvl} of (H, W) = ({h_l}, {w_l}): "
                f"Hp / H = {hp / h_l:.3g} and Wp / W = {wp / w_l:.3g} should be one stride; expected "
                "the (height, width) of the padded batch the feature maps were computed from"
            )


def check_image_sizes(
    image_sizes: Tensor | Sequence[Sequence[int]],
    num_images: int | None,
    padded_size: tuple[int, int] | None,
    device: torch.device,
) -> Tensor:
    """[N, 2] valid (h, w) of each image -> float32 [N, 2] on ``device``.

    ``num_images``: the expected N, or None to take it from ``image_sizes``. The values are
    checked where they are (free for a list or a CPU tensor) before the copy to ``device``.
    """
    sizes = torch.as_tensor(image_sizes).to(torch.float32)
    if num_images is None:
        if sizes.dim() != 2:
            raise ValueError(
                f"`image_sizes` has shape {list(sizes.shape)}; expected [N, 2] (valid h, w)"
            )
        num_images = sizes.shape[0]
    if tuple(sizes.shape) != (num_images, 2):
        raise ValueError(
            f"`image_sizes` has shape {list(sizes.shape)}; expected [N, 2] = [{num_images}, 2] "
            "(valid height, width of each image)"
        )
    if num_images and value_checks(sizes):
        if not bool((sizes >= 1).all()):
            raise ValueError(f"`image_sizes` = {sizes.tolist()}; expected every height and width >= 1")
        if padded_size is not None and (
            bool((sizes[:, 0] > padded_size[0]).any()) or bool((sizes[:, 1] > padded_size[1]).any())
        ):
            raise ValueError(
                f"`image_sizes` = {sizes.tolist()} exceed `padded_size` = {padded_size}; expected "
                "each (h, w) <= (Hp, Wp)"
            )
    return to_device(sizes, torch.device(device), torch.float32)


def check_valid_regions(
    image_sizes: Tensor | Sequence[Sequence[float]],
    num_images: int | None,
    padded_size: tuple[int, int] | None,
    device: torch.device,
) -> Tensor:
    """The valid region of each image, as [N, 2] sizes or [N, 4] boxes -> float32 [N, 4] boxes.

    Args:
        image_sizes: [N, 2] valid (h, w) of images placed top-left in the padded batch, or
            [N, 4] valid boxes (x1, y1, x2, y2) in padded-input pixels (letterboxed images:
            the box is the image inside its padding).
        num_images: the expected N, or None to take it from ``image_sizes``.
        padded_size: (Hp, Wp) the boxes must lie in, or None.

    Returns:
        float32 [N, 4] (x1, y1, x2, y2) on ``device``; a size (h, w) becomes (0, 0, w, h).
        The values are checked where they are (see ``check_image_sizes``) before the copy.
    """
    regions = torch.as_tensor(image_sizes).to(torch.float32)
    if regions.dim() == 2 and regions.shape[1] == 2:
        sizes = check_image_sizes(regions, num_images, padded_size, device)
        return torch.cat([torch.zeros_like(sizes), sizes.flip(-1)], dim=1)
    expected = "N" if num_images is None else str(num_images)
    if regions.dim() != 2 or regions.shape[1] != 4 or (
        num_images is not None and regions.shape[0] != num_images
    ):
        raise ValueError(
            f"`image_sizes` has shape {list(regions.shape)}; expected [{expected}, 2] valid (h, w) "
            f"or [{expected}, 4] valid boxes (x1, y1, x2, y2) in padded-input pixels"
        )
    if regions.shape[0] and value_checks(regions):
        if not bool(torch.isfinite(regions).all()):
            raise ValueError("`image_sizes` has NaN or infinite entries; expected finite pixels")
        if bool((regions[:, :2] < 0).any()) or bool((regions[:, 2:] - regions[:, :2] < 1).any()):
            raise ValueError(
                f"`image_sizes` = {regions.tolist()}; expected valid boxes (x1, y1, x2, y2) with "
                "x1, y1 >= 0 and at least 1 pixel wide and high (x2 - x1 >= 1, y2 - y1 >= 1)"
            )
        if padded_size is not None:
            hp, wp = padded_size
            if bool((regions[:, 2] > wp).any()) or bool((regions[:, 3] > hp).any()):
                raise ValueError(
                    f"`image_sizes` = {regions.tolist()} lie outside `padded_size` = (Hp, Wp) = "
                    f"{padded_size}; expected every valid box inside the padded image (x2 <= Wp, y2 <= Hp)"
                )
    return to_device(regions, torch.device(device), torch.float32)


def region_sizes(regions: Tensor) -> Tensor:
    """Valid boxes [N, 4] (x1, y1, x2, y2) -> their (h, w) [N, 2]."""
    return (regions[:, 2:] - regions[:, :2]).flip(-1)


def check_instances(
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    image_sizes: Tensor,
    num_classes: int,
) -> tuple[list[Tensor], list[Tensor]]:
    """Validate per-image boxes [n_i, 4] and labels [n_i]; return boxes clipped to the image.

    Args:
        boxes: N float tensors [n_i, 4], (x1, y1, x2, y2) in input pixels.
        labels: N integer tensors [n_i], 0 <= label < num_classes.
        image_sizes: float [N, 2] valid (h, w), or [N, 4] valid boxes (x1, y1, x2, y2),
            already checked.

    Returns:
        float32 boxes clipped to the valid region ([0, w_i] x [0, h_i] for sizes), and int64
        labels, on image_sizes' device.
    """
    n = image_sizes.shape[0]
    if len(boxes) != n or len(labels) != n:
        raise ValueError(
            f"`boxes` has {len(boxes)} entries and `labels` {len(labels)}; "
            f"expected one per image, N = {n}"
        )
    check_values = value_checks(image_sizes)
    out_boxes, out_labels = [], []
    for i, (b, lab) in enumerate(zip(boxes, labels, strict=True)):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = list(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ValueError(f"`boxes[{i}]` has shape {shape}; expected [n_i, 4] (x1, y1, x2, y2)")
        if not isinstance(lab, Tensor) or lab.dim() != 1 or lab.shape[0] != b.shape[0]:
            shape = list(lab.shape) if isinstance(lab, Tensor) else type(lab).__name__
            raise ValueError(f"`labels[{i}]` has shape {shape}; expected [n_i] = [{b.shape[0]}]")
        _check_label_dtype(lab, f"labels[{i}]")
        if check_values and value_checks(b) and value_checks(lab):
            _check_label_values(lab, f"labels[{i}]", num_classes)
            _check_box_values(b.float(), image_sizes[i], i)
        b = to_device(b, image_sizes.device, torch.float32)
        out_boxes.append(clip_boxes(b, image_sizes[i]))
        out_labels.append(to_device(lab, image_sizes.device, torch.long))
    return out_boxes, out_labels


def check_padded_instances(
    boxes: Tensor, labels: Tensor, image_sizes: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Validate padded boxes [N, M, 4] and labels [N, M] (label < 0: an empty row).

    ``image_sizes``: float [N, 2] valid (h, w) or [N, 4] valid boxes (x1, y1, x2, y2), already
    checked. Returns float32 boxes clipped to each image's valid region (zeros in empty rows)
    and int64 labels (-1 in empty rows), on image_sizes' device.
    """
    n = image_sizes.shape[0]
    if boxes.dim() != 3 or boxes.shape[0] != n or boxes.shape[2] != 4:
        raise ValueError(
            f"`boxes` has shape {list(boxes.shape)}; expected [N, M, 4] = [{n}, M, 4] "
            "(x1, y1, x2, y2; rows whose label is < 0 are empty)"
        )
    if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(boxes.shape[:2]):
        shape = list(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"`labels` has shape {shape}; expected [N, M] = {list(boxes.shape[:2])}")
    _check_label_dtype(labels, "labels")
    if value_checks(image_sizes) and value_checks(boxes) and value_checks(labels):
        for i in range(n):
            real = labels[i] >= 0
            _check_label_values(labels[i][real], f"labels[{i}]", num_classes)
            _check_box_values(boxes[i][real].float(), image_sizes[i], i)
    device = image_sizes.device
    labels = to_device(labels, device, torch.long)
    real = labels >= 0
    boxes = to_device(boxes, device, torch.float32)
    boxes = torch.where(real[..., None], clip_boxes(boxes, image_sizes[:, None, :]), 0.0)
    return boxes, torch.where(real, labels, -1)


def to_device(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype`` on ``device``; a copy to an accelerator does not block the host."""
    return t.to(device=device, dtype=dtype, non_blocking=device.type != "cpu")


def clip_boxes(boxes: Tensor, region: Tensor) -> Tensor:
    """Boxes [..., 4] clipped to a valid region (broadcast): a size (h, w) [..., 2], clipped to
    [0, w] x [0, h], or a valid box (x1, y1, x2, y2) [..., 4], clipped to [x1, x2] x [y1, y2]."""
    if region.shape[-1] == 4:
        low = region[..., :2].repeat(*([1] * (region.dim() - 1)), 2)  # (x1, y1, x1, y1)
        high = region[..., 2:].repeat(*([1] * (region.dim() - 1)), 2)  # (x2, y2, x2, y2)
        return torch.minimum(torch.maximum(boxes, low), high)
    limit = region.flip(-1).repeat(*([1] * (region.dim() - 1)), 2)  # (w, h, w, h)
    return torch.minimum(boxes.clamp_min(0.0), limit)


def _check_label_dtype(lab: Tensor, name: str) -> None:
    if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
        raise TypeError(f"`{name}` has dtype {lab.dtype}; expected an integer tensor (int64)")


def _check_label_values(lab: Tensor, name: str, num_classes: int) -> None:
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
        raise ValueError(
            f"`{name}` has values in [{int(lab.min())}, {int(lab.max())}]; expected "
            f"0 <= label < num_classes = {num_classes}"
        )


def _check_box_values(b: Tensor, region: Tensor, i: int) -> None:
    """Finite, ordered boxes [n, 4] inside image i's valid region, within the tolerance.

    ``region``: a valid size (h, w) [2] or a valid box (x1, y1, x2, y2) [4].
    """
    if b.numel() == 0:
        return
    if not bool(torch.isfinite(b).all()):
        raise ValueError(f"`boxes[{i}]` has NaN or infinite coordinates; expected finite pixels")
    if region.numel() == 4:
        origin = torch.cat([region[:2], region[:2]]).to(b.device)
        size = (region[2:] - region[:2]).flip(0)
        _check_box_values(b - origin, size, i)
        return
    h, w = float(region[0]), float(region[1])
    if bool((b[:, 2:] < b[:, :2]).any()):
        bad = int(torch.nonzero((b[:, 2:] < b[:, :2]).any(dim=1))[0])
        raise ValueError(
            f"`boxes[{i}][{bad}]` = {b[bad].tolist()}; expected x1 <= x2 and y1 <= y2 "
            "(boxes are x1, y1, x2, y2 in input pixels)"
        )
    tol_w, tol_h = box_tolerance(w), box_tolerance(h)
    low = torch.tensor([-tol_w, -tol_h, -tol_w, -tol_h], device=b.device)
    high = torch.tensor([w + tol_w, h + tol_h, w + tol_w, h + tol_h], device=b.device)
    outside = ((b < low) | (b > high)).any(dim=1)
    if bool(outside.any()):
        bad = int(torch.nonzero(outside)[0])
        raise ValueError(
            f"`boxes[{i}][{bad}]` = {b[bad].tolist()} lies outside image {i} of "
            f"(h, w) = ({h:g}, {w:g}) "
            f"by more than the tolerance ({tol_w:.3g} px in x, {tol_h:.3g} px in y); expected "
            "x1, y1, x2, y2 in the input pixels of that image"
        )


def check_feature_levels(
    teacher_features: Sequence[Tensor],
    student_features: Sequence[Tensor],
    teacher_channels: int | Sequence[int],
    student_channels: int | Sequence[int],
) -> None:
    """Teacher and student FPN lists: same levels, N and spatial sizes; the expected channels.

    Channels: one width for every level (int) or one width per level (a sequence of L ints).
    """
    for name, feats in (
        ("teacher_features", teacher_features),
        ("student_features", student_features),
    ):
        if isinstance(feats, Tensor) or not isinstance(feats, Sequence) or len(feats) == 0:
            raise ValueError(
                f"`{name}` is a {type(feats).__name__}; "
                "expected a non-empty list of [N, C, H_l, W_l] maps"
            )
        for lvl, f in enumerate(feats):
            if not isinstance(f, Tensor) or f.dim() != 4:
                shape = list(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"`{name}[{lvl}]` has shape {shape}; expected [N, C, H_l, W_l]")
            if f.shape[0] == 0 or f.shape[2] == 0 or f.shape[3] == 0:
                raise ValueError(
                    f"`{name}[{lvl}]` has shape {list(f.shape)}, an empty level; expected "
                    "[N, C, H_l, W_l] with N, H_l and W_l >= 1"
                )
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"`student_features` has {len(student_features)} levels; "
            f"expected {len(teacher_features)}, "
            "the levels of `teacher_features`"
        )
    levels = len(teacher_features)
    expected_widths = {}
    for name, channels in (("teacher_channels", teacher_channels), ("student_channels", student_channels)):
        if isinstance(channels, int):
            expected_widths[name] = ([channels] * levels, f"{name} = {channels}")
        elif len(channels) != levels:
            raise ValueError(
                f"{name} = {list(channels)} gives {len(channels)} levels; the features have {levels}"
            )
        else:
            expected_widths[name] = (list(channels), None)
    for lvl, (t, s) in enumerate(zip(teacher_features, student_features, strict=True)):
        for name, feature, side in (
            ("teacher_features", t, "teacher_channels"),
            ("student_features", s, "student_channels"),
        ):
            widths, label = expected_widths[side]
            if feature.shape[1] != widths[lvl]:
                raise ValueError(
                    f"`{name}[{lvl}]` has {feature.shape[1]} channels; "
                    f"expected {label or f'{side}[{lvl}] = {widths[lvl]}'}"
                )
        if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
            raise ValueError(
                f"`student_features[{lvl}]` has [N, H, W] = {[s.shape[0], *s.shape[2:]]}; expected "
                f"{[t.shape[0], *t.shape[2:]]}, those of `teacher_features[{lvl}]`"
            )
        if t.shape[0] != teacher_features[0].shape[0]:
            raise ValueError(
                f"`teacher_features[{lvl}]` has N = {t.shape[0]}; "
                f"expected {teacher_features[0].shape[0]} "
                "like level 0"
            )
