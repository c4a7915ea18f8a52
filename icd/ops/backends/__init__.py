"""The backend table: one descriptor per backend, read by dispatch, validation, errors and tests.

A backend is a way to run the icd ops. Its ``Backend`` says which tensors it takes (device
types, dtypes), whether it can run in this installation and, if not, why and how to get
it, and where its kernels are:

  reference  plain PyTorch, materialises [N, h, K, S]; any device; the oracle. It does not
             go through the icd:: custom ops, so it has no kernel table.
  cpu        the C++ extension's CPU kernels: ``torch.ops.icd_ext`` (icd._C).
  cuda       the C++ extension's CUDA kernels: ``torch.ops.icd_ext`` (icd._C built with nvcc);
             the device of the inputs picks the CPU or the CUDA kernel of each icd_ext op.
             float16 / bfloat16 attention and value mask run on tensor cores on sm_80 and
             later, float32 on CUDA cores (docs/cuda-kernels.md).
  triton     the Triton kernels of icd.kernels (``icd.ops.backends.triton``, each function
             an icd::triton_* op that torch.compile traces into); CUDA tensors, or CPU
             tensors when TRITON_INTERPRET=1 (how CI tests them).

A new backend is one more entry in ``_build_table`` (from outside icd:
``register_backend(Backend(...))``) and its kernel table: dispatch, validation, the op tests
(tests/op_cases.py) and the benchmarks read every name and fact from this table, and nothing
else lists backends (docs/architecture.md, "A new backend").

Every kernel table has these five functions (letters as in ``icd.ops``; arguments arrive
validated; forward outputs are contiguous; gradients have the strides of their inputs,
``torch.empty_like``, and icd.ops.library copies a gradient that does not):

    attention_forward(q, k, v, key_padding_mask, scale) -> (out [N, h, K, D], lse [N, h, K] fp32)
    attention_backward(grad_out, grad_lse, q, k, v, key_padding_mask, out, lse, scale)
        -> (dq, dk, dv)
    value_mask(q, k, weight, key_padding_mask, lse, scale, temperature) -> [N, h, S] fp32
    feature_mse_forward(student, teacher, weight, norm, eps, reduction) -> 0-dim fp32
    feature_mse_backward(grad_loss, student, teacher, weight, norm, eps, reduction)
        -> grad of student
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

HALF_AND_SINGLE = (torch.float32, torch.float16, torch.bfloat16)
WITH_DOUBLE = (*HALF_AND_SINGLE, torch.float64)
CUDA_MAX_HEAD_DIM = 128
"""The CUDA kernels' widest head-dim tile (kMaxHeadDim in csrc/cuda/common.cuh)."""


def triton_interpreted() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels then run on CPU tensors (read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Backend:
    """What one backend takes, whether it is here, and its kernels.

    Attributes:
        name: the name given to ``backend=``, ``set_backend`` and ``ICD_BACKEND``.
        devices: device types of the tensors it runs on; ``None`` for any device.
        interpreted_devices: device types it also runs on when TRITON_INTERPRET=1.
        dtypes: the float dtypes of its inputs.
        where: the tensors it runs on, in words (for the wrong-device error).
        why_not: why it cannot run in this installation; "" when it can.
        how_to_get: how to build or install it (for the not-available error).
        load_kernels: returns its kernel table; ``None`` for the reference.
        max_head_dim: the largest head dim D its attention and value-mask kernels take;
            ``None`` for any D.
        traceable: its kernel-table functions are torch ops that torch.compile traces into
            (torch.library.triton_op): icd.ops calls them directly, with icd.ops.library's
            autograd formulas, rather than through the opaque icd:: ops.
    """

    name: str
    devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...]
    where: str
    why_not: str = ""
    how_to_get: str = ""
    interpreted_devices: tuple[str, ...] = ()
    load_kernels: Callable[[], ModuleType] | None = None
    max_head_dim: int | None = None
    traceable: bool = False

    @property
    def available(self) -> bool:
        """Whether it can run in this installation (on some device)."""
        return not self.why_not

    def device_types(self) -> tuple[str, ...] | None:
        """The device types it runs on now (TRITON_INTERPRET is read at every call); None = any."""
        if self.devices is None:
            return None
        return self.devices + (self.interpreted_devices if triton_interpreted() else ())

    def runs_on(self, device: torch.device) -> bool:
        types = self.device_types()
        return types is None or device.type in types

    def native_on(self, device_type: str) -> bool:
        """Whether it runs on ``device_type`` tensors without the Triton interpreter (what the
        per-device default and the benchmarks ask)."""
        return self.devices is None or device_type in self.devices

    def interpreted_on(self, device: torch.device) -> bool:
        """Whether it runs on ``device`` only through the Triton interpreter (TRITON_INTERPRET=1)."""
        return not self.native_on(device.type) and self.runs_on(device)

    @property
    def kernels(self) -> ModuleType:
        """Its kernel table (imported on first use)."""
        if self.load_kernels is None:
            raise ValueError(f"backend {self.name!r} has no kernel table: it does not go through the icd:: ops")
        return self.load_kernels()


def _extension_error() -> str | None:
    """Import icd._C (registers the icd_ext kernels); return the error text, or None."""
    try:
        importlib.import_module("icd._C")
    except ImportError as exc:
        return str(exc)
    return None


def _extension_kernels() -> ModuleType:
    return torch.ops.icd_ext  # an op namespace (a ModuleType): the five kernels as icd_ext ops


def _triton_kernels() -> ModuleType:
    return importlib.import_module(f"{__name__}.triton")


def _extension_with_cuda() -> bool:
    """Whether icd._C was compiled with csrc/cuda: the extension records it at build time."""
    import icd._C as extension

    return bool(getattr(extension, "with_cuda", 0))


def _build_table() -> dict[str, Backend]:
    extension_error = _extension_error()
    cpu_why_not = cuda_why_not = triton_why_not = ""
    if extension_error is not None:
        cpu_why_not = f"the C++ extension icd._C is not importable ({extension_error})"
        cuda_why_not = f"icd._C was built without CUDA kernels ({extension_error})"
    elif not _extension_with_cuda():
        cuda_why_not = "icd._C was built without CUDA kernels (no CUDA kernel registered)"
    if importlib.util.find_spec("triton") is None:
        triton_why_not = "triton is not installed (module not found)"
    backends = [
        Backend("reference", devices=None, dtypes=WITH_DOUBLE, where="tensors on any device"),
        Backend(
            "cpu",
            devices=("cpu",),
            dtypes=WITH_DOUBLE,
            where="CPU tensors",
            why_not=cpu_why_not,
            how_to_get="Build it with `pip install --no-build-isolation -e .` from the icd source tree",
            load_kernels=_extension_kernels,
        ),
        Backend(
            "cuda",
            devices=("cuda",),
            dtypes=HALF_AND_SINGLE,
            where="CUDA tensors",
            why_not=cuda_why_not,
            how_to_get=(
                "Rebuild on a machine with nvcc and a CUDA build of torch: "
                "`FORCE_CUDA=1 pip install --no-build-isolation -e .`"
            ),
            load_kernels=_extension_kernels,
            max_head_dim=CUDA_MAX_HEAD_DIM,
        ),
        Backend(
            "triton",
            devices=("cuda",),
            interpreted_devices=("cpu",),
            dtypes=HALF_AND_SINGLE,
            where="CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1)",
            why_not=triton_why_not,
            how_to_get="Install it with `pip install triton`",
            load_kernels=_triton_kernels,
            traceable=True,
        ),
    ]
    return {b.name: b for b in backends}


BACKEND_TABLE: dict[str, Backend] = _build_table()
"""Every backend by name, the built-in ones first, then those of ``register_backend`` in the
order they were registered (the order of ``BACKENDS``)."""

BUILTIN_BACKENDS: tuple[str, ...] = tuple(BACKEND_TABLE)
"""The backends of ``_build_table``: ``unregister_backend`` refuses them."""

_NAME = re.compile(r"[a-z][a-z0-9_]*")


def __getattr__(name: str) -> tuple[str, ...]:
    if name == "BACKENDS":  # read at every access: register_backend may have added names
        return tuple(BACKEND_TABLE)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_backend(backend: Backend) -> None:
    """Add ``backend`` to the table; from then on it is a backend like the built-in ones.

    ``backend=``, ``set_backend``, ``ICD_BACKEND`` and ``icd train --icd-backend`` (parsers
    built after this call) accept its name, validation checks its dtypes and head dims, the op
    tests (tests/op_cases.py) compare it with the reference, and the benchmarks measure it on
    the device types of ``backend.devices``. Its kernel table (``backend.load_kernels()``)
    has the five functions listed in this module's docstring; a ``traceable`` one gets its
    ``icd::<name>_<kernel>`` ops now (torch.compile cannot trace a registration). It is never
    the per-device default (``DEFAULT_PREFERENCE`` of icd/ops/dispatch.py names those).

    Raises:
        TypeError: ``backend`` is not a ``Backend``.
        ValueError: its name is taken or is not lower case letters, digits and ``_``
            (``ICD_BACKEND`` is read lower-cased); or it has no kernel table.
    """
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend: expected an icd.ops.backends.Backend, got {type(backend).__name__}")
    if not _NAME.fullmatch(backend.name):
        raise ValueError(
            f"register_backend: backend name {backend.name!r}; expected lower case letters, digits and _, "
            "starting with a letter"
        )
    if backend.name in BACKEND_TABLE:
        raise ValueError(f"register_backend: backend {backend.name!r} is already registered")
    if backend.load_kernels is None:
        raise ValueError(f"register_backend: backend {backend.name!r} has no load_kernels (its kernel table)")
    BACKEND_TABLE[backend.name] = backend
    if backend.traceable and backend.available:
        from icd.ops import library  # imports this module: loaded by now, never at its import

        library.register_traceable(backend.name)


def unregister_backend(name: str) -> None:
    """Remove a backend added by ``register_backend`` (a built-in one is refused).

    Raises:
        ValueError: ``name`` is a built-in backend or is not registered.
    """
    if name in BUILTIN_BACKENDS:
        raise ValueError(f"unregister_backend: {name!r} is a built-in backend")
    if name not in BACKEND_TABLE:
        raise ValueError(f"unregister_backend: no backend {name!r} is registered")
    del BACKEND_TABLE[name]
    from icd.ops import library

    library.forget_traceable(name)


def native_backends(device_type: str, *, with_kernels: bool = False) -> tuple[str, ...]:
    """The backends, in table order, that run on ``device_type`` tensors without the Triton
    interpreter, built here or not (the reference included unless ``with_kernels``): what the
    benchmarks measure per device type."""
    return tuple(
        name
        for name, b in BACKEND_TABLE.items()
        if b.native_on(device_type) and (b.load_kernels is not None or not with_kernels)
    )
