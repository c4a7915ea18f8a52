"""The CUDA kernels of icd._C (csrc/cuda) are compiled in and registered; no GPU needed.

A .cu file that fails to compile fails the build itself; these tests catch a build that
left the CUDA sources out or one whose kernels do not register, and check how the "cuda"
backend presents itself. They are skipped where setup.py does not compile CUDA: with
ICD_NO_CUDA=1, without nvcc, or with a CPU-only torch.
"""

from __future__ import annotations

import ctypes
import os
import shutil

import pytest
import torch

import icd.ops as ops
from icd.ops.dispatch import resolve_backend

KERNEL_OPS = (
    "attention_forward",
    "attention_backward",
    "value_mask",
    "feature_mse_forward",
    "feature_mse_backward",
)


def _nvcc_found() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return True
    return shutil.which("nvcc") is not None


def _extension_has_cuda_code() -> bool:
    """Whether icd._C contains the compiled csrc/cuda sources (they export a marker symbol)."""
    try:
        import icd._C as extension
    except ImportError:
        return False
    return hasattr(ctypes.CDLL(extension.__file__), "icd_cuda_kernels_built")


def _skip_reason() -> str | None:
    if os.environ.get("ICD_NO_CUDA", "0") == "1":
        return "ICD_NO_CUDA=1: the extension is built without CUDA kernels"
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if not _nvcc_found():
        return "nvcc not found"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether icd_ext::``op`` has a kernel registered for ``dispatch_key``, without running it.

    torch has no public query for this (these tests run without a GPU, so the kernels cannot
    simply be called); the dispatcher's own private one is used here, and only here.
    """
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"icd_ext::{op}", dispatch_key)


def test_cuda_sources_were_compiled_in():
    """nvcc and a CUDA torch are here, so setup.py must have compiled csrc/cuda.

    A build made with ICD_NO_CUDA=1 must be tested with ICD_NO_CUDA=1 set as well.
    """
    assert _extension_has_cuda_code(), (
        "icd._C lacks the csrc/cuda kernels although nvcc and a CUDA torch are present: "
        "rebuild with `pip install --no-build-isolation -e .` (or run the tests with ICD_NO_CUDA=1)"
    )
    import icd._C as extension

    assert extension.with_cuda == 1, "icd._C does not record its CUDA kernels (icd._C.with_cuda)"


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_every_kernel_op_has_a_cuda_kernel(op):
    assert _has_kernel(op, "CUDA"), f"icd_ext::{op} has no CUDA kernel: a csrc/cuda/*.cu file does not register it"


def test_cpu_kernels_are_still_registered():
    for op in KERNEL_OPS:
        assert _has_kernel(op, "CPU"), op


def test_cuda_backend_is_available():
    assert "cuda" in ops.available_backends()


def test_cuda_backend_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="'cuda' runs on CUDA tensors"):
        resolve_backend(torch.device("cpu"), "cuda")
    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="'cuda' runs on CUDA tensors; the inputs are on cpu"):
        ops.instance_attention(q, k, k, backend="cuda")
    with pytest.raises(ValueError, match="'cuda' runs on CUDA tensors"):
        ops.instance_value_mask(q, k, torch.ones(1, 3), backend="cuda")
    with pytest.raises(ValueError, match="'cuda' runs on CUDA tensors"):
        ops.masked_feature_mse(k, k, torch.ones(1, 2, 5), backend="cuda")
