"""The CUDA kernels of icd._C (csrc/cuda) are compiled in and registered; no GPU needed.

A .cu file that fails to compile fails the build itself; these tests catch a build that
left the CUDA sources out or one whose kernels do not register, and check how the "cuda"
backend presents itself. They are skipped where setup.py does not compile CUDA: with
ICD_NO_CUDA=1, without nvcc, or with a CPU-only torch.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from functools import cache

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


# --- what nvcc put in the library: machine code for sm_80 and sm_90, tensor-core instructions ---

TENSOR_CORE_KERNELS = ("tc_attention_forward_kernel", "tc_attention_backward_kernel", "tc_value_mask_kernel")


@cache
def _cuobjdump() -> str | None:
    """cuobjdump from PATH, CUDA_HOME/bin, or the one the triton wheel ships."""
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [shutil.which("cuobjdump")]
    if CUDA_HOME is not None:
        candidates.append(os.path.join(CUDA_HOME, "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _dump(*args: str) -> str:
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (PATH, CUDA_HOME/bin, triton's bundled tools)")
    import icd._C as extension

    result = subprocess.run([tool, *args, extension.__file__], capture_output=True, text=True, check=True)
    return result.stdout


@cache
def _resource_usage() -> dict[str, list[dict[str, int]]]:
    """{mangled kernel name: its resource lines (REG, STACK, LOCAL, ...), one per architecture}."""
    usage: dict[str, list[dict[str, int]]] = {}
    name = None
    for line in _dump("--dump-resource-usage").splitlines():
        found = re.match(r"\s*Function (\S+):$", line)
        if found:
            name = found.group(1)
        elif name is not None and "REG:" in line:
            usage.setdefault(name, []).append({k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)})
            name = None
    return usage


def _tensor_core_kernels(kind: str) -> list[str]:
    return sorted(n for n in _resource_usage() if kind in n)


def test_library_holds_sm80_and_sm90_machine_code():
    elves = _dump("--list-elf")
    for arch in ("sm_80", "sm_90"):
        assert f".{arch}." in elves, f"no {arch} cubin in icd._C (TORCH_CUDA_ARCH_LIST 8.0;9.0):\n{elves}"


# Measured stack frames of this build: at most 16 bytes (a 16-byte tile chunk held on the stack
# in a few instantiations; docs/cuda-kernels.md); a real spill would show as LOCAL or grow it.
MAX_STACK_BYTES = 16


@pytest.mark.parametrize("kind", TENSOR_CORE_KERNELS)
def test_tensor_core_kernels_do_not_spill(kind):
    """Every instantiation (2 dtypes x 4 head-dim buckets), on both architectures: no local
    memory, and no stack frame beyond MAX_STACK_BYTES."""
    names = _tensor_core_kernels(kind)
    assert names, f"no {kind} in icd._C"
    for name in names:
        for arch_usage in _resource_usage()[name]:
            assert arch_usage["LOCAL"] == 0 and arch_usage["STACK"] <= MAX_STACK_BYTES, (name, arch_usage)


@cache
def _sass_bodies(arch: str) -> dict[str, str]:
    """{mangled name: SASS} of every tensor-core kernel on ``arch`` (one cuobjdump call)."""
    names = [n for kind in TENSOR_CORE_KERNELS for n in _tensor_core_kernels(kind)]
    sass = _dump("--dump-sass", "--gpu-architecture", arch, "--function", ",".join(names))
    bodies = {}
    for body in re.split(r"\n\s*Function : ", sass)[1:]:
        name, _, code = body.partition("\n")
        bodies[name.strip()] = code
    return bodies


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("kind", TENSOR_CORE_KERNELS)
def test_tensor_core_kernels_run_hmma_and_ldmatrix(kind, arch):
    """The SASS of each kernel has HMMA.16816.F32[.BF16] (mma.sync m16n8k16 with float32
    accumulators) and LDSM.16.M88.4 (ldmatrix .x4)."""
    names = _tensor_core_kernels(kind)
    bodies = _sass_bodies(arch)
    for name in names:
        assert name in bodies, f"{name}: no SASS for {arch}"
        hmma = "HMMA.16816.F32.BF16 " if "BFloat16" in name else "HMMA.16816.F32 "  # fp16: no suffix
        assert hmma in bodies[name], f"{name}: no {hmma.strip()} on {arch}"
        assert "LDSM.16.M88.4" in bodies[name], f"{name}: no ldmatrix (LDSM) on {arch}"


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
