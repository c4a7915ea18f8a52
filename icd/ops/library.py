"""The icd:: custom ops: schemas, fake (meta) kernels, autograd, and the call into a backend.

Every op takes the resolved backend name as its last argument, so a traced graph records
which backend it runs and torch.compile never has to guess; the op calls that backend's
kernel table (``BACKEND_TABLE[backend].kernels``: ``torch.ops.icd_ext`` for cpu and cuda,
``icd.ops.backends.triton`` for triton). One fake kernel and one autograd formula per op
serve every backend. The ops are opaque to
torch.compile (their fake kernels state the output shapes), and work under
``torch.library.opcheck``. Validation happens before, in ``icd.ops``.

Gradients come in the layout of their inputs: dq, dk, dv and the student's gradient have
the strides ``torch.empty_like(input)`` gives (the input's own when it is dense and
non-overlapping, e.g. a [S, N, h, D] tensor viewed as [N, h, S, D]), in the real kernels
and in the fake ones alike, so autograd hands them to permuted views without a copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from icd.ops.backends import BACKEND_TABLE
from icd.ops.reference import compute_dtype


def _in_layout_of(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` with the strides of ``torch.empty_like(like)``, copied only if it has others.

    The contract of every backward op; the built-in kernels already keep it, so this is a
    stride comparison for them (a meta tensor: nothing is allocated).
    """
    expected = torch.empty_like(like, device="meta").stride()
    if grad.stride() == expected:
        return grad
    return torch.empty_like(like, dtype=grad.dtype).copy_(grad)


# --- instance_attention ------------------------------------------------------------------


@torch.library.custom_op("icd::instance_attention", mutates_args=())
def instance_attention_op(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    """(out [N, h, K, D] in q's dtype, lse [N, h, K] float32) = softmax(scale q k^T) v."""
    return BACKEND_TABLE[backend].kernels.attention_forward(q, k, v, key_padding_mask, scale)


@instance_attention_op.register_fake
def _(q, k, v, key_padding_mask, scale, backend):
    n, h, kq, d = q.shape
    return q.new_empty((n, h, kq, v.shape[-1])), q.new_empty((n, h, kq), dtype=compute_dtype(q, k, v))


@torch.library.custom_op("icd::instance_attention_backward", mutates_args=())
def instance_attention_backward_op(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) with the strides of q, k, v, by recomputing the probabilities from q, k, lse."""
    dq, dk, dv = BACKEND_TABLE[backend].kernels.attention_backward(
        grad_out, grad_lse, q, k, v, key_padding_mask, out, lse, scale
    )
    return _in_layout_of(dq, q), _in_layout_of(dk, k), _in_layout_of(dv, v)


@instance_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, key_padding_mask, out, lse, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup_context(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.scale = scale
    ctx.backend = backend


def _attention_backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:3]):
        return None, None, None, None, None, None
    dq, dk, dv = instance_attention_backward_op(
        grad_out, grad_lse, q, k, v, key_padding_mask, out, lse, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None


instance_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


# --- instance_value_mask -------------------------------------------------------------------


@torch.library.custom_op("icd::instance_value_mask", mutates_args=())
def instance_value_mask_op(
    q: Tensor,
    k: Tensor,
    weight: Tensor,
    key_padding_mask: Tensor | None,
    lse: Tensor | None,
    scale: float,
    temperature: float,
    backend: str,
) -> Tensor:
    """[N, h, S] float32: sum_k weight[n, k] * softmax_s(scale q k^T / temperature)."""
    return BACKEND_TABLE[backend].kernels.value_mask(q, k, weight, key_padding_mask, lse, scale, temperature)


@instance_value_mask_op.register_fake
def _(q, k, weight, key_padding_mask, lse, scale, temperature, backend):
    n, h, s, _ = k.shape
    return k.new_empty((n, h, s), dtype=compute_dtype(q, k, weight))


# --- masked_feature_mse ----------------------------------------------------------------------


@torch.library.custom_op("icd::masked_feature_mse", mutates_args=())
def masked_feature_mse_op(
    student: Tensor, teacher: Tensor, weight: Tensor, norm: str, eps: float, reduction: str, backend: str
) -> Tensor:
    """0-dim float32 loss; see icd.ops.masked_feature_mse."""
    return BACKEND_TABLE[backend].kernels.feature_mse_forward(student, teacher, weight, norm, eps, reduction)


@masked_feature_mse_op.register_fake
def _(student, teacher, weight, norm, eps, reduction, backend):
    return student.new_empty((), dtype=compute_dtype(student, teacher, weight))


@torch.library.custom_op("icd::masked_feature_mse_backward", mutates_args=())
def masked_feature_mse_backward_op(
    grad_loss: Tensor,
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    norm: str,
    eps: float,
    reduction: str,
    backend: str,
) -> Tensor:
    """Gradient of the loss with respect to ``student`` (student's dtype and strides)."""
    grad = BACKEND_TABLE[backend].kernels.feature_mse_backward(
        grad_loss, student, teacher, weight, norm, eps, reduction
    )
    return _in_layout_of(grad, student)


@masked_feature_mse_backward_op.register_fake
def _(grad_loss, student, teacher, weight, norm, eps, reduction, backend):
    return torch.empty_like(student)


def _mse_setup_context(ctx, inputs, output) -> None:
    student, teacher, weight, norm, eps, reduction, backend = inputs
    ctx.save_for_backward(student, teacher, weight)
    ctx.options = (norm, eps, reduction, backend)


def _mse_backward(ctx, grad_loss: Tensor):
    student, teacher, weight = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = masked_feature_mse_backward_op(grad_loss, student, teacher, weight, *ctx.options)
    return grad_student, None, None, None, None, None, None


masked_feature_mse_op.register_autograd(_mse_backward, setup_context=_mse_setup_context)
