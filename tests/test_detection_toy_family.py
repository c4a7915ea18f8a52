"""A new detector family is one class and one ``register_family``: a toy family registered from this
test (a tiny torchvision FCOS behind its own spec, levels P3-P5) is trained, distilled with ICD,
evaluated, reloaded and used for prediction through ``icd``'s commands, with no change to icd."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from icd.cli import build_parser, main
from icd.data.shapes import generate
from icd.detection.adapters import DetectorFamily, FeatureLayout, InputFrame, register_family, unregister_family
from icd.detection.feature_tap import FeatureTap
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.checkpoint import load_checkpoint, save_atomic
from icd.engine.run_spec import distiller_of_run, load_detector
from icd.errors import ConfigError

TOY_LEVELS = (3, 4, 5)
TOY_LOSS_WEIGHT = 2.5  # the family's ICD default: the trained distiller must carry it


@dataclass
class ToySpec:
    """A toy detector: ``channels`` wide maps P3-P5 of ``size`` x ``size`` inputs."""

    detector: str = "toy"
    num_classes: int = 1
    channels: int = 32
    size: int = 64

    def __post_init__(self) -> None:
        if self.detector != "toy":
            raise ConfigError(f"detector={self.detector!r}; expected 'toy'")


class ToyFamily(DetectorFamily):
    """A tiny FCOS with GroupNorm, built from a ``ToySpec``."""

    name = "toy"
    detectors = ("toy",)
    spec_type = ToySpec

    def spec_from_args(self, values: Mapping[str, Any], num_classes: int) -> ToySpec:
        size = values.get("min_size") or [64]
        return ToySpec("toy", num_classes, values.get("fpn_channels") or 32, int(size[0]))

    def build(self, spec: ToySpec, backbone_weights=None, source: str = "backbone weights") -> nn.Module:
        fcos = DetectorSpec("fcos", "resnet18", spec.num_classes, spec.channels, TOY_LEVELS[0], TOY_LEVELS[-1], "gn",
                            min_size=(spec.size,), max_size=spec.size)  # fmt: skip
        return build_detector(fcos)

    def feature_layout(self, spec: ToySpec) -> FeatureLayout:
        return FeatureLayout(TOY_LEVELS, tuple(2.0**lvl for lvl in TOY_LEVELS), (spec.channels,) * len(TOY_LEVELS))

    def tap(self, model: nn.Module, spec: ToySpec) -> FeatureTap:
        return FeatureTap(model)  # FCOS's labels are 0..C-1 already

    def features(self, model: nn.Module, spec: ToySpec, images: Tensor) -> list[Tensor]:
        return list(model.backbone(images).values())

    def frame(self, model, spec, images, targets=None, *, augment=False) -> InputFrame:
        model.transform.train(augment)
        image_list, resized = model.transform(images, targets)
        sizes = torch.tensor([list(s) for s in image_list.image_sizes], dtype=torch.long)
        boxes = None if resized is None else [t["boxes"] for t in resized]
        labels = None if resized is None else [t["labels"] for t in resized]
        return InputFrame(image_list.tensors, sizes, boxes, labels)

    def method_defaults(self, detector: str, method: str) -> dict[str, Any]:
        return {"loss_weight": TOY_LOSS_WEIGHT} if method == "icd" else {}


@pytest.fixture
def toy_family():
    register_family(ToyFamily())
    yield
    unregister_family("toy")


def test_a_registered_family_is_offered_by_the_commands(toy_family):
    args = build_parser().parse_args(["train", "--data-path", "d", "--detector", "toy"])
    assert args.detector == "toy"
    args = build_parser().parse_args(["train", "--data-path", "d", "--teacher", "t.pth", "--teacher-detector", "toy"])
    assert args.teacher_detector == "toy"


def test_a_new_family_is_one_class_and_one_entry_trained_through_icd_train(tmp_path, toy_family):
    data = tmp_path / "data"
    generate(str(data), num_train=4, num_val=2, image_size=64, seed=3)
    family = ToyFamily()
    teacher_spec = ToySpec("toy", num_classes=7, channels=64, size=64)
    torch.manual_seed(1)
    teacher = tmp_path / "teacher.pth"
    save_atomic({"model": family.build(teacher_spec).state_dict(), "detector_spec": family.spec_to_dict(teacher_spec)},
                str(teacher))  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", "--data-path", str(data), "--detector", "toy", "--fpn-channels", "32", "--min-size", "64",
                 "--max-size", "64", "--iters", "2", "--batch-size", "2", "--lr", "0.01", "--workers", "0",
                 "--device", "cpu", "--no-progress", "--print-freq", "1", "--epoch-checkpoint-every", "0",
                 "--teacher", str(teacher), "--distill", "icd", "--icd-heads", "4",
                 "--output-dir", str(out)]) == 0  # fmt: skip
    ckpt = load_checkpoint(str(out / "checkpoint.pth"))
    assert ckpt["detector_spec"] == {"detector": "toy", "num_classes": 7, "channels": 32, "size": 64, "family": "toy"}
    assert ckpt["iteration"] == 2
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    losses = [r["loss_distill"] for r in records if r.get("type") == "train"]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    evaluation = [r for r in records if r.get("type") == "eval"]
    assert evaluation and "AP" in evaluation[-1] and "lift" in evaluation[-1]  # with the teacher's attention
    # the run's distiller has the family's ICD default and its teacher's layout
    rebuilt = distiller_of_run(ckpt["args"], teacher_spec, 7)
    rebuilt.load_state_dict(ckpt["distiller"], strict=True)
    assert rebuilt.loss_weight == TOY_LOSS_WEIGHT
    # the checkpoint names its family: read back by it
    model, spec = load_detector(str(out / "checkpoint.pth"), 7)
    assert spec == ToySpec("toy", 7, 32, 64)
    assert main(["predict", "--checkpoint", str(out / "checkpoint.pth"), str(data / "val"), "--out",
                 str(tmp_path / "predictions"), "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    with open(tmp_path / "predictions" / "detections.json") as f:
        assert len(json.load(f)["images"]) == 2
