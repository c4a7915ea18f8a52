"""The Triton kernels' own paths, against the reference: split counts, block edges, strides.

tests/test_instance_attention.py etc. check the public ops on every backend; this file
reaches what they cannot choose: the number of key slices of the split-S forward and of the
one-pass backward (empty slices included), several query blocks, skipped all-zero weight
blocks, head dims that are not powers of two, stride-0 inputs and gradients, large logits,
gradients in the inputs' layout, NaN and inf behind the key mask, and every GPU autotune
config pinned in turn. Without a GPU it runs under TRITON_INTERPRET=1 (tests/conftest.py),
where blocks are 16 wide: the sizes below cross them.
"""

from __future__ import annotations

import pytest
import torch
from op_cases import TOLERANCES

import icd.ops as ops
from icd.ops import reference
from icd.ops.dispatch import triton_interpreted

_CAN_RUN = torch.cuda.is_available() or triton_interpreted()
if not _CAN_RUN or "triton" not in ops.available_backends():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from icd.kernels import feature_mse as mse_kernels  # noqa: E402
from icd.kernels import instance_attention as attention_kernels  # noqa: E402
from icd.kernels import tuning  # noqa: E402
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
    for name, a, b, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, k), strict=True):
        assert a.stride() == torch.empty_like(x).stride(), name  # q's transposed layout; k's dense
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
        assert grad.stride() == student.stride() and torch.all(grad[0, 1] == 0)
        _close(grad, ref_grad, f"grad {norm} {reduction}", tol=dict(atol=1e-7, rtol=2e-4))


# --- the one-pass backward at awkward sizes ----------------------------------------------------

AWKWARD = [  # (N, h, K, S, D, permuted k and v, image 0 fully masked)
    pytest.param(1, 1, 1, 1, 8, False, False, id="K1-S1-unmasked"),
    pytest.param(2, 2, 1, 37, 16, True, True, id="K1-empty-image-permuted"),
    pytest.param(2, 1, 17, 50, 24, True, True, id="K17-S50-D24-empty-image-permuted"),
    pytest.param(1, 3, 33, 19, 8, False, False, id="K33-S19-three-query-blocks"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n, h, kq, s, d, permuted, empty_image", AWKWARD)
def test_one_pass_backward_at_awkward_sizes(n, h, kq, s, d, permuted, empty_image, dtype):
    q = torch.randn(n, kq, h, d, device=DEVICE).to(dtype).transpose(1, 2)  # a strided view
    if permuted:  # ICD's layout: [S, N, h, D] buffers viewed as [N, h, S, D]
        k, v = (torch.randn(s, n, h, d, device=DEVICE).to(dtype).permute(1, 2, 0, 3) for _ in range(2))
    else:
        k, v = (torch.randn(n, h, s, d, device=DEVICE).to(dtype) for _ in range(2))
    mask = None
    if s > 1:
        mask = torch.rand(n, s, device=DEVICE) < 0.3
        mask[:, 0] = False
        if empty_image:
            mask[0] = True
    scale = d**-0.5
    out, lse = attention_kernels.attention_forward(q, k, v, mask, scale)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grad_lse[~torch.isfinite(lse)] = 0.0
    ref_out, _, ref_grads = _reference_grads(q, k, v, mask, scale, grad_out, grad_lse)
    tol = TOL if dtype == torch.float32 else TOLERANCES[dtype]
    _close(out, ref_out, f"out {dtype}", tol=tol)
    for num_splits in (None, 3):  # the device-filling default, and more slices than some need
        grads = attention_kernels.attention_backward(
            grad_out, grad_lse, q, k, v, mask, out, lse, scale, num_splits=num_splits
        )
        for name, got, want, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v), strict=True):
            what = f"{name} {dtype} slices={num_splits}"
            assert got.dtype == dtype and got.stride() == torch.empty_like(x).stride(), what
            peak = want.float().abs().max().clamp_min(1.0)
            _close(got.float() / peak, want.float() / peak, what, tol=tol)
            if empty_image:
                assert torch.all(got[0] == 0), f"{what}: the fully masked image"


# --- layouts ---------------------------------------------------------------------------------


def test_gradients_reach_icd_layout_leaves_without_a_copy():
    """dq, dk, dv and the student gradient have the strides of the views they belong to, so
    autograd stores them in .grad of the [S, N, h, D] (and [N, K, h, D]) leaves as they are."""
    n, h, kq, s, d = 2, 2, 5, 37, 16
    q_base = torch.randn(n, kq, h, d, device=DEVICE, requires_grad=True)
    k_base, v_base, student_base = (
        torch.randn(s, n, h, d, device=DEVICE, requires_grad=True) for _ in range(3)
    )
    mask = torch.rand(n, s, device=DEVICE) < 0.3
    views = {
        "q": (q_base, q_base.transpose(1, 2)),
        "k": (k_base, k_base.permute(1, 2, 0, 3)),
        "v": (v_base, v_base.permute(1, 2, 0, 3)),
        "student": (student_base, student_base.permute(1, 2, 0, 3)),
    }
    seen = {}
    for name, (_, view) in views.items():  # record the kernel's gradient, keep no reference to it
        view.register_hook(lambda g, name=name: seen.__setitem__(name, (g.data_ptr(), g.stride())))
    q, k, v, student = (view for _, view in views.values())
    out, lse = ops.instance_attention(q, k, v, mask, backend="triton")
    weight = torch.rand(n, h, s, device=DEVICE)
    loss = ops.masked_feature_mse(student, v.detach(), weight, backend="triton")
    (out.square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum() + loss).backward()
    for name, (base, view) in views.items():
        pointer, stride = seen[name]
        assert stride == view.stride(), f"{name}: gradient strides {stride}, input {view.stride()}"
        assert base.grad.is_contiguous() and base.grad.data_ptr() == pointer, f"{name}: copied"


# --- non-finite inputs -----------------------------------------------------------------------


def _all_results(q, k, v, mask, scale=0.4):
    """out, lse, dq, dk, dv and two value masks (lse reused, T = 0.5) of the Triton kernels."""
    out, lse = attention_kernels.attention_forward(q, k, v, mask, scale)
    gen = torch.Generator(device="cpu").manual_seed(3)
    grad_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    grad_lse = torch.randn(lse.shape, generator=gen).to(lse.device)
    dq, dk, dv = attention_kernels.attention_backward(grad_out, grad_lse, q, k, v, mask, out, lse, scale)
    weight = torch.ones(q.shape[0], q.shape[2], device=q.device)
    vm = value_mask_kernels.value_mask(q, k, weight, mask, lse, scale, 1.0)
    vm_t = value_mask_kernels.value_mask(q, k, weight, mask, None, scale, 0.5)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv, "vm": vm, "vm_t": vm_t}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
def test_masked_keys_never_affect_results_even_when_not_finite(poison, dtype):
    q, k, v, mask = _inputs(2, 2, 5, 40, 16)  # image 0 fully masked
    q, k, v = (t.to(dtype) for t in (q, k, v))
    masked = mask[:, None, :, None].expand_as(k)
    k_bad, v_bad = k.masked_fill(masked, poison), v.masked_fill(masked, poison)
    clean, bad = _all_results(q, k, v, mask), _all_results(q, k_bad, v_bad, mask)
    for name in clean:
        assert torch.equal(bad[name], clean[name]), f"{name}: masked {poison} changed the result"
    assert torch.all(bad["out"][0] == 0) and torch.all(torch.isneginf(bad["lse"][0]))
    for name in ("dq", "dk", "dv", "vm", "vm_t"):
        assert torch.all(bad[name][0] == 0), f"{name} of the fully masked image"
    assert torch.all(bad["dk"][masked] == 0) and torch.all(bad["dv"][masked] == 0)


def test_nan_in_unmasked_inputs_gives_nan():
    q, k, v, mask = _inputs(2, 2, 5, 40, 16)
    key = int((~mask[1]).nonzero()[0])  # an unmasked key of image 1
    k_nan = k.clone()
    k_nan[1, 0, key, 3] = float("nan")  # every row of (image 1, head 0) sees it
    got = _all_results(q, k_nan, v, mask)
    for name in ("out", "lse", "dq", "vm", "vm_t"):
        # the value mask is over keys: its masked keys stay exactly 0 (the non-finite rule)
        reached = got[name][1, 0][~mask[1]] if name.startswith("vm") else got[name][1, 0]
        assert torch.all(torch.isnan(reached)), f"{name}: NaN key not propagated"
        if name.startswith("vm"):
            assert torch.all(got[name][1, 0][mask[1]] == 0), f"{name}: a masked key is not 0"
        assert torch.isfinite(got[name][1, 1]).all(), f"{name}: NaN leaked into another head"
    assert torch.isnan(got["dk"][1, 0]).any() and torch.isnan(got["dv"][1, 0]).any()

    q_nan = q.clone()
    q_nan[1, 1, 2, 0] = float("nan")  # one query row
    got = _all_results(q_nan, k, v, mask)
    assert torch.all(torch.isnan(got["out"][1, 1, 2])) and torch.isnan(got["lse"][1, 1, 2])
    rows = [0, 1, 3, 4]
    assert torch.isfinite(got["out"][1, 1, rows]).all() and torch.isfinite(got["lse"][1, 1, rows]).all()

    v_nan = v.clone()
    v_nan[1, 0, key, 5] = float("nan")  # a value: out is NaN, lse is not
    got = _all_results(q, k, v_nan, mask)
    assert torch.all(torch.isnan(got["out"][1, 0, :, 5])) and torch.isfinite(got["lse"][1]).all()


# --- autotuning ------------------------------------------------------------------------------


def test_every_kernel_is_autotuned_with_coarse_keys():
    tuners = tuning.autotuners()
    assert set(tuners) == set(tuning.FAMILY)
    coarse = {"BLOCK_D", "S_CLASS", "HAS_MASK", "DOT_PRECISION", "WITH_VALUES", "HAS_GRAD_LSE",
              "NORM_STUDENT", "NORM_TEACHER", "FROM_PARTS"}
    for name, t in tuners.items():
        assert set(t.keys) <= coarse, f"{name}: autotune key {t.keys} varies with the batch"


@pytest.mark.parametrize("index", range(max(len(c) for c in tuning.GPU_CONFIGS.values())))
def test_every_gpu_config_pinned_in_turn(index):
    # K = 70 crosses query blocks of 16 to 64; S = 150 crosses key blocks of 32 to 128
    q, k, v, mask = _inputs(2, 1, 70, 150, 16)
    k, v = (t.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for t in (k, v))
    scale = 0.3
    weight = (torch.rand(2, 70, device=DEVICE) < 0.4).float()
    student, teacher = torch.randn_like(k), torch.randn_like(v)
    mse_weight = torch.rand(2, 1, 150, device=DEVICE)
    with tuning.pinned(index):
        out, lse = attention_kernels.attention_forward(q, k, v, mask, scale, num_splits=2)
        grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
        grad_lse[0] = 0.0
        grads = attention_kernels.attention_backward(
            grad_out, grad_lse, q, k, v, mask, out, lse, scale, num_splits=3
        )
        vm = value_mask_kernels.value_mask(q, k, weight, mask, None, scale, 0.7)
        loss = mse_kernels.feature_mse_forward(student, teacher, mse_weight, "ln", 1e-5, "per_head")
        grad_student = mse_kernels.feature_mse_backward(
            torch.tensor(1.0, device=DEVICE), student, teacher, mse_weight, "ln", 1e-5, "per_head"
        )
    ref_out, _, ref_grads = _reference_grads(q, k, v, mask, scale, grad_out, grad_lse)
    _close(out, ref_out, f"out, config {index}")
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        _close(got, want, f"{name}, config {index}")
    _close(vm, reference.instance_value_mask(q, k, weight, mask, scale, 0.7), f"value mask, config {index}")
    s = student.detach().requires_grad_(True)
    ref = reference.masked_feature_mse(s, teacher, mse_weight, "ln", 1e-5, "per_head")
    _close(loss, ref, f"mse, config {index}")
    _close(grad_student, torch.autograd.grad(ref, s)[0], f"mse grad, config {index}",
           tol=dict(atol=1e-7, rtol=2e-4))


def test_autotuning_happens_in_the_first_step_only(monkeypatch):
    """Two configs per kernel (one would skip tuning); K and S change from step to step, as box
    counts and image sizes do in training: only the first step may benchmark."""
    import triton

    monkeypatch.setattr(tuning, "SMALL_PROBLEM_KEYS", 16)  # every S below is "detection-sized"
    monkeypatch.setattr(tuning, "INTERPRETED_RESIDENCY", 8)  # several backward slices: dq is merged
    tuners = tuning.autotuners()
    benchmarked = []
    for name, t in tuners.items():
        config = t.configs[0]
        twin = triton.Config(dict(config.kwargs), num_warps=2 * config.num_warps, num_stages=config.num_stages)
        monkeypatch.setattr(t, "configs", [config, twin])
        monkeypatch.setattr(t, "_bench", lambda *a, name=name, **kw: benchmarked.append(name) or [1.0] * 3)
        t.cache.clear()

    def training_step(kq, s):
        q, k, v, mask = _inputs(2, 2, kq, s, 16, empty_image=False)
        (q, k, v) = (t.requires_grad_(True) for t in (q, k, v))
        out, lse = ops.instance_attention(q, k, v, mask, backend="triton")
        weight = torch.ones(2, kq, device=DEVICE)
        vm = ops.instance_value_mask(q.detach(), k.detach(), weight, mask, lse=lse.detach(), backend="triton")
        loss = ops.masked_feature_mse(v, k.detach(), vm, backend="triton")
        (out.square().sum() + lse.sum() + loss).backward()

    try:
        training_step(5, 40)
        first = len(benchmarked)
        assert set(benchmarked) == set(tuners), "every kernel is tuned in the first step"
        training_step(9, 70)
        training_step(3, 23)
        assert len(benchmarked) == first, f"re-tuned: {benchmarked[first:]}"
    finally:
        for t in tuners.values():
            t.cache.clear()


def test_shared_memory_pruning_keeps_a_config_that_fits():
    limits = {"sm_86/89": 101_376, "sm_80": 166_912, "sm_90": 232_448}
    for family in ("split", "key_block"):
        full = tuning.GPU_CONFIGS[family]
        assert tuning.fitting_configs(family, full, 32, 2, 1 << 30) == full
        for gpu, limit in limits.items():
            kept = tuning.fitting_configs(family, full, 128, 4, limit)  # the worst case: D = 128, fp32
            assert full[-1] in kept, f"{family} on {gpu}: the small fallback config is pruned"
            assert all(tuning.shared_memory_estimate(family, c, 128, 4) <= limit for c in kept)
        estimates = [tuning.shared_memory_estimate(family, c, 128, 4) for c in full]
        assert tuning.fitting_configs(family, full, 128, 4, 1) == [full[estimates.index(min(estimates))]]
        # bigger tiles, wider heads and wider elements never need less
        for c in full:
            assert tuning.shared_memory_estimate(family, c, 64, 2) < tuning.shared_memory_estimate(family, c, 128, 2)
            assert tuning.shared_memory_estimate(family, c, 64, 2) < tuning.shared_memory_estimate(family, c, 64, 4)
    # the pruning hook the autotuners call reads the launch's head-dim block and dtype
    prune = tuning.prune_by_shared_memory("split", "q_ptr")
    cpu = torch.zeros(1)
    assert prune(tuning.GPU_CONFIGS["split"], {"q_ptr": cpu}, BLOCK_D=128) == tuning.GPU_CONFIGS["split"]
