"""torchvision detectors on ResNet + FPN: levels, channels, strict weight loading, no downloads."""

from __future__ import annotations

import pytest
import torch

from icd.detection.models import (
    DetectorSpec,
    build_backbone,
    build_detector,
    load_backbone_weights,
    load_detector_weights,
)


def _tiny(detector: str, **kw) -> DetectorSpec:
    kw = {
        "backbone": "resnet18",
        "num_classes": 3,
        "fpn_channels": 32,
        "norm": "gn",
        "min_size": (64,),
        "max_size": 96,
        **kw,
    }
    return DetectorSpec(detector, **kw)


def _targets():
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]


@pytest.mark.parametrize("detector", ["retinanet", "fcos", "fasterrcnn"])
def test_each_detector_trains_and_predicts(detector):
    model = build_detector(_tiny(detector, min_level=3, max_level=5))
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    losses = model(images, _targets())
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4


@pytest.mark.parametrize(
    ("detector", "levels", "expected"),
    [
        ("retinanet", None, [3, 4, 5, 6, 7]),
        ("fcos", (2, 4), [2, 3, 4]),
        ("fasterrcnn", None, [2, 3, 4, 5, 6]),
        ("maskrcnn", None, [2, 3, 4, 5, 6]),
        ("retinanet", (4, 6), [4, 5, 6]),
    ],
)
def test_fpn_levels_and_width(detector, levels, expected):
    lo, hi = levels or (None, None)
    spec = _tiny(detector, min_level=lo, max_level=hi, fpn_channels=64)
    assert spec.levels == expected
    maps = list(build_backbone(spec)(torch.rand(1, 3, 128, 128)).values())
    assert [tuple(m.shape) for m in maps] == [(1, 64, 128 >> lv, 128 >> lv) for lv in expected]


def test_backbone_weights_load_from_a_state_dict():
    from torchvision.models import resnet18

    body = resnet18(weights=None)
    torch.nn.init.constant_(body.layer2[0].conv1.weight, 0.25)
    spec = _tiny("retinanet", norm="frozen_bn", trainable_layers=3)
    backbone = build_backbone(spec, body.state_dict())
    assert torch.all(backbone.body.layer2[0].conv1.weight == 0.25)
    assert not backbone.body.conv1.weight.requires_grad  # trainable_layers=3: stem frozen
    assert backbone.body.layer2[0].conv1.weight.requires_grad
    bad = {"conv1.weight": body.conv1.weight, "extra.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="r18.pth: not a ResNet of torchvision: .*'extra.weight'"):
        load_backbone_weights(resnet18(weights=None), bad, "r18.pth")


def test_teacher_weights_load_strictly_and_list_bad_keys():
    spec = _tiny("retinanet")
    source = build_detector(spec)
    target = build_detector(spec)
    load_detector_weights(target, {"model": source.state_dict()})
    for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    state = dict(source.state_dict())
    state.pop("head.regression_head.bbox_reg.bias")
    state["head.surprise"] = torch.zeros(1)
    with pytest.raises(
        KeyError,
        match=r"missing keys \['head.regression_head.bbox_reg.bias'\]"
        r".*unexpected keys \['head.surprise'\]",
    ):
        load_detector_weights(target, state)


def test_spec_rejects_bad_choices():
    with pytest.raises(ValueError, match="backbone"):
        DetectorSpec("retinanet", "resnet9")
    with pytest.raises(ValueError, match="min_level"):
        DetectorSpec("retinanet", "resnet18", min_level=1)
    assert DetectorSpec("fasterrcnn", "resnet18").label_offset == 1
    assert DetectorSpec("maskrcnn", "resnet18").label_offset == 1
    assert DetectorSpec("retinanet", "resnet18").label_offset == 0
