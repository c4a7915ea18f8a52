"""icd.ops.instance_value_mask on every built backend against the reference."""

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
    instance_weight,
)

import icd.ops as ops


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("backend, device, case, dtype", case_params())
@pytest.mark.parametrize("temperature", [1.0, 0.5], ids=["T1", "T0.5"])
def test_matches_reference(backend, device, case, dtype, temperature):
    q, k, _, mask = attention_inputs(case, dtype, device)
    weight = instance_weight(case, device)
    got = ops.instance_value_mask(q, k, weight, mask, temperature=temperature, backend=backend)
    want = ops.instance_value_mask(q, k, weight, mask, temperature=temperature, backend="reference")
    assert got.dtype == _stat_dtype(dtype), f"dtype {got.dtype}"
    tol = dtype if dtype in (torch.float16, torch.bfloat16) else _stat_dtype(dtype)
    assert_close(got, want, tol, "value mask")


@pytest.mark.parametrize("backend, device, case, dtype", case_params(max_cases=3, dtypes=(torch.float32,)))
def test_lse_path_matches_two_pass_path(backend, device, case, dtype):
    q, k, v, mask = attention_inputs(case, dtype, device)
    weight = instance_weight(case, device)
    _, lse = ops.instance_attention(q, k, v, mask, backend=backend)
    with_lse = ops.instance_value_mask(q, k, weight, mask, lse=lse, backend=backend)
    without = ops.instance_value_mask(q, k, weight, mask, backend="reference")
    assert_close(with_lse, without, dtype, "lse path")


@pytest.mark.parametrize("backend, device", backend_params())
def test_masked_keys_and_empty_images_give_zero(backend, device):
    case = Case(3, 2, 4, 29, 16, padding=True, empty_image=True)
    q, k, _, mask = attention_inputs(case, torch.float32, device)
    weight = instance_weight(case, device)
    out = ops.instance_value_mask(q, k, weight, mask, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.all(out[0] == 0)  # image 0: every key masked
    assert torch.all(out[1] == 0)  # image 1: no real instance
    assert torch.all(out[2][:, mask[2]] == 0)
    # each head's mask sums to the number of real instances over the valid keys
    torch.testing.assert_close(out[2].sum(-1), weight[2].sum().expand(case.h), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend, device", backend_params())
def test_soft_weights_are_linear(backend, device):
    case = Case(2, 2, 5, 31, 8, padding=True)
    q, k, _, mask = attention_inputs(case, torch.float32, device)
    w1 = torch.rand(case.n, case.k, device=device)
    w2 = torch.rand(case.n, case.k, device=device)
    m1 = ops.instance_value_mask(q, k, w1, mask, backend=backend)
    m2 = ops.instance_value_mask(q, k, w2, mask, backend=backend)
    m12 = ops.instance_value_mask(q, k, 2 * w1 + w2, mask, backend=backend)
    torch.testing.assert_close(m12, 2 * m1 + m2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend, device", backend_params())
def test_not_differentiable(backend, device):
    case = Case(2, 2, 3, 15, 8)
    q, k, _, mask = attention_inputs(case, torch.float32, device, requires_grad=True)
    out = ops.instance_value_mask(q, k, instance_weight(case, device), mask, backend=backend)
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("backend, device", backend_params())
def test_opcheck(backend, device):
    case = Case(2, 2, 3, 17, 8, padding=True, empty_image=True)
    q, k, v, mask = attention_inputs(case, torch.float32, device)
    weight = instance_weight(case, device)
    _, lse = ops.instance_attention(q, k, v, mask, backend=backend)
    op = torch.ops.icd.instance_value_mask.default
    torch.library.opcheck(op, (q, k, weight, mask, None, 0.35, 0.7, backend))
    torch.library.opcheck(op, (q, k, weight, mask, lse, case.d**-0.5, 1.0, backend))


@pytest.mark.parametrize("backend, device", backend_params())
def test_float64_where_supported(backend, device):
    if torch.float64 not in dtypes_for(backend, device):
        pytest.skip(f"{backend} has no float64")
    case = Case(2, 2, 4, 23, 8, padding=True, empty_image=True, permuted=True)
    q, k, _, mask = attention_inputs(case, torch.float64, device)
    weight = instance_weight(case, device).double()
    got = ops.instance_value_mask(q, k, weight, mask, temperature=0.8, backend=backend)
    want = ops.instance_value_mask(q, k, weight, mask, temperature=0.8, backend="reference")
    assert got.dtype == torch.float64
    assert_close(got, want, torch.float64, "value mask float64")
