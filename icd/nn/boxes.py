"""Packed, normalised ground truth (YOLO style) -> per-image pixel boxes and labels.

YOLO-style loaders give one tensor of boxes for the whole batch, (cx, cy, w, h) as fractions
of the padded input, with the image index of each box in ``batch_idx``; ICDDistiller takes
one [n_i, 4] (x1, y1, x2, y2) pixel tensor per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def unpack_boxes(
    boxes: Tensor,
    labels: Tensor,
    batch_idx: Tensor,
    num_images: int,
    padded_size: Sequence[int],
) -> tuple[list[Tensor], list[Tensor]]:
    """Split packed normalised boxes into per-image pixel boxes and labels.

    Args:
        boxes: float [M, 4] (cx, cy, w, h) as fractions of the padded input's (Wp, Hp).
        labels: [M] or [M, 1] class ids (integer or integral float, as YOLO loaders give).
        batch_idx: [M] or [M, 1] image index of each box, 0 <= batch_idx < num_images.
        num_images: N, the images of the batch (images without a box get empty tensors).
        padded_size: (Hp, Wp) of the padded input in pixels.

    Returns:
        N float32 tensors [n_i, 4] (x1, y1, x2, y2) in padded-input pixels and N int64
        tensors [n_i], on ``boxes``' device, in the order the boxes came.
    """
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        shape = list(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"unpack_boxes: `boxes` has shape {shape}; expected [M, 4] (cx, cy, w, h) normalised")
    m = boxes.shape[0]
    flat = {}
    for name, t in (("labels", labels), ("batch_idx", batch_idx)):
        if not isinstance(t, Tensor) or t.numel() != m or t.dim() not in (1, 2) or (t.dim() == 2 and t.shape[1] != 1):
            shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"unpack_boxes: `{name}` has shape {shape}; expected [M] or [M, 1] with M = {m}")
        values = t.reshape(-1)
        if values.is_floating_point() and m and not bool((values == values.round()).all()):
            raise ValueError(f"unpack_boxes: `{name}` has non-integer values; expected integer ids")
        flat[name] = values.long().to(boxes.device)
    if len(padded_size) != 2 or min(int(s) for s in padded_size) < 1:
        raise ValueError(f"unpack_boxes: `padded_size` = {tuple(padded_size)}; expected (Hp, Wp), both >= 1")
    if num_images < 0:
        raise ValueError(f"unpack_boxes: `num_images` = {num_images}; expected >= 0")
    index = flat["batch_idx"]
    if m and (int(index.min()) < 0 or int(index.max()) >= num_images):
        raise ValueError(
            f"unpack_boxes: `batch_idx` has values in [{int(index.min())}, {int(index.max())}]; "
            f"expected 0 <= batch_idx < num_images = {num_images}"
        )
    if m and not bool(torch.isfinite(boxes).all()):
        raise ValueError("unpack_boxes: `boxes` has NaN or infinite values; expected finite fractions")
    hp, wp = float(padded_size[0]), float(padded_size[1])
    scale = torch.tensor([wp, hp, wp, hp], dtype=torch.float32, device=boxes.device)
    centre, size = boxes[:, :2].float(), boxes[:, 2:].float()
    pixels = torch.cat([centre - size / 2, centre + size / 2], dim=1) * scale
    out_boxes, out_labels = [], []
    for i in range(num_images):
        keep = index == i
        out_boxes.append(pixels[keep])
        out_labels.append(flat["labels"][keep])
    return out_boxes, out_labels
