"""icd.nn.InstanceSampler and InstanceEncoder: slot layout, counts, statistics, descriptor."""

from __future__ import annotations

import math

import pytest
import torch

from icd.nn import ClassPrior, InstanceEncoder, InstanceSampler, instance_count, instance_descriptor


def _gt(n: int, w: float, h: float, label: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random boxes inside a (h, w) image and their labels."""
    xy = torch.rand(n, 2) * torch.tensor([w / 2, h / 2])
    wh = 4 + torch.rand(n, 2) * torch.tensor([w / 2 - 4, h / 2 - 4])
    return torch.cat([xy, xy + wh], dim=1), torch.full((n,), label, dtype=torch.long)


@pytest.mark.parametrize(
    "num_gt, neg_ratio, max_labels, expected",
    [
        (0, 5, 300, 1),
        (1, 5, 300, 6),
        (7, 5, 300, 42),
        (60, 5, 300, 300),
        (400, 5, 300, 400),
        (3, 0, 300, 3),
        (10, 0.3, 100, 13),
        (2, 5, 100, 12),
        (30, 5, 100, 100),
    ],
)
def test_instance_count_follows_spec(num_gt, neg_ratio, max_labels, expected):
    assert instance_count(num_gt, neg_ratio, max_labels) == expected


def test_slot_layout_real_then_fake_then_padding():
    sampler = InstanceSampler(ClassPrior.uniform(4), neg_ratio=5, max_labels=100).eval()
    sizes = torch.tensor([[100, 200], [80, 60], [300, 300], [120, 90]])
    counts = [0, 2, 150, 30]  # -> n_eff 1, 12, 150 (above max_labels, no fakes), 100
    gts = [
        _gt(n, float(w), float(h), label=i)
        for i, (n, (h, w)) in enumerate(zip(counts, sizes.tolist(), strict=True))
    ]
    batch = sampler([b for b, _ in gts], [lab for _, lab in gts], sizes)
    assert batch.num_slots == 150
    assert batch.boxes.shape == (4, 150, 4) and batch.centers.shape == (4, 150, 2)
    for i, (n_gt, n_eff) in enumerate(zip(counts, [1, 12, 150, 100], strict=True)):
        assert batch.is_real[i].tolist() == [True] * n_gt + [False] * (150 - n_gt)
        assert batch.is_valid[i].tolist() == [True] * n_eff + [False] * (150 - n_eff)
        torch.testing.assert_close(batch.boxes[i, :n_gt], gts[i][0])  # real boxes first, in order
        assert torch.equal(batch.labels[i, :n_gt], gts[i][1])
        assert torch.all(batch.labels[i, n_gt:n_eff] >= 0) and torch.all(
            batch.labels[i, n_eff:] == -1
        )
        assert torch.all(batch.boxes[i, n_eff:] == 0) and torch.all(batch.centers[i, n_eff:] == 0)
    # eval mode: no jitter, the centres are the box centres
    valid = batch.is_valid
    torch.testing.assert_close(
        batch.centers[valid], (batch.boxes[valid, :2] + batch.boxes[valid, 2:]) / 2
    )


def test_real_instances_only():
    sampler = InstanceSampler(ClassPrior.uniform(3)).train()
    boxes, labels = _gt(4, 50, 50)
    batch = sampler(
        [boxes, torch.zeros(0, 4)],
        [labels, torch.zeros(0, dtype=torch.long)],
        [[50, 50], [40, 40]],
        with_fakes=False,
        jitter=False,
    )
    assert batch.num_slots == 4
    assert batch.is_real.equal(batch.is_valid)
    assert batch.is_real.sum(1).tolist() == [4, 0]
    torch.testing.assert_close(batch.centers[0], (boxes[:, :2] + boxes[:, 2:]) / 2)


def _clipped_normal_std_factor(a: float = 2.0) -> float:
    """std of clip(Z, -a, a) for Z ~ N(0, 1)."""
    pdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    inside = math.erf(a / math.sqrt(2))
    return math.sqrt(inside - 2 * a * pdf + a * a * (1 - inside))


def test_fake_statistics_match_the_prior_on_a_large_draw():
    freq = torch.tensor([0.5, 0.3, 0.2])
    mean = torch.tensor([[0.1, 0.3], [0.2, 0.05], [0.4, 0.4]])
    std = torch.tensor(
        [[0.04, 0.1], [0.02, 0.02], [0.1, 0.15]]
    )  # mean +- 2 std inside [0.002, 0.7]
    sampler = InstanceSampler(ClassPrior(freq, mean, std), neg_ratio=3999, max_labels=4000).eval()
    sizes = torch.tensor([[100, 1000], [600, 50], [333, 333], [800, 1300], [64, 64]])
    gts = [_gt(1, float(w), float(h)) for h, w in sizes.tolist()]
    gen = torch.Generator().manual_seed(123)
    batch = sampler([b for b, _ in gts], [lab for _, lab in gts], sizes, generator=gen)
    fake = batch.is_valid & ~batch.is_real
    assert int(fake.sum()) == 5 * 3999
    labels = batch.labels[fake]
    observed = torch.bincount(labels, minlength=3).float() / labels.numel()
    torch.testing.assert_close(observed, freq, atol=0.015, rtol=0)
    # sizes as fractions of each image's own (w, h)
    fractions = (batch.box_sizes / sizes.flip(-1)[:, None, :].float())[fake]
    centres = batch.normalized_centers[fake]
    factor = _clipped_normal_std_factor()
    for c in range(3):
        f = fractions[labels == c]
        torch.testing.assert_close(f.mean(0), mean[c], atol=0.01, rtol=0)
        torch.testing.assert_close(f.std(0), std[c] * factor, atol=0, rtol=0.06)
        assert torch.all(f >= mean[c] - 2 * std[c] - 1e-5) and torch.all(
            f <= mean[c] + 2 * std[c] + 1e-5
        )
        assert torch.all(f >= 0.002 - 1e-6) and torch.all(f <= 0.7 + 1e-6)
    assert torch.all(centres >= 0.03 - 1e-5) and torch.all(centres <= 0.97 + 1e-5)
    torch.testing.assert_close(centres.mean(0), torch.tensor([0.5, 0.5]), atol=0.01, rtol=0)
    torch.testing.assert_close(
        centres.std(0), torch.full((2,), 0.94 / math.sqrt(12)), atol=0, rtol=0.03
    )


def test_fake_sizes_are_clipped_to_the_spec_range():
    prior = ClassPrior(
        torch.ones(2), torch.tensor([[0.001, 0.65], [0.9, 0.01]]), torch.full((2, 2), 0.3)
    )
    sampler = InstanceSampler(prior, neg_ratio=999, max_labels=1000).eval()
    batch = sampler([torch.tensor([[0.0, 0.0, 5.0, 5.0]])], [torch.tensor([0])], [[200, 100]])
    fake = batch.is_valid & ~batch.is_real
    fractions = batch.box_sizes[fake] / torch.tensor([100.0, 200.0])
    assert fractions.min() >= 0.002 - 1e-6 and fractions.max() <= 0.7 + 1e-6
    assert (fractions <= 0.002 + 1e-6).any() and (fractions >= 0.7 - 1e-6).any()


def test_jitter_moves_centres_within_sample_range_of_the_box():
    sampler = InstanceSampler(
        ClassPrior.uniform(2), neg_ratio=50, max_labels=5000, sample_range=0.3
    ).train()
    gts = [_gt(40, 300.0, 200.0) for _ in range(3)]
    batch = sampler([b for b, _ in gts], [lab for _, lab in gts], [[200, 300]] * 3)
    valid = batch.is_valid
    box_centre = (batch.boxes[..., :2] + batch.boxes[..., 2:]) / 2
    offset = ((batch.centers - box_centre) / batch.box_sizes.clamp_min(1e-6))[valid]
    assert offset.abs().max() <= 0.3 + 1e-4
    torch.testing.assert_close(offset.mean(0), torch.zeros(2), atol=0.01, rtol=0)
    torch.testing.assert_close(
        offset.std(0), torch.full((2,), 0.6 / math.sqrt(12)), atol=0, rtol=0.05
    )
    # eval mode switches the jitter off
    still = sampler.eval()([b for b, _ in gts], [lab for _, lab in gts], [[200, 300]] * 3)
    real = still.is_real
    torch.testing.assert_close(
        still.centers[real], ((still.boxes[..., :2] + still.boxes[..., 2:]) / 2)[real]
    )


def test_descriptor_layout():
    num_classes = 6
    sampler = InstanceSampler(ClassPrior.uniform(num_classes)).eval()
    # same relative box in two images of different sizes; widths 64 px vs 256 px
    boxes = [torch.tensor([[32.0, 20.0, 96.0, 60.0]]), torch.tensor([[128.0, 80.0, 384.0, 240.0]])]
    labels = [torch.tensor([4]), torch.tensor([1])]
    sizes = torch.tensor([[100, 256], [400, 1024]])
    batch = sampler(boxes, labels, sizes, with_fakes=False)
    desc = instance_descriptor(batch, num_classes)
    assert desc.shape == (2, 1, num_classes + 128 + 128 + 10)
    assert desc[0, 0, :num_classes].tolist() == [0, 0, 0, 0, 1, 0]
    assert desc[1, 0, :num_classes].tolist() == [0, 1, 0, 0, 0, 0]
    # centre (64, 40) of a 256 x 100 image: x = 0.25, y = 0.4, in both images
    j = torch.arange(64, dtype=torch.float32)
    for offset, c in ((num_classes, 0.25), (num_classes + 128, 0.4)):
        angles = 2 * math.pi * c / 10000 ** (2 * j / 128)
        expected = torch.cat([angles.sin(), angles.cos()])
        for i in range(2):
            torch.testing.assert_close(
                desc[i, 0, offset : offset + 128], expected, atol=1e-5, rtol=0
            )
    # scale bins: width 64 px -> floor(6 - 5) = 1, height 40 px -> 0 in image 0;
    # width 256 -> 3, height 160 -> floor(7.32 - 5) = 2 in image 1 (its own size, not the batch's)
    scale = desc[:, 0, -10:]
    assert scale[0].tolist() == [0, 1, 0, 0, 0] + [1, 0, 0, 0, 0]
    assert scale[1].tolist() == [0, 0, 0, 1, 0] + [0, 0, 1, 0, 0]


def test_scale_bins_clamp_at_both_ends():
    sampler = InstanceSampler(ClassPrior.uniform(1)).eval()
    boxes = torch.tensor([[0.0, 0.0, 3000.0, 1.0], [0.0, 0.0, 0.0, 20.0]])  # 3000 px wide; 0 wide
    batch = sampler([boxes], [torch.zeros(2, dtype=torch.long)], [[2000, 3000]], with_fakes=False)
    scale = instance_descriptor(batch, 1)[0, :, -10:]
    assert scale[0].tolist() == [0, 0, 0, 0, 1] + [1, 0, 0, 0, 0]
    assert scale[1].tolist() == [1, 0, 0, 0, 0] + [1, 0, 0, 0, 0]


def test_encoder_output_and_zero_padding_descriptor():
    sampler = InstanceSampler(ClassPrior.uniform(5), neg_ratio=2, max_labels=10)
    gts = [_gt(3, 64.0, 64.0), _gt(1, 64.0, 64.0)]
    batch = sampler([b for b, _ in gts], [lab for _, lab in gts], [[64, 64], [64, 64]])
    assert batch.num_slots == 9
    desc = instance_descriptor(batch, 5)
    assert torch.all(desc[1, 3:] == 0)  # padding slots
    assert torch.all(desc[batch.is_valid].abs().sum(-1) > 0)
    encoder = InstanceEncoder(5, 32)
    out = encoder(batch)
    assert out.shape == (2, 9, 32)
    assert encoder.mlp.layers[0].in_features == 5 + 266 and len(encoder.mlp.layers) == 3


@pytest.mark.parametrize(
    "boxes, labels, match",
    [
        ([[0.0, 0.0, 10.0, 10.0]], [3], r"labels\[0\].*num_classes = 3"),
        ([[0.0, 0.0, 10.0, 10.0]], [-1], r"labels\[0\]"),
        ([[0.0, 0.0, 80.0, 10.0]], [0], r"boxes\[0\]\[0\].*outside image 0"),
        ([[-20.0, 0.0, 10.0, 10.0]], [0], r"boxes\[0\]\[0\].*outside"),
        ([[10.0, 0.0, 5.0, 10.0]], [0], r"x1 <= x2"),
        ([[0.0, 0.0, float("nan"), 10.0]], [0], r"NaN"),
    ],
)
def test_bad_instances_raise(boxes, labels, match):
    sampler = InstanceSampler(ClassPrior.uniform(3))
    with pytest.raises(ValueError, match=match):
        sampler([torch.tensor(boxes)], [torch.tensor(labels)], [[40, 50]])


def test_bad_shapes_and_dtypes_raise():
    sampler = InstanceSampler(ClassPrior.uniform(3))
    with pytest.raises(ValueError, match=r"boxes\[0\].*\[n_i, 4\]"):
        sampler([torch.zeros(2, 5)], [torch.zeros(2, dtype=torch.long)], [[40, 50]])
    with pytest.raises(ValueError, match=r"labels\[0\].*\[n_i\] = \[2\]"):
        sampler([torch.zeros(2, 4)], [torch.zeros(3, dtype=torch.long)], [[40, 50]])
    with pytest.raises(TypeError, match=r"labels\[0\].*integer"):
        sampler([torch.zeros(2, 4)], [torch.zeros(2)], [[40, 50]])
    with pytest.raises(ValueError, match="one per image"):
        sampler([torch.zeros(2, 4)], [torch.zeros(2, dtype=torch.long)] * 2, [[40, 50]])
    with pytest.raises(ValueError, match=r"boxes` has 1 entries.*N = 2"):
        sampler([torch.zeros(2, 4)], [torch.zeros(2, dtype=torch.long)], [[40, 50], [40, 50]])
    with pytest.raises(ValueError, match=r"image_sizes.*expected \[N, 2\]"):
        sampler([torch.zeros(2, 4)], [torch.zeros(2, dtype=torch.long)], [40, 50])
    with pytest.raises(ValueError, match="image_sizes"):
        sampler([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], [[0, 50]])


def test_boxes_slightly_outside_are_clipped():
    sampler = InstanceSampler(ClassPrior.uniform(3)).eval()
    boxes = torch.tensor([[-0.5, -1.2, 50.4, 40.9], [10.0, 10.0, 20.0, 20.0]])  # (h, w) = (40, 50)
    batch = sampler([boxes], [torch.tensor([0, 1])], [[40, 50]], with_fakes=False)
    torch.testing.assert_close(
        batch.boxes[0], torch.tensor([[0.0, 0.0, 50.0, 40.0], [10.0, 10.0, 20.0, 20.0]])
    )
