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
