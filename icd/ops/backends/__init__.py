"""Kernel tables of the built backends, behind the icd:: custom ops.

Each backend module provides the same five functions; forward outputs are contiguous and
gradients have the strides of their inputs (``torch.empty_like``; icd.ops.library copies a
gradient that does not):

    attention_forward(q, k, v, key_padding_mask, scale) -> (out, lse)
    attention_backward(grad_out, grad_lse, q, k, v, key_padding_mask, out, lse, scale)
        -> (dq, dk, dv)
    value_mask(q, k, weight, key_padding_mask, lse, scale, temperature) -> [N, h, S] fp32
    feature_mse_forward(student, teacher, weight, norm, eps, reduction) -> 0-dim fp32
    feature_mse_backward(grad_loss, student, teacher, weight, norm, eps, reduction)
        -> grad of student

Shapes and meaning as in icd.ops; arguments arrive validated. "cpu" and "cuda" are the
C++ extension (one op per function, a CPU and a CUDA kernel behind it); "triton" is
icd.kernels. The "reference" backend does not go through the custom ops.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {"cpu": "extension", "cuda": "extension", "triton": "triton"}


def kernels_of(backend: str) -> ModuleType:
    """The kernel table of a built backend ("cpu", "cuda" or "triton")."""
    if backend not in _MODULES:
        raise ValueError(f"backend {backend!r} has no kernel table; expected one of {sorted(_MODULES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[backend]}")
