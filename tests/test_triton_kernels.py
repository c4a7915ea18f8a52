"""The Triton kernels' own paths, against the reference: split counts, block edges, strides.

tests/test_instance_attention.py etc. check the public ops on every backend; this file
reaches what they cannot choose: the number of key slices of the split-S passes (empty
slices included), several query blocks, skipped all-zero weight blocks, head dims that are
not powers of two, stride-0 inputs and gradients, large logits. Without a GPU it runs under
TRITON_INTERPRET=1 (tests/conftest.py), where blocks are 16 wide: the sizes below cross them.
"""

from __future__ import annotations

import pytest
import torch

import icd.ops as ops
from icd.ops import reference
from icd.ops.dispatch import triton_interpreted

_CAN_RUN = torch.cuda.is_available() or triton_interpreted()
if not _CAN_RUN or "triton" not in ops.available_backends():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from icd.kernels import feature_mse as mse_kernels  # noqa: E402
from icd.kernels import instance_attention as attention_kernels  # noqa: E402
from icd.kernels import value_mask as value_mask_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = dict(atol=2e-5, rtol=2e-4)  # float32
# On a GPU float32 dots use 3xTF32 (products to ~2^-22): logits of a few hundred lose ~1e-4
LARGE_LOGIT_TOL = TOL if DEVICE.type == "cpu" else dict(atol=2e-4, rtol=1e-3)


def _inputs(n, h, kq, s, d, scale_q=1.0, empty_image=True):
    q = torch.randn(n, h, kq, d, device=DEVICE) * scale_q
    k = torch.randn(n, h, s, d, device=DEVICE)
    v = torch.randn(n, h, s, d, device=DEVICE)
    mask = torch.rand(n, s, device=DEVICE) < 0.3
    if empty_image:
        mask[0] = True
    return q, k, v, mask


def _reference_grads(q, k, v, mask, scale, grad_out, grad_lse):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out, lse = reference.instance_attention(q, k, v, mask, scale)
    finite = torch.isfinite(lse)
    loss = (out * grad_out).sum() + (torch.where(finite, lse, 0.0) * grad_lse).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, (q, k, v))


def _close(actual, expected, what, tol=TOL):
    assert torch.isfinite(actual).all(), f"{what}: NaN/Inf"
    torch.testing.assert_close(
        actual.float(), expected.float(), msg=lambda m: f"{what}: {m}", **tol
    )


@pytest.mark.parametrize("num_splits", [1, 2, 5, 9])
def test_every_split_count_gives_the_same_result(num_splits):
    # S = 50: four key blocks under the interpreter, so 5 and 9 slices leave some empty
    q, k, v, mask = _inputs(2, 1, 5, 50, 16)
    scale = 0.3
    out, lse = attention_kernels.attention_forward(q, k, v, mask, scale, num_splits=num_splits)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grad_lse[0] = 0.0  # rows without keys: lse is -inf, the reference loss ignores them
    ref_out, ref_lse, ref_grads = _reference_grads(q, k, v, mask, scale, grad_out, grad_lse)
    _close(out, ref_out, "out")
    assert torch.equal(lse[0], torch.full_like(lse[0], float("-inf")))
    _close(lse[1], ref_lse[1], "lse")
    grads = attention_kernels.attention_backward(
        grad_out, grad_lse, q, k, v, mask, out, lse, scale, num_splits=num_splits
    )
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        _close(got, want, f"{name} with {num_splits} slices")
    weight = torch.tensor([[1.0, 0.0, 0.5, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0, 2.0]], device=DEVICE)
    got = value_mask_kernels.value_mask(q, k, weight, mask, None, scale, 0.7, num_splits=num_splits)
    _close(got, reference.instance_value_mask(q, k, weight, mask, scale, 0.7), "value mask")


def test_several_query_blocks_and_skipped_weight_blocks():
    # K = 40: three query blocks of 16; weights only in slots 0..9, so the later blocks are skipped
    q, k, v, mask = _inputs(2, 2, 40, 37, 16, empty_image=False)
    scale = 0.25
    weight = torch.zeros(2, 40, device=DEVICE)
    weight[:, :10] = torch.rand(2, 10, device=DEVICE)
    got = ops.instance_value_mask(q, k, weight, mask, scale=scale, backend="triton")
    _close(got, reference.instance_value_mask(q, k, weight, mask, scale), "value mask, K=40")
    weight[1, 33] = 0.05  # a lone small weight in the last (partial) block
    got = ops.instance_value_mask(q, k, weight, mask, scale=scale, backend="triton")
    _close(got, reference.instance_value_mask(q, k, weight, mask, scale), "value mask, last block")

    out, lse = attention_kernels.attention_forward(q, k, v, mask, scale)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    _, _, ref_grads = _reference_grads(q, k, v, mask, scale, grad_out, grad_lse)
    grads = attention_kernels.attention_backward(grad_out, grad_lse, q, k, v, mask, out, lse, scale)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        _close(got, want, f"{name}, K=40")


@pytest.mark.parametrize("head_dim", [12, 24])
def test_head_dims_that_are_not_powers_of_two(head_dim):
    q, k, v, mask = _inputs(2, 1, 3, 21, head_dim)
    (q, k, v) = (t.requires_grad_(True) for t in (q, k, v))
    out, lse = ops.instance_attention(q, k, v, mask, backend="triton")
    ref_out, ref_lse = reference.instance_attention(q, k, v, mask, head_dim**-0.5)
    _close(out, ref_out, "out")
    loss = out.square().sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_grads = torch.autograd.grad(ref_out.square().sum(), (q, k, v))
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        _close(got, want, f"{name}, D={head_dim}")
    weight = torch.ones(2, 3, device=DEVICE)
    got = ops.instance_value_mask(q, k, weight, mask, lse=lse, backend="triton")
    want = reference.instance_value_mask(q.detach(), k.detach(), weight, mask, head_dim**-0.5)
    _close(got, want, f"value mask, D={head_dim}")

    student = torch.randn(1, 2, 30, head_dim, device=DEVICE, requires_grad=True)
    teacher = torch.randn(1, 2, 30, head_dim, device=DEVICE)
    w = torch.rand(1, 2, 30, device=DEVICE)
    loss = ops.masked_feature_mse(student, teacher, w, backend="triton")
    ref = reference.masked_feature_mse(student, teacher, w)
    _close(loss, ref, f"mse loss, D={head_dim}")
    _close(torch.autograd.grad(loss, student)[0], torch.autograd.grad(ref, student)[0], "mse grad")


def test_stride_zero_inputs_and_expanded_gradients():
    n, h, kq, s, d = 2, 3, 4, 23, 8
    # keys shared by every head (stride 0 over h), queries a transposed view of [N, K, h, D]
    k_one = torch.randn(n, 1, s, d, device=DEVICE, requires_grad=True)
    v_one = torch.randn(n, 1, s, d, device=DEVICE, requires_grad=True)
    q_base = torch.randn(n, kq, h, d, device=DEVICE, requires_grad=True)
    mask = torch.rand(n, s, device=DEVICE) < 0.3

    def run(backend):
        q = q_base.transpose(1, 2)
        k, v = k_one.expand(n, h, s, d), v_one.expand(n, h, s, d)
        out, lse = ops.instance_attention(q, k, v, mask, backend=backend)
        # out.sum() and lse.sum() send stride-0 expanded gradients into the backward
        return torch.autograd.grad(out.sum() + lse.sum(), (q_base, k_one, v_one)), out

    got, out = run("triton")
    want, ref_out = run("reference")
    _close(out, ref_out, "out of strided inputs")
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        _close(a, b, f"{name} through expand")

    q = q_base.detach().transpose(1, 2)
    k = k_one.detach().expand(n, h, s, d)
    out, lse = attention_kernels.attention_forward(q, k, k, mask, 0.4)
    grad_out = torch.ones(1, 1, 1, 1, device=DEVICE).expand(n, h, kq, d)
    _, _, ref_grads = _reference_grads(q, k, k, mask, 0.4, grad_out, torch.zeros_like(lse))
    grads = attention_kernels.attention_backward(grad_out, None, q, k, k, mask, out, lse, 0.4)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert a.is_contiguous(), name
        _close(a, b, f"{name} with grad_lse None")


def test_large_logits_stay_finite_and_exact():
    # logits of a few hundred: every block raises the running max, the rescaling must hold
    q, k, v, mask = _inputs(2, 2, 6, 45, 16, scale_q=30.0)
    scale = 1.0
    out, lse = attention_kernels.attention_forward(q, k, v, mask, scale, num_splits=3)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grad_lse[0] = 0.0
    ref_out, ref_lse, ref_grads = _reference_grads(q, k, v, mask, scale, grad_out, grad_lse)
    assert ref_lse[1].abs().max() > 100
    _close(out, ref_out, "out", tol=LARGE_LOGIT_TOL)
    _close(lse[1], ref_lse[1], "lse", tol=dict(atol=1e-4, rtol=2e-5))
    grads = attention_kernels.attention_backward(
        grad_out, grad_lse, q, k, v, mask, out, lse, scale, num_splits=3
    )
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        peak = want.abs().max().clamp_min(1.0)
        _close(got / peak, want / peak, f"{name}, large logits", tol=LARGE_LOGIT_TOL)


def test_gradients_of_rows_without_keys_ignore_grad_lse():
    q, k, v, mask = _inputs(2, 1, 3, 19, 8)
    out, lse = attention_kernels.attention_forward(q, k, v, mask, 0.5)
    grad_lse = torch.full_like(lse, 5.0)  # also on the -inf rows of image 0
    dq, dk, dv = attention_kernels.attention_backward(
        torch.randn_like(out), grad_lse, q, k, v, mask, out, lse, 0.5
    )
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all() and torch.all(g[0] == 0)


@pytest.mark.parametrize("norm", ["ln", "none"])
def test_feature_mse_with_many_tiles_per_program(norm):
    # S = 333 rows of 16: each program walks several tiles; a permuted [S, N, h, D] buffer
    student = torch.randn(333, 1, 2, 16, device=DEVICE).permute(1, 2, 0, 3)
    teacher = torch.randn(333, 1, 2, 16, device=DEVICE).permute(1, 2, 0, 3)
    weight = torch.rand(1, 2, 333, device=DEVICE)
    weight[0, 1] = 0.0  # a head without weight: its denominator is the floor
    for reduction in ("per_head", "global"):
        loss = mse_kernels.feature_mse_forward(student, teacher, weight, norm, 1e-5, reduction)
        grad = mse_kernels.feature_mse_backward(
            torch.tensor(0.5, device=DEVICE), student, teacher, weight, norm, 1e-5, reduction
        )
        s = student.detach().requires_grad_(True)
        ref = reference.masked_feature_mse(s, teacher, weight, norm, 1e-5, reduction)
        (ref_grad,) = torch.autograd.grad(ref * 0.5, s)
        _close(loss, ref, f"loss {norm} {reduction}")
        assert grad.is_contiguous() and torch.all(grad[0, 1] == 0)
        _close(grad, ref_grad, f"grad {norm} {reduction}", tol=dict(atol=1e-7, rtol=2e-4))
