"""How the icd Triton kernels are launched: ``launcher(kernel)[grid](...)``.

An eager call on real tensors launches the kernel directly (no Python beyond Triton's own
launcher). When the launching function is traced (torch.compile through a
``torch.library.triton_op``, make_fx), its tensors are fake or functional, and the launch goes
through ``torch.library.wrap_triton``: the trace records the Triton launch itself, so that
Inductor schedules the kernels with the rest of the graph and CUDA graphs capture them with no
Python in between. Under ``TRITON_INTERPRET=1`` the interpreter runs the kernels on CPU
tensors; there a launch on tensors without data (the op's fake kernel, which is the launching
function itself under the interpreter) does nothing, so the function gives the outputs'
shapes and strides without running anything.
"""

from __future__ import annotations

from typing import Any

import torch

from .tuning import INTERPRETED


class _Launch:
    """``kernel[grid]``, choosing at the call how to launch (see the module docstring)."""

    def __init__(self, kernel: Any, grid: Any) -> None:
        self.kernel = kernel
        self.grid = grid

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        first = args[0]  # every icd kernel's first argument is a tensor
        if type(first) is torch.Tensor and first.device.type != "meta":
            self.kernel[self.grid](*args, **kwargs)  # eager, real tensors
        elif not INTERPRETED:
            torch.library.wrap_triton(self.kernel)[self.grid](*args, **kwargs)  # traced
        # interpreted and no data: the fake kernel's launch does nothing


class launcher:  # noqa: N801 - used like a function: launcher(kernel)[grid](...)
    """``kernel`` (a ``@triton.jit`` or ``@triton.autotune`` function), ready for ``[grid](...)``."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel

    def __getitem__(self, grid: Any) -> _Launch:
        return _Launch(self.kernel, grid)
