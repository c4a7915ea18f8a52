"""The Triton kernels (icd.kernels) as torch ops: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

The five kernel functions of this package's docstring, with the icd_ext ops' signatures, each
registered as an ``icd::triton_*`` op. On a GPU that is a ``torch.library.triton_op``: eager
calls launch the kernels directly, and torch.compile traces into the op, so Inductor sees the
Triton launches themselves (``icd.kernels.launch``: no Python between them in a compiled
graph, nothing opaque for CUDA graphs to capture). Under the interpreter triton_op cannot
trace (it would run the interpreter on fake tensors), so there each is a
``torch.library.custom_op`` whose fake kernel is the same function: its launches are skipped
for tensors without data, and its torch allocations give the outputs' shapes and strides.
icd.ops.library registers the autograd formulas on the two forward ops (``Backend.traceable``)
and calls these ops directly.

Inputs arrive validated (float32, float16 or bfloat16; float64 is rejected before this
point) and are passed with their strides, never copied. Any head dim D works (padded to a
power of two >= 16 inside the kernels). Gradients come back in their inputs' layout
(``torch.empty_like``: a permuted [S, N, h, D] buffer's view gets a gradient with the same
strides), so autograd hands them on without a copy. Autotuning happens in the first call per
head dim and dtype and is cached on disk (see icd/kernels/tuning.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from icd.kernels import feature_mse as _mse
from icd.kernels import instance_attention as _attention
from icd.kernels import value_mask as _value_mask
from icd.kernels.tuning import INTERPRETED, on_device
from icd.ops.reference import LN_FLOOR


def _kernel_op(name: str) -> Callable[[Callable], torch.library.CustomOpDef]:
    """Register the decorated function as op ``icd::<name>`` (see the module docstring)."""

    def register(fn: Callable) -> torch.library.CustomOpDef:
        if INTERPRETED:
            op = torch.library.custom_op(f"icd::{name}", fn, mutates_args=())
            op.register_fake(fn)
            return op
        return torch.library.triton_op(f"icd::{name}", fn, mutates_args=())

    return register


@_kernel_op("triton_attention_forward")
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    with on_device(q):
        return _attention.attention_forward(q, k, v, key_padding_mask, scale)


@_kernel_op("triton_attention_backward")
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
    with on_device(q):
        return _attention.attention_backward(
            grad_out, grad_lse, q, k, v, key_padding_mask, out, lse, scale
        )


@_kernel_op("triton_value_mask")
def value_mask(
    q: Tensor,
    k: Tensor,
    weight: Tensor,
    key_padding_mask: Tensor | None,
    lse: Tensor | None,
    scale: float,
    temperature: float,
) -> Tensor:
    with on_device(q):
        return _value_mask.value_mask(q, k, weight, key_padding_mask, lse, scale, temperature)


@_kernel_op("triton_feature_mse_forward")
def feature_mse_forward(
    student: Tensor, teacher: Tensor, weight: Tensor, norm: str, eps: float, reduction: str
) -> Tensor:
    with on_device(student):
        return _mse.feature_mse_forward(
            student, teacher, weight, norm, eps, reduction, floor=LN_FLOOR
        )


@_kernel_op("triton_feature_mse_backward")
def feature_mse_backward(
    grad_loss: Tensor,
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    norm: str,
    eps: float,
    reduction: str,
) -> Tensor:
    with on_device(student):
        return _mse.feature_mse_backward(
            grad_loss, student, teacher, weight, norm, eps, reduction, floor=LN_FLOOR
        )
