"""icd.nn for detectors like YOLO: per-level widths, letterboxed valid regions, packed boxes,
and the class prior from plain boxes or a YOLO label folder."""

from __future__ import annotations

import pytest
import torch

import icd.ops as ops
from icd.nn import ClassPrior, ICDDistiller, InstanceSampler, LevelProjection, unpack_boxes

LEVELS = [(8, 10), (4, 5), (2, 3)]
PADDED = (32, 40)
SIZES = torch.tensor([[32, 40], [24, 29]])
BOXES = [torch.tensor([[2.0, 3.0, 20.0, 30.0], [15.0, 1.0, 39.0, 12.0]]), torch.tensor([[4.0, 4.0, 28.0, 20.0]])]
LABELS = [torch.tensor([0, 2]), torch.tensor([1])]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _features(widths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, h, w, generator=g) for c, (h, w) in zip(widths, LEVELS, strict=True)]


def _losses(distiller, teacher, student, sizes=SIZES, boxes=BOXES, seed=5):
    torch.manual_seed(seed)
    return distiller(teacher, student, boxes, LABELS, sizes, PADDED)


def test_equal_int_widths_match_the_outputs_before_per_level_widths():
    """Losses recorded with the code before per-level widths (commit 7610d98), same seeds."""
    torch.manual_seed(0)
    teacher = [torch.randn(2, 16, h, w) for h, w in LEVELS]
    student = [torch.randn(2, 12, h, w) for h, w in LEVELS]
    torch.manual_seed(3)
    distiller = ICDDistiller(
        3, 16, 12, heads=2, neg_ratio=2, max_labels=10, warmup_iters=0, backend="reference", num_layers=2
    )
    losses = _losses(distiller, teacher, student)
    recorded = {"distill": 16.4248714, "aux_conf": 0.669125676, "aux_reg": 1.60076785}
    for name, value in recorded.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-6, abs=1e-6), name


def test_per_level_widths_with_identity_projections_equal_the_int_widths():
    kwargs = dict(heads=2, neg_ratio=2, max_labels=10, warmup_iters=0, backend="reference", num_layers=2)
    torch.manual_seed(3)
    shared = ICDDistiller(3, 16, 12, **kwargs)
    per_level = ICDDistiller(3, [16, 16, 16], [12, 12, 12], decoder_channels=16, **kwargs)
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("student_projections")}
    missing = per_level.load_state_dict(state, strict=False).missing_keys
    assert all(k.startswith(("teacher_projection", "student_projections")) for k in missing)
    with torch.no_grad():
        for level in per_level.teacher_projection.levels:
            level.weight.copy_(torch.eye(16))
            level.bias.zero_()
        for shared_linear, projection in zip(shared.student_projections, per_level.student_projections, strict=True):
            for level in projection.levels:
                level.load_state_dict(shared_linear.state_dict())
    teacher, student = _features([16] * 3, 0), _features([12] * 3, 1)
    a, b = _losses(shared, teacher, student), _losses(per_level, teacher, student)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_per_level_widths_train_their_projections_on_the_right_side():
    torch.manual_seed(0)
    distiller = ICDDistiller(
        3, [16, 32, 64], [8, 16, 32], heads=2, decoder_channels=16, neg_ratio=2, warmup_iters=1, backend="reference"
    )
    teacher = [f.requires_grad_(True) for f in _features([16, 32, 64], 0)]
    student = [f.requires_grad_(True) for f in _features([8, 16, 32], 1)]
    teacher_side = list(distiller.teacher_side_parameters())
    student_side = list(distiller.student_side_parameters())
    assert {id(p) for p in distiller.teacher_projection.parameters()} <= {id(p) for p in teacher_side}
    assert len(student_side) == 2 * 3  # weight and bias of one Linear per level
    assert {id(p) for p in teacher_side} | {id(p) for p in student_side} == {id(p) for p in distiller.parameters()}

    losses = _losses(distiller, teacher, student)  # warm-up: the student features are detached
    losses["distill"].backward(retain_graph=True)
    assert all(p.grad is None for p in teacher_side)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student_side)
    assert all(f.grad is None for f in student)
    (losses["aux_conf"] + losses["aux_reg"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.teacher_projection.parameters())
    assert all(f.grad is None for f in teacher)

    distiller.step()  # after the warm-up the distill loss reaches the student's features
    _losses(distiller, teacher, student)["distill"].backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in student)


def test_level_projection_is_a_one_by_one_convolution_per_level():
    projection = LevelProjection([3, 5], 4)
    feats = [torch.randn(2, 3, 4, 6), torch.randn(2, 5, 2, 3)]
    tokens = projection(feats)
    expected = torch.cat(
        [
            torch.nn.functional.conv2d(f, lin.weight[:, :, None, None], lin.bias).flatten(2).transpose(1, 2)
            for f, lin in zip(feats, projection.levels, strict=True)
        ],
        dim=1,
    )
    torch.testing.assert_close(tokens, expected)


@pytest.mark.parametrize(
    "teacher_channels, student_channels, teacher_widths, student_widths, message",
    [
        ([16, 32, 64], 8, [16, 32, 32], [8, 8, 8], "`teacher_features\\[2\\]` has 32 .*teacher_channels\\[2\\] = 64"),
        (16, [8, 8, 16], [16, 16, 16], [8, 8, 8], "`student_features\\[2\\]` has 8 .*student_channels\\[2\\] = 16"),
        ([16, 16], 8, [16, 16, 16], [8, 8, 8], "teacher_channels = \\[16, 16\\] gives 2 levels"),
    ],
)
def test_widths_that_do_not_match_the_features_raise_naming_the_argument(
    teacher_channels, student_channels, teacher_widths, student_widths, message
):
    distiller = ICDDistiller(3, teacher_channels, student_channels, heads=2, decoder_channels=16)
    with pytest.raises(ValueError, match=message):
        _losses(distiller, _features(teacher_widths, 0), _features(student_widths, 1))
    with pytest.raises(ValueError, match="different numbers of levels"):
        ICDDistiller(3, [16, 32], [8, 16, 32], heads=2)


def test_bad_widths_and_decoder_channels_raise():
    with pytest.raises(ValueError, match="student_channels"):
        ICDDistiller(3, 16, [8, 0, 4], heads=2)
    with pytest.raises(ValueError, match="decoder_channels = 18"):
        ICDDistiller(3, [16, 32], 8, heads=4, decoder_channels=18)
    with pytest.raises(ValueError, match="decoder_channels = 32 with teacher_channels = 16"):
        ICDDistiller(3, 16, 8, heads=4, decoder_channels=32)


# --- valid regions ------------------------------------------------------------------------------


def test_padding_mask_of_a_letterboxed_box():
    shapes = torch.tensor([[4, 5], [2, 3]])  # strides 8 (32x40) and ~14 on the 2x3 level
    mask = ops.padding_mask(torch.tensor([[8.0, 4.0, 40.0, 20.0]]), shapes, (32, 40))
    level0 = ops.unflatten_levels(mask, shapes)[0][0]
    expected = torch.ones(4, 5, dtype=torch.bool)
    expected[0:3, 1:5] = False  # rows floor(4/8)=0 .. ceil(20/8)=3, cols 1 .. 5
    assert torch.equal(level0, expected)
    sizes_mask = ops.padding_mask(torch.tensor([[20, 30]]), shapes, (32, 40))
    box_mask = ops.padding_mask(torch.tensor([[0, 0, 30, 20]]), shapes, (32, 40))
    assert torch.equal(sizes_mask, box_mask)


def test_sizes_and_top_left_boxes_give_the_same_losses():
    torch.manual_seed(3)
    distiller = ICDDistiller(3, 16, 12, heads=2, neg_ratio=2, max_labels=10, warmup_iters=0, backend="reference")
    teacher, student = _features([16] * 3, 0), _features([12] * 3, 1)
    boxes_form = torch.cat([torch.zeros(2, 2), SIZES.flip(-1)], dim=1)
    a, b = _losses(distiller, teacher, student), _losses(distiller, teacher, student, sizes=boxes_form)
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_a_letterboxed_image_looks_and_samples_inside_its_valid_box():
    """Shifting the image, its valid box and its boxes together shifts nothing else: the
    padding mask, position embedding and instance descriptors are relative to the box."""
    torch.manual_seed(3)
    distiller = ICDDistiller(3, 16, 12, heads=2, neg_ratio=3, max_labels=10, warmup_iters=0, backend="reference")
    distiller.eval()  # no jitter
    shift = 8  # pixels = one stride of level 0 (strides 4, 8, ~13)
    base = [torch.zeros(2, 16, h, w) for h, w in LEVELS]
    g = torch.Generator().manual_seed(0)
    base[0][:, :, :4, :6] = torch.randn(2, 16, 4, 6, generator=g)
    shifted = [f.clone() for f in base]
    shifted[0] = torch.roll(base[0], shifts=(2, 2), dims=(2, 3))  # 8 px = 2 tokens of stride 4
    region = torch.tensor([[0.0, 0.0, 24.0, 16.0], [0.0, 0.0, 24.0, 16.0]])
    boxes = [torch.tensor([[2.0, 2.0, 10.0, 12.0]]), torch.tensor([[4.0, 1.0, 20.0, 9.0]])]
    labels = [torch.tensor([0]), torch.tensor([2])]
    maps_a, shapes = distiller.instance_attention_maps(base[:1], boxes, labels, region, PADDED)
    maps_b, _ = distiller.instance_attention_maps(
        shifted[:1], [b + shift for b in boxes], labels, region + shift, PADDED
    )
    for a, b in zip(maps_a, maps_b, strict=True):
        a0 = a.view(-1, *LEVELS[0])
        b0 = b.view(-1, *LEVELS[0])
        torch.testing.assert_close(torch.roll(a0, shifts=(2, 2), dims=(1, 2)), b0, rtol=1e-5, atol=1e-6)
        assert b0[:, :2].sum() == 0 and b0[:, :, :2].sum() == 0  # nothing on the padding


def test_fakes_lie_inside_the_valid_box_and_normalise_to_it():
    prior = ClassPrior.uniform(2)
    sampler = InstanceSampler(prior, neg_ratio=20, max_labels=100, sample_range=0.0)
    region = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    batch = sampler([torch.tensor([[12.0, 22.0, 20.0, 30.0]])], [torch.tensor([1])], region)
    fakes = batch.is_valid & ~batch.is_real
    centres = (batch.boxes[..., :2] + batch.boxes[..., 2:]) / 2
    assert int(fakes.sum()) == 20
    assert bool((centres[fakes] >= region[0, :2]).all()) and bool((centres[fakes] <= region[0, 2:]).all())
    normalised = batch.normalized_centers[batch.is_valid]
    assert bool((normalised >= 0).all()) and bool((normalised <= 1).all())
    torch.testing.assert_close(batch.normalized_centers[0, 0], torch.tensor([6.0 / 40, 6.0 / 20]))


@pytest.mark.parametrize(
    "regions, message",
    [
        (torch.tensor([[0.0, 0.0, 41.0, 32.0], [0.0, 0.0, 29.0, 24.0]]), "outside `padded_size`"),
        (torch.tensor([[-1.0, 0.0, 40.0, 32.0], [0.0, 0.0, 29.0, 24.0]]), "x1, y1 >= 0"),
        (torch.tensor([[5.0, 0.0, 5.0, 32.0], [0.0, 0.0, 29.0, 24.0]]), "1 pixel wide"),
        (torch.zeros(2, 3), "\\[2, 4\\] valid boxes"),
    ],
)
def test_bad_valid_regions_raise_naming_the_argument(regions, message):
    distiller = ICDDistiller(3, 16, 12, heads=2, backend="reference")
    with pytest.raises(ValueError, match=f"image_sizes.*{message}|{message}"):
        _losses(distiller, _features([16] * 3, 0), _features([12] * 3, 1), sizes=regions)


# --- packed boxes and the class prior -----------------------------------------------------------


def test_unpack_boxes_splits_and_scales_packed_normalised_boxes():
    packed = torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.25, 0.75, 0.1, 0.2], [0.5, 0.5, 1.0, 1.0]])
    batch_idx = torch.tensor([2.0, 0.0, 2.0])
    boxes, labels = unpack_boxes(packed, torch.tensor([[2.0], [0.0], [1.0]]), batch_idx, 3, (40, 80))
    assert [b.shape[0] for b in boxes] == [1, 0, 2]
    torch.testing.assert_close(boxes[0], torch.tensor([[16.0, 26.0, 24.0, 34.0]]))
    torch.testing.assert_close(boxes[2], torch.tensor([[20.0, 15.0, 60.0, 25.0], [0.0, 0.0, 80.0, 40.0]]))
    assert labels[2].tolist() == [2, 1] and labels[1].dtype == torch.long
    with pytest.raises(ValueError, match="batch_idx"):
        unpack_boxes(packed, torch.zeros(3), torch.tensor([0, 1, 3]), 3, (40, 80))
    with pytest.raises(ValueError, match="labels"):
        unpack_boxes(packed, torch.zeros(2), torch.zeros(3), 3, (40, 80))
    with pytest.raises(ValueError, match="boxes"):
        unpack_boxes(packed[:, :3], torch.zeros(3), torch.zeros(3), 3, (40, 80))


def test_class_prior_from_boxes_and_from_a_yolo_label_folder(tmp_path):
    labels_dir = tmp_path / "labels" / "train"
    labels_dir.mkdir(parents=True)
    (labels_dir / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.3 0.3 0.1 0.1\n\n")
    (labels_dir / "b.txt").write_text("0 0.5 0.5 0.4 0.2\n")
    (labels_dir / "c.txt").write_text("")
    prior = ClassPrior.from_yolo_labels(tmp_path / "labels", 3)
    torch.testing.assert_close(prior.class_freq, torch.tensor([2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(prior.size_mean[0], torch.tensor([0.3, 0.3]))
    torch.testing.assert_close(prior.size_std[0], torch.tensor([0.1, 0.1]))
    torch.testing.assert_close(prior.size_mean[2], torch.tensor([0.2, 0.2]))  # default, no boxes

    pixels = torch.tensor([[0.0, 0.0, 20.0, 40.0], [0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 50.0, 30.0]])
    same = ClassPrior.from_boxes(pixels, torch.tensor([0, 1, 0]), 3, image_sizes=torch.full((3, 2), 100.0))
    for name in ("class_freq", "size_mean", "size_std"):
        torch.testing.assert_close(getattr(prior, name), getattr(same, name))

    (labels_dir / "d.txt").write_text("3 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match="d.txt:1: class id 3.*num_classes = 3"):
        ClassPrior.from_yolo_labels(tmp_path / "labels", 3)
    (labels_dir / "d.txt").write_text("0 0.5 0.5\n")
    with pytest.raises(ValueError, match="d.txt:1"):
        ClassPrior.from_yolo_labels(tmp_path / "labels", 3)
    with pytest.raises(ValueError, match="labels.*num_classes = 2"):
        ClassPrior.from_boxes(pixels, torch.tensor([0, 1, 2]), 2, image_sizes=torch.full((3, 2), 100.0))
