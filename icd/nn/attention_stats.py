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

- **auxiliary task** (``add_auxiliary``, with real and fake instances sampled as in training):
  the real/fake BCE of the real and of the fake slots (``aux_conf_real``, ``aux_conf_fake``),
  the box error of the real ones (``aux_reg_real``, L_reg's terms) and ``aux_auc``, the
  probability that a real instance gets a higher "real" logit than a fake one (0.5: the task
  does not tell them apart; per size: real and fake instances of that size).

A cell (y, x) of level l of stride r_l has its centre at ((x + 0.5) * r_l, (y + 0.5) * r_l)
input pixels (without known strides: r_l = Wp / W_l across, Hp / H_l down, for a map of size
(H_l, W_l) of a batch padded to (Hp, Wp)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

import icd.ops as ops

STAT_NAMES = ("lift", "distinctness", "peak")
MASS_NAMES = ("mass_own", "mass_others", "mass_background", "mass_border", "mass_padding")
# what the auxiliary task makes of the instances (``AttentionStats.add_auxiliary``)
AUX_NAMES = ("aux_conf_real", "aux_conf_fake", "aux_reg_real", "aux_auc")
SIZES = ("tiny", "small", "medium", "large")
# box areas (pixels) where each size ends: under 2 x 2 cells of stride 8, then COCO's thresholds
SIZE_LIMITS = (16.0**2, 32.0**2, 96.0**2)


def cell_extents(
    spatial_shapes: Tensor, padded_size: Sequence[int], strides: Sequence[float] | None = None
) -> Tensor:
    """float64 [S, 4] (x1, y1, x2, y2) in input pixels of every token's cell, levels
    concatenated: cell (y, x) of a level of stride r_l covers [x r_l, (x + 1) r_l) across and
    [y r_l, (y + 1) r_l) down.

    ``strides``: r_l of each level (2**l for P_l); None: Hp / H_l and Wp / W_l (exact only when
    the padded size is a multiple of the stride, see ``icd.ops.level_strides``).
    """
    hp, wp = (float(v) for v in padded_size)
    shapes = spatial_shapes.tolist()
    given = None if strides is None else ops.level_strides(shapes, padded_size, strides)
    out = []
    for lvl, (h_l, w_l) in enumerate(shapes):
        ry, rx = (hp / h_l, wp / w_l) if given is None else (given[lvl], given[lvl])
        ys = torch.arange(h_l, dtype=torch.float64) * ry
        xs = torch.arange(w_l, dtype=torch.float64) * rx
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        x1, y1 = grid_x.reshape(-1), grid_y.reshape(-1)
        out.append(torch.stack([x1, y1, x1 + rx, y1 + ry], dim=1))
    return torch.cat(out)


def cell_centres(
    spatial_shapes: Tensor, padded_size: Sequence[int], strides: Sequence[float] | None = None
) -> Tensor:
    """float64 [S, 2] (x, y) centre in input pixels of every token's cell (``cell_extents``)."""
    extents = cell_extents(spatial_shapes, padded_size, strides)
    return (extents[:, :2] + extents[:, 2:]) / 2


def level_index(spatial_shapes: Tensor) -> Tensor:
    """int64 [S]: the level l of every token."""
    counts = (spatial_shapes[:, 0] * spatial_shapes[:, 1]).tolist()
    return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


@dataclass
class AttentionStats:
    """Running sums of lift and distinctness over instances, overall and per level.

    ``add_image`` per image; ``summary()`` gives the means. ``level_names`` label the levels
    in the summary keys (``lift_P3``, ...). ``detailed`` adds, per instance size (``SIZES``: box
    area in input pixels: tiny below 16^2, i.e. under 2 x 2 cells of stride 8; then COCO's
    small below 32^2, medium below 96^2, large), ``lift_tiny``, ``lift_P3_tiny``, ...,
    ``distinctness_tiny``, ...; where the attention mass goes (``MASS_NAMES``, overall and per
    size: ``mass_own``, ``mass_own_tiny``, ...; a cell is inside a box here when it overlaps
    it, so that a box smaller than a cell still owns the cells it lies in, where lift counts
    only the cells whose centres it holds); and the share of the attention on each level
    (``mass_P3``, ``mass_P3_tiny``, ...).
    """

    level_names: Sequence[str]
    detailed: bool = False
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    # real/fake logits per size index (-1: all) for aux_auc: {size: ([real...], [fake...])}
    logits: dict[int, tuple[list[Tensor], list[Tensor]]] = field(default_factory=dict)

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
        strides: Sequence[float] | None = None,
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
            strides: r_l of each level in input pixels (None: inferred, see ``cell_centres``).
        """
        if maps.shape[0] == 0:
            return
        if head_weights is not None:
            self._add("peak", head_weights.double().cpu().amax(dim=-1).mean(dim=-1))
        maps = maps.double().cpu()
        boxes = boxes.double().cpu()
        valid = valid.cpu()
        extents = cell_extents(spatial_shapes, padded_size, strides)
        centres = (extents[:, :2] + extents[:, 2:]) / 2
        levels = level_index(spatial_shapes)
        in_box = (
            (centres[None, :, 0] >= boxes[:, None, 0])
            & (centres[None, :, 0] < boxes[:, None, 2])
            & (centres[None, :, 1] >= boxes[:, None, 1])
            & (centres[None, :, 1] < boxes[:, None, 3])
        )  # [n, S]
        inside = in_box & valid[None, :]
        groups = [("", torch.ones_like(valid))]
        groups += [(f"_{name}", levels == lvl) for lvl, name in enumerate(self.level_names)]
        lifts = {}
        for suffix, on_level in groups:
            lifts[suffix] = _lift(maps, inside, valid & on_level)
            self._add("lift" + suffix, lifts[suffix])
            if maps.shape[0] >= 2:
                self._add("distinctness" + suffix, _distinctness(maps[:, on_level & valid]))
        if not self.detailed:
            return
        area = (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)
        size_of = size_index(area)
        distinct = _distinctness(maps[:, valid], keep_all=True) if maps.shape[0] >= 2 else None
        touches = (
            (extents[None, :, 0] < boxes[:, None, 2])
            & (extents[None, :, 2] > boxes[:, None, 0])
            & (extents[None, :, 1] < boxes[:, None, 3])
            & (extents[None, :, 3] > boxes[:, None, 1])
        )  # [n, S]: the cell overlaps the box
        mass = _mass_shares(maps, touches, valid, _border_tokens(valid, spatial_shapes))
        total = maps.sum(dim=1).clamp_min(1e-30)
        for lvl, name in enumerate(self.level_names):
            mass[f"mass_{name}"] = maps[:, levels == lvl].sum(dim=1) / total
        for s, size in enumerate(SIZES):
            rows = size_of == s
            if not bool(rows.any()):
                continue
            for suffix, values in lifts.items():
                self._add(f"lift{suffix}_{size}", values[rows])
            if distinct is not None:
                self._add(f"distinctness_{size}", distinct[rows])
            for name, share in mass.items():
                self._add(f"{name}_{size}", share[rows])
        for name, share in mass.items():
            self._add(name, share)

    def add_auxiliary(self, boxes: Tensor, is_real: Tensor, is_valid: Tensor, logit: Tensor, bce: Tensor,
                      error: Tensor) -> None:  # fmt: skip
        """Add one image's instance slots as the auxiliary task sees them, overall and per size
        of each slot's box (``AUX_NAMES``).

        Args:
            boxes: float [K, 4] (x1, y1, x2, y2) of the slots, in input pixels.
            is_real, is_valid: bool [K], the real slots and the real or fake ones.
            logit, bce, error: float [K] real/fake logit, its BCE and the box error of each
                slot (``ICDDistiller.auxiliary_slot_losses``).
        """
        boxes, logit, bce, error = (t.double().cpu() for t in (boxes, logit, bce, error))
        real, fake = is_real.cpu(), (is_valid & ~is_real).cpu()
        area = (boxes[:, 2] - boxes[:, 0]).clamp_min(0) * (boxes[:, 3] - boxes[:, 1]).clamp_min(0)
        size_of = size_index(area)
        groups = [("", -1, torch.ones_like(real))]
        groups += [(f"_{name}", s, size_of == s) for s, name in enumerate(SIZES)]
        for suffix, s, rows in groups:
            if suffix and not self.detailed:
                break
            self._add("aux_conf_real" + suffix, bce[real & rows])
            self._add("aux_conf_fake" + suffix, bce[fake & rows])
            self._add("aux_reg_real" + suffix, error[real & rows])
            reals, fakes = self.logits.setdefault(s, ([], []))
            reals.append(logit[real & rows])
            fakes.append(logit[fake & rows])

    def summary(self) -> dict[str, float]:
        """Mean of each statistic over the instances that have it, and the instance counts
        (``lift_count``, ``distinctness_count``, ``peak_count``)."""
        sums, counts = dict(self.sums), dict(self.counts)
        for s, (reals, fakes) in self.logits.items():
            real, fake = torch.cat(reals), torch.cat(fakes)
            if real.numel() and fake.numel():
                key = "aux_auc" + ("" if s < 0 else f"_{SIZES[s]}")
                sums[key], counts[key] = _auc(real, fake), 1
        out = {}
        for key in sorted(sums, key=_order(self.level_names)):
            if counts[key]:
                out[key] = sums[key] / counts[key]
        for name in STAT_NAMES:
            out[f"{name}_count"] = self.counts.get(name, 0)
        return out


def is_detailed_statistic(key: str) -> bool:
    """Whether a summary key is one of the ``detailed`` statistics (per size, mass shares, the
    auxiliary task's but its overall real/fake AUC)."""
    stat, _, rest = key.partition("_")
    if key.startswith(("mass_", "aux_")):
        return key != "aux_auc"
    return stat in STAT_NAMES and any(part in SIZES for part in rest.split("_"))


def size_index(area: Tensor) -> Tensor:
    """int64 [n]: the index in ``SIZES`` of each box area in pixels (``SIZE_LIMITS``)."""
    return sum((area >= limit).long() for limit in SIZE_LIMITS)


def _border_tokens(valid: Tensor, spatial_shapes: Tensor) -> Tensor:
    """bool [S]: valid tokens in the first or last valid row or column of their level."""
    out = []
    for lvl_valid, (h_l, w_l) in zip(
        valid.split((spatial_shapes[:, 0] * spatial_shapes[:, 1]).tolist()), spatial_shapes.tolist(), strict=True
    ):
        grid = lvl_valid.reshape(h_l, w_l)
        rows = torch.nonzero(grid.any(dim=1)).flatten()
        cols = torch.nonzero(grid.any(dim=0)).flatten()
        edge = torch.zeros(h_l, w_l, dtype=torch.bool)
        if rows.numel():
            edge[rows.min()] = edge[rows.max()] = True
            edge[:, cols.min()] = edge[:, cols.max()] = True
        out.append((edge & grid).flatten())
    return torch.cat(out)


def _mass_shares(maps: Tensor, in_box: Tensor, valid: Tensor, border: Tensor) -> dict[str, Tensor]:
    """Each instance's attention split over ``MASS_NAMES`` (each [n]; they sum to 1), by the
    first that holds a token: padding (not ``valid``), its own box, another instance's box, the
    valid region's border ring, background (the rest). ``in_box`` [n, S]: the cells that count
    as inside each box."""
    total = maps.sum(dim=1).clamp_min(1e-30)
    padding = ~valid[None, :]
    own = in_box & ~padding
    others = (in_box.sum(dim=0, keepdim=True) - in_box.long() > 0) & ~own & ~padding
    edge = border[None, :] & ~own & ~others & ~padding
    rest = ~(padding | own | others | edge)
    regions = {"mass_padding": padding, "mass_own": own, "mass_others": others, "mass_border": edge,
               "mass_background": rest}  # fmt: skip
    return {name: (maps * regions[name]).sum(dim=1) / total for name in MASS_NAMES}


def _lift(maps: Tensor, inside: Tensor, region: Tensor) -> Tensor:
    """[n] lift of each instance over the tokens of ``region`` (NaN where undefined)."""
    mass = maps[:, region]
    total = mass.sum(dim=1)
    inside = inside[:, region].double()
    share_attention = (mass * inside).sum(dim=1) / total
    share_tokens = inside.mean(dim=1) if region.any() else torch.zeros_like(total)
    lift = share_attention / share_tokens
    return torch.where((share_tokens > 0) & (total > 0), lift, torch.full_like(lift, float("nan")))


def _distinctness(maps: Tensor, keep_all: bool = False) -> Tensor:
    """[n] total-variation distance of each row (renormalised) from the mean of the others.

    Rows without mass are left out, or NaN with ``keep_all`` (which keeps the rows aligned);
    fewer than 2 rows with mass: empty (all NaN with ``keep_all``)."""
    total = maps.sum(dim=1, keepdim=True)
    keep = total[:, 0] > 0
    out = torch.full((maps.shape[0],), float("nan"), dtype=maps.dtype)
    if int(keep.sum()) < 2:
        return out if keep_all else torch.empty(0, dtype=maps.dtype)
    p = maps[keep] / total[keep]
    n = p.shape[0]
    others = (p.sum(dim=0, keepdim=True) - p) / (n - 1)
    distance = 0.5 * (p - others).abs().sum(dim=1)
    if not keep_all:
        return distance
    out[keep] = distance
    return out


def _auc(positive: Tensor, negative: Tensor) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U / (n_p n_n))."""
    scores = torch.cat([positive, negative])
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # ranks from 1, ties averaged
    n_pos, n_neg = positive.numel(), negative.numel()
    rank_sum = float(mean_rank[inverse[:n_pos]].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _order(level_names: Sequence[str]):
    """Sort key: lift, lift per level, distinctness, distinctness per level, peak, then the
    detailed statistics; inside each, sizes after the overall value."""
    levels = list(level_names)
    stats = STAT_NAMES + MASS_NAMES + ("mass",) + AUX_NAMES  # mass: the share per level (mass_P3, ...)

    def key(name: str) -> tuple[int, int, int]:
        stat = next(s for s in sorted(stats, key=len, reverse=True) if name == s or name.startswith(s + "_"))
        parts = name[len(stat) :].split("_")[1:]
        level = next((levels.index(p) + 1 for p in parts if p in levels), 0)
        size = next((SIZES.index(p) + 1 for p in parts if p in SIZES), 0)
        return stats.index(stat), size, level

    return key
