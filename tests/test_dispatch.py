"""Backend choice: the per-device default, set_backend(), ICD_BACKEND and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import icd.ops as ops
from icd.ops import dispatch
from icd.ops.backends import BACKEND_TABLE

CPU = torch.device("cpu")


def test_default_on_cpu_is_the_cpu_extension_when_built():
    expected = "cpu" if dispatch.is_built("cpu") else "reference"
    assert ops.default_backend(CPU) == expected
    assert ops.resolve_backend(CPU) in (expected, ops.get_backend())


def _with(monkeypatch, name: str, why_not: str) -> None:
    """Pretend backend ``name`` is available (why_not "") or not, for this test."""
    monkeypatch.setitem(BACKEND_TABLE, name, replace(BACKEND_TABLE[name], why_not=why_not))


def test_default_on_cuda_prefers_triton(monkeypatch):
    cuda = torch.device("cuda")
    _with(monkeypatch, "triton", "")
    assert ops.default_backend(cuda) == "triton"
    _with(monkeypatch, "triton", "not installed")
    _with(monkeypatch, "cuda", "")
    assert ops.default_backend(cuda) == "cuda"
    _with(monkeypatch, "cuda", "not built")
    assert ops.default_backend(cuda) == "reference"


def test_default_on_cpu_is_never_the_interpreted_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _with(monkeypatch, "triton", "")
    _with(monkeypatch, "cpu", "not built")
    assert ops.default_backend(CPU) == "reference"
    assert ops.default_backend(torch.device("meta")) == "reference"


def test_set_backend_sets_and_restores_as_context_manager():
    before = ops.get_backend()
    with ops.set_backend("reference"):
        assert ops.get_backend() == "reference"
        assert ops.resolve_backend(CPU) == "reference"
    assert ops.get_backend() == before
    ops.set_backend("reference")
    try:
        assert ops.resolve_backend(CPU) == "reference"
        explicit = "cpu" if dispatch.is_built("cpu") else "reference"
        assert ops.resolve_backend(CPU, explicit) == explicit  # backend= wins over set_backend()
    finally:
        ops.set_backend(None)
    assert ops.get_backend() is None or "ICD_BACKEND" in os.environ


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="expected one of reference, cpu, cuda, triton"):
        ops.set_backend("tpu")
    with pytest.raises(ValueError, match="backend = 'fast'"):
        ops.instance_attention(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8),
                               backend="fast")


def test_backend_that_is_not_built_says_how_to_build(monkeypatch):
    _with(monkeypatch, "cuda", "icd._C was built without CUDA kernels (no CUDA kernel registered)")
    with pytest.raises(RuntimeError, match=r"'cuda' is not available: icd._C was built without CUDA kernels "
                                           r"\(no CUDA kernel registered\). Rebuild on a machine with nvcc"):
        ops.resolve_backend(torch.device("cuda"), "cuda")
    with pytest.raises(RuntimeError, match="FORCE_CUDA=1 pip install --no-build-isolation"):
        ops.resolve_backend(torch.device("cuda"), "cuda")
    _with(monkeypatch, "cpu", "the C++ extension icd._C is not importable (no module)")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        ops.resolve_backend(CPU, "cpu")
    _with(monkeypatch, "triton", "triton is not installed (module not found)")
    with pytest.raises(RuntimeError, match="pip install triton"):
        ops.resolve_backend(CPU, "triton")
    assert ops.available_backends() == ["reference"]


def test_backend_on_the_wrong_device_is_refused(monkeypatch):
    if dispatch.is_built("cuda"):
        with pytest.raises(ValueError, match="'cuda' runs on CUDA tensors"):
            ops.resolve_backend(CPU, "cuda")
    if dispatch.is_built("cpu"):
        with pytest.raises(ValueError, match="'cpu' runs on CPU tensors"):
            ops.resolve_backend(torch.device("cuda"), "cpu")
    if dispatch.is_built("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            ops.resolve_backend(CPU, "triton")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_icd_backend_environment_variable():
    code = "import torch, icd.ops as o; print(o.get_backend(), o.resolve_backend(torch.device('cpu')))"
    done = _run(code, ICD_BACKEND="reference")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["reference", "reference"]
    bad = _run(code, ICD_BACKEND="nonsense")
    assert bad.returncode != 0 and "ICD_BACKEND = 'nonsense'" in bad.stderr


def test_ops_really_run_on_the_selected_backend(monkeypatch):
    """The op records which backend computed it: the reference never enters icd:: ops."""
    calls = []
    cpu = BACKEND_TABLE["cpu"]

    def spy():
        calls.append("cpu")
        return cpu.load_kernels()

    monkeypatch.setitem(BACKEND_TABLE, "cpu", replace(cpu, load_kernels=spy))
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 5, 8)
    ops.instance_attention(q, k, k, backend="reference")
    assert calls == []
    if dispatch.is_built("cpu"):
        ops.instance_attention(q, k, k, backend="cpu")
        assert calls == ["cpu"]


def test_every_backend_is_described_once():
    """The table is the one list of backends: names, devices, dtypes and kernels agree with use."""
    assert ops.BACKENDS == tuple(BACKEND_TABLE) == ("reference", "cpu", "cuda", "triton")
    for name, described in BACKEND_TABLE.items():
        assert described.name == name
        assert described.available == (name in ops.available_backends())
        assert torch.float32 in described.dtypes
        assert (described.load_kernels is None) == (name == "reference")
    assert torch.float64 in BACKEND_TABLE["cpu"].dtypes and torch.float64 not in BACKEND_TABLE["triton"].dtypes
    with pytest.raises(ValueError, match="no kernel table"):
        _ = BACKEND_TABLE["reference"].kernels


def test_kernel_tables_have_every_kernel():
    names = ("attention_forward", "attention_backward", "value_mask", "feature_mse_forward", "feature_mse_backward")
    for described in BACKEND_TABLE.values():
        if described.available and described.load_kernels is not None:
            kernels = described.kernels
            assert all(callable(getattr(kernels, name)) for name in names), described.name


def test_the_extension_records_whether_it_has_cuda_kernels():
    """icd._C says at build time whether csrc/cuda was compiled in; the cuda backend follows it."""
    extension = pytest.importorskip("icd._C")
    assert extension.with_cuda in (0, 1)
    assert BACKEND_TABLE["cuda"].available == bool(extension.with_cuda)


def test_available_backends_on_a_device_lists_what_runs_there(monkeypatch):
    built = ops.available_backends()
    assert "reference" in built and "cpu" in built  # this checkout builds the C++ extension
    # a machine without a GPU: nothing runs on CUDA tensors, and triton runs on CPU ones only interpreted
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.available_backends("cpu") == ["reference", "cpu"]
    assert ops.available_backends(torch.device("cpu")) == ["reference", "cpu"]
    assert ops.available_backends("cuda") == [] and ops.available_backends("cuda:0") == []
    if dispatch.is_built("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert ops.available_backends("cpu") == ["reference", "cpu", "triton"]
    # a machine with one GPU: what was built for CUDA tensors; not on a second GPU it does not have
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    on_gpu = ops.available_backends("cuda")
    assert on_gpu == [name for name in ops.BACKENDS if name in built and name != "cpu"]
    assert ops.available_backends("cuda:1") == []
