"""icd.ops.masked_feature_mse on every built backend against the reference."""

from __future__ import annotations

import pytest
import torch
from op_cases import Case, assert_close, backend_params, case_params, dtypes_for, head_tensor

import icd.ops as ops

NORMS = ("ln", "tln", "none")
REDUCTIONS = ("per_head", "global")


def _mse_inputs(case: Case, dtype, device, requires_grad: bool = True):
    student = head_tensor(case.n, case.h, case.s, case.d, dtype, device, case.permuted)
    teacher = head_tensor(case.n, case.h, case.s, case.d, dtype, device, case.permuted) * 2 + 0.5
    weight = torch.rand(case.n, case.h, case.s, device=device)
    weight[weight < 0.3] = 0.0
    if case.empty_image:
        weight[0] = 0.0  # an image without instances: its weights are all zero
    student.requires_grad_(requires_grad)
    return student, teacher, weight


def _loss_and_grad(student, teacher, weight, norm, reduction, backend):
    loss = ops.masked_feature_mse(student, teacher, weight, norm=norm, reduction=reduction, backend=backend)
    (grad,) = torch.autograd.grad(loss * 3.0, student)
    return loss.detach(), grad


@pytest.mark.parametrize("backend, device, case, dtype", case_params())
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(backend, device, case, dtype, norm, reduction):
    inputs = _mse_inputs(case, dtype, device)
    loss, grad = _loss_and_grad(*inputs, norm, reduction, backend)
    ref_loss, ref_grad = _loss_and_grad(*inputs, norm, reduction, "reference")
    assert loss.dim() == 0 and loss.dtype == ref_loss.dtype
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    assert_close(loss, ref_loss, dtype, "loss")
    scale = ref_grad.float().abs().max().clamp_min(1e-12)
    assert_close(grad.float() / scale, ref_grad.float() / scale, dtype, "grad")


@pytest.mark.parametrize("backend, device", backend_params())
def test_no_gradient_to_teacher_or_weight(backend, device):
    case = Case(2, 2, 1, 19, 8)
    student, teacher, weight = _mse_inputs(case, torch.float32, device)
    teacher.requires_grad_(True)
    weight.requires_grad_(True)
    loss = ops.masked_feature_mse(student, teacher, weight, backend=backend)
    loss.backward()
    assert student.grad is not None and teacher.grad is None and weight.grad is None


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_zero_weight_gives_zero_loss(backend, device, reduction):
    case = Case(2, 2, 1, 23, 16)
    student, teacher, weight = _mse_inputs(case, torch.float32, device)
    loss, grad = _loss_and_grad(student, teacher, torch.zeros_like(weight), "ln", reduction, backend)
    assert loss.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_float64(backend, device, norm, reduction):
    if torch.float64 not in dtypes_for(backend, device):
        pytest.skip(f"{backend} has no float64")
    case = Case(2, 2, 1, 11, 8, empty_image=True, permuted=True)
    student, teacher, weight = _mse_inputs(case, torch.float64, device)

    def fn(s):
        return ops.masked_feature_mse(s, teacher, weight, norm=norm, reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("backend, device", backend_params())
def test_opcheck(backend, device):
    case = Case(2, 2, 1, 13, 8, empty_image=True)
    student, teacher, weight = _mse_inputs(case, torch.float32, device)
    torch.library.opcheck(
        torch.ops.icd.masked_feature_mse.default, (student, teacher, weight, "ln", 1e-5, "per_head", backend)
    )
    torch.library.opcheck(
        torch.ops.icd.masked_feature_mse_backward.default,
        (torch.tensor(2.0, device=device), student.detach(), teacher, weight, "tln", 1e-5, "global", backend),
    )


def test_reference_definitions_by_hand():
    """The two reductions written out with loops on a tiny input: the oracle's own check."""
    torch.manual_seed(3)
    s, t = torch.randn(1, 2, 3, 4, dtype=torch.float64), torch.randn(1, 2, 3, 4, dtype=torch.float64)
    w = torch.rand(1, 2, 3, dtype=torch.float64)

    def ln(x):
        return (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-5)

    e = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    for h in range(2):
        for i in range(3):
            e[0, h, i] = (ln(s[0, h, i]) - ln(t[0, h, i])) ** 2
    per_head = sum(
        (e[0, h, :, d] * w[0, h]).sum() / w[0, h].sum() for h in range(2) for d in range(4)
    ) / 8
    global_ = (e.mean(-1) * w).sum() / w.sum()
    got_ph = ops.masked_feature_mse(s, t, w, reduction="per_head", backend="reference")
    got_gl = ops.masked_feature_mse(s, t, w, reduction="global", backend="reference")
    torch.testing.assert_close(got_ph, per_head)
    torch.testing.assert_close(got_gl, global_)
