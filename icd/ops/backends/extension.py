"""The C++ extension's kernels (icd._C): CPU kernels always, CUDA kernels when built.

The device of the inputs selects the kernel through the dispatcher.
"""

from __future__ import annotations

import torch
from torch import Tensor

import icd._C  # noqa: F401  (registers the icd_ext ops)

_ops = torch.ops.icd_ext


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    return _ops.attention_forward(q, k, v, key_padding_mask, scale)


def attention_backward(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return _ops.attention_backward(grad_out, grad_lse, q, k, v, key_padding_mask, out, lse, scale)


def value_mask(
    q: Tensor,
    k: Tensor,
    weight: Tensor,
    key_padding_mask: Tensor | None,
    lse: Tensor | None,
    scale: float,
    temperature: float,
) -> Tensor:
    return _ops.value_mask(q, k, weight, key_padding_mask, lse, scale, temperature)


def feature_mse_forward(
    student: Tensor, teacher: Tensor, weight: Tensor, norm: str, eps: float, reduction: str
) -> Tensor:
    return _ops.feature_mse_forward(student, teacher, weight, norm, eps, reduction)


def feature_mse_backward(
    grad_loss: Tensor,
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    norm: str,
    eps: float,
    reduction: str,
) -> Tensor:
    return _ops.feature_mse_backward(grad_loss, student, teacher, weight, norm, eps, reduction)
