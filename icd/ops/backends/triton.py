"""The Triton kernels (icd.kernels): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

The five kernel functions of this package's docstring, with the icd_ext ops' signatures. They
are traceable (``Backend.traceable``): nothing but torch allocations and Triton launches
through ``icd.kernels.launch``, so icd.ops.library registers each as a
``torch.library.triton_op`` that torch.compile traces into, and calls them directly in eager
mode (see there).

Inputs arrive validated (float32, float16 or bfloat16; float64 is rejected before this
point) and are passed with their strides, never copied. Any head dim D works (padded to a
power of two >= 16 inside the kernels). Gradients come back in their inputs' layout
(``torch.empty_like``: a permuted [S, N, h, D] buffer's view gets a gradient with the same
strides), so autograd hands them on without a copy. Autotuning happens in the first call per
head dim and dtype and is cached on disk (see icd/kernels/tuning.py).
"""

from __future__ import annotations

from torch import Tensor

from icd.kernels import feature_mse as _mse
from icd.kernels import instance_attention as _attention
from icd.kernels import value_mask as _value_mask
from icd.kernels.tuning import on_device
from icd.ops.reference import LN_FLOOR


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    with on_device(q):
        return _attention.attention_forward(q, k, v, key_padding_mask, scale)


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


def feature_mse_forward(
    student: Tensor, teacher: Tensor, weight: Tensor, norm: str, eps: float, reduction: str
) -> Tensor:
    with on_device(student):
        return _mse.feature_mse_forward(
            student, teacher, weight, norm, eps, reduction, floor=LN_FLOOR
        )


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
