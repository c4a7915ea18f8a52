"""Multi-scale helpers: flatten FPN levels into tokens, their padding mask and position embedding.

Tokens are the levels concatenated in the given order, row-major inside a level
(docs/method.md 2 and 3.4): S = sum_l H_l * W_l.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def flatten_levels(features: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate FPN maps into one token sequence.

    Args:
        features: L maps [N, C, H_l, W_l], same N, C, dtype and device.

    Returns:
        tokens [N, S, C] on the maps' device; spatial_shapes int64 [L, 2] holding (H_l, W_l)
        and level_start int64 [L], the index of each level's first token, both on the CPU:
        they are host-side sizes, so reading them never waits for an accelerator.
    """
    if len(features) == 0:
        raise ValueError("flatten_levels: `features` is empty; expected at least one [N, C, H, W] map")
    first = features[0]
    for i, f in enumerate(features):
        if not isinstance(f, Tensor) or f.dim() != 4:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"flatten_levels: features[{i}] has shape {shape}; expected [N, C, H, W]")
        if f.shape[:2] != first.shape[:2]:
            raise ValueError(
                f"flatten_levels: features[{i}] has [N, C] = {list(f.shape[:2])} but features[0] "
                f"has {list(first.shape[:2])}; every level must share N and C"
            )
    tokens = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)
    shapes = torch.tensor([list(f.shape[-2:]) for f in features], dtype=torch.long)
    sizes = shapes.prod(dim=1)
    level_start = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return tokens, shapes, level_start


def _as_size_list(sizes: Tensor | Sequence[Sequence[int]], name: str) -> list[tuple[int, int]]:
    rows = sizes.tolist() if isinstance(sizes, Tensor) else [list(s) for s in sizes]
    for i, row in enumerate(rows):
        if len(row) != 2:
            raise ValueError(f"{name}[{i}] = {row}; expected a (height, width) pair")
    return [(int(a), int(b)) for a, b in rows]


def _valid_cells(low: Tensor, high: Tensor, stride: float, cells: int) -> Tensor:
    """bool [N, cells]: cell j is valid when floor(low_i / stride) <= j < ceil(high_i / stride).

    ``low`` and ``high`` are float64 [N] extents in input pixels.
    """
    first = torch.floor(low / stride)
    limit = torch.ceil(high / stride)
    j = torch.arange(cells, device=low.device)
    return (j >= first[:, None]) & (j < limit[:, None])


def level_strides(
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    padded_size: Sequence[int],
    strides: Sequence[float] | None = None,
) -> list[float]:
    """The stride r_l (input pixels per cell) of each level.

    ``strides`` given (e.g. 2**l of FPN level P_l, what the convolutions do): checked, one
    positive number per level, and returned. None: inferred as (Hp / H_l + Wp / W_l) / 2, exact
    only when the padded size is a multiple of every stride: a 192-px batch has a 2-cell P7
    (ceil(192 / 128)), which the inference takes for a stride of 96 instead of 128.
    """
    levels = _as_size_list(spatial_shapes, "spatial_shapes")
    if strides is None:
        hp, wp = (float(x) for x in padded_size)
        return [(hp / h_l + wp / w_l) / 2 for h_l, w_l in levels]
    out = [float(r) for r in strides]
    if len(out) != len(levels) or not all(math.isfinite(r) and r > 0 for r in out):
        raise ValueError(
            f"strides = {list(strides)}; expected one positive stride per level ({len(levels)} levels)"
        )
    return out


def padding_mask(
    image_sizes: Tensor | Sequence[Sequence[float]],
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    padded_size: Sequence[int],
    strides: Sequence[float] | None = None,
) -> Tensor:
    """Key padding mask of the flattened tokens: True where a token lies in padding.

    Args:
        image_sizes: [N, 2] valid (h_i, w_i) of each image in input pixels (the image sits
            top-left), or [N, 4] valid boxes (x1, y1, x2, y2) in input pixels (letterboxed
            images, padding on any side); a tensor on any device (the mask is built there,
            without reading its values on the host).
        spatial_shapes: [L, 2] (H_l, W_l) of each level; a list or a CPU tensor (a tensor on
            an accelerator is read on the host: a synchronisation).
        padded_size: (Hp, Wp), the padded batch size in input pixels.
        strides: the stride r_l of each level in input pixels (2**l for FPN level P_l); None
            infers r_l = (Hp / H_l + Wp / W_l) / 2, which is wrong for the coarse levels of a
            padded size that is not a multiple of their stride (``level_strides``).

    Returns:
        bool [N, S] on image_sizes' device (when a tensor, else spatial_shapes', else the CPU).
        On level l with stride r = r_l, token (y, x) of image i is valid
        when floor(y1_i / r) <= y < ceil(y2_i / r) and floor(x1_i / r) <= x < ceil(x2_i / r);
        a size (h, w) is the box (0, 0, w, h).
    """
    levels = _as_size_list(spatial_shapes, "spatial_shapes")
    if len(padded_size) != 2:
        raise ValueError(f"padded_size = {tuple(padded_size)}; expected (Hp, Wp)")
    hp, wp = (float(x) for x in padded_size)
    if isinstance(image_sizes, Tensor):
        regions = image_sizes
    else:
        rows = [list(r) for r in image_sizes]
        for i, row in enumerate(rows):
            if len(row) not in (2, 4) or len(row) != len(rows[0]):
                raise ValueError(
                    f"image_sizes[{i}] = {row}; expected every row a (height, width) pair or every row "
                    "a box (x1, y1, x2, y2)"
                )
        device = spatial_shapes.device if isinstance(spatial_shapes, Tensor) else None
        width = len(rows[0]) if rows else 2
        regions = torch.tensor(rows, dtype=torch.float64, device=device).reshape(-1, width)
    if regions.dim() != 2 or regions.shape[1] not in (2, 4):
        raise ValueError(
            f"image_sizes has shape {list(regions.shape)}; expected [N, 2] (valid h, w) or "
            "[N, 4] valid boxes (x1, y1, x2, y2)"
        )
    regions = regions.to(torch.float64)  # the rule in double precision, like Python's math.ceil
    if regions.shape[1] == 2:
        regions = torch.cat([torch.zeros_like(regions), regions.flip(-1)], dim=1)  # (0, 0, w, h)
    x1, y1, x2, y2 = regions.unbind(-1)
    per_level = []
    for (h_l, w_l), stride in zip(levels, level_strides(levels, (hp, wp), strides), strict=True):
        valid_rows = _valid_cells(y1, y2, stride, h_l)
        valid_cols = _valid_cells(x1, x2, stride, w_l)
        per_level.append(~(valid_rows[:, :, None] & valid_cols[:, None, :]).flatten(1))
    return torch.cat(per_level, dim=1)


def unflatten_levels(tokens: Tensor, spatial_shapes: Tensor | Sequence[Sequence[int]]) -> list[Tensor]:
    """Split [N, S, ...] back into per-level [N, H_l, W_l, ...] tensors (views)."""
    levels = _as_size_list(spatial_shapes, "spatial_shapes")
    total = sum(h * w for h, w in levels)
    if tokens.dim() < 2 or tokens.shape[1] != total:
        raise ValueError(
            f"unflatten_levels: tokens has shape {tuple(tokens.shape)}; expected [N, {total}, ...] "
            f"for spatial_shapes {levels}"
        )
    chunks = tokens.split([h * w for h, w in levels], dim=1)
    return [c.unflatten(1, (h, w)) for c, (h, w) in zip(chunks, levels, strict=True)]


def sine_position_embedding(
    level_masks: Sequence[Tensor],
    num_feats: int = 128,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
) -> Tensor:
    """DETR's 2-D sine position embedding of every level, flattened like the tokens.

    Positions count valid tokens only, so they start at each image's valid region (a
    letterboxed image's first valid row and column get position 1, as at the top-left).

    Args:
        level_masks: L bool padding masks [N, H_l, W_l] (True = padding), e.g.
            ``unflatten_levels(padding_mask(...), spatial_shapes)``.
        num_feats: features per axis (C / 2); the output has 2 * num_feats channels.
        temperature: base of the geometric frequency progression.
        normalize: divide the cumulative positions by the last valid one (+1e-6), times ``scale``.
        scale: the normalised positions' range, 2*pi (DETR's): the finest frequency makes one
            period over the valid region; 2*pi*s makes s periods.

    Returns:
        float32 [N, S, 2 * num_feats]: the y half, then the x half; inside each half the
        frequencies alternate sin, cos.
    """
    if num_feats % 2 != 0:
        raise ValueError(f"sine_position_embedding: num_feats = {num_feats}; expected an even number")
    out = []
    for i, mask in enumerate(level_masks):
        if mask.dtype != torch.bool or mask.dim() != 3:
            raise ValueError(
                f"sine_position_embedding: level_masks[{i}] is {mask.dtype} {tuple(mask.shape)}; "
                "expected bool [N, H, W]"
            )
        valid = (~mask).float()
        y = valid.cumsum(dim=1)
        x = valid.cumsum(dim=2)
        if normalize:
            y = y / (y[:, -1:, :] + 1e-6) * scale
            x = x / (x[:, :, -1:] + 1e-6) * scale
        exponent = 2 * torch.div(torch.arange(num_feats, device=mask.device), 2, rounding_mode="floor")
        freq = temperature ** (exponent.float() / num_feats)
        halves = []
        for coord in (y, x):
            angles = coord[..., None] / freq  # [N, H, W, num_feats]
            halves.append(torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2))
        out.append(torch.cat(halves, dim=-1).flatten(1, 2))
    return torch.cat(out, dim=1)
