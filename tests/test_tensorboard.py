"""--tensorboard: the scalars of metrics.jsonl in TensorBoard event files, read back with
TensorBoard's own EventAccumulator; a clear error when the package is missing."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from tiny_runs import ON_CPU, TINY

from icd.cli import main
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.checkpoint import save_atomic

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    assert main(f"data shapes --out {out} --num-train 4 --num-val 2 --image-size 64 --seed 1".split()) == 0
    return str(out)


def _records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def _scalars(run_dir) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every event file in ``run_dir``, as TensorBoard loads them."""
    (event_file,) = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    events = event_accumulator.EventAccumulator(event_file)
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_train_writes_the_metrics_as_tensorboard_scalars(data, tmp_path):
    run = tmp_path / "run"
    argv = f"train --data-path {data} {TINY} --epochs 2 --print-freq 1 --score-thresh 0 --tensorboard "
    argv += f"--output-dir {run}"
    assert main(argv.split()) == 0
    scalars = _scalars(str(run))
    train, evals = _records(run, "train"), _records(run, "eval")
    assert [r["iter"] for r in train] == [1, 2, 3, 4] and [r["iter"] for r in evals] == [2, 4]
    for record in train:  # the same names as metrics.jsonl, under the line's type, at its iteration
        for key in ("loss", "loss_classification", "loss_bbox_regression", "lr", "sec_per_iter"):
            assert scalars[f"train/{key}"][record["iter"]] == pytest.approx(record[key], rel=1e-6)
    for record in evals:
        for key in ("AP", "AP50", "APs", "best_AP"):
            assert scalars[f"eval/{key}"][record["iter"]] == pytest.approx(record[key], rel=1e-6, abs=1e-6)
    assert not any(tag.endswith(("/time", "/iter", "/type")) for tag in scalars)


def test_pretrain_writes_its_losses_and_attention_statistics(data, tmp_path):
    torch.manual_seed(0)
    spec = DetectorSpec("fcos", "resnet18", num_classes=7, fpn_channels=32, norm="gn",
                        min_level=3, max_level=5, min_size=(64,), max_size=64)  # fmt: skip
    teacher = str(tmp_path / "teacher.pth")
    save_atomic({"model": build_detector(spec).state_dict(), "detector_spec": spec.to_dict()}, teacher)
    out = tmp_path / "pre"
    argv = (f"pretrain --data-path {data} --teacher {teacher} --output-dir {out} {ON_CPU} --batch-size 2 "
            f"--iters 2 --eval-every 2 --print-freq 1 --icd-heads 4 --tensorboard")  # fmt: skip
    assert main(argv.split()) == 0
    scalars = _scalars(str(out))
    for record in _records(out, "pretrain"):
        assert scalars["pretrain/loss_aux_conf"][record["iter"]] == pytest.approx(record["loss_aux_conf"], rel=1e-6)
    assert sorted(scalars["attention/lift"]) == [r["iter"] for r in _records(out, "attention")] == [0, 2]


def test_missing_tensorboard_is_a_usage_error_before_any_work(data, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    absent = lambda name, *rest: None if name == "tensorboard" else find_spec(name, *rest)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", absent)
    with pytest.raises(SystemExit) as exit_info:
        main(f"train --data-path {data} {TINY} --tensorboard --output-dir {tmp_path / 'run'}".split())
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--tensorboard: needs the tensorboard package" in err and '".[tensorboard]"' in err
    assert not (tmp_path / "run").exists()
