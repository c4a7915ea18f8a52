"""How instance-specific ICD's attention is: lift and distinctness of real instances' maps.

Given, for each image, the attention maps of its real instances over the flattened FPN tokens
(``ICDDistiller.instance_attention_maps``: float [n_i, S], each row a distribution over the
image's valid tokens, already averaged over heads) and their boxes:

- **lift** of an instance: the share of its attention on tokens whose cell centres lie inside
  its box, divided by the share of the image's valid tokens inside the box. Uniform attention
  over the valid tokens gives 1; attention that looks only inside the box gives
  1 / (share of tokens inside), e.g. 10 for a box covering a tenth of the image. Instances
  whose box holds no valid cell centre (on a level: no cell of that level) have no lift there.
- **distinctness** of an instance (images with >= 2 real instances): the total-variation
  distance ``0.5 * sum |p - q|`` between its map p and the mean map q of the other instances
  of its image. 0 when every instance looks at the same places; 1 for disjoint maps.

Both are also computed per FPN level, on each instance's map restricted to the level and
renormalised (an instance with no attention mass on a level is left out there).

- **peak** (when the per-head distillation weights are given): an instance's largest weight
  on one token, per head (each head's weights sum to 1 over the valid tokens), averaged over
  the heads. 1 / (valid tokens) for uniform weights, 1 when every head puts all its weight on
  one token. High peaks concentrate the distillation loss on a few cells.

A cell (y, x) of level l with map size (H_l, W_l) of a batch padded to (Hp, Wp) has its centre
at ((x + 0.5) * Wp / W_l, (y + 0.5) * Hp / H_l) input pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

STAT_NAMES = ("lift", "distinctness", "peak")


def cell_centres(spatial_shapes: Tensor, padded_size: Sequence[int]) -> Tensor:
    """float [S, 2] (x, y) centre in input pixels of every token, levels concatenated."""
    hp, wp = (float(v) for v in padded_size)
    centres = []
    for h_l, w_l in spatial_shapes.tolist():
        ys = (torch.arange(h_l, dtype=torch.float64) + 0.5) * (hp / h_l)
        xs = (torch.arange(w_l, dtype=torch.float64) + 0.5) * (wp / w_l)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=1))
    return torch.cat(centres)


def level_index(spatial_shapes: Tensor) -> Tensor:
    """int64 [S]: the level l of every token."""
    counts = (spatial_shapes[:, 0] * spatial_shapes[:, 1]).tolist()
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


@dataclass
class AttentionStats:
    """Running sums of lift and distinctness over instances, overall and per level.

    ``add_image`` per image; ``summary()`` gives the means. ``level_names`` label the levels
    in the summary keys (``lift_P3``, ...).
    """

    level_names: Sequence[str]
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def _add(self, key: str, values: Tensor) -> None:
        values = values[torch.isfinite(values)]
        self.sums[key] = self.sums.get(key, 0.0) + float(values.sum())
        self.counts[key] = self.counts.get(key, 0) + int(values.numel())

    def add_image(
        self,
        maps: Tensor,
        boxes: Tensor,
        valid: Tensor,
        spatial_shapes: Tensor,
        padded_size: Sequence[int],
        head_weights: Tensor | None = None,
    ) -> None:
        """Add one image's real instances.

        Args:
            maps: float [n, S] attention of each real instance over the tokens.
            boxes: float [n, 4] (x1, y1, x2, y2) in input pixels of the padded frame.
            valid: bool [S], the image's valid (unpadded) tokens.
            spatial_shapes: int64 [L, 2] (H_l, W_l) of the levels.
            padded_size: (Hp, Wp) of the padded input.
            head_weights: float [n, h, S], each instance's distillation weights per head, for
                the peak (None: no peak).
        """
        if maps.shape[0] == 0:
            return
        if head_weights is not None:
            self._add("peak", head_weights.double().cpu().amax(dim=-1).mean(dim=-1))
        maps = maps.double().cpu()
        boxes = boxes.double().cpu()
        valid = valid.cpu()
        centres = cell_centres(spatial_shapes, padded_size)
        levels = level_index(spatial_shapes)
        inside = (
            (centres[None, :, 0] >= boxes[:, None, 0])
            & (centres[None, :, 0] < boxes[:, None, 2])
            & (centres[None, :, 1] >= boxes[:, None, 1])
            & (centres[None, :, 1] < boxes[:, None, 3])
            & valid[None, :]
        )  # [n, S]
        groups = [("", torch.ones_like(valid))]
        groups += [(f"_{name}", levels == lvl) for lvl, name in enumerate(self.level_names)]
        for suffix, on_level in groups:
            self._add("lift" + suffix, _lift(maps, inside, valid & on_level))
            if maps.shape[0] >= 2:
                self._add("distinctness" + suffix, _distinctness(maps[:, on_level & valid]))

    def summary(self) -> dict[str, float]:
        """Mean of each statistic over the instances that have it, and the instance counts
        (``lift_count``, ``distinctness_count``, ``peak_count``)."""
        out = {}
        for key in sorted(self.sums, key=_order(self.level_names)):
            if self.counts[key]:
                out[key] = self.sums[key] / self.counts[key]
        for name in STAT_NAMES:
            out[f"{name}_count"] = self.counts.get(name, 0)
        return out


def _lift(maps: Tensor, inside: Tensor, region: Tensor) -> Tensor:
    """[n] lift of each instance over the tokens of ``region`` (NaN where undefined)."""
    mass = maps[:, region]
    total = mass.sum(dim=1)
    inside = inside[:, region].double()
    share_attention = (mass * inside).sum(dim=1) / total
    share_tokens = inside.mean(dim=1) if region.any() else torch.zeros_like(total)
    lift = share_attention / share_tokens
    return torch.where((share_tokens > 0) & (total > 0), lift, torch.full_like(lift, float("nan")))


def _distinctness(maps: Tensor) -> Tensor:
    """[n] total-variation distance of each row (renormalised) from the mean of the others."""
    total = maps.sum(dim=1, keepdim=True)
    keep = total[:, 0] > 0
    if int(keep.sum()) < 2:
        return torch.empty(0, dtype=maps.dtype)
    p = maps[keep] / total[keep]
    n = p.shape[0]
    others = (p.sum(dim=0, keepdim=True) - p) / (n - 1)
    return 0.5 * (p - others).abs().sum(dim=1)


def _order(level_names: Sequence[str]):
    """Sort key: lift, lift per level, distinctness, distinctness per level."""

    def key(name: str) -> tuple[int, int]:
        stat, _, level = name.partition("_")
        return STAT_NAMES.index(stat), (list(level_names).index(level) + 1 if level else 0)

    return key
