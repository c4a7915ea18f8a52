"""--iters (a last partial epoch), --stop-after-iters and resuming: the same run as unbroken."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_runs import ON_CPU, THREE_LEVELS, TINY_MODEL

from icd.cli import main
from icd.data.shapes import generate
from icd.engine.checkpoint import load_checkpoint, save_atomic

TINY = (f"{TINY_MODEL} {THREE_LEVELS} {ON_CPU} --batch-size 2 --print-freq 1 --lr 0.01 --warmup-iters 1 "
        "--epoch-checkpoint-every 0 --iters 3 --lr-steps 2")


def _train(data: str, out: str, extra: str = "") -> None:
    assert main(["train", "--data-path", data, "--output-dir", out, *TINY.split(), *extra.split()]) == 0


def _records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_stop_and_resume_match_an_unbroken_iteration_schedule(tmp_path):
    data = str(tmp_path / "data")
    generate(data, num_train=4, num_val=2, image_size=64, seed=5)  # 2 iterations per epoch
    unbroken, broken = str(tmp_path / "unbroken"), str(tmp_path / "broken")
    _train(data, unbroken)
    done = load_checkpoint(os.path.join(unbroken, "checkpoint.pth"))
    # 3 iterations = epoch 0 and the first batch of epoch 1, then the evaluation of the run's end
    assert (done["iteration"], done["epoch"], done["epoch_batches"]) == (3, 1, 1)
    assert done["lr_scheduler"]["last_epoch"] == 3
    evals = [r for r in _records(unbroken) if r["type"] == "eval"]
    assert [r["iter"] for r in evals] == [2, 3]  # after epoch 0 (--eval-every 1) and at the end

    ckpt = os.path.join(broken, "checkpoint.pth")
    _train(data, broken, "--no-eval --stop-after-iters 1")  # stops mid-epoch 0
    mid = load_checkpoint(ckpt)
    assert (mid["iteration"], mid["epoch"], mid["epoch_batches"]) == (1, 0, 1)
    assert mid["lr_scheduler"]["last_epoch"] == 1  # the schedule is the whole run's
    _train(data, broken, f"--no-eval --resume {ckpt} --stop-after-iters 2")  # stops at an epoch's end
    assert (load_checkpoint(ckpt)["iteration"], load_checkpoint(ckpt)["epoch"]) == (2, 1)
    # what a kill right after a --checkpoint-every save at epoch 0's last batch leaves (before that
    # epoch's own end): the same state at (epoch 0, batch 2); resumed, epoch 0's end comes first
    last_batch = str(tmp_path / "last_batch")
    os.makedirs(last_batch)
    save_atomic({**load_checkpoint(ckpt), "epoch": 0, "epoch_batches": 2}, os.path.join(last_batch, "checkpoint.pth"))
    _train(data, last_batch, f"--resume {os.path.join(last_batch, 'checkpoint.pth')}")
    assert [r["iter"] for r in _records(last_batch) if r["type"] == "eval"] == [2, 3]  # as unbroken
    redone = load_checkpoint(os.path.join(last_batch, "checkpoint.pth"))
    for key, value in done["model"].items():
        torch.testing.assert_close(redone["model"][key], value, rtol=0, atol=0, msg=key)
    _train(data, broken, f"--resume {ckpt}")
    end = load_checkpoint(ckpt)
    assert (end["iteration"], end["epoch"], end["epoch_batches"]) == (3, 1, 1)
    moved = sum(not torch.equal(mid["model"][k], v) for k, v in end["model"].items())
    assert moved > 0
    for key, value in done["model"].items():
        torch.testing.assert_close(end["model"][key], value, rtol=0, atol=0, msg=key)
    assert [r["iter"] for r in _records(broken) if r["type"] == "eval"] == [3]
    lrs = {r["iter"]: r["lr"] for r in _records(broken) if r["type"] == "train"}
    assert lrs[1] == pytest.approx(0.01) and lrs[2] == pytest.approx(0.001)  # x0.1 from step 2


def test_a_stop_in_the_last_epoch_is_not_the_end_of_the_run(tmp_path):
    data = str(tmp_path / "data")
    generate(data, num_train=4, num_val=2, image_size=64, seed=5)
    out = str(tmp_path / "run")
    _train(data, out, "--iters 4 --stop-after-iters 3")  # 2 epochs; stops inside the second
    assert load_checkpoint(os.path.join(out, "checkpoint.pth"))["iteration"] == 3
    assert [r["iter"] for r in _records(out) if r["type"] == "eval"] == [2]  # epoch 0's only


def test_run_length_flags_are_checked(tmp_path, capsys):
    data = str(tmp_path / "data")
    generate(data, num_train=2, num_val=1, image_size=64, seed=5)
    with pytest.raises(SystemExit) as exit_info:  # out of range: a parse error
        _train(data, str(tmp_path / "a"), "--stop-after-iters 0")
    assert exit_info.value.code == 2
    assert "argument --stop-after-iters: 0: expected an integer >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"lr steps \[2\]: expected .* in 1\.\.1 "):  # --debug: raised
        main(["train", "--data-path", data, "--output-dir", str(tmp_path / "b"),
              *TINY.replace("--iters 3", "--iters 1").split(), "--debug"])
    with pytest.raises(ValueError, match="--inherit-teacher neck: distillation flags need --teacher"):
        _train(data, str(tmp_path / "c"), "--inherit-teacher neck --debug")
