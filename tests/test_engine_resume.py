"""A run killed with SIGKILL mid-way and resumed ends with the weights of an unbroken run."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from tiny_runs import THREE_LEVELS, TINY_MODEL

from icd.data.shapes import generate
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.checkpoint import load_checkpoint, save_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLER = os.path.join(ROOT, "tests", "sigkill_after_checkpoint.py")


def _train(args: list[str], kill_after: int | None = None) -> subprocess.Popen:
    """``icd train`` in a subprocess; ``kill_after``: it SIGKILLs itself right after the checkpoint
    of that iteration (tests/sigkill_after_checkpoint.py)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    command = ["-m", "icd", "train"] if kill_after is None else [KILLER, str(kill_after)]
    return subprocess.Popen(
        [sys.executable, *command, *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err[-3000:]


def test_sigkill_then_resume_matches_unbroken_run(tmp_path):
    data = tmp_path / "data"
    generate(str(data), num_train=4, num_val=2, image_size=64, seed=3)
    # A random teacher is enough: what is checked is that every state (student, ICD's both
    # sides, both optimisers and schedules, RNG of the fake instances, data order) resumes.
    spec = DetectorSpec(
        "retinanet",
        "resnet18",
        num_classes=7,
        fpn_channels=32,
        norm="gn",
        min_level=3,
        max_level=5,
        min_size=(64,),
        max_size=64,
    )
    torch.manual_seed(1)
    teacher = tmp_path / "teacher.pth"
    save_atomic(
        {"model": build_detector(spec).state_dict(), "detector_spec": spec.to_dict()}, str(teacher)
    )
    common = [
        "--data-path",
        str(data),
        *f"{TINY_MODEL} {THREE_LEVELS}".split(),
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-eval",
        "--no-progress",
        "--print-freq",
        "1",
        "--epoch-checkpoint-every",
        "1",
        "--teacher",
        str(teacher),
        "--distill",
        "icd",
        "--icd-heads",
        "4",
        "--distill-warmup-iters",
        "1",
        "--lr",
        "0.01",
    ]
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    # both at once (the 2 cores): one unbroken run, one SIGKILLed right after iteration 3's
    # checkpoint, part-way through epoch 1 (only it writes a checkpoint every iteration: 100 MB each,
    # and a run that checkpoints mid-epoch must match one that does not)
    done = _train([*common, "--output-dir", str(unbroken)])
    mid_epoch = ["--checkpoint-every", "1"]
    killed = _train([*common, *mid_epoch, "--output-dir", str(broken)], kill_after=3)
    code, err = _wait(done)
    assert code == 0, err
    code, err = _wait(killed)
    assert code == -9, (code, err)
    mid = load_checkpoint(str(broken / "checkpoint.pth"))
    assert (mid["iteration"], mid["epoch"], mid["epoch_batches"]) == (3, 1, 1)
    resumed = _train(
        [*common, *mid_epoch, "--output-dir", str(broken), "--resume", str(broken / "checkpoint.pth")]
    )
    code, err = _wait(resumed)
    assert code == 0, err

    a, b = (
        load_checkpoint(str(unbroken / "checkpoint.pth")),
        load_checkpoint(str(broken / "checkpoint.pth")),
    )
    assert a["iteration"] == b["iteration"] == 4
    start = load_checkpoint(str(unbroken / "model_0.pth"))
    moved = sum(not torch.equal(start["model"][k], v) for k, v in a["model"].items())
    assert moved > 0  # the last epoch changed the weights: the comparison below means something
    for part in ("model", "distiller"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=0, atol=0, msg=f"{part}.{key}")
    for group_a, group_b in zip(
        a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True
    ):
        torch.testing.assert_close(
            group_b["momentum_buffer"], group_a["momentum_buffer"], rtol=0, atol=0
        )
