"""Per-level projections: FPN maps of different widths to one token width.

Detectors whose necks change width per level (YOLO: 64/128/256 channels on strides 8/16/32)
need one projection per level before their maps can be flattened into one token sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def as_level_widths(channels: int | Sequence[int], name: str) -> tuple[int, ...] | None:
    """An int (one width for every level) -> None; a sequence -> a tuple of L >= 1 widths."""
    if isinstance(channels, bool):
        raise TypeError(f"{name} = {channels!r}; expected an int or a sequence of ints")
    if isinstance(channels, int):
        if channels < 1:
            raise ValueError(f"{name} = {channels}; expected >= 1")
        return None
    widths = tuple(channels)
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"{name} = {list(widths)}; expected an int or a non-empty list of ints >= 1, one per level")
    return widths


class LevelProjection(nn.Module):
    """One Linear(C_l, C) per level (a 1x1 convolution), then the levels flattened into tokens.

    Args:
        in_channels: C_l of each of the L levels.
        out_channels: C, the common token width.

    ``forward(features)``: L maps [N, C_l, H_l, W_l] -> tokens [N, S, C], S = sum H_l * W_l,
    levels in order and row-major inside a level (like ``icd.ops.flatten_levels``).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        self.out_channels = int(out_channels)
        self.levels = nn.ModuleList(nn.Linear(c, out_channels) for c in self.in_channels)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.levels):
            raise ValueError(
                f"LevelProjection: got {len(features)} feature maps; expected {len(self.levels)} levels"
            )
        tokens = [
            projection(f.flatten(2).transpose(1, 2))
            for projection, f in zip(self.levels, features, strict=True)
        ]
        return torch.cat(tokens, dim=1)

    def extra_repr(self) -> str:
        return f"in_channels={list(self.in_channels)}, out_channels={self.out_channels}"
