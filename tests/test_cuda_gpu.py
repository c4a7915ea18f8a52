"""The CUDA kernels (backend "cuda") against the reference and the Triton backend, on a GPU.

Skipped without a CUDA device or without the CUDA kernels in icd._C. The shapes are awkward
on purpose: S not a multiple of any key tile, K = 1, head dims from 8 to 128 (100 lies
between two tile buckets), masked keys, a fully padded image, all-zero weights, permuted
(non-contiguous) views, a stride-0 grad_out, and sizes that split the keys over several
blocks (a combine step in the forward pass, a reduction of partial dq in the backward).
Gradients must have the strides of their inputs, and non-finite inputs follow the rule of
tests/test_nonfinite_inputs.py (whose checks run here too, on the cuda backend).
"""

from __future__ import annotations

import pytest
import test_nonfinite_inputs as nonfinite
import torch
from op_cases import (
    Case,
    assert_close,
    attention_inputs,
    head_tensor,
    instance_weight,
    key_mask,
)

import icd.ops as ops
from icd.ops.library import (
    instance_attention_op,
    instance_value_mask_op,
    masked_feature_mse_op,
)

DEVICE = torch.device("cuda")
BACKEND = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda_kernels_ready() -> bool:
    return torch.cuda.is_available() and BACKEND in ops.available_backends()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not _cuda_kernels_ready(), reason="needs a CUDA device and icd._C built with CUDA"
    ),
]

CASES = [
    Case(2, 2, 5, 37, 16, padding=True, empty_image=True),
    Case(1, 1, 1, 1, 8, padding=False),
    Case(2, 2, 3, 45, 8, padding=True, permuted=True),
    Case(3, 1, 7, 70, 32, padding=True, empty_image=True, permuted=True),
    Case(1, 2, 4, 19, 64, padding=False, permuted=True),
    Case(1, 2, 20, 150, 128, padding=True, permuted=True),
    Case(2, 1, 17, 333, 100, padding=True),
    Case(1, 1, 1, 4099, 32, padding=True),
    Case(2, 3, 37, 1031, 32, padding=True, empty_image=True, permuted=True),
    Case(1, 2, 300, 2500, 16, padding=True),
]


def _ids(cases: list[Case]) -> list[str]:
    return [c.id for c in cases]


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _attention_loss_grads(q, k, v, mask, backend: str, seed: int = 1):
    """(out, lse, dq, dk, dv) of a loss that uses out and the finite part of lse."""
    out, lse = ops.instance_attention(q, k, v, mask, backend=backend)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    grad_lse = torch.randn(lse.shape, generator=gen).to(lse.device)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (out.float() * grad_out.float()).sum() + (finite_lse * grad_lse).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return out.detach(), lse.detach(), dq, dk, dv


def _assert_grads_close(got, want, dtype: torch.dtype, what: str) -> None:
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, f"{name} {what}"
        assert torch.isfinite(a).all(), f"{name} {what}: NaN/Inf"
        scale = b.float().abs().max().clamp_min(1.0)  # gradients sum rounding over S
        assert_close(a / scale, b / scale, dtype, f"{name} {what}")


# --- instance_attention -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_attention_matches_reference(case, dtype):
    inputs = attention_inputs(case, dtype, DEVICE, requires_grad=True)
    got = _attention_loss_grads(*inputs, BACKEND)
    want = _attention_loss_grads(*inputs, "reference")
    what = f"{case.id} {dtype}"
    assert got[0].dtype == dtype and got[0].is_contiguous() and got[1].dtype == torch.float32
    assert_close(got[0], want[0], dtype, f"out {what}")
    assert_close(got[1], want[1], torch.float32, f"lse {what}")
    _assert_grads_close(got[2:], want[2:], dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_fully_masked_rows_and_masked_keys_get_zero(dtype):
    case = Case(2, 2, 3, 300, 32, padding=True, empty_image=True, permuted=True)
    q, k, v, mask = attention_inputs(case, dtype, DEVICE, requires_grad=True)
    out, lse, dq, dk, dv = _attention_loss_grads(q, k, v, mask, BACKEND)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    assert torch.isfinite(lse[1]).all() and torch.isfinite(out).all()
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
        assert torch.all(g[0] == 0)
    assert torch.all(dk[1][:, mask[1]] == 0) and torch.all(dv[1][:, mask[1]] == 0)


def test_attention_without_mask_and_with_custom_scale():
    q, k, v, _ = attention_inputs(Case(2, 3, 9, 257, 24, padding=False), torch.float32, DEVICE)
    out, lse = ops.instance_attention(q, k, v, None, scale=0.3, backend=BACKEND)
    ref_out, ref_lse = ops.instance_attention(q, k, v, None, scale=0.3, backend="reference")
    assert_close(out, ref_out, torch.float32, "out")
    assert_close(lse, ref_lse, torch.float32, "lse")


def test_stride_zero_grad_out():
    """out.sum() sends an expanded (stride 0) gradient into the backward kernel."""
    case = Case(2, 2, 6, 129, 32)
    q, k, v, mask = attention_inputs(case, torch.float32, DEVICE, requires_grad=True)
    grads = []
    for backend in (BACKEND, "reference"):
        out, _ = ops.instance_attention(q, k, v, mask, backend=backend)
        grads.append(torch.autograd.grad(out.sum(), (q, k, v)))
    _assert_grads_close(grads[0], grads[1], torch.float32, "stride-0 grad_out")


def test_gradient_of_q_only():
    q, k, v, mask = attention_inputs(Case(1, 2, 5, 77, 16), torch.float32, DEVICE)
    q.requires_grad_(True)
    grads = []
    for backend in (BACKEND, "reference"):
        out, _ = ops.instance_attention(q, k, v, mask, backend=backend)
        grads.append(torch.autograd.grad(out.sum(), q)[0])
    assert_close(grads[0], grads[1], torch.float32, "dq")


# --- instance_value_mask ------------------------------------------------------------------


def _value_mask_inputs(case: Case, dtype: torch.dtype):
    q = head_tensor(case.n, case.h, case.k, case.d, dtype, DEVICE, case.permuted)
    k = head_tensor(case.n, case.h, case.s, case.d, dtype, DEVICE, case.permuted)
    return q, k, instance_weight(case, DEVICE), key_mask(case, DEVICE)


@pytest.mark.parametrize("temperature", [1.0, 0.5], ids=["T1", "T0.5"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_value_mask_matches_reference(case, dtype, temperature):
    q, k, weight, mask = _value_mask_inputs(case, dtype)
    got = ops.instance_value_mask(q, k, weight, mask, temperature=temperature, backend=BACKEND)
    want = ops.instance_value_mask(
        q, k, weight, mask, temperature=temperature, backend="reference"
    )
    assert got.dtype == torch.float32 and got.grad_fn is None
    assert_close(got, want, dtype, f"value mask {case.id} {dtype} T={temperature}")
    if case.padding and mask is not None:
        assert torch.all(got.permute(0, 2, 1)[mask] == 0), "masked keys must get 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_value_mask_with_lse_from_attention(dtype):
    case = Case(2, 2, 11, 1031, 32, padding=True, empty_image=True, permuted=True)
    q, k, weight, mask = _value_mask_inputs(case, dtype)
    _, lse = ops.instance_attention(q, k, k, mask, backend=BACKEND)
    got = ops.instance_value_mask(q, k, weight, mask, lse=lse, backend=BACKEND)
    want = ops.instance_value_mask(q, k, weight, mask, backend="reference")
    assert_close(got, want, dtype, f"value mask with lse {dtype}")


def test_value_mask_all_zero_weight_is_zero():
    q, k, weight, mask = _value_mask_inputs(Case(2, 2, 5, 100, 32), torch.float32)
    got = ops.instance_value_mask(q, k, torch.zeros_like(weight), mask, backend=BACKEND)
    assert torch.all(got == 0)


# --- masked_feature_mse -------------------------------------------------------------------

MSE_SHAPES = [(2, 3, 37, 32), (1, 1, 1, 8), (2, 2, 1031, 16), (1, 2, 70, 100), (1, 1, 333, 160)]


def _mse_inputs(n, h, s, d, dtype, permuted: bool):
    student = head_tensor(n, h, s, d, dtype, DEVICE, permuted) * 2 + 0.5
    teacher = head_tensor(n, h, s, d, dtype, DEVICE, permuted)
    weight = torch.rand(n, h, s, device=DEVICE) * (torch.rand(n, h, s, device=DEVICE) < 0.7)
    return student.requires_grad_(True), teacher, weight


@pytest.mark.parametrize("reduction", ["per_head", "global"])
@pytest.mark.parametrize("norm", ["ln", "tln", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", MSE_SHAPES, ids=lambda s: "N{}h{}S{}D{}".format(*s))
def test_feature_mse_matches_reference(shape, dtype, norm, reduction):
    student, teacher, weight = _mse_inputs(*shape, dtype, permuted=shape[2] % 2 == 1)
    results = []
    for backend in (BACKEND, "reference"):
        loss = ops.masked_feature_mse(
            student, teacher, weight, norm, reduction=reduction, backend=backend
        )
        results.append((loss.detach(), torch.autograd.grad(loss * 1.7, student)[0]))
    (loss, grad), (ref_loss, ref_grad) = results
    what = f"{shape} {dtype} {norm} {reduction}"
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref_loss, dtype, f"loss {what}")
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    # divided in float32: 1e-30 (an all-zero reference gradient) is 0 in float16
    scale = ref_grad.float().abs().max().clamp_min(1e-30)
    assert_close(grad.float() / scale, ref_grad.float() / scale, dtype, f"grad {what}")


@pytest.mark.parametrize("reduction", ["per_head", "global"])
def test_feature_mse_all_zero_weight(reduction):
    student, teacher, weight = _mse_inputs(2, 2, 50, 32, torch.float32, permuted=False)
    zero = torch.zeros_like(weight)
    loss = ops.masked_feature_mse(student, teacher, zero, reduction=reduction, backend=BACKEND)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == 0.0 and torch.all(grad == 0)


# --- agreement with the Triton backend ----------------------------------------------------

needs_triton = pytest.mark.skipif(
    "triton" not in ops.available_backends(), reason="the triton backend is not installed"
)
BOTH = (BACKEND, "triton")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", CASES[-3:], ids=_ids(CASES[-3:]))
def test_cuda_agrees_with_triton(case, dtype):
    inputs = attention_inputs(case, dtype, DEVICE, requires_grad=True)
    got = _attention_loss_grads(*inputs, BACKEND)
    want = _attention_loss_grads(*inputs, "triton")
    assert_close(got[0], want[0], dtype, f"out {case.id}")
    assert_close(got[1], want[1], torch.float32, f"lse {case.id}")
    _assert_grads_close(got[2:], want[2:], dtype, f"{case.id} vs triton")

    q, k, weight, mask = _value_mask_inputs(case, dtype)
    masks = [ops.instance_value_mask(q, k, weight, mask, backend=b) for b in BOTH]
    assert_close(masks[0], masks[1], dtype, f"value mask {case.id} vs triton")

    student, teacher, mse_w = _mse_inputs(case.n, case.h, case.s, case.d, dtype, case.permuted)
    losses = [ops.masked_feature_mse(student, teacher, mse_w, backend=b) for b in BOTH]
    assert_close(losses[0].detach(), losses[1].detach(), dtype, f"mse {case.id} vs triton")


# --- gradients in the inputs' layout ----------------------------------------------------------

LAYOUTS = {
    "sequence": lambda x: x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3),  # [L, N, h, D]
    "tokens": lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),  # [N, L, h, D]
}
# one key split, and enough keys for several (the backward then reduces partial dq)
STRIDE_CASES = [Case(2, 3, 7, 300, 16, padding=True), Case(1, 2, 3, 4099, 32, padding=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", STRIDE_CASES, ids=_ids(STRIDE_CASES))
def test_gradients_have_the_inputs_strides(case, layout, dtype):
    q, k, v, mask = (t if t is None or t.dtype == torch.bool else LAYOUTS[layout](t)
                     for t in attention_inputs(case, dtype, DEVICE))  # fmt: skip
    out, lse = torch.ops.icd_ext.attention_forward(q, k, v, mask, 0.25)
    grad_out = torch.randn_like(out)
    grads = torch.ops.icd_ext.attention_backward(grad_out, None, q, k, v, mask, out, lse, 0.25)
    for name, g, x in zip(("dq", "dk", "dv"), grads, (q, k, v), strict=True):
        assert g.stride() == x.stride(), f"{name}: {g.stride()} vs the input's {x.stride()}"
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref_out, _ = ops.instance_attention(*leaves, mask, scale=0.25, backend="reference")
    want = torch.autograd.grad(ref_out, leaves, grad_out.float())
    _assert_grads_close(grads, [w.to(dtype) for w in want], dtype, f"{case.id} {layout}")

    student, teacher, weight = _mse_inputs(case.n, case.h, case.s, case.d, dtype, permuted=False)
    student, teacher = LAYOUTS[layout](student.detach()), LAYOUTS[layout](teacher)
    grad = torch.ops.icd_ext.feature_mse_backward(
        torch.tensor(1.0, device=DEVICE), student, teacher, weight, "ln", 1e-5, "per_head"
    )
    assert grad.stride() == student.stride()
    leaf = student.detach().float().requires_grad_()
    (want,) = torch.autograd.grad(ops.masked_feature_mse(leaf, teacher.float(), weight, backend="reference"), leaf)
    scale = want.abs().max()
    assert_close(grad / scale, (want / scale).to(dtype), dtype, f"mse grad {case.id} {layout}")


# --- non-finite inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("poison", nonfinite.POISONS)
def test_nonfinite_rule(poison):
    """The masked-part checks of tests/test_nonfinite_inputs.py on the cuda backend."""
    nonfinite.test_masked_keys_never_reach_attention(BACKEND, DEVICE, poison)
    nonfinite.test_masked_keys_never_reach_value_mask(BACKEND, DEVICE, poison)
    nonfinite.test_zero_weight_slots_never_reach_value_mask(BACKEND, DEVICE, poison)
    nonfinite.test_zero_weight_locations_never_reach_feature_mse(BACKEND, DEVICE, poison)


def test_nan_propagates():
    """The NaN checks of tests/test_nonfinite_inputs.py on the cuda backend."""
    nonfinite.test_masked_keys_are_zero_in_value_mask_of_a_nan_row(BACKEND, DEVICE)
    nonfinite.test_nan_in_an_unmasked_key_gives_nan(BACKEND, DEVICE)
    nonfinite.test_nan_in_a_query_row_gives_nan_in_that_row(BACKEND, DEVICE)
    nonfinite.test_nan_in_an_unmasked_value_gives_nan_in_that_column(BACKEND, DEVICE)
    nonfinite.test_nan_in_value_mask_inputs_gives_nan(BACKEND, DEVICE)
    nonfinite.test_nan_in_weighted_features_gives_nan(BACKEND, DEVICE)


@pytest.mark.parametrize("poison", nonfinite.POISONS)
def test_nonfinite_rule_with_split_keys(poison):
    """S = 4099, K = 3: the forward combines key splits and the backward sums partial dq, and
    both keep the rule (masked keys never read, a NaN row stays NaN through the combine)."""
    case = Case(2, 2, 3, 4099, 32, padding=True, permuted=True)
    q, k, v, mask = attention_inputs(case, torch.float32, DEVICE)
    mask[0, 1000:2500] = True  # whole splits of masked keys
    mask[1] = False

    def run(q, k, v):
        return _attention_loss_grads(*(t.detach().requires_grad_() for t in (q, k, v)), mask, BACKEND)

    clean = run(q, k, v)
    keys = mask[:, None, :, None]
    got = run(q, k.masked_fill(keys, poison), v.masked_fill(keys, poison))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, clean, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    k_bad = k.clone()
    k_bad[1, 0, 4000, 5] = float("nan")  # an unmasked key in the last split of image 1, head 0
    out, lse, dq, dk, dv = run(q, k_bad, v)
    assert torch.isnan(out[1, 0]).all() and torch.isnan(lse[1, 0]).all() and torch.isnan(dq[1, 0]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, 1]).all() and torch.isfinite(dq[0]).all()
    assert (dk[0][:, mask[0]] == 0).all() and (dv[0][:, mask[0]] == 0).all()


# --- argument errors and torch.library checks ---------------------------------------------


def test_rejects_float64_and_too_large_head_dim():
    q, k, v, _ = attention_inputs(Case(1, 1, 2, 9, 8, padding=False), torch.float64, DEVICE)
    with pytest.raises(TypeError, match="float64"):
        ops.instance_attention(q, k, v, backend=BACKEND)
    q, k, v, _ = attention_inputs(Case(1, 1, 2, 9, 129, padding=False), torch.float32, DEVICE)
    with pytest.raises(ValueError, match="head dim D = 129"):  # refused in Python, before the kernel
        ops.instance_attention(q, k, v, backend=BACKEND)
    with pytest.raises(ValueError, match="head dim D = 129"):
        ops.instance_value_mask(q, k, torch.ones(1, 2, device=DEVICE), backend=BACKEND)


def test_kernel_checks_name_the_argument():
    q, k, v, _ = attention_inputs(Case(1, 1, 2, 9, 8, padding=False), torch.float32, DEVICE)
    with pytest.raises(RuntimeError, match="`v` has shape"):
        torch.ops.icd_ext.attention_forward(q, k, v[:, :, :5], None, 1.0)
    with pytest.raises(RuntimeError, match="`key_padding_mask` has dtype"):
        torch.ops.icd_ext.attention_forward(q, k, v, torch.zeros(1, 9, device=DEVICE), 1.0)
    with pytest.raises(RuntimeError, match="`weight` has dtype"):
        half_weight = torch.ones(1, 2, device=DEVICE, dtype=torch.float16)
        torch.ops.icd_ext.value_mask(q, k, half_weight, None, None, 1.0, 1.0)


def test_opcheck():
    case = Case(2, 2, 5, 70, 16, padding=True, empty_image=True, permuted=True)
    q, k, v, mask = attention_inputs(case, torch.float32, DEVICE, requires_grad=True)
    torch.library.opcheck(instance_attention_op, (q, k, v, mask, 0.25, BACKEND))
    weight = instance_weight(case, DEVICE)
    mask_args = (q.detach(), k.detach(), weight, mask, None, 0.25, 1.0, BACKEND)
    torch.library.opcheck(instance_value_mask_op, mask_args)
    student, teacher, mse_weight = _mse_inputs(2, 2, 70, 16, torch.float32, permuted=True)
    mse_args = (student, teacher, mse_weight, "ln", 1e-5, "per_head", BACKEND)
    torch.library.opcheck(masked_feature_mse_op, mse_args)


# --- the tensor-core kernels (float16 and bfloat16 on sm_80 and later) ---------------------

needs_tensor_cores = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
    reason="the tensor-core kernels need compute capability 8.0 or later",
)
HALF_DTYPES = [torch.float16, torch.bfloat16]


@needs_tensor_cores
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=_dtype_id)
def test_tensor_cores_match_their_cpu_emulation(dtype):
    """The GPU runs what tests/test_tensor_core_emulation.py checked on the CPU: the same
    bodies, so the results agree to the rounding of exp2 and of the summation order inside
    an mma (both float32)."""
    case = Case(2, 2, 70, 300, 32, padding=True, empty_image=True, permuted=True)
    q, k, v, mask = attention_inputs(case, dtype, DEVICE)
    grad_out = torch.randn_like(q)
    out, lse = torch.ops.icd_ext.attention_forward(q, k, v, mask, 0.2)
    grads = torch.ops.icd_ext.attention_backward(grad_out, None, q, k, v, mask, out, lse, 0.2)
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    cpu = [t.cpu() if t is not None else None for t in (q, k, v, mask, grad_out)]
    e_out, e_lse = torch.ops.icd_emu.attention_forward(*cpu[:4], 0.2, sms)
    e_grads = torch.ops.icd_emu.attention_backward(cpu[4], None, *cpu[:4], e_out, e_lse, 0.2, sms, 227 * 1024)
    assert_close(out.cpu(), e_out, dtype, "out")
    assert_close(lse.cpu(), e_lse, torch.float32, "lse")
    _assert_grads_close([g.cpu() for g in grads], e_grads, dtype, "vs emulation")


@needs_tensor_cores
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=_dtype_id)
def test_tensor_cores_with_query_chunks(dtype):
    """K = 300 at D = 128 does not fit in one block's shared memory: the backward cuts the
    queries into chunks and sums float32 dk, dv partials."""
    case = Case(1, 2, 300, 700, 128, padding=True, permuted=True)
    inputs = attention_inputs(case, dtype, DEVICE, requires_grad=True)
    got = _attention_loss_grads(*inputs, BACKEND)
    want = _attention_loss_grads(*inputs, "reference")
    assert_close(got[0], want[0], dtype, "out")
    _assert_grads_close(got[2:], want[2:], dtype, "query chunks")


@needs_tensor_cores
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=_dtype_id)
def test_tensor_cores_are_deterministic(dtype):
    case = Case(2, 8, 300, 5000, 32, padding=True, permuted=True)
    inputs = attention_inputs(case, dtype, DEVICE, requires_grad=True)
    first = _attention_loss_grads(*inputs, BACKEND)
    second = _attention_loss_grads(*inputs, BACKEND)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    q, k, weight, mask = _value_mask_inputs(case, dtype)
    masks = [ops.instance_value_mask(q, k, weight, mask, temperature=0.5, backend=BACKEND) for _ in range(2)]
    assert torch.equal(masks[0], masks[1])


@needs_tensor_cores
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=_dtype_id)
def test_tensor_cores_in_a_cuda_graph(dtype):
    """Forward, backward and value mask captured once and replayed on new inputs."""
    case = Case(2, 4, 300, 3000, 32, padding=True)
    q, k, v, mask = attention_inputs(case, dtype, DEVICE)
    grad_out = torch.randn_like(q)
    weight = instance_weight(case, DEVICE)

    def step():
        out, lse = torch.ops.icd_ext.attention_forward(q, k, v, mask, 0.2)
        grads = torch.ops.icd_ext.attention_backward(grad_out, None, q, k, v, mask, out, lse, 0.2)
        return out, lse, *grads, torch.ops.icd_ext.value_mask(q, k, weight, mask, None, 0.2, 0.5)

    step()  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in (q, k, v, grad_out):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, step(), strict=True):
        assert torch.equal(a, b)


@needs_tensor_cores
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=_dtype_id)
def test_tensor_cores_with_no_instances_or_no_keys(dtype):
    """K = 0 (an image batch without instances) and S = 0 return before any launch."""
    for k_slots, keys in ((0, 50), (3, 0)):
        q = torch.randn(2, 2, k_slots, 32, device=DEVICE, dtype=dtype, requires_grad=True)
        k = torch.randn(2, 2, keys, 32, device=DEVICE, dtype=dtype, requires_grad=True)
        out, lse = ops.instance_attention(q, k, k, backend=BACKEND)
        want_out, want_lse = ops.instance_attention(q, k, k, backend="reference")
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
        dq, dk = torch.autograd.grad(out.float().sum(), (q, k), allow_unused=False)
        assert torch.all(dq == 0) and torch.all(dk == 0)
        weight = torch.ones(2, k_slots, device=DEVICE)
        assert torch.all(ops.instance_value_mask(q.detach(), k.detach(), weight, backend=BACKEND) == 0)
