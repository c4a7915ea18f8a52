"""Compiling the icd Triton kernels for an NVIDIA architecture on a machine without a GPU.

Triton's front end and ptxas run on the CPU; only the launch needs a device. ``offline_target``
makes Triton's active driver one pinned to an architecture with no device behind it, so that
``kernel.warmup(...)`` compiles (benchmarks/kernel_resources.py reads the registers and shared
memory of the result) and torch's tracing of the triton_op ops generates their Triton IR
(tests/triton_trace_for_gpu.py). Nothing here launches a kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from triton.backends import backends
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver


class OfflineDriver(DriverBase):
    """Triton's CUDA driver pinned to one architecture (compute capability x 10), no device."""

    def __init__(self, arch: int) -> None:
        self.arch = arch
        self._cuda = backends["nvidia"].driver.__new__(backends["nvidia"].driver)

    @classmethod
    def is_active(cls) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:
        return backends["nvidia"].driver.map_python_to_cpp_type(self._cuda, ty)

    def get_benchmarker(self):
        raise RuntimeError("an offline Triton target has no device to benchmark on")

    def get_device_interface(self):
        raise RuntimeError("an offline Triton target has no device")

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("an offline Triton target has no device")

    def clear_cache(self, cache) -> None:
        pass


@contextlib.contextmanager
def offline_target(arch: int = 90) -> Iterator[OfflineDriver]:
    """Within the block Triton compiles for sm_<arch> without a device."""
    previous = getattr(driver, "_active", None)  # None until a driver is made (none can be here)
    offline = OfflineDriver(arch)
    driver.set_active(offline)
    try:
        yield offline
    finally:
        driver._active = previous
