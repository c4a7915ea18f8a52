"""Schedules of the student (SGD, warm-up, steps at 2/3 and 8/9) and ICD's teacher side."""

from __future__ import annotations

import pytest
import torch

from icd.engine import optim


def _lrs(scheduler, optimizer, n):
    out = []
    for _ in range(n):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_student_recipe_scaled_to_the_run():
    assert optim.default_lr("retinanet", 16) == pytest.approx(0.01)
    assert optim.default_lr("fasterrcnn", 4) == pytest.approx(0.005)
    assert optim.decay_steps(90_000) == (60_000, 80_000)
    assert optim.default_warmup_iters(90_000) == 1000 and optim.default_warmup_iters(300) == 30
    p = torch.nn.Parameter(torch.zeros(2))
    opt = optim.student_optimizer([p], lr=0.1)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4
    lrs = _lrs(optim.student_scheduler(opt, total_iters=90, warmup_iters=10), opt, 90)
    assert lrs[0] == pytest.approx(1e-4) and lrs[5] == pytest.approx(0.1 * (0.001 * 0.5 + 0.5))
    assert lrs[10] == pytest.approx(0.1) and lrs[59] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.01) and lrs[79] == pytest.approx(0.01)
    assert lrs[80] == pytest.approx(0.001)


def test_teacher_side_adamw_cosine():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = optim.teacher_side_optimizer([p])
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 1e-4 and opt.defaults["weight_decay"] == 1e-4
    lrs = _lrs(optim.teacher_side_scheduler(opt, total_iters=110), opt, 110)
    assert lrs[0] < lrs[5] < lrs[9] < 1e-4  # 10 warm-up iterations
    assert lrs[10] == pytest.approx(1e-4)
    assert lrs[60] == pytest.approx(0.5e-4, rel=1e-6)  # half way through the cosine
    assert lrs[109] < 1e-7


def test_explicit_lr_steps_of_a_3x_schedule():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = optim.student_optimizer([p], lr=1.0)
    lrs = _lrs(optim.student_scheduler(opt, total_iters=27, warmup_iters=0, steps=[21, 25]), opt, 27)
    assert lrs[20] == pytest.approx(1.0) and lrs[21] == pytest.approx(0.1)
    assert lrs[24] == pytest.approx(0.1) and lrs[25] == pytest.approx(0.01)


@pytest.mark.parametrize("steps", [[60, 50], [10, 10], [0, 5], [50, 91]])
def test_bad_lr_steps_are_errors(steps):
    opt = optim.student_optimizer([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(ValueError, match=r"lr steps .* in 1\.\.90"):
        optim.student_scheduler(opt, total_iters=90, warmup_iters=0, steps=steps)
