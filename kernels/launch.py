"""How the icd Triton kernels are launched: ``launcher(kernel)[grid](...)``.

On a GPU this is ``torch.library.wrap_triton(kernel)``: inside a ``torch.library.triton_op``
(icd/ops/backends/triton.py registers one around each launching function) an eager call
launches the kernel directly, and tracing (torch.compile, make_fx) records the launch itself,
so that Inductor schedules the Triton kernels with the rest of the graph and CUDA graphs
capture them without a Python call in between. Under ``TRITON_INTERPRET=1`` the interpreter
runs the kernels on CPU tensors; there a launch whose tensors carry no data (fake or meta
tensors: the op's fake kernel, which is the launching function itself) does nothing, so the
function gives the outputs' shapes and strides without running anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from .tuning import INTERPRETED


def _has_data(arg: Any) -> bool:
    return not isinstance(arg, torch.Tensor) or not (arg.device.type == "meta" or is_fake(arg))


class _InterpretedLaunch:
    """``kernel[grid](...)`` under the interpreter, skipped for tensors without data."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def run(*args: Any, **kwargs: Any) -> None:
            if all(_has_data(a) for a in args):
                self.kernel[grid](*args, **kwargs)

        return run


def launcher(kernel: Any) -> Any:
    """``kernel`` (a ``@triton.jit`` or ``@triton.autotune`` function), ready for ``[grid](...)``."""
    if INTERPRETED:
        return _InterpretedLaunch(kernel)
    return torch.library.wrap_triton(kernel)
