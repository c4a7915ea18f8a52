"""Non-finite guards of the training loop: cheap on-device flags, and reports that name the culprit.

Per step the trainer reads one flag on the host (the loss check it always made); the parameters'
flag of a step is computed on the device after the step and folded into the next step's check,
so it adds no host synchronisation. Before a checkpoint is written every tensor in it is checked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """0-dim bool tensor on the tensors' device: no NaN or inf in any of them (no host sync).

    One fused max-norm over all of them: NaN propagates through it, and unlike a 2-norm it
    cannot overflow for large finite values.
    """
    tensors = [t for t in tensors if t.numel()]  # an empty tensor has no max norm (and nothing to check)
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    total = torch.nn.utils.get_total_norm(tensors, norm_type=math.inf, foreach=None)
    return torch.isfinite(total)


def first_non_finite(named: Iterable[tuple[str, Tensor]]) -> str | None:
    """The name of the first floating tensor with a NaN or inf.

    One fused check (``all_finite``, one host sync per device) first; only when it fails is
    each tensor checked in turn (a sync per tensor) to name the culprit.
    """
    named = [(n, t) for n, t in named if torch.is_tensor(t) and t.is_floating_point()]
    by_device: dict[torch.device, list[Tensor]] = {}
    for _, tensor in named:
        by_device.setdefault(tensor.device, []).append(tensor)
    if all(bool(all_finite(tensors)) for tensors in by_device.values()):
        return None
    for name, tensor in named:
        if not bool(torch.isfinite(tensor).all()):
            return name
    return None


def nested_tensors(obj, prefix: str = "") -> Iterable[tuple[str, Tensor]]:
    """(dotted name, tensor) of every tensor in nested dicts and lists (a checkpoint)."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from nested_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from nested_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def loss_report(losses: Mapping[str, Tensor]) -> str:
    """'loss_distill = nan (finite: loss_classification 0.53, ...)' of a step's named losses."""
    values = {k if k.startswith("loss_") else f"loss_{k}": float(v.detach()) for k, v in losses.items()}
    bad = [f"{k} = {v}" for k, v in values.items() if not torch.isfinite(torch.tensor(v))]
    good = [f"{k} {v:.4g}" for k, v in values.items() if torch.isfinite(torch.tensor(v))]
    text = ", ".join(bad) if bad else "their sum overflows"
    return text + (f" (finite: {', '.join(good)})" if good else "")
