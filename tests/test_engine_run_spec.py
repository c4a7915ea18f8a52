"""icd.engine.run_spec: a checkpoint of a tiny `icd train --distill icd` run is rebuilt as it was trained."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from tiny_runs import THREE_LEVELS, TINY

from icd.cli import main
from icd.data.shapes import generate
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.checkpoint import load_checkpoint, save_atomic
from icd.engine.distill import PRETRAINED_MASK_TEMPERATURE
from icd.engine.run_spec import (
    checkpoint_detector_spec,
    detector_spec_from_args,
    distiller_kwargs,
    distiller_of_run,
    load_detector,
)
from icd.errors import ConfigError, WeightsMismatchError

TEACHER = DetectorSpec("retinanet", "resnet18", num_classes=7, fpn_channels=32, norm="gn",
                       min_level=3, max_level=5, min_size=(64,), max_size=64)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A random teacher (with its spec) and an ICD student trained 2 iterations from it."""
    root = tmp_path_factory.mktemp("run_spec")
    data = str(root / "data")
    generate(data, num_train=4, num_val=2, image_size=64, seed=1)
    teacher = str(root / "teacher.pth")
    torch.manual_seed(0)
    save_atomic({"model": build_detector(TEACHER).state_dict(), "detector_spec": TEACHER.to_dict()}, teacher)
    out = root / "icd"
    assert main(f"train --data-path {data} {TINY} {THREE_LEVELS} --fpn-channels 16 --epochs 1 --batch-size 2 "
                f"--teacher {teacher} --distill icd --icd-heads 4 --icd-max-labels 20 --no-eval "
                f"--epoch-checkpoint-every 0 --output-dir {out}".split()) == 0
    return {"data": data, "teacher": teacher, "checkpoint": str(out / "checkpoint.pth")}


def _assert_same_state(model: torch.nn.Module, state: dict) -> None:
    rebuilt = model.state_dict()
    assert rebuilt.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(rebuilt[key], value, rtol=0, atol=0, msg=key)


def test_a_trained_checkpoint_is_rebuilt_identically(run):
    ckpt = load_checkpoint(run["checkpoint"])
    model, spec = load_detector(run["checkpoint"], 7)
    assert spec == DetectorSpec(**ckpt["detector_spec"])
    assert (spec.backbone, spec.fpn_channels, spec.norm, spec.levels) == ("resnet18", 16, "gn", [3, 4, 5])
    _assert_same_state(model, ckpt["model"])
    # the spec the trainer built from its flags is the one it saved
    assert detector_spec_from_args(argparse.Namespace(**ckpt["args"]), 7) == spec


def test_a_checkpoint_without_its_spec_is_read_from_its_saved_args(run):
    ckpt = load_checkpoint(run["checkpoint"])
    old = {k: v for k, v in ckpt.items() if k != "detector_spec"}
    # as trained: --norm gn; a bare state dict's flags (frozen_bn) lose against the saved args
    flags = DetectorSpec("retinanet", "resnet18", num_classes=7, fpn_channels=16, min_level=3, max_level=5)
    assert checkpoint_detector_spec(old, "old.pth", 7, flags=flags) == DetectorSpec(**ckpt["detector_spec"])
    model, _ = load_detector(old, 7)
    _assert_same_state(model, ckpt["model"])
    # its classes come from the data there: other data is a mismatch of the weights' shapes
    with pytest.raises(WeightsMismatchError, match="shapes"):
        load_detector(old, 3)
    with pytest.raises(ConfigError, match="new.pth has 7 classes; the data has 3"):
        checkpoint_detector_spec(ckpt, "new.pth", 3)


def test_the_distiller_of_a_run_is_rebuilt_from_its_saved_args(run):
    ckpt = load_checkpoint(run["checkpoint"])
    teacher, teacher_spec = load_detector(run["teacher"], 7)
    assert teacher_spec == TEACHER
    kwargs = distiller_kwargs(ckpt["args"], teacher_spec, 7)
    assert {k: kwargs[k] for k in ("method", "detector", "teacher_channels", "student_channels", "num_levels",
                                   "heads", "max_labels")} == {
        "method": "icd", "detector": "retinanet", "teacher_channels": 32, "student_channels": 16,
        "num_levels": 3, "heads": 4, "max_labels": 20}  # fmt: skip
    distiller = distiller_of_run(ckpt["args"], teacher_spec, 7)
    distiller.load_state_dict(ckpt["distiller"], strict=True)
    _assert_same_state(distiller, ckpt["distiller"])
    assert kwargs["mask_temperature"] == 1.0 == distiller.mask_temperature


@pytest.mark.parametrize(
    "flags, temperature",
    [({}, 1.0), ({"icd_init": "side.pth"}, PRETRAINED_MASK_TEMPERATURE),
     ({"icd_init": "side.pth", "icd_mask_temperature": 2.0}, 2.0), ({"icd_mask_temperature": 3.0}, 3.0)],
)  # fmt: skip
def test_the_mask_temperature_defaults_to_the_softened_one_with_a_pretrained_teacher_side(flags, temperature):
    args = {"distill": "icd", "icd_init": None, "icd_mask_temperature": None, **flags}
    assert distiller_kwargs(args, TEACHER, 7)["mask_temperature"] == temperature
    assert PRETRAINED_MASK_TEMPERATURE > 1.0


def test_a_bare_state_dict_needs_the_model_flags(run, tmp_path, capsys):
    bare = str(tmp_path / "bare.pth")
    save_atomic(load_checkpoint(run["teacher"])["model"], bare)
    with pytest.raises(ConfigError, match="holds no detector_spec .*give --teacher-detector"):
        checkpoint_detector_spec(load_checkpoint(bare), f"--teacher {bare}", 7,
                                 flags_hint="give --teacher-detector and --teacher-backbone")  # fmt: skip
    capsys.readouterr()
    out = str(tmp_path / "student")
    assert main(f"train --data-path {run['data']} {TINY} {THREE_LEVELS} --epochs 1 --no-eval "
                f"--teacher {bare} --distill fpn-mse --output-dir {out}".split()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no detector_spec" in err and "--teacher-backbone" in err
    assert not os.path.exists(os.path.join(out, "checkpoint.pth"))
    # with the flags it is the teacher again (frozen_bn unless --teacher-norm: this one is gn)
    assert main(f"train --data-path {run['data']} {TINY} {THREE_LEVELS} --epochs 1 --no-eval --overwrite "
                f"--teacher {bare} --teacher-detector retinanet --teacher-backbone resnet18 "
                f"--teacher-fpn-channels 32 --teacher-norm gn --distill fpn-mse --output-dir {out}".split()) == 0
