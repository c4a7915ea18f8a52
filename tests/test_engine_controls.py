"""Study controls: inheritance without distillation, and model_best.pth (the best evaluation kept)."""

from __future__ import annotations

import gc
import json
import os
import weakref

import pytest
import torch
from tiny_runs import ON_CPU, THREE_LEVELS, TINY_MODEL

import icd.engine.trainer as trainer_module
from icd.cli import build_parser, main
from icd.data.shapes import generate
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.checkpoint import load_checkpoint, save_atomic
from icd.engine.trainer import BEST_CHECKPOINT, Trainer, best_metric

TINY = f"{TINY_MODEL} {THREE_LEVELS} {ON_CPU} --batch-size 2 --print-freq 1 --lr 0.02"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("controls") / "data")
    generate(out, num_train=4, num_val=2, image_size=64, seed=4)
    return out


def _records(run_dir: str, kind: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def _teacher(tmp_path) -> str:
    """A ResNet-34 FCOS with the student's FPN width and levels (its neck and head fit the student)."""
    spec = DetectorSpec("fcos", "resnet34", num_classes=7, fpn_channels=32, norm="gn", min_level=3, max_level=5,
                        min_size=(64,), max_size=64)
    torch.manual_seed(11)
    path = str(tmp_path / "teacher.pth")
    save_atomic({"model": build_detector(spec).state_dict(), "detector_spec": spec.to_dict()}, path)
    return path


def _args(data: str, out: str, extra: str):
    return build_parser().parse_args(["train", "--data-path", data, *TINY.split(), "--detector", "fcos",
                                      "--output-dir", out, *extra.split()])


def test_inheritance_only_copies_neck_and_head_then_releases_the_teacher(data, tmp_path, monkeypatch):
    teacher_path = _teacher(tmp_path)
    loaded = []
    real_load = trainer_module.load_teacher

    def watched_load(*args, **kwargs):
        teacher, spec = real_load(*args, **kwargs)
        loaded.append(weakref.ref(teacher))
        return teacher, spec

    monkeypatch.setattr(trainer_module, "load_teacher", watched_load)
    out = str(tmp_path / "inherit")
    trainer = Trainer(_args(data, out, f"--epochs 1 --no-eval --teacher {teacher_path} --distill none "
                                       "--inherit-teacher neck,head"))
    try:
        gc.collect()
        assert len(loaded) == 1 and loaded[0]() is None  # loaded for the copy, then released
        assert trainer.teacher is None and trainer.distiller is None and trainer.tap is None
        teacher_state = load_checkpoint(teacher_path)["model"]
        student_state = trainer.model.state_dict()
        inherited = [k for k in student_state if k.startswith(("backbone.fpn.", "head."))]
        assert len(inherited) > 20
        for key in inherited:
            torch.testing.assert_close(student_state[key], teacher_state[key], rtol=0, atol=0, msg=key)
        body = [k for k, v in student_state.items() if k.startswith("backbone.body.") and v.dim() == 4]
        assert body and not any(torch.equal(student_state[k], teacher_state[k]) for k in body)  # convs
        # every optimised parameter is the student's: no distiller, no teacher side
        assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
            id(p) for p in trainer.model.parameters()}
        assert trainer.teacher_optimizer is None
        trainer.run()
    finally:
        trainer.close()
    records = _records(out, "train")
    assert len(records) == 2 and all("loss_distill" not in r and "loss_aux_conf" not in r for r in records)
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert "distiller" not in ckpt and ckpt["args"]["distill"] == "none"
    assert ckpt["args"]["inherit_teacher"] == "neck,head"


def test_distill_none_with_a_teacher_needs_inheritance(data, tmp_path):
    teacher_path = _teacher(tmp_path)
    with pytest.raises(ValueError, match="--distill none: the teacher would not be used; add --inherit-teacher"):
        main(["train", "--data-path", data, *TINY.split(), "--teacher", teacher_path, "--distill", "none",
              "--output-dir", str(tmp_path / "x")])


def test_best_metric_is_mask_ap_for_mask_rcnn():
    assert best_metric("maskrcnn", {"AP": 3.0, "segm_AP": 2.0}) == "segm_AP"
    assert best_metric("maskrcnn", {"AP": 3.0}) == "AP"  # val set without segmentations
    assert best_metric("fcos", {"AP": 3.0, "segm_AP": 2.0}) == "AP"


def _scripted_evaluate(monkeypatch, aps: list[float]) -> None:
    """The trainer's evaluations return these APs in turn (tiny runs all score 0.0)."""
    calls = iter(aps)

    def evaluate(*args, **kwargs):
        ap = next(calls)
        return {"AP": ap, "AP50": 2 * ap}

    monkeypatch.setattr(trainer_module, "evaluate", evaluate)


def _without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_model_best_is_the_best_evaluation_and_survives_a_resume(data, tmp_path, monkeypatch):
    common = f"{TINY} --detector fcos --epochs 3 --eval-every 1 --epoch-checkpoint-every 1"
    aps = [1.0, 3.0, 3.0]  # best: epoch 1 (a later equal AP does not replace it)
    unbroken, broken = str(tmp_path / "unbroken"), str(tmp_path / "broken")
    _scripted_evaluate(monkeypatch, aps)
    assert main(["train", "--data-path", data, *common.split(), "--output-dir", unbroken]) == 0
    evals = _records(unbroken, "eval")
    assert [r["AP"] for r in evals] == aps
    assert [(r["best_AP"], r["best_epoch"], r["best_iter"]) for r in evals] == [
        (1.0, 0, 2), (3.0, 1, 4), (3.0, 1, 4)]
    best = load_checkpoint(os.path.join(unbroken, BEST_CHECKPOINT))
    assert best["best"] == {"metric": "AP", "value": 3.0, "epoch": 1, "iter": 4}
    assert best["iteration"] == 4 and "detector_spec" in best
    last = load_checkpoint(os.path.join(unbroken, "checkpoint.pth"))
    assert last["iteration"] == 6 and last["best"] == best["best"]
    epoch_1 = load_checkpoint(os.path.join(unbroken, "model_1.pth"))
    moved = [k for k, v in last["model"].items() if not torch.equal(v, epoch_1["model"][k])]
    assert moved  # the later epochs changed the weights: model_best.pth kept epoch 1's
    for key, value in epoch_1["model"].items():
        torch.testing.assert_close(best["model"][key], value, rtol=0, atol=0, msg=key)

    # stopped after epoch 1 (evaluated: AP 1, 3), resumed (AP 3): the best stays epoch 1's
    _scripted_evaluate(monkeypatch, aps)
    assert main(["train", "--data-path", data, *common.split(), "--stop-after-iters", "4",
                 "--output-dir", broken]) == 0
    assert main(["train", "--data-path", data, *common.split(), "--output-dir", broken,
                 "--resume", os.path.join(broken, "checkpoint.pth")]) == 0
    assert _without_time(_records(broken, "eval")) == _without_time(evals)
    resumed_best = load_checkpoint(os.path.join(broken, BEST_CHECKPOINT))
    assert resumed_best["best"] == best["best"]
    for key, value in best["model"].items():
        torch.testing.assert_close(resumed_best["model"][key], value, rtol=0, atol=0, msg=key)

    # model_best.pth is a checkpoint like checkpoint.pth: icd eval reads it, --teacher takes it
    monkeypatch.undo()
    evaluated = str(tmp_path / "eval")
    assert main(["eval", "--data-path", data, "--checkpoint", os.path.join(unbroken, BEST_CHECKPOINT),
                 *ON_CPU.split(), "--output-dir", evaluated]) == 0
    assert _records(evaluated, "eval")[0]["iter"] == 4
    student = str(tmp_path / "student")
    assert main(["train", "--data-path", data, *TINY.split(), "--detector", "fcos", "--iters", "1", "--no-eval",
                 "--teacher", os.path.join(unbroken, BEST_CHECKPOINT), "--distill", "fpn-mse",
                 "--output-dir", student]) == 0
    assert _records(student, "train")[0]["loss_distill"] > 0
