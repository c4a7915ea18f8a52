"""Every command end to end on a tiny generated COCO dataset (64 px images, ResNet-18, FPN 32)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tiny_runs import THREE_LEVELS, TINY

from icd.cli import build_parser, main
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.checkpoint import load_checkpoint, save_atomic
from icd.nn.sampler import InstanceSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    args = f"data shapes --out {out} --num-train 4 --num-val 2 --image-size 64 --seed 1"
    assert main(args.split()) == 0
    assert sorted(os.listdir(out / "annotations")) == ["instances_train.json", "instances_val.json"]
    assert len(os.listdir(out / "train")) == 4 and len(os.listdir(out / "val")) == 2
    return str(out)


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


@pytest.mark.parametrize("command", [["train"], ["eval"], ["plot"], ["data"], ["data", "shapes"]])
def test_help_of_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: icd " + " ".join(command))
    if command == ["train"]:
        flags = "--data-path --epochs --lr --amp --resume --output-dir --teacher --distill "
        flags += "--workers --seed --device --batch-size --detector --backbone"
        for flag in flags.split():
            assert flag in text


def test_python_dash_m_and_console_script():
    env = {**os.environ, "PYTHONPATH": ROOT}
    command = [sys.executable, "-m", "icd", "--help"]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "eval" in out.stdout
    script = shutil.which("icd") or os.path.join(os.path.dirname(sys.executable), "icd")
    if not os.path.exists(script):
        pytest.skip("the `icd` console script is not installed in this environment")
    out = subprocess.run([script, "data", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "shapes" in out.stdout


def test_train_eval_plot_and_fpn_mse_distillation(data, tmp_path):
    teacher = str(tmp_path / "teacher")
    # --score-thresh 0: an untrained detector still gives detections, so eval is exercised
    main(f"train --data-path {data} {TINY} --epochs 2 --batch-size 2 --print-freq 1 --lr 0.02 "
         f"--score-thresh 0 --epoch-checkpoint-every 2 --output-dir {teacher}".split())
    ckpt = load_checkpoint(os.path.join(teacher, "checkpoint.pth"))
    assert {"model", "optimizer", "lr_scheduler", "epoch", "args", "iteration", "rng"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 4 and ckpt["args"]["lr"] == 0.02
    assert [f for f in sorted(os.listdir(teacher)) if f.startswith("model_")] == ["model_1.pth", "model_best.pth"]
    train = _records(teacher, "train")
    assert [r["iter"] for r in train] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and "loss_classification" in r for r in train)
    evals = _records(teacher, "eval")
    assert [r["epoch"] for r in evals] == [0, 1] and all(0 <= r["AP"] <= 100 for r in evals)
    with open(os.path.join(teacher, "detections_val.json")) as f:
        train_dets = json.load(f)
    assert {d["image_id"] for d in train_dets} == {1, 2}

    evaluated = str(tmp_path / "eval")
    checkpoint = os.path.join(teacher, "checkpoint.pth")
    main(f"eval --data-path {data} --checkpoint {checkpoint} --workers 0 --device cpu "
         f"--no-progress --output-dir {evaluated}".split())
    (record,) = _records(evaluated, "eval")
    assert record["AP"] == evals[-1]["AP"] and record["AP50"] == evals[-1]["AP50"]
    with open(os.path.join(evaluated, "detections_val.json")) as f:
        assert json.load(f) == train_dets

    student = str(tmp_path / "fpn_mse")  # narrower student: a 1x1 adapter 16 -> 32 channels
    main(f"train --data-path {data} {TINY} --fpn-channels 16 --epochs 1 --print-freq 1 "
         f"--workers 1 --teacher {checkpoint} --distill fpn-mse --no-eval "
         f"--epoch-checkpoint-every 0 "
         f"--output-dir {student}".split())
    records = _records(student, "train")
    assert len(records) == 2 and all(r["loss_distill"] > 0 for r in records)
    ckpt = load_checkpoint(os.path.join(student, "checkpoint.pth"))
    assert ckpt["distiller"]["adapters.0.weight"].shape == (32, 16, 1, 1)
    assert sorted(f for f in os.listdir(student) if f.endswith(".pth")) == ["checkpoint.pth"]

    png = str(tmp_path / "curves.png")
    assert main(["plot", teacher, student, "--out", png]) == 0
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _random_teacher(tmp_path, detector: str = "retinanet", backbone: str = "resnet18", max_level: int = 5) -> str:
    """A teacher checkpoint of random weights (P3-P``max_level``, FPN 32, 64 px) with its spec."""
    spec = DetectorSpec(detector, backbone, num_classes=7, fpn_channels=32, norm="gn",
                        min_level=3, max_level=max_level, min_size=(64,), max_size=64)
    teacher = str(tmp_path / "teacher.pth")
    save_atomic({"model": build_detector(spec).state_dict(), "detector_spec": spec.to_dict()}, teacher)
    return teacher


@pytest.mark.parametrize(("detector", "extra"), [("retinanet", ""), ("fasterrcnn", "--amp")])
def test_icd_distillation(detector, extra, data, tmp_path):
    teacher = _random_teacher(tmp_path, detector, "resnet34")
    out = str(tmp_path / "icd")
    main(f"train --data-path {data} {TINY} --detector {detector} --fpn-channels 16 "
         f"--min-level 3 --max-level 5 --epochs 1 --print-freq 1 --teacher {teacher} "
         f"--distill icd --icd-heads 4 --no-eval --output-dir {out} {extra}".split())
    records = _records(out, "train")
    assert len(records) == 2
    for r in records:
        assert r["loss_distill"] > 0 and r["loss_aux_conf"] > 0 and r["loss_aux_reg"] > 0
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert {"distiller", "teacher_optimizer", "teacher_lr_scheduler"} <= set(ckpt)
    assert ckpt["teacher_optimizer"]["param_groups"][0]["weight_decay"] == 1e-4
    # default distillation warm-up: min(1000, 10% of 2 iterations) = 0; the counter is at 2
    assert int(ckpt["distiller"]["num_steps"]) == 2
    assert not any(k.startswith("teacher") for k in ckpt["model"])  # the teacher stays out
    assert torch.is_tensor(ckpt["rng"]["torch"])


def test_icd_attention_detail_and_the_looks_away_warning(data, tmp_path, monkeypatch, capsys, caplog):
    import icd.engine.trainer as trainer_module

    # any real lift is below this floor: the warning and its health record must follow each evaluation
    monkeypatch.setattr(trainer_module, "ATTENTION_LIFT_FLOOR", 1e9)
    out = str(tmp_path / "icd")
    main(f"train --data-path {data} {TINY} {THREE_LEVELS} --epochs 1 --teacher {_random_teacher(tmp_path)} "
         f"--distill icd --icd-heads 4 --attention-detail --output-dir {out}".split())  # fmt: skip
    (evaluation,) = _records(out, "eval")
    assert {"lift", "lift_P3", "mass_own", "mass_others", "mass_background", "mass_border", "mass_padding",
            "mass_P5"} <= set(evaluation)  # fmt: skip
    assert sum(evaluation[f"mass_{n}"] for n in ("own", "others", "background", "border", "padding")) == (
        pytest.approx(1.0))  # fmt: skip
    (health,) = _records(out, "health")
    assert health["problem"] == "looks-away" and health["value"] == evaluation["lift"]
    assert "looks away from its instances" in caplog.text
    printed = capsys.readouterr().out
    assert "lift " in printed and "mass_own" not in printed  # the detail goes to metrics.jsonl only
    assert "aux_auc " in printed and "aux_conf_real " not in printed and "aux_auc_small" in evaluation
    monkeypatch.setattr(trainer_module, "ATTENTION_LIFT_FLOOR", 0.0)
    main(f"train --data-path {data} {TINY} {THREE_LEVELS} --epochs 1 --teacher {_random_teacher(tmp_path)} "
         f"--distill icd --icd-heads 4 --output-dir {out}_plain".split())  # fmt: skip
    (plain,) = _records(f"{out}_plain", "eval")
    assert not _records(f"{out}_plain", "health") and "mass_own" not in plain
    assert 0 <= plain["aux_auc"] <= 1 and "aux_conf_fake" in plain and "aux_auc_small" not in plain


def test_icd_static_shapes_fixes_the_instance_slots(data, tmp_path, monkeypatch):
    slots = []
    sample = InstanceSampler.forward

    def spy(self, *args, **kwargs):
        batch = sample(self, *args, **kwargs)
        slots.append(batch.boxes.shape[1])
        return batch

    monkeypatch.setattr(InstanceSampler, "forward", spy)
    teacher = _random_teacher(tmp_path)
    static = f"--icd-static-shapes --icd-max-labels 64 --icd-heads 4 --epochs 1 --no-eval {THREE_LEVELS}"
    main(f"train --data-path {data} {TINY} --teacher {teacher} --distill icd "
         f"{static} --output-dir {tmp_path / 'static'}".split())
    assert slots and set(slots) == {64}  # K = the slots, whatever the batch's box counts
    assert all(r["loss_distill"] > 0 for r in _records(str(tmp_path / "static"), "train"))
    slots.clear()
    main(f"train --data-path {data} {TINY} --teacher {teacher} --distill icd "
         f"--icd-max-labels 64 --icd-heads 4 --epochs 1 --no-eval {THREE_LEVELS} "
         f"--output-dir {tmp_path / 'dynamic'}".split())
    assert slots and max(slots) < 64  # the default: K = the batch's largest instance count


def test_icd_static_shapes_refuses_images_with_more_boxes_than_slots(data, tmp_path, capsys):
    out = tmp_path / "refused"
    argv = (f"train --data-path {data} {TINY} {THREE_LEVELS} --teacher {_random_teacher(tmp_path)} "
            f"--distill icd --icd-static-shapes --icd-max-labels 1 --no-eval --output-dir {out}").split()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--icd-static-shapes" in err and "--icd-max-labels" in err and "Traceback" not in err
    assert not (out / "checkpoint.pth").exists()


def test_teacher_with_other_levels_is_refused(data, tmp_path, capsys):
    teacher = _random_teacher(tmp_path, max_level=6)
    argv = (f"train --data-path {data} {TINY} --max-level 5 --teacher {teacher} --no-eval "
            f"--output-dir {tmp_path / 'x'}").split()
    assert main(argv) == 2  # a user's error: one line, no traceback
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("icd: error: teacher levels P[3, 4, 5, 6] differ")
    with pytest.raises(ValueError, match="levels"):  # --debug: the exception itself
        main([*argv, "--debug"])
