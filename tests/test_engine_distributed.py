"""Two gloo processes (torchrun) train like one process with the doubled batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from tiny_runs import ON_CPU, THREE_LEVELS, TINY_MODEL

from icd.data.shapes import generate
from icd.detection.models import DetectorSpec, build_detector
from icd.engine.checkpoint import load_checkpoint, save_atomic

ATOL = 1e-7  # float32 sums in another order (DDP's all-reduce): a few ulps after 2 steps (> 1e-8 seen)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.serial  # torchrun: several processes, each wanting the cores


def _launch(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    # its own session, so that _finish can kill torchrun's agent with os.killpg
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen, marker: str, timeout: float, why: str) -> str:
    """Wait for a launched run and return its stderr; past ``timeout`` seconds kill it and fail.
    torchrun starts its workers in sessions of their own, so killing the agent's group leaves
    them running (holding the pipes open: communicate() would wait forever); they are found by
    ``marker`` (the run's own --output-dir) in their command lines and killed too."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        os.kill(int(pid), signal.SIGKILL)
            except OSError:  # gone meanwhile, or not ours to read
                continue
        proc.communicate(timeout=60)
        pytest.fail(why)


def _losses(run_dir) -> list[float]:
    with open(run_dir / "metrics.jsonl") as f:
        return [r["loss"] for r in map(json.loads, f) if r["type"] == "train"]


def test_two_gloo_processes_equal_one_process_with_double_batch(tmp_path):
    data = tmp_path / "data"
    generate(str(data), num_train=8, num_val=3, image_size=64, seed=5)
    # GroupNorm backbone and same-size images: every image's loss is independent of its
    # batch-mates, so the split over ranks cannot change the result.
    common = [
        "--data-path",
        str(data),
        *f"{TINY_MODEL} {THREE_LEVELS}".split(),
        "--epochs",
        "1",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--print-freq",
        "1",
        "--seed",
        "7",
        "--lr",
        "0.05",
        "--score-thresh",
        "0.0",
    ]
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one = _launch(
        [
            sys.executable,
            "-m",
            "icd",
            "train",
            *common,
            "--batch-size",
            "4",
            "--output-dir",
            str(one_dir),
        ]
    )
    two = _launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "icd",
            "train",
            *common,
            "--batch-size",
            "2",
            "--output-dir",
            str(two_dir),
        ]
    )
    for proc, run_dir in ((one, one_dir), (two, two_dir)):
        err = _finish(proc, str(run_dir), 600, "a run hung (or the machine is far too loaded)")
        assert proc.returncode == 0, err[-3000:]

    a, b = (
        load_checkpoint(str(one_dir / "checkpoint.pth")),
        load_checkpoint(str(two_dir / "checkpoint.pth")),
    )
    assert a["iteration"] == b["iteration"] == 2
    assert b["args"]["batch_size"] == 2 and a["args"]["batch_size"] == 4
    torch.testing.assert_close(
        torch.tensor(_losses(two_dir)), torch.tensor(_losses(one_dir)), rtol=1e-5, atol=1e-6
    )
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=ATOL, msg=key)
    # evaluation: each rank predicts half of the val images, rank 0 gathers and scores them
    evals = [
        [r for r in map(json.loads, open(d / "metrics.jsonl")) if r["type"] == "eval"]
        for d in (one_dir, two_dir)
    ]
    assert len(evals[0]) == len(evals[1]) == 1
    for key in ("AP", "AP50", "APs"):
        assert evals[1][0][key] == pytest.approx(evals[0][0][key], abs=1e-6)
    dets = [json.load(open(d / "detections_val.json")) for d in (one_dir, two_dir)]
    assert sorted({d["image_id"] for d in dets[1]}) == sorted({d["image_id"] for d in dets[0]})
    assert len({d["image_id"] for d in dets[0]}) == 3  # rank 1's image and rank 0's two
    assert len(dets[1]) == len(dets[0]) > 3
    torch.manual_seed(7)  # the trainer seeds with --seed before building the model
    spec = DetectorSpec(**a["detector_spec"])
    initial = build_detector(spec).state_dict()
    moved = [k for k, v in a["model"].items() if (v - initial[k]).abs().max() > 10 * ATOL]
    assert len(moved) > 20  # the steps moved the weights far beyond the tolerance above


def test_a_rank_whose_batch_is_all_corrupt_skips_the_step_with_the_others(tmp_path):
    """--on-bad-data skip under DDP: the empty rank's step is skipped on every rank (no hang)."""
    data = tmp_path / "data"
    generate(str(data), num_train=4, num_val=1, image_size=64, seed=5)
    (data / "train" / "000002.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    proc = _launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "icd", "train", "--data-path", str(data), *f"{TINY_MODEL} {THREE_LEVELS} {ON_CPU}".split(),
         "--epochs", "1", "--batch-size", "1", "--no-eval", "--on-bad-data", "skip",
         "--output-dir", str(out)]
    )
    err = _finish(proc, str(out), 600, "the ranks hung on a batch of skipped images")  # ~40 s on 2 idle cores
    assert proc.returncode == 0, err[-3000:]
    assert "000002.png" in err and "cannot be read" in err
    # 4 images over 2 ranks with batch 1: 2 steps, of which the one with the corrupt image is skipped
    assert load_checkpoint(str(out / "checkpoint.pth"))["iteration"] == 1


def test_icd_distillation_keeps_the_ranks_in_step(tmp_path):
    """Two gloo ranks distilling with ICD hold identical student and distiller weights after every
    step, including steps where one rank's batch has no box (ICD's zero losses); every parameter
    takes part in every step, so DDP runs without find_unused_parameters and says nothing about it."""
    data = tmp_path / "data"
    generate(str(data), num_train=6, num_val=1, image_size=64, seed=5)
    annotations = data / "annotations" / "instances_train.json"
    coco = json.loads(annotations.read_text())
    empty = coco["images"][2]["id"]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != empty]
    annotations.write_text(json.dumps(coco))
    spec = DetectorSpec("retinanet", "resnet18", num_classes=7, fpn_channels=32, norm="gn", min_level=3,
                        max_level=5, min_size=(64,), max_size=64)
    torch.manual_seed(3)
    teacher = tmp_path / "teacher.pth"
    save_atomic({"model": build_detector(spec).state_dict(), "detector_spec": spec.to_dict()}, str(teacher))
    out = tmp_path / "run"
    # batch 1 per rank, 3 steps per epoch, 2 epochs: the box-less image is alone on its rank twice;
    # distillation warm-up for the first 2 steps (the student's features detached)
    proc = _launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         os.path.join(ROOT, "tests", "ddp_rank_state.py"), "--data-path", str(data),
         *f"{TINY_MODEL} {THREE_LEVELS} {ON_CPU}".split(), "--fpn-channels", "16", "--epochs", "2",
         "--batch-size", "1", "--no-eval", "--print-freq", "1", "--lr", "0.02", "--teacher", str(teacher),
         "--distill", "icd", "--icd-heads", "4", "--distill-warmup-iters", "2", "--output-dir", str(out)]
    )
    err = _finish(proc, str(out), 600, "the ranks hung (or the machine is far too loaded)")  # ~1 min on 2 idle cores
    assert proc.returncode == 0, err[-3000:]
    assert "find_unused_parameters" not in err
    assert "blowing up" not in err and "stayed at" not in err, err[-2000:]  # no health warning
    ranks = [torch.load(out / f"rank{r}.pth", weights_only=True) for r in (0, 1)]
    assert ranks[0]["iteration"] == ranks[1]["iteration"] == 6
    torch.manual_seed(0)  # the trainer seeds with --seed (0) before building the student
    start = build_detector(DetectorSpec(**load_checkpoint(str(out / "checkpoint.pth"))["detector_spec"]))
    for part in ("model", "distiller"):
        assert ranks[0][part].keys() == ranks[1][part].keys()
        for key, value in ranks[0][part].items():
            torch.testing.assert_close(ranks[1][part][key], value, rtol=0, atol=0, msg=f"{part}.{key}")
    moved = [k for k, v in ranks[0]["model"].items() if v.is_floating_point() and
             not torch.equal(v, start.state_dict()[k])]
    assert len(moved) > 20
    assert int(ranks[0]["distiller"]["num_steps"]) == 6
    train = [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["type"] == "train"]
    assert [r["iter"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss_distill"] > 0 and r["loss_aux_conf"] > 0 for r in train)  # averaged over the ranks
