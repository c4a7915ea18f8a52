"""Optimisers and per-iteration LR schedules of the student and of ICD's teacher side (docs/method.md 5).

Student: SGD, momentum 0.9 (AdamW for a detector family that asks for it: RT-DETR), weight decay
1e-4, linear warm-up from ``warmup_factor`` * lr,
then x0.1 at given iterations, by default ~2/3 and ~8/9 of the run (60k and 80k of 90k in the
1x schedule; the 3x presets give 210k and 250k of 270k).
Teacher side: AdamW lr 1e-4, weight decay 1e-4, 10 linear warm-up iterations, cosine decay to
0 at the end of the run; its gradient norm is clipped to 0.01 by the trainer.

Both are closed-form multipliers of the iteration on ``LambdaLR``, not torch's
``SequentialLR(LinearLR, MultiStepLR)`` / ``CosineAnnealingLR``: those compute each lr from the
previous one, which drifts from these values (measured: up to 4e-15 relative for the student's
90k-iteration schedule, 2e-11 for the teacher side's cosine), never apply --lr-steps that fall
inside the warm-up, keep a warm-up of 0 at the start factor (``LinearLR(total_iters=0)``: 0.001x
for good), and save another state dict than the ``LambdaLR`` one of existing checkpoints
(``SequentialLR.load_state_dict`` of it: KeyError '_schedulers').
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from icd.errors import ConfigError

TEACHER_SIDE_LR = 1e-4
TEACHER_SIDE_WEIGHT_DECAY = 1e-4
TEACHER_SIDE_WARMUP = 10
TEACHER_SIDE_CLIP = 0.01


def default_lr(detector: str, total_batch_size: int) -> float:
    """The detector's lr for 16 images (its family's ``base_lr``) scaled linearly to the total batch size."""
    from icd.detection.adapters import family_of

    return family_of(detector).base_lr(detector) * total_batch_size / 16


def default_warmup_iters(total_iters: int) -> int:
    """1000 iterations (the detectors' 1x recipe), at most a tenth of a shorter run."""
    return max(0, min(1000, total_iters // 10))


def decay_steps(total_iters: int) -> tuple[int, int]:
    """Iterations of the two x0.1 decays: 2/3 and 8/9 of the run (60k, 80k of 90k)."""
    return round(total_iters * 2 / 3), round(total_iters * 8 / 9)


def multistep_with_warmup(
    iteration: int,
    warmup_iters: int,
    steps: tuple[int, ...],
    warmup_factor: float = 0.001,
    gamma: float = 0.1,
) -> float:
    """LR multiplier at ``iteration`` (0-based count of steps already taken)."""
    factor = gamma ** sum(iteration >= s for s in steps)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def cosine_with_warmup(iteration: int, warmup_iters: int, total_iters: int) -> float:
    if iteration < warmup_iters:
        return (iteration + 1) / (warmup_iters + 1)
    span = max(1, total_iters - warmup_iters)
    progress = min(1.0, (iteration - warmup_iters) / span)
    return 0.5 * (1 + math.cos(math.pi * progress))


STUDENT_OPTIMIZERS = ("sgd", "adamw")


def student_optimizer(
    params: Iterable[nn.Parameter], lr: float, momentum: float = 0.9, weight_decay: float = 1e-4, kind: str = "sgd"
) -> torch.optim.Optimizer:
    """SGD with ``momentum``, or AdamW (``kind="adamw"``: the detector family's choice, e.g.
    RT-DETR's; torch's betas and eps), over the parameters that train."""
    trained = [p for p in params if p.requires_grad]
    if kind == "adamw":
        return torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay)
    if kind != "sgd":
        raise ValueError(f"student_optimizer: kind {kind!r}; expected one of {STUDENT_OPTIMIZERS}")
    return torch.optim.SGD(trained, lr=lr, momentum=momentum, weight_decay=weight_decay)


def check_decay_steps(steps: Sequence[int], total_iters: int) -> tuple[int, ...]:
    """``steps`` as a tuple after checking they rise strictly and fall inside 1..total_iters."""
    steps = tuple(int(s) for s in steps)
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)) or any(
        not 0 < s <= total_iters for s in steps
    ):
        raise ConfigError(
            f"lr steps {list(steps)}: expected strictly increasing iterations in 1..{total_iters} "
            "(the run's length)"
        )
    return steps


def student_scheduler(
    optimizer: torch.optim.Optimizer,
    total_iters: int,
    warmup_iters: int,
    steps: Sequence[int] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then x0.1 at each of ``steps`` (default :func:`decay_steps` of the run)."""
    steps = decay_steps(total_iters) if steps is None else check_decay_steps(steps, total_iters)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: multistep_with_warmup(it, warmup_iters, steps)
    )


def teacher_side_optimizer(params: Iterable[nn.Parameter], lr: float = TEACHER_SIDE_LR) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in params if p.requires_grad],
        lr=lr,
        weight_decay=TEACHER_SIDE_WEIGHT_DECAY,
    )


def teacher_side_scheduler(
    optimizer: torch.optim.Optimizer, total_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: cosine_with_warmup(it, TEACHER_SIDE_WARMUP, total_iters)
    )
