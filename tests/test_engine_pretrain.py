"""`icd pretrain` (ICD's teacher side on the frozen teacher alone) and `icd train --icd-init`."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from tiny_runs import ON_CPU

from icd.cli import main
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.checkpoint import load_checkpoint, save_atomic
from icd.engine.pretrain import TEACHER_SIDE_PREFIXES

SIZE = "--min-size 64 --max-size 64"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    assert main(f"data shapes --out {out} --num-train 4 --num-val 2 --image-size 64 --seed 1".split()) == 0
    return str(out)


def _teacher(path, channels=32, seed=0):
    torch.manual_seed(seed)
    spec = DetectorSpec("fcos", "resnet18", num_classes=7, fpn_channels=channels, norm="gn",
                        min_level=3, max_level=5, min_size=(64,), max_size=64)  # fmt: skip
    save_atomic({"model": build_detector(spec).state_dict(), "detector_spec": spec.to_dict()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return _teacher(tmp_path_factory.mktemp("teacher") / "teacher.pth")


def _pretrain(data, teacher, out, extra=""):
    argv = (f"pretrain --data-path {data} --teacher {teacher} --output-dir {out} {ON_CPU} {SIZE} "
            f"--batch-size 2 --iters 4 --eval-every 2 --print-freq 1 --icd-heads 4 {extra}")  # fmt: skip
    return main(argv.split())


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def _teacher_side(path):
    return load_checkpoint(path)["teacher_side"]


def test_pretrain_writes_the_teacher_side_metrics_and_curve(data, teacher, tmp_path):
    out = tmp_path / "pre"
    assert _pretrain(data, teacher, out) == 0
    assert {"checkpoint.pth", "teacher_side.pth", "metrics.jsonl", "attention_curve.png"} <= set(os.listdir(out))
    attention = _records(out, "attention")
    assert [r["iter"] for r in attention] == [0, 2, 4]
    for r in attention:
        assert r["lift"] > 0 and 0 <= r["distinctness"] <= 1
        assert {"lift_P3", "lift_P4", "lift_P5", "distinctness_P3", "cpu_s"} <= set(r)
        assert 0 <= r["aux_auc"] <= 1 and r["aux_conf_real"] > 0 and r["aux_conf_fake"] > 0  # always measured
        assert "aux_auc_small" not in r  # per size: with --attention-detail only
    train = _records(out, "pretrain")
    assert [r["iter"] for r in train] == [1, 2, 3, 4]
    assert all(r["loss_aux_conf"] > 0 and r["loss_aux_reg"] > 0 for r in train)
    blob = load_checkpoint(str(out / "teacher_side.pth"))
    assert blob["signature"]["channels"] == 32 and blob["signature"]["levels"] == [3, 4, 5]
    assert blob["teacher_side"] and all(k.startswith(TEACHER_SIDE_PREFIXES) for k in blob["teacher_side"])
    best = max(attention, key=lambda r: r["score"])
    assert blob["iteration"] == best["iter"]
    with open(out / "attention_curve.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_pretrain_resumes_exactly(data, teacher, tmp_path):
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    assert _pretrain(data, teacher, straight) == 0
    assert _pretrain(data, teacher, paused, "--stop-after-iters 2") == 0
    assert _records(paused, "pretrain")[-1]["iter"] == 2
    assert _pretrain(data, teacher, paused, f"--resume {paused / 'checkpoint.pth'}") == 0
    a, b = (load_checkpoint(str(d / "checkpoint.pth")) for d in (straight, paused))
    assert a["iteration"] == b["iteration"] == 4
    for key, value in a["teacher_side"].items():
        assert torch.equal(value, b["teacher_side"][key]), key


def test_student_starts_from_the_pretrained_teacher_side(data, teacher, tmp_path):
    pre = tmp_path / "pre"
    assert _pretrain(data, teacher, pre) == 0
    out = tmp_path / "icd"
    # --icd-lr 0: the teacher side stays as loaded, so the checkpoint shows what was loaded
    main(f"train --data-path {data} --backbone resnet18 --norm gn --fpn-channels 32 {SIZE} {ON_CPU} "
         f"--detector fcos --min-level 3 --max-level 5 --epochs 1 --teacher {teacher} --distill icd "
         f"--icd-heads 4 --icd-init {pre / 'teacher_side.pth'} --icd-lr 0 --output-dir {out}".split())  # fmt: skip
    loaded = _teacher_side(str(pre / "teacher_side.pth"))
    distiller = load_checkpoint(str(out / "checkpoint.pth"))["distiller"]
    for key, value in loaded.items():
        assert torch.equal(distiller[key], value), key
    evals = _records(out, "eval")
    assert evals and {"lift", "distinctness", "lift_P3", "distinctness_P5"} <= set(evals[-1])


@pytest.mark.parametrize(
    ("teacher_kwargs", "flags", "message"),
    [
        ({"channels": 64}, "--icd-heads 4", "channels 32"),
        ({"seed": 1}, "--icd-heads 4", "another teacher"),
        ({}, "--icd-heads 8", "heads 4"),
    ],
)
def test_icd_init_from_another_teacher_is_refused(data, teacher, tmp_path, teacher_kwargs, flags, message, capsys):
    pre = tmp_path / "pre"
    assert _pretrain(data, teacher, pre) == 0
    other = _teacher(tmp_path / "other.pth", **teacher_kwargs) if teacher_kwargs else teacher
    out = tmp_path / "icd"
    capsys.readouterr()
    code = main(f"train --data-path {data} --backbone resnet18 --norm gn --fpn-channels 32 {SIZE} {ON_CPU} "
             f"--detector fcos --min-level 3 --max-level 5 --epochs 1 --teacher {other} --distill icd "
             f"{flags} --icd-init {pre / 'teacher_side.pth'} --output-dir {out}".split())  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("icd: error: --icd-init") and re.search(message, err), err
    assert not os.path.exists(out / "checkpoint.pth") and not os.path.exists(out / "metrics.jsonl")


@pytest.mark.parametrize("flag", ["--iters 0", "--iters -3", "--eval-every 0", "--lr nan", "--clip 0"])
def test_bad_pretrain_flags_are_refused_before_training(data, teacher, tmp_path, flag, capsys):
    out = tmp_path / "pre"
    with pytest.raises(SystemExit):  # out of range: a parse error naming the flag
        _pretrain(data, teacher, out, flag)
    assert f"argument {flag.split()[0]}" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_eval_attention_stats_of_a_pretrain_file(data, teacher, tmp_path, capsys):
    pre = tmp_path / "pre"
    assert _pretrain(data, teacher, pre) == 0
    capsys.readouterr()
    main(f"eval --data-path {data} --checkpoint {pre / 'teacher_side.pth'} --attention-stats "
         f"{ON_CPU} --output-dir {tmp_path / 'ev'}".split())  # fmt: skip
    printed = capsys.readouterr().out
    assert "lift " in printed and "distinctness " in printed and "lift_P4" in printed


def test_the_teacher_feature_cache_changes_nothing_but_time(data, teacher, tmp_path):
    cached, fresh = tmp_path / "cached", tmp_path / "fresh"
    assert _pretrain(data, teacher, cached) == 0  # default: train and val maps cached (64 px, unpadded)
    assert _pretrain(data, teacher, fresh, "--cache-gb 0") == 0
    for a, b in zip(_records(cached, "attention"), _records(fresh, "attention"), strict=True):
        assert a["iter"] == b["iter"]
        for key in ("lift", "distinctness", "peak", "lift_P3", "distinctness_P4"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    a, b = (_teacher_side(str(d / "checkpoint.pth")) for d in (cached, fresh))
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.0, 1.1])
def test_a_shared_attention_is_reported(data, teacher, tmp_path, monkeypatch, caplog, threshold):
    from icd.engine import pretrain

    monkeypatch.setattr(pretrain, "SHARED_ATTENTION_DISTINCTNESS", threshold)  # distinctness is in [0, 1]
    out = tmp_path / "pre"
    with caplog.at_level("WARNING", logger="icd.pretrain"):
        assert _pretrain(data, teacher, out) == 0
    health = _records(out, "health")
    if threshold == 0.0:
        assert health == [] and "does not single instances out" not in caplog.text
    else:
        kept = load_checkpoint(str(out / "teacher_side.pth"))
        assert [(r["problem"], r["iter"]) for r in health] == [("shared", kept["iteration"])]
        assert health[0]["value"] == pytest.approx(kept["attention"]["distinctness"])
        assert "does not single instances out" in caplog.text
