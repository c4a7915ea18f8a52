"""Lift and distinctness on constructed attention maps whose values are known by hand."""

from __future__ import annotations

import math

import pytest
import torch

from icd.nn.attention_stats import AttentionStats, cell_centres, cell_extents, is_detailed_statistic, level_index
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


def _detailed(maps, boxes, valid=ALL_VALID, shapes=ONE_LEVEL, names=("P3",)):
    stats = AttentionStats(names, detailed=True)
    stats.add_image(maps, boxes, valid, shapes, PADDED)
    return stats.summary()


def test_attention_mass_splits_over_own_box_others_border_background_and_padding():
    # 4x4 cells of 16 px; instance 0's box holds cell (1, 1), instance 1's cell (2, 2); the
    # border ring is rows/columns 0 and 3 of the valid region (here: all but column 3 valid)
    valid = torch.ones(4, 4, dtype=torch.bool)
    valid[:, 3] = False
    boxes = torch.tensor([[18.0, 18.0, 30.0, 30.0], [34.0, 34.0, 46.0, 46.0]])  # inside one cell each
    first = torch.zeros(4, 4)
    first[1, 1], first[2, 2], first[0, 0], first[1, 2], first[3, 3] = 0.4, 0.2, 0.1, 0.2, 0.1
    second = torch.zeros(4, 4)
    second[2, 2] = 1.0
    summary = _detailed(torch.stack([first.flatten(), second.flatten()]), boxes, valid.flatten())
    # own, others, border (column 2 is now the valid region's last: (0,0) and (1,2) border), padding
    expected_first = {"mass_own": 0.4, "mass_others": 0.2, "mass_border": 0.3, "mass_background": 0.0,
                      "mass_padding": 0.1}  # fmt: skip
    for name, value in expected_first.items():
        assert summary[name] == pytest.approx((value + (1.0 if name == "mass_own" else 0.0)) / 2), name
    assert sum(summary[n] for n in expected_first) == pytest.approx(1.0)
    assert summary["mass_P3"] == pytest.approx(1.0)
    # both boxes are 12 x 12 px: tiny (under 16^2); no other size has entries
    assert summary["mass_own_tiny"] == summary["mass_own"] and "mass_own_small" not in summary
    assert "lift_tiny" in summary and "lift_P3_tiny" in summary and "distinctness_tiny" in summary
    assert summary["lift_count"] == 2  # the size split adds no instances to the counts


def test_detailed_statistics_per_size_and_level():
    shapes = torch.tensor([[4, 4], [2, 2]])
    valid = torch.ones(20, dtype=torch.bool)
    tiny = torch.tensor([[16.0, 16.0, 30.0, 30.0]])  # 14 x 14: tiny
    small = torch.tensor([[0.0, 0.0, 30.0, 30.0]])  # 30 x 30: small
    maps = torch.zeros(2, 20)
    maps[0, 5] = 0.75  # P3 cell (1, 1)
    maps[0, 16] = 0.25  # P4 cell (0, 0)
    maps[1, :16] = 1 / 16  # uniform over P3
    summary = _detailed(maps, torch.cat([tiny, small]), valid, shapes, names=("P3", "P4"))
    assert summary["mass_P3_tiny"] == pytest.approx(0.75) and summary["mass_P4_tiny"] == pytest.approx(0.25)
    assert summary["mass_P3_small"] == pytest.approx(1.0) and summary["mass_P3"] == pytest.approx(0.875)
    assert summary["lift_P3_tiny"] == pytest.approx(1.0 / (1 / 16))  # all its P3 mass on its one cell
    assert summary["lift_P3_small"] == pytest.approx(1.0)
    keys = list(summary)
    assert keys.index("lift") < keys.index("lift_P3") < keys.index("lift_tiny") < keys.index("lift_P3_tiny")
    assert keys.index("lift_P4_tiny") < keys.index("distinctness") < keys.index("mass_own")


def test_detailed_keys_are_only_added_on_request():
    maps = torch.stack([_cells((0, 0)), _cells((3, 3))])
    plain = _summary(maps, TOP_LEFT.expand(2, 4))
    assert not any(is_detailed_statistic(k) for k in plain)
    detailed = _detailed(maps, TOP_LEFT.expand(2, 4))
    extra = [k for k in detailed if k not in plain]
    assert extra and all(is_detailed_statistic(k) for k in extra)
    assert {k: detailed[k] for k in plain} == plain


def test_cells_at_explicit_strides():
    # a 96 x 192 batch's P6 (2 x 3 cells) and P7 (1 x 2): stride 64 and 128, not 56 and 96
    shapes = torch.tensor([[2, 3], [1, 2]])
    assert cell_centres(shapes, (96, 192), [64, 128])[2].tolist() == [160.0, 32.0]
    assert cell_centres(shapes, (96, 192))[2].tolist() == [160.0, 24.0]  # inferred: 192 / 3 across, 96 / 2 down
    assert cell_extents(shapes, (96, 192), [64, 128])[-1].tolist() == [128.0, 0.0, 256.0, 128.0]


def test_only_attention_keys_count_as_detailed():
    assert is_detailed_statistic("lift_P3_tiny") and is_detailed_statistic("mass_P3")
    assert not is_detailed_statistic("lift_P3") and not is_detailed_statistic("AP_small")


def test_auxiliary_statistics_per_slot_kind_and_size():
    """aux_conf_real / _fake and aux_reg_real average the slots of their kind (padding never
    counts), per size with ``detailed``; aux_auc is P(real logit > fake logit), ties half."""
    boxes = torch.tensor([[0, 0, 4, 4], [0, 0, 40, 40], [0, 0, 4, 4], [0, 0, 40, 40], [0, 0, 0, 0]]).float()
    is_real = torch.tensor([True, True, False, False, False])
    is_valid = torch.tensor([True, True, True, True, False])
    logit = torch.tensor([2.0, 3.0, 1.0, 2.0, 9.0])
    bce = torch.tensor([0.1, 0.3, 0.5, 0.7, 99.0])
    error = torch.tensor([1.0, 2.0, 9.0, 9.0, 99.0])
    stats = AttentionStats(["P3"], detailed=True)
    stats.add_auxiliary(boxes, is_real, is_valid, logit, bce, error)
    out = stats.summary()
    assert out["aux_conf_real"] == pytest.approx(0.2) and out["aux_conf_fake"] == pytest.approx(0.6)
    assert out["aux_reg_real"] == pytest.approx(1.5)
    assert out["aux_auc"] == pytest.approx(3.5 / 4)  # (2 > 1) + (2 = 2) / 2 + (3 > 1) + (3 > 2)
    assert out["aux_conf_real_tiny"] == pytest.approx(0.1) and out["aux_conf_fake_medium"] == pytest.approx(0.7)
    assert out["aux_auc_tiny"] == 1.0 and out["aux_auc_medium"] == 1.0
    assert all(is_detailed_statistic(k) for k in out if k.startswith("aux_") and k != "aux_auc")
    assert not is_detailed_statistic("aux_auc")  # printed with lift and distinctness
    plain = AttentionStats(["P3"])
    plain.add_auxiliary(boxes, is_real, is_valid, logit, bce, error)
    assert not any(k.endswith(("_tiny", "_medium")) for k in plain.summary())
