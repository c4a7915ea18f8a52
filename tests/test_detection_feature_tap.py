"""The feature tap sees the detector's FPN maps, padded input, resized sizes and boxes."""

from __future__ import annotations

import torch

from icd.detection.feature_tap import FeatureTap
from icd.detection.models import DetectorSpec, build_detector


def test_tap_reads_the_detectors_own_forward():
    spec = DetectorSpec(
        "retinanet",
        "resnet18",
        num_classes=3,
        fpn_channels=32,
        norm="gn",
        min_level=3,
        max_level=6,
        min_size=(96,),
        max_size=200,
    )
    model = build_detector(spec)
    images = [torch.rand(3, 48, 60), torch.rand(3, 40, 80)]
    targets = [
        {"boxes": torch.tensor([[6.0, 4.0, 30.0, 24.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[0.0, 0.0, 80.0, 40.0]]), "labels": torch.tensor([0])},
    ]
    with FeatureTap(model) as tap:
        model(images, targets)
        batch = tap.batch
    # resize: shorter side 96 (capped by max_size 200), then padded to a multiple of 32
    assert batch.image_sizes.tolist() == [[96, 120], [96, 192]]
    assert batch.padded_size == (96, 192)
    torch.testing.assert_close(batch.boxes[0], torch.tensor([[12.0, 8.0, 60.0, 48.0]]))
    torch.testing.assert_close(batch.boxes[1], torch.tensor([[0.0, 0.0, 192.0, 96.0]]))
    assert [t.tolist() for t in batch.labels] == [[2], [0]]
    # P3-P5 divide the padded size by 8, 16, 32; P6 is a stride-2 conv of P5: ceil(3 / 2) = 2
    assert [tuple(f.shape[-2:]) for f in batch.features] == [(12, 24), (6, 12), (3, 6), (2, 3)]
    assert {f.shape[:2] for f in batch.features} == {(2, 32)}
    expected = list(model.backbone(batch.images).values())
    for got, want in zip(batch.features, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert batch.features[0].requires_grad  # the student's graph is kept for distillation
    assert len(model.transform._forward_hooks) == 0  # removed on exit


def test_tap_in_eval_mode_has_no_boxes():
    spec = DetectorSpec(
        "fcos",
        "resnet18",
        num_classes=2,
        fpn_channels=32,
        norm="gn",
        min_level=3,
        max_level=5,
        min_size=(64,),
        max_size=64,
    )
    model = build_detector(spec).eval()
    tap = FeatureTap(model)
    with torch.no_grad():
        model([torch.rand(3, 64, 64)])
    assert tap.batch.boxes is None and len(tap.batch.features) == 3
    tap.remove()


def test_icd_geometry_in_the_resized_frame_at_every_level():
    """Resized images of two aspect ratios (padded 96 x 192, not a multiple of P6/P7's strides):
    boxes, valid regions, padding mask, position embedding and the statistics' cells all sit in
    the resized frame at the levels' true strides 2^l."""
    from icd import ops
    from icd.engine.distill import build_distiller
    from icd.engine.run_spec import distiller_kwargs
    from icd.nn.attention_stats import cell_centres

    spec = DetectorSpec("fcos", "resnet18", num_classes=3, fpn_channels=32, norm="gn", min_level=3,
                        max_level=7, min_size=(96,), max_size=200)  # fmt: skip
    model = build_detector(spec)
    images = [torch.rand(3, 48, 60), torch.rand(3, 40, 80)]
    targets = [
        {"boxes": torch.tensor([[40.0, 4.0, 60.0, 24.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.tensor([[2.0, 30.0, 10.0, 38.0]]), "labels": torch.tensor([0])},
    ]
    with FeatureTap(model) as tap:
        model(images, targets)
        batch = tap.batch
    padded = batch.padded_size
    assert padded == (96, 192) and batch.image_sizes.tolist() == [[96, 120], [96, 192]]
    torch.testing.assert_close(batch.boxes[0], torch.tensor([[80.0, 8.0, 120.0, 48.0]]))  # x2 resize
    strides = [2**level for level in spec.levels]
    shapes = [tuple(f.shape[-2:]) for f in batch.features]
    assert shapes == [(-(-96 // r), -(-192 // r)) for r in strides]  # ceil(Hp / 2^l): P7 is 1 x 2
    kwargs = distiller_kwargs({"distill": "icd", "icd_heads": 4}, spec, 3)
    assert kwargs["strides"] == strides
    distiller = build_distiller(**kwargs, warmup_iters=0)
    features = [f.detach() for f in batch.features]
    regions = torch.tensor([[0.0, 0.0, 120.0, 96.0], [0.0, 0.0, 192.0, 96.0]])
    _, _, mask, pos = distiller._teacher_tokens(features, regions, padded)
    for level, (grid, r) in enumerate(zip(ops.unflatten_levels(mask, shapes), strides, strict=True)):
        for i, (h, w) in enumerate(batch.image_sizes.tolist()):
            ys, xs = torch.meshgrid(torch.arange(shapes[level][0]), torch.arange(shapes[level][1]), indexing="ij")
            assert torch.equal(grid[i], ~((ys * r < h) & (xs * r < w))), (level, i)
    assert bool(mask[0, -6]) and bool(mask[0, -3]) and not mask[1].any()  # P6 column 2: padding beside image 0
    level_masks = ops.unflatten_levels(mask, shapes)
    torch.testing.assert_close(pos, ops.sine_position_embedding(level_masks, num_feats=16))
    maps, _ = distiller.instance_attention_maps(features, batch.boxes, batch.labels, batch.image_sizes, padded)
    assert float(maps[0][0, mask[0]].abs().sum()) == 0.0  # no attention on the padding, P6 included
    torch.testing.assert_close(maps[0].sum(dim=1), torch.ones(1))
    centres = cell_centres(torch.tensor(shapes), padded, strides)
    assert centres[-1].tolist() == [192.0, 64.0]  # P7's second cell: (1 + 0.5) * 128 across
    assert centres[-3].tolist() == [160.0, 96.0]  # P6 (1, 2): (2.5 * 64, 1.5 * 64)
