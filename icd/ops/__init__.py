"""icd.ops: the fused ops of Instance-Conditional Knowledge Distillation.

Drop-in functions for any trainer (docs/method.md 3). Letters: N images, h heads, K instance
slots, S tokens over all FPN levels, D head dim. Each op validates its arguments here,
before any kernel runs, then calls the ``icd::`` custom op of the chosen backend (see
``icd.ops.dispatch``), or the plain-PyTorch reference.

Non-finite values, on every backend: what is masked is never read. Masked keys, slots of
weight 0 (instance_value_mask) and locations of weight 0 (masked_feature_mse) may hold NaN or
inf and change no output or gradient; outputs at masked keys (value mask, dk, dv) and the
student gradient at weight-0 locations are exactly 0. A NaN anywhere else gives NaN in every
output it reaches. Gradients have the strides of their inputs (``torch.empty_like``).
"""

from __future__ import annotations

import math

from torch import Tensor

from icd.ops import library, reference
from icd.ops.backends import BACKEND_TABLE
from icd.ops.dispatch import (
    available_backends,
    default_backend,
    get_backend,
    register_backend,
    resolve_backend,
    set_backend,
    unregister_backend,
)
from icd.ops.multiscale import (
    flatten_levels,
    level_strides,
    padding_mask,
    sine_position_embedding,
    unflatten_levels,
)
from icd.ops.validation import (
    check_feature_mse_args,
    check_instance_attention_args,
    check_value_mask_args,
    device_of,
)

__all__ = [
    "BACKENDS",
    "available_backends",
    "default_backend",
    "flatten_levels",
    "get_backend",
    "instance_attention",
    "instance_value_mask",
    "level_strides",
    "masked_feature_mse",
    "padding_mask",
    "register_backend",
    "resolve_backend",
    "set_backend",
    "sine_position_embedding",
    "unflatten_levels",
    "unregister_backend",
]


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "BACKENDS":  # every backend name, read at each access (register_backend adds names)
        return tuple(BACKEND_TABLE)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _default_scale(q: Tensor, scale: float | None) -> float:
    if scale is None:
        return q.shape[-1] ** -0.5
    if not math.isfinite(scale):
        raise ValueError(f"scale = {scale}; expected a finite number")
    return float(scale)


def instance_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Multi-head attention of K instance queries over S keys, without the [N, h, K, S] tensor.

    Args:
        q: [N, h, K, D] queries. k, v: [N, h, S, D] keys and values. Any strides; float32,
            float16, bfloat16 (float64 on the reference and cpu backends); one dtype for all.
        key_padding_mask: optional bool [N, S], True = ignore that key.
        scale: logit scale, default D ** -0.5.
        backend: overrides set_backend() / ICD_BACKEND / the per-device default.

    Returns:
        out [N, h, K, D] in q's dtype = softmax(scale q k^T, masked) v, and lse [N, h, K]
        float32 (float64 for float64 inputs), the logsumexp of each row. A row whose keys are
        all masked gets out 0 and lse -inf, with finite gradients. Differentiable in q, k, v
        (through out and lse).
    """
    name = resolve_backend(device_of(q, "q", "N, h, K, D", "instance_attention"), backend)
    check_instance_attention_args(q, k, v, key_padding_mask, name)
    scale = _default_scale(q, scale)
    if name == "reference" or q.numel() == 0:
        return reference.instance_attention(q, k, v, key_padding_mask, scale)
    return library.instance_attention(q, k, v, _as_mask(key_padding_mask), scale, name)


def instance_value_mask(
    q: Tensor,
    k: Tensor,
    weight: Tensor,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    temperature: float = 1.0,
    lse: Tensor | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Per-location importance: attention of the weighted instances, summed over instances.

    Args:
        q: [N, h, K, D]; k: [N, h, S, D] (the teacher's projected queries and keys).
        weight: [N, K] >= 0, 1 for real instances and 0 for fake or padding slots.
        key_padding_mask: optional bool [N, S], True = ignore; masked keys get 0.
        scale: logit scale, default D ** -0.5.
        temperature: softmax temperature, > 0.
        lse: optional [N, h, K] logsumexp from ``instance_attention`` with the same q, k,
            mask and scale; only with temperature == 1. Skips the max/sum pass.
        backend: overrides set_backend() / ICD_BACKEND / the per-device default.

    Returns:
        [N, h, S] float32: out[n, h, s] = sum_k weight[n, k] softmax_s(logits / temperature).
        Not differentiable: the result has no grad_fn.
    """
    name = resolve_backend(device_of(q, "q", "N, h, K, D", "instance_value_mask"), backend)
    check_value_mask_args(q, k, weight, key_padding_mask, temperature, lse, name)
    scale = _default_scale(q, scale)
    q, k, weight = q.detach(), k.detach(), weight.detach()
    lse = None if lse is None else lse.detach()
    if name == "reference" or q.numel() == 0:
        return reference.instance_value_mask(q, k, weight, key_padding_mask, scale, temperature, lse)
    stat = reference.compute_dtype(q)
    weight = weight.to(stat).contiguous()
    lse = None if lse is None else lse.to(stat).contiguous()
    return library.instance_value_mask(q, k, weight, _as_mask(key_padding_mask), lse, scale, temperature, name)


def masked_feature_mse(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    norm: str = "ln",
    eps: float = 1e-5,
    reduction: str = "per_head",
    *,
    backend: str | None = None,
) -> Tensor:
    """Weighted MSE between normalised student and teacher features, per head and location.

    Args:
        student, teacher: [N, h, S, D], one float dtype (float64 on reference and cpu only).
        weight: [N, h, S] >= 0, usually ``instance_value_mask``'s output.
        norm: "ln" (LayerNorm over D, no affine, on both), "tln" (teacher only) or "none".
        eps: LayerNorm epsilon.
        reduction: "per_head" (mean over n, h, d of the weight-normalised sum over s) or
            "global" (sum of mean_d(e) * weight over n, h, s divided by the total weight).
        backend: overrides set_backend() / ICD_BACKEND / the per-device default.

    Returns:
        0-dim float32 loss (float64 for float64 inputs). Gradient flows to ``student`` only.
    """
    name = resolve_backend(device_of(student, "student", "N, h, S, D", "masked_feature_mse"), backend)
    check_feature_mse_args(student, teacher, weight, norm, eps, reduction, name)
    teacher, weight = teacher.detach(), weight.detach()
    if name == "reference":  # (validation has ruled out empty inputs)
        return reference.masked_feature_mse(student, teacher, weight, norm, eps, reduction)
    stat = reference.compute_dtype(student)
    weight = weight.to(stat).contiguous()
    return library.masked_feature_mse(student, teacher, weight, norm, float(eps), reduction, name)


def _as_mask(key_padding_mask: Tensor | None) -> Tensor | None:
    return None if key_padding_mask is None else key_padding_mask.contiguous()
