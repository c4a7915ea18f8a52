"""Which backend computes an op: the default per device, ICD_BACKEND and set_backend().

Backends (docs/method.md 3.5):
  reference  plain PyTorch, materialises [N, h, K, S]; any device; the oracle.
  cpu        the C++ extension's CPU kernels (icd._C).
  cuda       the C++ extension's CUDA kernels (icd._C built with nvcc).
  triton     the Triton kernels of icd.kernels; CUDA tensors, or CPU tensors when
             TRITON_INTERPRET=1 (how CI tests them).

Default: triton on CUDA tensors when triton is installed, else cuda when built, else
reference; cpu on CPU tensors when built, else reference. ``ICD_BACKEND=<name>`` (read
at import and whenever ``set_backend(None)`` is called), ``set_backend(name)`` and the
``backend=`` argument of each op override it, in increasing priority.
"""

from __future__ import annotations

import importlib.util
import os
from types import TracebackType

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")

_HOW_TO_BUILD = {
    "cpu": (
        "the C++ extension icd._C is not importable ({error}). Build it with "
        "`pip install --no-build-isolation -e .` from the icd source tree"
    ),
    "cuda": (
        "icd._C was built without CUDA kernels ({error}). Rebuild on a machine with nvcc and a "
        "CUDA build of torch: `FORCE_CUDA=1 pip install --no-build-isolation -e .`"
    ),
    "triton": "triton is not installed ({error}). Install it with `pip install triton`",
}


def _load_extension() -> str | None:
    """Import icd._C (registers the icd_ext kernels); return the error text, or None."""
    try:
        importlib.import_module("icd._C")
    except ImportError as exc:
        return str(exc)
    return None


_EXTENSION_ERROR = _load_extension()
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def has_extension_kernels(dispatch_key: str) -> bool:
    """Whether icd._C registered its kernels for ``dispatch_key`` ("CPU" or "CUDA")."""
    if _EXTENSION_ERROR is not None:
        return False
    ops = ("attention_forward", "attention_backward", "value_mask", "feature_mse_forward",
           "feature_mse_backward")
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"icd_ext::{op}", dispatch_key) for op in ops)


_CPU_KERNELS_BUILT = has_extension_kernels("CPU")
_CUDA_KERNELS_BUILT = has_extension_kernels("CUDA")


def triton_interpreted() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_built(name: str) -> bool:
    """Whether backend ``name`` can run in this installation (any device)."""
    if name == "reference":
        return True
    if name == "cpu":
        return _CPU_KERNELS_BUILT
    if name == "cuda":
        return _CUDA_KERNELS_BUILT
    if name == "triton":
        return _TRITON_INSTALLED
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def available_backends() -> list[str]:
    """The backends built in this installation."""
    return [b for b in BACKENDS if is_built(b)]


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} = {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def _env_backend() -> str | None:
    value = os.environ.get("ICD_BACKEND", "").strip().lower()
    return _check_name(value, "ICD_BACKEND") if value else None


_override: str | None = _env_backend()


class set_backend:  # noqa: N801 - used like a function, also a context manager
    """Choose the backend of every icd op; ``None`` goes back to ICD_BACKEND / the default.

    Takes effect immediately; used as a context manager it restores the previous choice
    on exit::

        icd.ops.set_backend("reference")
        with icd.ops.set_backend("cpu"):
            ...
    """

    def __init__(self, name: str | None) -> None:
        global _override
        self._previous = _override
        _override = _env_backend() if name is None else _check_name(name, "backend")

    def __enter__(self) -> set_backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _override
        _override = self._previous


def get_backend() -> str | None:
    """The backend forced by set_backend() / ICD_BACKEND, or None for the per-device default."""
    return _override


def default_backend(device: torch.device) -> str:
    """The backend used for tensors on ``device`` when nothing overrides it."""
    if device.type == "cuda":
        if _TRITON_INSTALLED:
            return "triton"
        return "cuda" if _CUDA_KERNELS_BUILT else "reference"
    if device.type == "cpu":
        return "cpu" if _CPU_KERNELS_BUILT else "reference"
    return "reference"


def resolve_backend(device: torch.device, requested: str | None = None) -> str:
    """The backend that will run an op on ``device``; raises if it cannot.

    ``requested`` (an op's ``backend=`` argument) beats set_backend(), which beats
    ICD_BACKEND, which beats the per-device default.
    """
    name = requested if requested is not None else _override
    if name is None:
        return default_backend(device)
    _check_name(name, "backend")
    if not is_built(name):
        error = _EXTENSION_ERROR or f"no {name.upper()} kernel registered"
        if name == "triton":
            error = "module not found"
        raise RuntimeError(f"icd backend {name!r} is not available: " + _HOW_TO_BUILD[name].format(error=error))
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"icd backend 'cpu' runs on CPU tensors; the inputs are on {device}")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"icd backend 'cuda' runs on CUDA tensors; the inputs are on {device}")
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        raise ValueError(
            f"icd backend 'triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1); "
            f"the inputs are on {device}"
        )
    return name
