"""The icd:: custom ops: schemas, fake (meta) kernels, autograd, and the call into a backend.

Every op takes the resolved backend name as its last argument, so a traced graph records
which backend it runs and torch.compile never has to guess; the op calls that backend's
kernel table (``BACKEND_TABLE[backend].kernels``: ``torch.ops.icd_ext`` for cpu and cuda,
``icd.ops.backends.triton`` for triton). One fake kernel per op serves every backend. These
ops are opaque to torch.compile (their fake kernels state the output shapes), and work
under ``torch.library.opcheck``. Validation happens before, in ``icd.ops``.

A traceable backend (``Backend.traceable``: the Triton kernels, whose functions are torch
allocations and Triton launches only) bypasses them. Under torch.compile it runs as its own
ops, ``icd::<backend>_<kernel>``, registered with ``torch.library.triton_op`` (``traceable_ops``):
Dynamo and AOTAutograd trace into them, so Inductor launches the Triton kernels itself and a
compiled graph holds no Python between them (under the Triton interpreter, where triton_op
cannot trace, they are custom ops whose fake kernel is the kernel function itself). In eager
mode it runs as a ``torch.autograd.Function`` that calls the kernel functions directly: a
custom op with autograd costs ~115 us of host time per call on the 2-core CI machine against
~7 us for a (ctx-style) autograd.Function (benchmarks/host_overhead.py measures the path). Both
use the autograd formulas below. ``instance_attention``, ``instance_value_mask`` and
``masked_feature_mse`` choose the path.

Gradients come in the layout of their inputs: dq, dk, dv and the student's gradient have
the strides ``torch.empty_like(input)`` gives (the input's own when it is dense and
non-overlapping, e.g. a [S, N, h, D] tensor viewed as [N, h, S, D]), in the real kernels
and in the fake ones alike, so autograd hands them to permuted views without a copy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor

from icd.ops.backends import BACKEND_TABLE, triton_interpreted
from icd.ops.reference import compute_dtype

KERNEL_NAMES = ("attention_forward", "attention_backward", "value_mask", "feature_mse_forward",
                "feature_mse_backward")
"""The functions of every kernel table (icd/ops/backends/__init__.py lists their signatures)."""


def _in_layout_of(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` with the strides of ``torch.empty_like(like)``, copied only if it has others.

    The contract of every backward op; the built-in kernels already keep it, so for them this
    is one stride comparison (the strides of a dense ``like``, which kernels reproduce);
    only a mismatch asks a meta tensor what empty_like would give.
    """
    if grad.stride() == like.stride():
        return grad  # like's own strides: what empty_like gives whenever a kernel can match them
    expected = torch.empty_like(like, device="meta").stride()
    if grad.stride() == expected:
        return grad
    return torch.empty_like(like, dtype=grad.dtype).copy_(grad)


# --- autograd formulas, shared by the icd:: ops and a traceable backend's own ops -------------


def _attention_autograd(backward_op: Callable) -> tuple[Callable, Callable]:
    """(setup_context, backward) of an attention forward op whose inputs are (q, k, v,
    key_padding_mask, scale, *rest): rest is (backend,) for icd::instance_attention and empty
    for a backend's own op, and is passed on to ``backward_op``."""

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, key_padding_mask, scale, *rest = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
        ctx.scale = scale
        ctx.rest = tuple(rest)

    def backward(ctx, grad_out: Tensor, grad_lse: Tensor | None):
        q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
        no_grads = (None,) * (2 + len(ctx.rest))
        if not any(ctx.needs_input_grad[:3]):
            return (None, None, None, *no_grads)
        dq, dk, dv = backward_op(grad_out, grad_lse, q, k, v, key_padding_mask, out, lse, ctx.scale, *ctx.rest)
        return (dq, dk, dv, *no_grads)

    return setup_context, backward


def _mse_autograd(backward_op: Callable) -> tuple[Callable, Callable]:
    """(setup_context, backward) of a feature-MSE forward op whose inputs are (student,
    teacher, weight, norm, eps, reduction, *rest), rest as in _attention_autograd."""

    def setup_context(ctx, inputs, output) -> None:
        student, teacher, weight, norm, eps, reduction, *rest = inputs
        ctx.save_for_backward(student, teacher, weight)
        ctx.options = (norm, eps, reduction, *rest)

    def backward(ctx, grad_loss: Tensor):
        student, teacher, weight = ctx.saved_tensors
        grad_student = None
        if ctx.needs_input_grad[0]:
            grad_student = backward_op(grad_loss, student, teacher, weight, *ctx.options)
        return (grad_student, *(None,) * (2 + len(ctx.options)))

    return setup_context, backward


def _register_traceable(backend: str) -> SimpleNamespace:
    """The kernel-table functions of traceable ``backend`` registered as ops
    ``icd::<backend>_<kernel>`` (torch.library.triton_op; custom ops with the function as fake
    kernel under the Triton interpreter), the forward ops with their autograd formulas."""
    kernels = BACKEND_TABLE[backend].kernels

    def register(name: str) -> torch.library.CustomOpDef:
        fn = getattr(kernels, name)
        if triton_interpreted():
            op = torch.library.custom_op(f"icd::{backend}_{name}", fn, mutates_args=())
            op.register_fake(fn)  # its launches do nothing on tensors without data
            return op
        return torch.library.triton_op(f"icd::{backend}_{name}", fn, mutates_args=())

    ops = SimpleNamespace(**{name: register(name) for name in KERNEL_NAMES})
    setup, backward = _attention_autograd(ops.attention_backward)
    ops.attention_forward.register_autograd(backward, setup_context=setup)
    setup, backward = _mse_autograd(ops.feature_mse_backward)
    ops.feature_mse_forward.register_autograd(backward, setup_context=setup)
    return ops


# Registered at import (~0.1 s, after importing the Triton kernels, ~0.3 s, on the CI machine),
# not on first use: torch.compile may trace the first call, and Dynamo cannot trace an import
# or a registration. A backend whose registration fails keeps the error for its first use.
_TRACEABLE: dict[str, SimpleNamespace] = {}
_TRACEABLE_ERRORS: dict[str, str] = {}


def register_traceable(backend: str) -> None:
    """Register the ops of traceable ``backend`` (at import for the built-in ones, by
    ``register_backend`` for the others); an error is kept for the backend's first use."""
    try:
        _TRACEABLE[backend] = _register_traceable(backend)
    except Exception as exc:  # noqa: BLE001 - reported when the backend is used
        _TRACEABLE_ERRORS[backend] = f"{type(exc).__name__}: {exc}"


def forget_traceable(backend: str) -> None:
    """Drop what ``register_traceable`` kept of ``backend`` (``unregister_backend``); its
    torch ops stay registered with torch, so the name cannot be registered as traceable again."""
    _TRACEABLE.pop(backend, None)
    _TRACEABLE_ERRORS.pop(backend, None)
    eager_functions.cache_clear()


for _name, _described in BACKEND_TABLE.items():
    if _described.traceable and _described.available:
        register_traceable(_name)


def traceable_ops(backend: str) -> SimpleNamespace:
    """The ops of traceable ``backend`` (attention_forward, ..., feature_mse_backward)."""
    if backend not in _TRACEABLE:
        raise RuntimeError(f"icd backend {backend!r} could not register its ops: "
                           f"{_TRACEABLE_ERRORS.get(backend, 'it is not traceable or not available')}")
    return _TRACEABLE[backend]


def _function(name: str, forward: Callable, autograd: tuple[Callable, Callable]) -> type:
    """A torch.autograd.Function running ``forward`` with an autograd formula's (setup_context,
    backward). Written in the ctx style (forward(ctx, ...)): a Function with a separate
    setup_context goes through functorch's generic path, ~90 us per call here against ~7."""
    setup, backward = autograd

    def run(ctx, *inputs):
        output = forward(*inputs)
        setup(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(run), "backward": staticmethod(backward)})


@functools.cache
def eager_functions(backend: str) -> SimpleNamespace:
    """The eager path of traceable ``backend``: autograd.Functions of its attention and feature
    MSE, and its value mask function (not differentiable), calling the kernels directly."""
    traceable_ops(backend)  # raises the registration's error, if any
    kernels = BACKEND_TABLE[backend].kernels
    return SimpleNamespace(
        attention=_function("InstanceAttention", kernels.attention_forward,
                            _attention_autograd(kernels.attention_backward)),
        feature_mse=_function("MaskedFeatureMse", kernels.feature_mse_forward,
                              _mse_autograd(kernels.feature_mse_backward)),
        value_mask=kernels.value_mask,
    )


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


_setup, _backward = _attention_autograd(instance_attention_backward_op)
instance_attention_op.register_autograd(_backward, setup_context=_setup)


def instance_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float, backend: str
) -> tuple[Tensor, Tensor]:
    """The attention of ``backend``: for a traceable one its triton_op under torch.compile and
    its autograd.Function in eager mode, else icd::instance_attention."""
    if not BACKEND_TABLE[backend].traceable:
        return instance_attention_op(q, k, v, key_padding_mask, scale, backend)
    if torch.compiler.is_compiling():
        return traceable_ops(backend).attention_forward(q, k, v, key_padding_mask, scale)
    return eager_functions(backend).attention.apply(q, k, v, key_padding_mask, scale)


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


def instance_value_mask(
    q: Tensor,
    k: Tensor,
    weight: Tensor,
    key_padding_mask: Tensor | None,
    lse: Tensor | None,
    scale: float,
    temperature: float,
    backend: str,
) -> Tensor:
    """The value mask of ``backend`` (see ``instance_attention`` for the three paths)."""
    if not BACKEND_TABLE[backend].traceable:
        return instance_value_mask_op(q, k, weight, key_padding_mask, lse, scale, temperature, backend)
    if torch.compiler.is_compiling():
        return traceable_ops(backend).value_mask(q, k, weight, key_padding_mask, lse, scale, temperature)
    return eager_functions(backend).value_mask(q, k, weight, key_padding_mask, lse, scale, temperature)


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


_setup, _backward = _mse_autograd(masked_feature_mse_backward_op)
masked_feature_mse_op.register_autograd(_backward, setup_context=_setup)


def masked_feature_mse(
    student: Tensor, teacher: Tensor, weight: Tensor, norm: str, eps: float, reduction: str, backend: str
) -> Tensor:
    """The feature MSE of ``backend`` (see ``instance_attention`` for the three paths)."""
    if not BACKEND_TABLE[backend].traceable:
        return masked_feature_mse_op(student, teacher, weight, norm, eps, reduction, backend)
    if torch.compiler.is_compiling():
        return traceable_ops(backend).feature_mse_forward(student, teacher, weight, norm, eps, reduction)
    return eager_functions(backend).feature_mse.apply(student, teacher, weight, norm, eps, reduction)
