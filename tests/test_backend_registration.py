"""A new backend is its ``Backend`` entry and its kernel table, nothing more: a "toy" backend,
registered from this file with ``icd.ops.register_backend`` (its kernels call the reference
ops on CPU tensors), is taken by dispatch, ICD_BACKEND and the ops, parametrised by the op
tests (tests/op_cases.py) and measured by the benchmarks, without any other file naming it."""

from __future__ import annotations

import csv
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
import torch
from op_cases import Case, attention_inputs, backend_params, case_params, instance_weight
from torch import Tensor

import icd.ops as ops
from icd.ops import reference
from icd.ops.backends import BACKEND_TABLE, BUILTIN_BACKENDS, Backend, native_backends
from icd.ops.dispatch import backend_of, resolve_backend

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CPU = torch.device("cpu")
CALLS: list[str] = []  # the toy kernels called, in order: proves an op ran on the toy backend


# The toy's kernel table: the five functions of icd/ops/backends/__init__.py on the reference
# ops, typed (a traceable backend's functions become torch ops, their schemas read from these).


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    CALLS.append("attention_forward")
    return reference.instance_attention(q, k, v, key_padding_mask, scale)


def attention_backward(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    CALLS.append("attention_backward")

    def forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        out, lse = reference.instance_attention(q, k, v, key_padding_mask, scale)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)  # a fully masked row: lse -inf, no gradient

    # torch.func.vjp: plain autograd is off inside a custom op's kernel
    (_, finite_lse), vjp = torch.func.vjp(forward, q, k, v)
    grad_lse = torch.zeros_like(finite_lse) if grad_lse is None else grad_lse.to(finite_lse.dtype)
    dq, dk, dv = vjp((grad_out, grad_lse))
    return dq, dk, dv


def value_mask(
    q: Tensor,
    k: Tensor,
    weight: Tensor,
    key_padding_mask: Tensor | None,
    lse: Tensor | None,
    scale: float,
    temperature: float,
) -> Tensor:
    CALLS.append("value_mask")
    return reference.instance_value_mask(q, k, weight, key_padding_mask, scale, temperature, lse)


def feature_mse_forward(
    student: Tensor, teacher: Tensor, weight: Tensor, norm: str, eps: float, reduction: str
) -> Tensor:
    CALLS.append("feature_mse_forward")
    return reference.masked_feature_mse(student, teacher, weight, norm, eps, reduction)


def feature_mse_backward(
    grad_loss: Tensor, student: Tensor, teacher: Tensor, weight: Tensor, norm: str, eps: float, reduction: str
) -> Tensor:
    CALLS.append("feature_mse_backward")
    _, vjp = torch.func.vjp(lambda s: reference.masked_feature_mse(s, teacher, weight, norm, eps, reduction), student)
    return vjp(grad_loss)[0]


def _toy_kernels() -> ModuleType:
    return sys.modules[__name__]  # this module: it has the five functions


TOY = Backend(
    "toy",
    devices=("cpu",),
    dtypes=(torch.float32, torch.float64),
    where="CPU tensors",
    load_kernels=_toy_kernels,
)


@pytest.fixture
def toy():
    """The toy backend registered for one test, then removed."""
    ops.register_backend(TOY)
    CALLS.clear()
    try:
        yield TOY
    finally:
        ops.unregister_backend("toy")


@pytest.fixture
def bench_modules():
    """The benchmark modules, imported as the scripts import each other (benchmarks/ on sys.path)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_kernels
        import op_sweep
        import run_attention
        import run_distill

        yield op_sweep, run_attention, bench_kernels, run_distill
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_dispatch_takes_a_registered_backend(toy, monkeypatch):
    assert "toy" in ops.BACKENDS and ops.BACKENDS[-1] == "toy"
    assert backend_of("toy") is TOY
    assert "toy" in ops.available_backends() and "toy" in ops.available_backends("cpu")
    assert resolve_backend(CPU, "toy") == "toy"
    with ops.set_backend("toy"):
        assert resolve_backend(CPU) == "toy"
    monkeypatch.setenv("ICD_BACKEND", "TOY")  # read lower-cased
    assert resolve_backend(CPU) == "toy"
    monkeypatch.delenv("ICD_BACKEND")
    assert ops.default_backend(CPU) != "toy"  # only DEFAULT_PREFERENCE names defaults
    with pytest.raises(ValueError, match=r"backend = 'nope'; expected one of .*, toy$"):
        resolve_backend(CPU, "nope")
    with pytest.raises(ValueError, match=r"icd backend 'toy' runs on CPU tensors; the inputs are on meta"):
        resolve_backend(torch.device("meta"), "toy")


def test_a_registered_backend_leaves_with_unregister():
    ops.register_backend(TOY)
    ops.unregister_backend("toy")
    assert "toy" not in ops.BACKENDS and "toy" not in BACKEND_TABLE
    with pytest.raises(ValueError, match=r"backend = 'toy'; expected one of"):
        resolve_backend(CPU, "toy")


def test_the_ops_run_on_a_registered_backend(toy):
    """Forward and backward of each op go through the icd:: ops into the toy kernels and match
    the reference; validation reads the toy's dtypes."""
    case = Case(2, 2, 3, 11, 8, padding=True, empty_image=True)
    torch.manual_seed(0)
    q, k, v, mask = attention_inputs(case, torch.float64, CPU, requires_grad=True)
    out, lse = ops.instance_attention(q, k, v, mask, backend="toy")
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want, want_lse = ops.instance_attention(q, k, v, mask, backend="reference")
    (want.sum() + torch.where(torch.isfinite(want_lse), want_lse, 0.0).sum()).backward()
    torch.testing.assert_close(out, want)
    for got, t in zip(grads, (q, k, v), strict=True):
        torch.testing.assert_close(got, t.grad)
    weight = instance_weight(case, CPU)
    torch.testing.assert_close(
        ops.instance_value_mask(q.detach(), k.detach(), weight, mask, backend="toy"),
        ops.instance_value_mask(q.detach(), k.detach(), weight, mask, backend="reference"),
    )
    student = torch.randn(2, 2, 11, 8, dtype=torch.float64, requires_grad=True)
    teacher, mse_weight = torch.randn(2, 2, 11, 8, dtype=torch.float64), torch.rand(2, 2, 11, dtype=torch.float64)
    ops.masked_feature_mse(student, teacher, mse_weight, backend="toy").backward()
    assert CALLS == ["attention_forward", "attention_backward", "value_mask", "feature_mse_forward",
                     "feature_mse_backward"]  # fmt: skip
    with pytest.raises(TypeError, match=r"expected one of float32, float64 \(backend 'toy'\)"):
        ops.instance_attention(q.detach().half(), k.detach().half(), v.detach().half(), backend="toy")


def test_the_op_tests_parametrise_a_registered_backend(toy):
    assert [p.id for p in backend_params()][-1] == "toy"
    toy_cases = [p for p in case_params() if p.values[0] == "toy"]
    assert {p.values[3] for p in toy_cases} == {torch.float32, torch.float64}
    assert all(p.values[1] == CPU and not p.marks for p in toy_cases)
    assert any(p.id == "toy-float64-N1h2K300S2500D16-pad" for p in toy_cases)  # not interpreted: every case


def test_the_benchmarks_measure_a_registered_backend(toy, bench_modules, tmp_path):
    op_sweep, run_attention, bench_kernels, run_distill = bench_modules
    assert native_backends("cpu")[-1] == "toy" and "toy" not in native_backends("cuda")
    assert "toy" in op_sweep.backends_for(CPU, run_attention.BENCHMARKS, None, [])
    assert "toy" in bench_kernels.backends_of("attention", "cpu", None)
    assert "toy" in bench_kernels.backends_of("feature_mse", "cpu", None)
    assert ("icd", "toy") in run_distill.variants(CPU, None)
    argv = ["--device", "cpu", "--backends", "reference,toy", "--levels", "p3-p7", "--inputs", "32x48",
            "--k", "3", "--warmup", "0", "--repeats", "1", "--no-plot", "--out", str(tmp_path)]  # fmt: skip
    assert run_attention.main(argv) == 0
    (written,) = tmp_path.glob("attention_cpu-*.csv")
    with written.open() as f:
        rows = [r for r in csv.DictReader(line for line in f if not line.startswith("#")) if r["backend"] == "toy"]
    assert {(r["op"], r["pass"], r["status"]) for r in rows} == {
        ("attention", "fwd", "ok"), ("attention", "fwd+bwd", "ok"), ("value_mask", "fwd", "ok"),
        ("feature_mse", "fwd", "ok"), ("feature_mse", "fwd+bwd", "ok"),
    }  # fmt: skip


def test_register_backend_refuses_what_it_cannot_take(toy):
    with pytest.raises(ValueError, match=r"register_backend: backend 'toy' is already registered"):
        ops.register_backend(TOY)
    with pytest.raises(ValueError, match=r"register_backend: backend 'cuda' is already registered"):
        ops.register_backend(replace(TOY, name="cuda"))
    with pytest.raises(ValueError, match=r"register_backend: backend name 'My-Toy'; expected lower case"):
        ops.register_backend(replace(TOY, name="My-Toy"))
    with pytest.raises(ValueError, match=r"register_backend: backend 'toy2' has no load_kernels"):
        ops.register_backend(replace(TOY, name="toy2", load_kernels=None))
    with pytest.raises(TypeError, match=r"register_backend: expected an icd.ops.backends.Backend, got str"):
        ops.register_backend("toy3")  # type: ignore[arg-type]
    for name in BUILTIN_BACKENDS:
        with pytest.raises(ValueError, match=rf"unregister_backend: '{name}' is a built-in backend"):
            ops.unregister_backend(name)
    with pytest.raises(ValueError, match=r"unregister_backend: no backend 'toy2' is registered"):
        ops.unregister_backend("toy2")
    assert tuple(BACKEND_TABLE) == (*BUILTIN_BACKENDS, "toy")


def test_a_traceable_backend_gets_its_ops_at_registration():
    """``traceable``: register_backend registers its icd::<name>_<kernel> ops at once (torch.compile
    cannot trace a registration); the eager ops run its kernels through autograd.Functions."""
    from icd.ops import library

    traced = replace(TOY, name="toy_traced", traceable=True)
    ops.register_backend(traced)
    CALLS.clear()
    try:
        assert sorted(vars(library.traceable_ops("toy_traced"))) == sorted(library.KERNEL_NAMES)
        q, k, v, mask = attention_inputs(Case(1, 2, 3, 9, 8), torch.float64, CPU, requires_grad=True)
        out, _ = ops.instance_attention(q, k, v, mask, backend="toy_traced")
        out.sum().backward()
        dq = q.grad.clone()
        q.grad = None
        ops.instance_attention(q, k, v, mask, backend="reference")[0].sum().backward()
        torch.testing.assert_close(dq, q.grad)
        assert CALLS == ["attention_forward", "attention_backward"]
    finally:
        ops.unregister_backend("toy_traced")
    with pytest.raises(RuntimeError, match=r"icd backend 'toy_traced' could not register its ops"):
        library.traceable_ops("toy_traced")
