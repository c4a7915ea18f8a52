"""Training health: stuck and blowing-up loss terms, on constructed loss sequences and in a run."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch
from tiny_runs import ON_CPU, THREE_LEVELS, TINY_MODEL

from icd.cli import main
from icd.data.shapes import generate
from icd.engine.checkpoint import load_checkpoint
from icd.engine.health import BLOW_UP, STUCK, LossHealth, UnhealthyTrainingError


def _noisy(n: int, level: float = 0.8, seed: int = 0) -> list[float]:
    """A healthy loss: decays slowly, moves a few percent from batch to batch."""
    rng = random.Random(seed)
    return [level * (1 - 0.3 * i / n) * (1 + 0.05 * rng.uniform(-1, 1)) for i in range(n)]


def _run(health: LossHealth, series: dict[str, list[float]], start: int = 1) -> list:
    found = []
    length = len(next(iter(series.values())))
    for i in range(length):
        found += health.check(start + i, {name: values[i] for name, values in series.items()})
    return found


def test_healthy_losses_give_nothing():
    health = LossHealth(window=20)
    series = {"loss_classification": _noisy(300, 1.1, 1), "loss_bbox_regression": _noisy(300, 0.6, 2),
              "loss_distill": [v * 1e-4 for v in _noisy(300, 1.0, 3)]}  # small but moving
    series["loss"] = [sum(v) for v in zip(*series.values(), strict=True)]
    assert _run(health, series) == []


def test_a_loss_stuck_at_one_is_reported_once_with_its_name_and_iteration():
    """FCOS's GIoU loss of empty boxes: exactly 1.0 from iteration 11 on, the rest healthy."""
    health = LossHealth(window=30)
    box = _noisy(10, 1.2) + [1.0] * 190
    found = _run(health, {"loss_classification": _noisy(200), "loss_bbox_regression": box})
    assert len(found) == 1
    (problem,) = found
    assert (problem.loss, problem.kind, problem.iteration, problem.value) == ("loss_bbox_regression", STUCK, 40, 1.0)
    assert "loss_bbox_regression" in problem.message and "iteration 40" in problem.message
    assert "1 for the last 30 iterations" in problem.message


def test_stuck_needs_the_whole_window_and_tolerates_only_rounding():
    health = LossHealth(window=10, rel_tol=1e-6)
    assert _run(health, {"a": [0.5] * 9}) == []  # one short of the window
    assert [p.iteration for p in health.check(10, {"a": 0.5})] == [10]
    # a loss that moves by 1e-7 relative sits still; one that moves by 1e-4 does not
    health = LossHealth(window=10, rel_tol=1e-6)
    rounding = [2.0 * (1 + 1e-7 * (-1) ** i) for i in range(12)]
    moving = [2.0 * (1 + 1e-4 * (-1) ** i) for i in range(12)]
    assert [p.loss for p in _run(health, {"rounding": rounding, "moving": moving})] == ["rounding"]


def test_a_term_that_is_always_zero_is_stuck():
    health = LossHealth(window=5)
    (problem,) = _run(health, {"loss_distill": [0.0] * 8, "loss": _noisy(8)})
    assert (problem.loss, problem.kind, problem.iteration) == ("loss_distill", STUCK, 5)


def test_a_loss_growing_by_orders_of_magnitude_is_reported_once():
    """The raw FPN-MSE divergence: ~1 for 60 iterations, then x1.5 per iteration to ~1e15."""
    health = LossHealth(window=20, growth=1e3)
    exploding = _noisy(60, 1.0) + [1.5**k for k in range(1, 86)]
    found = _run(health, {"loss_distill": exploding, "loss_classification": _noisy(145)})
    assert [(p.loss, p.kind) for p in found] == [("loss_distill", BLOW_UP)]
    (problem,) = found
    # x1.5 per iteration gains 1000x in 18 iterations; the reference lags by 16-20 iterations
    assert 60 + 17 <= problem.iteration <= 60 + 21
    assert problem.reference == pytest.approx(1.5 ** (problem.iteration - 60 - 18), rel=0.5)
    assert problem.value > 1e3 * problem.reference and "blowing up" in problem.message


def test_growth_is_measured_against_a_floor_and_a_single_spike_counts():
    health = LossHealth(window=10, growth=1e3, floor=1e-3)
    # from 1e-6 to 1e-4 is x100 of nothing: below 1000 x the floor, not a blow-up
    assert _run(health, {"a": [1e-6] * 5 + [1e-4] * 5}) == []
    health = LossHealth(window=10, growth=1e3)
    found = _run(health, {"b": _noisy(10, 2.0) + [5e3]})
    assert [(p.kind, p.iteration) for p in found] == [(BLOW_UP, 11)]
    # looked for from the 11th value on: a spike at the 10th is not a blow-up yet
    assert _run(LossHealth(window=20), {"b": _noisy(9, 2.0) + [5e3]}) == []
    assert health.check(12, {"b": math.nan}) == []  # NaN: the trainer's own finite check stops on it
    # a term that is exactly 0 on batches without boxes, then ~1: inactive, not a blow-up from 0
    health = LossHealth(window=10, growth=1e3)
    assert _run(health, {"loss_aux_conf": [0.0, 0.0, 1.3, 0.0, 1.1, 1.2, 0.9] + _noisy(20, 1.0)}) == []
    # the total of a box-less batch is tiny (negatives only): one such value is no reference
    health = LossHealth(window=50, growth=1e3)
    assert _run(health, {"loss": [0.004] + _noisy(30, 20.0)}) == []


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="window = 1"):
        LossHealth(window=1)
    with pytest.raises(ValueError, match="growth 0.5"):
        LossHealth(growth=0.5)


# -- in a run ---------------------------------------------------------------------------------

TINY = f"{TINY_MODEL} {THREE_LEVELS} {ON_CPU} --batch-size 2 --print-freq 1 --epoch-checkpoint-every 0 --no-eval"


@pytest.fixture(scope="module")
def data_and_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("health")
    data = str(root / "data")
    generate(data, num_train=8, num_val=1, image_size=64, seed=2)
    teacher = str(root / "teacher")
    assert main(["train", "--data-path", data, *TINY.split(), "--iters", "1", "--output-dir", teacher]) == 0
    return data, os.path.join(teacher, "checkpoint.pth")


def _health_lines(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == "health"]


def test_a_run_warns_once_about_a_stuck_loss(data_and_teacher, tmp_path, caplog):
    """A distillation loss of weight 0 is exactly 0 at every step: stuck after --health-window."""
    data, teacher = data_and_teacher
    out = str(tmp_path / "warn")
    argv = ["train", "--data-path", data, *TINY.split(), "--iters", "6", "--teacher", teacher, "--distill",
            "fpn-mse", "--distill-weight", "0", "--health-window", "3", "--output-dir", out]
    assert main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if "loss_distill" in r.getMessage()]
    assert len(warnings) == 1 and "stayed at 0 for the last 3 iterations" in warnings[0]
    assert "iteration 3" in warnings[0]
    assert _health_lines(out) == [
        {"type": "health", "iter": 3, "loss": "loss_distill", "problem": STUCK, "value": 0.0,
         "time": _health_lines(out)[0]["time"]}
    ]
    assert load_checkpoint(os.path.join(out, "checkpoint.pth"))["iteration"] == 6  # warn: the run goes on


def test_on_unhealthy_stop_ends_the_run(data_and_teacher, tmp_path):
    data, teacher = data_and_teacher
    out = str(tmp_path / "stop")
    argv = ["train", "--debug", "--data-path", data, *TINY.split(), "--iters", "6", "--teacher", teacher, "--distill",
            "fpn-mse", "--distill-weight", "0", "--health-window", "3", "--on-unhealthy", "stop",
            "--checkpoint-every", "1", "--output-dir", out]
    stuck = r"loss_distill has stayed at 0 .*iteration 3.*--on-unhealthy stop"
    with pytest.raises(UnhealthyTrainingError, match=stuck):
        main(argv)
    assert load_checkpoint(os.path.join(out, "checkpoint.pth"))["iteration"] == 2  # not past the bad step
    assert [r["iter"] for r in _health_lines(out)] == [3]
    with pytest.raises(SystemExit):  # out of range: a parse error
        main([*argv[:-2], "--health-window", "1", "--output-dir", str(tmp_path / "x")])


def test_first_non_finite_names_the_first_bad_tensor_and_skips_what_cannot_be_checked():
    from icd.engine.finite import all_finite, first_non_finite

    good = [("empty", torch.empty(0)), ("half", torch.ones(2, dtype=torch.float16)), ("ids", torch.arange(3)),
            ("big", torch.tensor([3e38, -3e38])), ("w", torch.nn.Parameter(torch.ones(3)))]  # fmt: skip
    assert first_non_finite(good) is None and first_non_finite([]) is None
    assert bool(all_finite([t for _, t in good if t.is_floating_point()]))
    bad = [*good, ("b16", torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)), ("f64", torch.tensor([-math.inf]))]
    assert first_non_finite(bad) == "b16"
    assert first_non_finite(bad[-1:]) == "f64"
