"""The registry of distillation methods (icd.nn.methods): old checkpoints' distillers rebuild from
it, and a new method is one module and one entry (a toy FPN L1, trained through icd train)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from tiny_runs import THREE_LEVELS, TINY_MODEL
from torch import Tensor, nn

from icd.cli import build_parser, main
from icd.data.shapes import generate
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.checkpoint import load_checkpoint, save_atomic
from icd.engine.run_spec import distiller_kwargs, distiller_of_run
from icd.errors import ConfigError
from icd.nn.methods import METHODS, DistillMethod, DistillTarget, config_from_flags, get_method, register_method

DATA = os.path.join(os.path.dirname(__file__), "data")
# distillers and saved args of two icd train runs written before the registry (tiny: 32/16 channels)
BEFORE = os.path.join(DATA, "distillers_before_registry.pth")


# ---- the toy method: what a new method's module holds, then its one entry -----------------------
class FpnL1Distiller(nn.Module):
    """Mean absolute difference of the (1x1-adapted) student maps and the teacher maps, over levels."""

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int, loss_weight: float) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.adapters = nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, 1) for _ in range(num_levels))

    def forward(self, teacher_features, student_features, boxes=None, labels=None, image_sizes=None,
                padded_size=None) -> dict[str, Tensor]:  # fmt: skip
        pairs = zip(self.adapters, teacher_features, student_features, strict=True)
        loss = torch.stack([(a(s).float() - t.detach().float()).abs().mean() for a, t, s in pairs]).mean()
        return {"distill": self.loss_weight * loss}

    def student_side_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def teacher_side_parameters(self) -> list[nn.Parameter]:
        return []

    def step(self) -> None:
        pass


@dataclass(frozen=True)
class FpnL1Config:
    loss_weight: float | None = None
    scale: float = 1.0


def _config(args: Mapping[str, Any]) -> FpnL1Config:
    return config_from_flags(FpnL1Config, args, {"fpn_l1_scale": "scale"})


def _build(config: FpnL1Config, target: DistillTarget) -> FpnL1Distiller:
    weight = config.scale * (1.0 if config.loss_weight is None else config.loss_weight)
    return FpnL1Distiller(target.student_channels, target.teacher_channels, target.num_levels, weight)


def _flags(group, command: str) -> None:
    if command == "train":
        group.add_argument("--fpn-l1-scale", type=float, default=FpnL1Config.scale, help="toy: loss scale")


TOY = DistillMethod("fpn-l1", "fpn-l1 (toy)", "fpn-l1: 1", FpnL1Config, _config, _build, _flags)


@pytest.fixture
def toy_method():
    register_method(TOY)
    yield TOY
    del METHODS[TOY.name]


# ---- tests ------------------------------------------------------------------------------------------
def test_the_registry_holds_the_three_methods_in_distills_order():
    assert list(METHODS)[:3] == ["icd", "fpn-mse", "none"]
    assert all(dataclasses.is_dataclass(m.config) for m in METHODS.values())
    with pytest.raises(ConfigError, match="--distill l2: no such distillation method"):
        get_method("l2")
    with pytest.raises(ValueError, match="'icd' is registered already"):
        register_method(METHODS["icd"])


@pytest.mark.parametrize("method", ["icd", "fpn-mse"])
def test_distillers_saved_before_the_registry_load_strictly_into_the_rebuilt_ones(method):
    saved = torch.load(BEFORE, weights_only=True)[method]
    teacher = DetectorSpec(**saved["teacher_spec"])
    distiller = distiller_of_run(saved["args"], teacher, 7)
    distiller.load_state_dict(saved["distiller"], strict=True)
    kwargs = distiller_kwargs(saved["args"], teacher, 7)
    if method == "icd":
        assert (kwargs["heads"], kwargs["max_labels"], distiller.mask_temperature) == (4, 20, 1.0)
    else:
        assert (distiller.norm, distiller.loss_weight) == ("layer", 2.0)


def test_a_registered_method_is_offered_by_icd_train(toy_method, capsys):
    parser = build_parser()
    args = parser.parse_args(["train", "--data-path", "d", "--distill", "fpn-l1", "--fpn-l1-scale", "2"])
    assert (args.distill, args.fpn_l1_scale) == ("fpn-l1", 2.0)
    assert "--fpn-l1-scale" in parser._subparsers._group_actions[0].choices["train"].format_help()
    # its --fpn-l1-* flags need --teacher, as every method's
    assert main(["train", "--data-path", "d", "--fpn-l1-scale", "2"]) != 0
    assert "--fpn-l1-scale 2.0: distillation flags need --teacher" in capsys.readouterr().err


def test_a_new_method_is_one_module_and_one_entry_trained_through_icd_train(tmp_path, toy_method):
    data = tmp_path / "data"
    generate(str(data), num_train=4, num_val=2, image_size=64, seed=3)
    spec = DetectorSpec("retinanet", "resnet18", num_classes=7, fpn_channels=32, norm="gn", min_level=3,
                        max_level=5, min_size=(64,), max_size=64)  # fmt: skip
    torch.manual_seed(1)
    teacher = tmp_path / "teacher.pth"
    save_atomic({"model": build_detector(spec).state_dict(), "detector_spec": spec.to_dict()}, str(teacher))
    out = tmp_path / "run"
    main(["train", "--data-path", str(data), *f"{TINY_MODEL} {THREE_LEVELS}".split(), "--fpn-channels", "16",
          "--iters", "2", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--no-eval", "--no-progress",
          "--print-freq", "1", "--teacher", str(teacher), "--distill", "fpn-l1", "--fpn-l1-scale", "3",
          "--output-dir", str(out)])  # fmt: skip
    ckpt = load_checkpoint(str(out / "checkpoint.pth"))
    assert ckpt["args"]["distill"] == "fpn-l1" and ckpt["iteration"] == 2
    rebuilt = distiller_of_run(ckpt["args"], spec, 7)
    assert isinstance(rebuilt, FpnL1Distiller) and rebuilt.loss_weight == 3.0
    rebuilt.load_state_dict(ckpt["distiller"], strict=True)  # the 16 -> 32 adapters were trained and saved
    with open(out / "metrics.jsonl") as f:
        losses = [r["loss_distill"] for r in map(json.loads, f) if r.get("type") == "train"]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)  # --print-freq 1: both iterations
