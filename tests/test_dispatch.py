"""Backend choice: the per-device default, set_backend(), ICD_BACKEND and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import icd.ops as ops
from icd.ops import dispatch

CPU = torch.device("cpu")


def test_default_on_cpu_is_the_cpu_extension_when_built():
    expected = "cpu" if dispatch.is_built("cpu") else "reference"
    assert ops.default_backend(CPU) == expected
    assert ops.resolve_backend(CPU) in (expected, ops.get_backend())


def test_default_on_cuda_prefers_triton(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(dispatch, "_TRITON_INSTALLED", True)
    assert ops.default_backend(cuda) == "triton"
    monkeypatch.setattr(dispatch, "_TRITON_INSTALLED", False)
    monkeypatch.setattr(dispatch, "_CUDA_KERNELS_BUILT", True)
    assert ops.default_backend(cuda) == "cuda"
    monkeypatch.setattr(dispatch, "_CUDA_KERNELS_BUILT", False)
    assert ops.default_backend(cuda) == "reference"


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
    monkeypatch.setattr(dispatch, "_CUDA_KERNELS_BUILT", False)
    with pytest.raises(RuntimeError, match="FORCE_CUDA=1 pip install --no-build-isolation"):
        ops.resolve_backend(torch.device("cuda"), "cuda")
    monkeypatch.setattr(dispatch, "_CPU_KERNELS_BUILT", False)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e ."):
        ops.resolve_backend(CPU, "cpu")
    monkeypatch.setattr(dispatch, "_TRITON_INSTALLED", False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        ops.resolve_backend(CPU, "triton")


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
    from icd.ops import library

    real = library.kernels_of

    def spy(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(library, "kernels_of", spy)
    q, k = torch.randn(1, 1, 2, 8), torch.randn(1, 1, 5, 8)
    ops.instance_attention(q, k, k, backend="reference")
    assert calls == []
    if dispatch.is_built("cpu"):
        ops.instance_attention(q, k, k, backend="cpu")
        assert calls == ["cpu"]
