"""Lift and distinctness on constructed attention maps whose values are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from icd.nn.attention_stats import AttentionStats, cell_centres, level_index
from icd.ops import padding_mask

# one 4x4 level of a 64x64 input: cells of 16 px, centres at 8, 24, 40, 56
ONE_LEVEL = torch.tensor([[4, 4]])
PADDED = (64, 64)
ALL_VALID = torch.ones(16, dtype=torch.bool)
TOP_LEFT = torch.tensor([[0.0, 0.0, 32.0, 32.0]])  # holds the 4 cells (0..1, 0..1)


def _cells(*yx):
    """A map with equal mass on the given (y, x) cells of the 4x4 level."""
    m = torch.zeros(16)
    for y, x in yx:
        m[y * 4 + x] = 1.0
    return m / m.sum()


def _summary(maps, boxes, valid=ALL_VALID, shapes=ONE_LEVEL, names=("P3",)):
    stats = AttentionStats(names)
    stats.add_image(maps, boxes, valid, shapes, PADDED)
    return stats.summary()


def test_cell_centres_and_levels():
    shapes = torch.tensor([[4, 4], [2, 2]])
    centres = cell_centres(shapes, PADDED)
    assert centres.shape == (20, 2)
    assert centres[0].tolist() == [8.0, 8.0] and centres[5].tolist() == [24.0, 24.0]
    assert centres[16].tolist() == [16.0, 16.0] and centres[19].tolist() == [48.0, 48.0]
    assert level_index(shapes).tolist() == [0] * 16 + [1] * 4


@pytest.mark.parametrize(
    ("attention", "lift"),
    [
        (torch.full((16,), 1 / 16), 1.0),  # uniform attention
        (_cells((0, 0), (0, 1), (1, 0), (1, 1)), 4.0),  # all inside a box of 4/16 of the cells
        (_cells((0, 0), (3, 3)), 2.0),  # half inside
        (_cells((3, 3)), 0.0),  # all outside
    ],
)
def test_lift_of_known_maps(attention, lift):
    summary = _summary(attention[None], TOP_LEFT)
    assert summary["lift"] == pytest.approx(lift)
    assert summary["lift_P3"] == pytest.approx(lift)
    assert summary["lift_count"] == 1 and summary["distinctness_count"] == 0
    assert "distinctness" not in summary  # one instance: no other to differ from


def test_lift_counts_only_valid_tokens():
    # the image is 32 px wide: columns 2 and 3 are padding; the box holds 4 of the 8 valid cells
    valid = padding_mask(torch.tensor([[64, 32]]), ONE_LEVEL, PADDED)[0].logical_not()
    assert int(valid.sum()) == 8
    uniform_on_valid = valid.double() / valid.sum()
    assert _summary(uniform_on_valid[None], TOP_LEFT, valid)["lift"] == pytest.approx(1.0)
    inside = _cells((0, 0), (1, 1))
    assert _summary(inside[None], TOP_LEFT, valid)["lift"] == pytest.approx(2.0)  # 1 / (4/8)


def test_box_without_a_cell_centre_has_no_lift():
    tiny = torch.tensor([[0.0, 0.0, 6.0, 6.0]])  # no centre (8, 8) inside
    summary = _summary(_cells((0, 0))[None], tiny)
    assert summary["lift_count"] == 0 and "lift" not in summary


@pytest.mark.parametrize(
    ("maps", "expected"),
    [
        ([_cells((0, 0)), _cells((0, 0))], [0.0, 0.0]),  # same map
        ([_cells((0, 0)), _cells((3, 3))], [1.0, 1.0]),  # disjoint maps
        ([_cells((0, 0)), _cells((0, 1)), _cells((0, 2))], [1.0, 1.0, 1.0]),
        # p0 = (e0 + e1) / 2 against e0: 0.5; e0 against the mean of the others (p0 alone): 0.5
        ([_cells((0, 0), (0, 1)), _cells((0, 0))], [0.5, 0.5]),
    ],
)
def test_distinctness_of_known_maps(maps, expected):
    boxes = TOP_LEFT.expand(len(maps), 4)
    summary = _summary(torch.stack(maps), boxes)
    assert summary["distinctness"] == pytest.approx(sum(expected) / len(expected))
    assert summary["distinctness_count"] == len(maps)


def test_per_level_statistics_renormalise_each_level():
    # two levels: P3 4x4 and P4 2x2 (cells of 32 px, centres 16, 48); the box holds one P4 cell
    shapes = torch.tensor([[4, 4], [2, 2]])
    valid = torch.ones(20, dtype=torch.bool)
    first = torch.zeros(20)
    first[:16] = 0.5 / 16  # P3: uniform (lift 1)
    first[16] = 0.5  # P4: all on the box's cell (lift 4)
    second = torch.zeros(20)
    second[:16] = 0.5 / 16
    second[19] = 0.5  # P4: all on the far cell (lift 0)
    maps = torch.stack([first, second])
    boxes = TOP_LEFT.expand(2, 4)
    summary = _summary(maps, boxes, valid, shapes, names=("P3", "P4"))
    assert summary["lift_P3"] == pytest.approx(1.0)
    assert summary["lift_P4"] == pytest.approx((4.0 + 0.0) / 2)
    # overall: 20 tokens, 5 inside (4 P3 + 1 P4); first has 0.5 * 4/16 + 0.5 = 0.625 inside
    assert summary["lift"] == pytest.approx(((0.625 / 0.25) + (0.125 / 0.25)) / 2)
    assert summary["distinctness_P3"] == pytest.approx(0.0)
    assert summary["distinctness_P4"] == pytest.approx(1.0)
    assert summary["distinctness"] == pytest.approx(0.5)
    keys = [k for k in summary if not k.endswith("_count")]
    assert keys == ["lift", "lift_P3", "lift_P4", "distinctness", "distinctness_P3", "distinctness_P4"]


def test_means_accumulate_over_images():
    stats = AttentionStats(["P3"])
    stats.add_image(_cells((0, 0))[None], TOP_LEFT, ALL_VALID, ONE_LEVEL, PADDED)  # lift 4
    stats.add_image(torch.full((1, 16), 1 / 16), TOP_LEFT, ALL_VALID, ONE_LEVEL, PADDED)  # lift 1
    stats.add_image(torch.zeros(0, 16), torch.zeros(0, 4), ALL_VALID, ONE_LEVEL, PADDED)  # none
    summary = stats.summary()
    assert summary["lift"] == pytest.approx(2.5) and summary["lift_count"] == 2
    assert math.isfinite(summary["lift_P3"])


def test_peak_of_known_head_weights():
    uniform = torch.full((16,), 1 / 16)
    one_cell = _cells((2, 2))
    # instance 0: one head on one cell (peak 1), the other uniform (1/16); instance 1: both uniform
    weights = torch.stack([torch.stack([one_cell, uniform]), torch.stack([uniform, uniform])])
    stats = AttentionStats(["P3"])
    stats.add_image(weights.mean(dim=1), TOP_LEFT.expand(2, 4), ALL_VALID, ONE_LEVEL, PADDED, weights)
    summary = stats.summary()
    assert summary["peak"] == pytest.approx(((1 + 1 / 16) / 2 + 1 / 16) / 2)
    assert summary["peak_count"] == 2
    assert "peak" not in _summary(uniform[None], TOP_LEFT)  # no head weights given: no peak
