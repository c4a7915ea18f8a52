"""Each COCO preset in configs/ dry-runs: models at full width, optimisers and schedules of the
preset, two iterations on a tiny generated COCO set (64 px images) on CPU. A broken preset fails
here, not after hours on 8 GPUs."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
from tiny_runs import fewer_rois

from icd.cli import main
from icd.config import load_preset
from icd.data.shapes import generate
from icd.engine.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRY_RUN = ("--stop-after-iters 2 --min-size 64 --max-size 96 --workers 0 --device cpu --no-progress --no-eval "
           "--epoch-checkpoint-every 0")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("coco"))
    generate(out, num_train=6, num_val=2, image_size=64, seed=2)  # 3 iterations per epoch
    return out


def _dry_run(preset: str, data: str, out: str, extra: str = "") -> dict:
    argv = ["train", "--config", preset, "--data-path", data, "--output-dir", out, *DRY_RUN.split(), *extra.split()]
    assert main(argv) == 0
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    values = load_preset(preset)
    assert ckpt["iteration"] == 2 and ckpt["lr_scheduler"]["last_epoch"] == 2
    assert ckpt["args"]["iters"] == values["iters"] and ckpt["args"]["lr_steps"] == values["lr_steps"]
    spec = ckpt["detector_spec"]
    assert (spec["detector"], spec["backbone"], spec["fpn_channels"]) == (values["detector"], values["backbone"], 256)
    assert spec["norm"] == "frozen_bn" and spec["trainable_layers"] == 3
    assert ckpt["optimizer"]["param_groups"][0]["initial_lr"] == values["lr"]
    return ckpt


@pytest.mark.parametrize("detector", ["retinanet", "fasterrcnn", "fcos", "maskrcnn"])
def test_teacher_baseline_and_icd_presets_dry_run(detector, data, tmp_path, caplog, monkeypatch):
    fewer_rois(monkeypatch)  # RoI sampling is torchvision's, not the preset's: cheaper, same preset checks
    configs = os.path.join(ROOT, "configs", detector)
    teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
    teacher = _dry_run(os.path.join(configs, "r101_3x.toml"), data, teacher_dir)
    assert "distiller" not in teacher
    baseline = _dry_run(os.path.join(configs, "r50_1x.toml"), data, student_dir)
    assert "distiller" not in baseline
    shutil.rmtree(student_dir)

    teacher_ckpt = os.path.join(teacher_dir, "checkpoint.pth")
    with caplog.at_level(logging.INFO, logger="icd.train"):
        student = _dry_run(os.path.join(configs, "r50_1x_icd.toml"), data, student_dir, f"--teacher {teacher_ckpt}")
    assert "distiller" in student and "teacher_optimizer" in student
    assert "inherited neck,head from the teacher" in caplog.text  # what it copies: test_detection_inherit.py
    # one process x batch 2 is not the presets' 16 images: the run says how to scale the lr
    lr = load_preset(os.path.join(configs, "r50_1x.toml"))["lr"]
    assert "for 16 images per iteration; this run has 2 (world size 1 x --batch-size 2)" in caplog.text
    assert f"scale --lr linearly ({lr / 8:.3g} here)" in caplog.text
    with open(os.path.join(student_dir, "metrics.jsonl")) as f:
        loss_keys = {key for line in f for key in json.loads(line)}
    assert {"loss_distill", "loss_aux_conf", "loss_aux_reg"} <= loss_keys
    if detector == "maskrcnn":
        assert "loss_mask" in loss_keys


def test_dry_runs_cover_every_preset():
    shipped = sorted(
        os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "configs"))
        for d, _, files in os.walk(os.path.join(ROOT, "configs"))
        for f in files
        if f.endswith(".toml") and d != os.path.join(ROOT, "configs")
    )
    tested = sorted(f"{d}/{n}" for d in ("retinanet", "fasterrcnn", "fcos", "maskrcnn")
                    for n in ("r101_3x.toml", "r50_1x.toml", "r50_1x_icd.toml"))
    assert shipped == tested
