"""flatten_levels, padding_mask, unflatten_levels and sine_position_embedding (docs/method.md 3.4)."""

from __future__ import annotations

import math

import pytest
import torch

import icd.ops as ops


def test_flatten_levels_order_and_starts():
    feats = [torch.randn(2, 3, 4, 5), torch.randn(2, 3, 2, 3), torch.randn(2, 3, 1, 1)]
    tokens, shapes, starts = ops.flatten_levels(feats)
    assert tokens.shape == (2, 20 + 6 + 1, 3)
    assert shapes.tolist() == [[4, 5], [2, 3], [1, 1]]
    assert starts.tolist() == [0, 20, 26]
    # row-major inside a level: token (y, x) of level 1 sits at 20 + y * 3 + x
    assert torch.equal(tokens[:, 20 + 1 * 3 + 2], feats[1][:, :, 1, 2])
    assert torch.equal(tokens[:, 2 * 5 + 4], feats[0][:, :, 2, 4])
    back = ops.unflatten_levels(tokens, shapes)
    for f, b in zip(feats, back, strict=True):
        assert torch.equal(b.permute(0, 3, 1, 2), f)


def test_flatten_levels_rejects_mismatched_levels():
    with pytest.raises(ValueError, match=r"features\[1\].*N, C"):
        ops.flatten_levels([torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)])
    with pytest.raises(ValueError, match="empty"):
        ops.flatten_levels([])


def test_padding_mask_follows_the_stride_rule():
    padded = (64, 96)
    shapes = [(8, 12), (4, 6), (2, 3)]
    sizes = [(64, 96), (40, 70), (1, 1)]
    mask = ops.padding_mask(torch.tensor(sizes), torch.tensor(shapes), padded)
    assert mask.dtype == torch.bool and mask.shape == (3, 96 + 24 + 6)
    start = 0
    for hl, wl in shapes:
        stride = (padded[0] / hl + padded[1] / wl) / 2
        for i, (h, w) in enumerate(sizes):
            for y in range(hl):
                for x in range(wl):
                    valid = y < math.ceil(h / stride) and x < math.ceil(w / stride)
                    assert bool(mask[i, start + y * wl + x]) == (not valid)
        start += hl * wl
    assert not mask[0].any()


def _detr_embedding_by_hand(mask: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """One position at a time, straight from the formula (docs/method.md 3.4)."""
    n, hh, ww = mask.shape
    out = torch.zeros(n, hh, ww, 2 * num_feats)
    for i in range(n):
        valid = ~mask[i]
        for y in range(hh):
            for x in range(ww):
                cy = valid[: y + 1, x].sum().item() / (valid[:, x].sum().item() + 1e-6) * 2 * math.pi
                cx = valid[y, : x + 1].sum().item() / (valid[y, :].sum().item() + 1e-6) * 2 * math.pi
                for half, c in enumerate((cy, cx)):
                    for j in range(num_feats):
                        angle = c / temperature ** (2 * (j // 2) / num_feats)
                        out[i, y, x, half * num_feats + j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return out.flatten(1, 2)


def test_sine_position_embedding_matches_the_formula():
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, 2:, :] = True
    mask[1, :, 3:] = True
    small = torch.zeros(2, 1, 2, dtype=torch.bool)
    got = ops.sine_position_embedding([mask, small], num_feats=6, temperature=100.0)
    want = torch.cat(
        [_detr_embedding_by_hand(mask, 6, 100.0), _detr_embedding_by_hand(small, 6, 100.0)], dim=1
    )
    assert got.shape == (2, 12 + 2, 12)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sine_position_embedding_from_padding_mask():
    shapes = torch.tensor([[6, 8], [3, 4]])
    mask = ops.padding_mask([(48, 64), (30, 40)], shapes, (48, 64))
    pos = ops.sine_position_embedding(ops.unflatten_levels(mask, shapes), num_feats=64)
    assert pos.shape == (2, 48 + 12, 128) and torch.isfinite(pos).all()


def test_sine_position_embedding_rejects_bad_masks():
    with pytest.raises(ValueError, match="bool"):
        ops.sine_position_embedding([torch.zeros(2, 3, 4)])
    with pytest.raises(ValueError, match="even"):
        ops.sine_position_embedding([torch.zeros(2, 3, 4, dtype=torch.bool)], num_feats=5)


# A 96 x 120 image in a batch padded to 96 x 192 (the feature tap's second test): P3..P7 of the
# torchvision FPN have ceil(Hp / 2^l) x ceil(Wp / 2^l) cells.
AWKWARD_PADDED = (96, 192)
AWKWARD_SHAPES = [(12, 24), (6, 12), (3, 6), (2, 3), (1, 2)]
FPN_STRIDES = [8, 16, 32, 64, 128]


def test_explicit_strides_mark_exactly_the_cells_that_overlap_the_image():
    sizes = [(96, 120), (70, 192)]
    mask = ops.padding_mask(torch.tensor(sizes), AWKWARD_SHAPES, AWKWARD_PADDED, FPN_STRIDES)
    grids = ops.unflatten_levels(mask, AWKWARD_SHAPES)
    for level, ((hl, wl), grid) in enumerate(zip(AWKWARD_SHAPES, grids, strict=True)):
        r = FPN_STRIDES[level]
        for i, (h, w) in enumerate(sizes):
            for y in range(hl):
                for x in range(wl):
                    overlaps = y * r < h and x * r < w  # the cell [x r, (x + 1) r) meets [0, w)
                    assert bool(grid[i, y, x]) == (not overlaps), (level, i, y, x)


def test_inferred_strides_are_wrong_on_the_coarse_levels_of_an_awkward_padded_size():
    assert ops.level_strides(AWKWARD_SHAPES, AWKWARD_PADDED)[3:] == [56.0, 96.0]  # not 64, 128
    inferred = ops.unflatten_levels(ops.padding_mask([(96, 120)], AWKWARD_SHAPES, AWKWARD_PADDED), AWKWARD_SHAPES)
    explicit = ops.unflatten_levels(
        ops.padding_mask([(96, 120)], AWKWARD_SHAPES, AWKWARD_PADDED, FPN_STRIDES), AWKWARD_SHAPES
    )
    # P6's third column covers pixels 128..192, all padding for a 120-px-wide image
    assert not bool(inferred[3][0, 0, 2]) and bool(explicit[3][0, 0, 2])
    for lvl in range(3):  # P3-P5 divide 96 x 192 exactly: both agree
        assert torch.equal(inferred[lvl], explicit[lvl])
    # the position embedding counts the valid cells: it changes with the mask
    pos_inferred = ops.sine_position_embedding(inferred, num_feats=8)
    pos_explicit = ops.sine_position_embedding(explicit, num_feats=8)
    assert not torch.allclose(pos_inferred, pos_explicit)


@pytest.mark.parametrize("strides", [[8, 16, 32, 64], [8, 16, 32, 64, 0], [8, 16, 32, 64, float("nan")]])
def test_bad_strides_raise_naming_them(strides):
    with pytest.raises(ValueError, match="strides"):
        ops.padding_mask([(96, 120)], AWKWARD_SHAPES, AWKWARD_PADDED, strides)
