"""icd.ops.instance_attention on every built backend against the reference."""

from __future__ import annotations

import pytest
import torch
from op_cases import (
    Case,
    assert_close,
    attention_inputs,
    backend_params,
    case_params,
    dtypes_for,
    interpreted,
)

import icd.ops as ops


def _loss_inputs(out: torch.Tensor, lse: torch.Tensor, seed: int = 1):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    grad_lse = torch.randn(lse.shape, generator=gen).to(lse.device, lse.dtype)
    return grad_out, grad_lse


def _forward_backward(q, k, v, mask, backend):
    """Forward, then backward of a loss that uses both out and the finite part of lse."""
    out, lse = ops.instance_attention(q, k, v, mask, backend=backend)
    grad_out, grad_lse = _loss_inputs(out, lse)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (out.float() * grad_out.float()).sum() + (finite_lse * grad_lse).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return out.detach(), lse.detach(), dq, dk, dv


@pytest.mark.parametrize("backend, device, case, dtype", case_params())
def test_forward_matches_reference(backend, device, case, dtype):
    q, k, v, mask = attention_inputs(case, dtype, device)
    out, lse = ops.instance_attention(q, k, v, mask, backend=backend)
    ref_out, ref_lse = ops.instance_attention(q, k, v, mask, backend="reference")
    assert out.dtype == dtype and lse.dtype == ref_lse.dtype
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, torch.float32 if dtype != torch.float64 else dtype, "lse")


@pytest.mark.parametrize("backend, device, case, dtype", case_params())
def test_gradients_match_reference(backend, device, case, dtype):
    inputs = attention_inputs(case, dtype, device, requires_grad=True)
    got = _forward_backward(*inputs, backend)
    want = _forward_backward(*inputs, "reference")
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        if name.startswith("d"):
            assert a.dtype == dtype and a.shape == b.shape
            assert torch.isfinite(a).all(), f"{name}: NaN/Inf"
            # gradients accumulate rounding over S: compare relative to their scale
            scale = b.float().abs().max().clamp_min(1.0)
            assert_close(a / scale, b / scale, dtype, name)


@pytest.mark.parametrize("backend, device", backend_params())
def test_fully_masked_rows_are_zero_and_finite(backend, device):
    case = Case(2, 2, 3, 21, 16, padding=True, empty_image=True)
    q, k, v, mask = attention_inputs(case, torch.float32, device, requires_grad=True)
    out, lse, dq, dk, dv = _forward_backward(q, k, v, mask, backend)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    assert torch.isfinite(lse[1]).all()
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.all(dq[0] == 0) and torch.all(dk[0] == 0) and torch.all(dv[0] == 0)
    # masked keys of the other image receive no gradient either
    assert torch.all(dk[1][:, mask[1]] == 0) and torch.all(dv[1][:, mask[1]] == 0)


@pytest.mark.parametrize("backend, device", backend_params())
def test_gradcheck_float64(backend, device):
    if torch.float64 not in dtypes_for(backend, device):
        pytest.skip(f"{backend} has no float64")
    case = Case(2, 2, 3, 13, 8, padding=True, empty_image=True, permuted=True)
    q, k, v, mask = attention_inputs(case, torch.float64, device, requires_grad=True)

    def fn(q, k, v):
        out, lse = ops.instance_attention(q, k, v, mask, backend=backend)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend, device", backend_params())
def test_opcheck(backend, device):
    case = Case(2, 2, 3, 17, 8, padding=True, empty_image=True)
    q, k, v, mask = attention_inputs(case, torch.float32, device, requires_grad=True)
    torch.library.opcheck(torch.ops.icd.instance_attention.default, (q, k, v, mask, 0.3, backend))
    q, k, v, mask = attention_inputs(case, torch.float32, device)
    out, lse = ops.instance_attention(q, k, v, mask, backend=backend)
    torch.library.opcheck(
        torch.ops.icd.instance_attention_backward.default,
        (torch.randn_like(out), None, q, k, v, mask, out, lse, case.d**-0.5, backend),
    )


@pytest.mark.parametrize("backend, device", backend_params())
def test_torch_compile_fullgraph(backend, device):
    if interpreted(backend, device):
        pytest.skip("compiled graphs call the Triton interpreter too slowly to be worth it")
    case = Case(2, 2, 5, 33, 16, padding=True, empty_image=True)
    q, k, v, mask = attention_inputs(case, torch.float32, device, requires_grad=True)

    def step(q, k, v):
        out, lse = ops.instance_attention(q, k, v, mask, backend=backend)
        return out.square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(step(q, k, v), (q, k, v))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_reference_handles_no_instances():
    q = torch.randn(2, 2, 0, 8)
    k = torch.randn(2, 2, 9, 8)
    out, lse = ops.instance_attention(q, k, k, None)
    assert out.shape == (2, 2, 0, 8) and lse.shape == (2, 2, 0)
