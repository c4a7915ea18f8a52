"""Argument checks of the public ops, run before any kernel.

Each error names the argument, what was received and what was expected: a ValueError
for shapes and values, a TypeError for types and dtypes.

Shape, dtype and device checks always run: they read only metadata. Checks of the values
(weights >= 0, finite numbers, boxes inside their image) must read the data, which on an
accelerator is a host synchronisation that stalls the launch queue and forbids CUDA-graph
capture. ``ICD_CHECKS`` chooses where they run (read at every call, see ``value_checks``):

  cpu   (default) on CPU tensors only; skipped on accelerators and inside torch.compile
  full  on every device (a debug switch: a host sync per checked tensor), not in torch.compile
  off   never
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from icd.errors import ArgumentError, EnvironmentSettingError
from icd.ops.backends import BACKEND_TABLE

NORMS = ("ln", "tln", "none")
REDUCTIONS = ("per_head", "global")
CHECK_MODES = ("cpu", "full", "off")


def check_mode() -> str:
    """The value-check mode of ICD_CHECKS: "cpu" (default), "full" or "off"."""
    mode = os.environ.get("ICD_CHECKS", "").strip().lower() or "cpu"
    if mode not in CHECK_MODES:
        raise EnvironmentSettingError(f"ICD_CHECKS = {mode!r}; expected one of {', '.join(CHECK_MODES)}")
    return mode


def value_checks(t: Tensor) -> bool:
    """Whether to check the values of ``t`` (a data read): see the module docstring.

    Never while torch.compile traces, and never for tensors without data (meta, fake).
    """
    if torch.compiler.is_compiling() or t.device.type == "meta" or is_fake(t):
        return False
    mode = check_mode()
    return mode == "full" or (mode == "cpu" and t.device.type == "cpu")


def range_text(
    integer: bool = False, minimum: float | None = None, above: float | None = None,
    maximum: float | None = None, below: float | None = None,
) -> str:  # fmt: skip
    """What a number in the range is, in words: "an integer >= 1", "a finite number > 0 and <= 1"."""
    bounds = [
        f">= {minimum:g}" if minimum is not None else None,
        f"> {above:g}" if above is not None else None,
        f"<= {maximum:g}" if maximum is not None else None,
        f"< {below:g}" if below is not None else None,
    ]
    kind = "an integer" if integer else "a finite number"
    return " ".join([kind, " and ".join(b for b in bounds if b)]).strip()


def in_range(
    value: float, minimum: float | None = None, above: float | None = None,
    maximum: float | None = None, below: float | None = None,
) -> bool:  # fmt: skip
    """Finite and within the bounds (each None: no bound); an int too large for a float is not."""
    try:
        finite = math.isfinite(value)
    except OverflowError:
        return False
    return (
        finite
        and (minimum is None or value >= minimum)
        and (above is None or value > above)
        and (maximum is None or value <= maximum)
        and (below is None or value < below)
    )


def check_number(
    value: object, name: str, op: str, *, integer: bool = False, minimum: float | None = None,
    above: float | None = None, maximum: float | None = None, below: float | None = None,
) -> None:  # fmt: skip
    """ArgumentError ``{op}: `{name}` = {value}; expected ...`` unless ``value`` is a (finite) number
    in the range (an integer when ``integer``; bools are no numbers)."""
    bounds = {"minimum": minimum, "above": above, "maximum": maximum, "below": below}
    kinds = (int,) if integer else (int, float)
    if not (isinstance(value, kinds) and not isinstance(value, bool) and in_range(value, **bounds)):
        raise ArgumentError(op, f"`{name}` = {value!r}; expected {range_text(integer, **bounds)}")


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def allowed_dtypes(backend: str) -> tuple[torch.dtype, ...]:
    """The input dtypes of ``backend``, from its descriptor (float64 on reference and cpu only)."""
    return BACKEND_TABLE[backend].dtypes


def check_tensor(x: object, name: str, dims: str, op: str) -> Tensor:
    """``x`` is a tensor of rank len(dims.split(', ')); ``dims`` like "N, h, K, D"."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: `{name}` is a {type(x).__name__}; expected a tensor [{dims}]")
    rank = len(dims.split(", "))
    if x.dim() != rank:
        raise ValueError(f"{op}: `{name}` has shape {_shape(x)}; expected [{dims}] ({rank} dims)")
    return x


def device_of(x: object, name: str, dims: str, op: str) -> torch.device:
    """The device of tensor argument ``x`` (checked to be a tensor first)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: `{name}` is a {type(x).__name__}; expected a tensor [{dims}]")
    return x.device


def check_float(x: Tensor, name: str, op: str, backend: str) -> None:
    allowed = allowed_dtypes(backend)
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(
            f"{op}: `{name}` has dtype {str(x.dtype).replace('torch.', '')}; expected one of "
            f"{names} (backend {backend!r})"
        )


def check_same_device(op: str, **tensors: Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: `{name}` is on {t.device} but `{first_name}` is on {first.device}; "
                "expected one device"
            )


def check_nonempty(x: Tensor, name: str, dims: str, op: str) -> None:
    letters = dims.split(", ")
    for letter, size in zip(letters, x.shape, strict=True):
        if size == 0 and letter != "K":
            raise ValueError(f"{op}: `{name}` has shape {_shape(x)}; {letter} must be at least 1")


def check_mask(mask: Tensor | None, n: int, s: int, op: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{op}: `key_padding_mask` is a {type(mask).__name__}; expected a bool tensor [N, S]")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{op}: `key_padding_mask` has dtype {str(mask.dtype).replace('torch.', '')}; "
            "expected bool (True = ignore that key)"
        )
    if tuple(mask.shape) != (n, s):
        raise ValueError(f"{op}: `key_padding_mask` has shape {_shape(mask)}; expected [N, S] = [{n}, {s}]")


def check_nonnegative(weight: Tensor, name: str, op: str) -> None:
    if not weight.is_floating_point():
        raise TypeError(
            f"{op}: `{name}` has dtype {str(weight.dtype).replace('torch.', '')}; expected a float tensor"
        )
    if weight.numel() == 0 or not value_checks(weight):
        return
    if bool((weight < 0).any()):
        raise ValueError(f"{op}: `{name}` has negative entries (min {weight.min().item():g}); expected >= 0")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{op}: `{name}` has NaN or infinite entries; expected finite values >= 0")


def check_qk(q: Tensor, k: Tensor, op: str, backend: str) -> None:
    check_tensor(q, "q", "N, h, K, D", op)
    check_tensor(k, "k", "N, h, S, D", op)
    check_nonempty(q, "q", "N, h, K, D", op)
    check_nonempty(k, "k", "N, h, S, D", op)
    for name, t in (("q", q), ("k", k)):
        check_float(t, name, op, backend)
    if k.dtype != q.dtype:
        raise TypeError(f"{op}: `k` has dtype {k.dtype} but `q` has {q.dtype}; expected one dtype")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{op}: `q` has shape {_shape(q)} and `k` {_shape(k)}; expected q [N, h, K, D] and "
            "k [N, h, S, D] with the same N, h and D"
        )
    check_head_dim(q, op, backend)


def check_head_dim(q: Tensor, op: str, backend: str) -> None:
    """``q``'s head dim D is one ``backend``'s kernels take (the CUDA kernels: D <= 128)."""
    limit = BACKEND_TABLE[backend].max_head_dim
    if limit is not None and q.shape[3] > limit:
        takers = ", ".join(repr(b.name) for b in BACKEND_TABLE.values() if b.max_head_dim is None)
        raise ValueError(
            f"{op}: `q` has head dim D = {q.shape[3]}; backend {backend!r} takes 1 <= D <= {limit} "
            f"(backends {takers} take any D)"
        )


def check_instance_attention_args(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, backend: str
) -> None:
    op = "instance_attention"
    check_qk(q, k, op, backend)
    check_tensor(v, "v", "N, h, S, D", op)
    check_float(v, "v", op, backend)
    if v.dtype != q.dtype:
        raise TypeError(f"{op}: `v` has dtype {v.dtype} but `q` has {q.dtype}; expected one dtype")
    if v.shape != k.shape:
        raise ValueError(f"{op}: `v` has shape {_shape(v)}; expected the shape of `k`, {_shape(k)}")
    check_mask(key_padding_mask, k.shape[0], k.shape[2], op)
    check_same_device(op, q=q, k=k, v=v, key_padding_mask=key_padding_mask)


def check_value_mask_args(
    q: Tensor,
    k: Tensor,
    weight: Tensor,
    key_padding_mask: Tensor | None,
    temperature: float,
    lse: Tensor | None,
    backend: str,
) -> None:
    op = "instance_value_mask"
    check_qk(q, k, op, backend)
    check_tensor(weight, "weight", "N, K", op)
    n, h, kq, _ = q.shape
    if tuple(weight.shape) != (n, kq):
        raise ValueError(f"{op}: `weight` has shape {_shape(weight)}; expected [N, K] = [{n}, {kq}]")
    check_nonnegative(weight, "weight", op)
    check_mask(key_padding_mask, n, k.shape[2], op)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: `temperature` = {temperature}; expected a finite number > 0")
    if lse is not None:
        check_tensor(lse, "lse", "N, h, K", op)
        if tuple(lse.shape) != (n, h, kq):
            raise ValueError(f"{op}: `lse` has shape {_shape(lse)}; expected [N, h, K] = [{n}, {h}, {kq}]")
        if temperature != 1.0:
            raise ValueError(
                f"{op}: `lse` was given with temperature = {temperature}; lse from instance_attention "
                "is only valid with temperature == 1"
            )
    check_same_device(op, q=q, k=k, weight=weight, key_padding_mask=key_padding_mask, lse=lse)


def check_feature_mse_args(
    student: Tensor,
    teacher: Tensor,
    weight: Tensor,
    norm: str,
    eps: float,
    reduction: str,
    backend: str,
) -> None:
    op = "masked_feature_mse"
    check_tensor(student, "student", "N, h, S, D", op)
    check_tensor(teacher, "teacher", "N, h, S, D", op)
    check_tensor(weight, "weight", "N, h, S", op)
    check_nonempty(student, "student", "N, h, S, D", op)
    check_float(student, "student", op, backend)
    check_float(teacher, "teacher", op, backend)
    if teacher.dtype != student.dtype:
        raise TypeError(
            f"{op}: `teacher` has dtype {teacher.dtype} but `student` has {student.dtype}; expected one dtype"
        )
    if teacher.shape != student.shape:
        raise ValueError(f"{op}: `teacher` has shape {_shape(teacher)}; expected the shape of `student`, "
                         f"{_shape(student)}")
    if tuple(weight.shape) != tuple(student.shape[:3]):
        raise ValueError(f"{op}: `weight` has shape {_shape(weight)}; expected [N, h, S] = {list(student.shape[:3])}")
    check_nonnegative(weight, "weight", op)
    if norm not in NORMS:
        raise ValueError(f"{op}: `norm` = {norm!r}; expected one of {', '.join(NORMS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: `reduction` = {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    check_number(eps, "eps", op, above=0.0)
    check_same_device(op, student=student, teacher=teacher, weight=weight)
