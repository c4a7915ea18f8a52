"""The tensor-core CUDA kernels' algorithms, run on the CPU (ops ``icd_emu::*`` of icd._C).

The CUDA kernels of csrc/cuda/tensor_core_attention.cu cannot run without a GPU. Their
bodies (csrc/tensor_core/attention_tiles.h) and launch sequences (run.h) are compiled into
every icd._C a second time against an emulated warp (emulated_hw.h): host threads for CUDA
threads, mma.sync and ldmatrix computed from the PTX ISA's fragment layouts, and checks
that stop a launch on a shared-memory race, a read of uninitialised shared memory, an
access outside the launch's tensors, two threads writing one output element, or lanes of
a warp at different warp-wide instructions. These tests compare it with the reference on
small awkward shapes, and check the layouts against the PTX ISA's formulas written out
here. What they cannot check is the hardware: that the inline PTX is what the emulation
assumes (the layouts are), timing, and the compiler (tests/test_cuda_gpu.py does, on a GPU).
"""

from __future__ import annotations

import pytest
import torch
from op_cases import TOLERANCES, Case, attention_inputs, dtype_id, head_tensor, instance_weight, key_mask

import icd.ops as ops

emu = torch.ops.icd_emu
DTYPES = [torch.float16, torch.bfloat16]
H100_SMS = 132  # multiprocessors the plans see unless a test asks for fewer or more


# --- the PTX ISA's layouts, written out independently of csrc/tensor_core/fragments.h --------


def _ptx_layout(which: str) -> torch.Tensor:
    """(row, col) of element i of lane l's fragment, as the PTX ISA's formulas give them."""
    rows = []
    for lane in range(32):
        group, tig = lane >> 2, lane % 4
        if which == "a":  # m16n8k16 .f16/.bf16 A: a0..a7
            elements = [(group if i in (0, 1, 4, 5) else group + 8, tig * 2 + (i & 1) + (8 if i >= 4 else 0))
                        for i in range(8)]  # fmt: skip
        elif which == "b":  # B: b0..b3
            elements = [(tig * 2 + (i & 1) + (8 if i >= 2 else 0), group) for i in range(4)]
        else:  # C/D f32: c0..c3
            elements = [(group if i < 2 else group + 8, tig * 2 + (i & 1)) for i in range(4)]
        rows.append(elements)
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize("which", ["a", "b", "c"])
def test_fragment_layouts_are_the_ptx_isa_ones(which):
    assert torch.equal(emu.fragment_layout(which), _ptx_layout(which))


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
def test_ldmatrix_gives_each_lane_the_ptx_isa_elements(trans):
    """ldmatrix.x4 of four 8x8 matrices whose elements hold their own flat index."""
    got = emu.ldmatrix(trans)
    for lane in range(32):
        for m in range(4):
            for h in range(2):
                row, col = (2 * (lane % 4) + h, lane // 4) if trans else (lane // 4, 2 * (lane % 4) + h)
                assert got[lane, m, h] == m * 64 + row * 8 + col, (lane, m, h)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_mma_is_a_matrix_product(dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 8, generator=gen).to(dtype)
    c = torch.randn(16, 8, generator=gen)
    want = a.double() @ b.double() + c.double()
    torch.testing.assert_close(emu.mma(a, b, c).double(), want, rtol=1e-5, atol=1e-5)


# --- the kernels -----------------------------------------------------------------------------

# Awkward sizes: S not a multiple of 64 or 128, K = 1 and K past one 64-row block, D from 8 to
# 100 (every head-dim bucket of 16, 32, 64, 128), masked keys, a fully padded image, permuted
# keys and values. Small: each CUDA thread is a host thread here.
CASES = [
    Case(2, 2, 5, 37, 16, padding=True, empty_image=True),
    Case(1, 1, 1, 1, 8, padding=False),
    Case(2, 1, 70, 150, 32, padding=True, permuted=True),
    Case(1, 2, 4, 19, 64, padding=False, permuted=True),
    Case(1, 1, 3, 40, 100, padding=True),
]


def _tolerance(dtype: torch.dtype) -> dict:
    return TOLERANCES[dtype]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == want.shape, what
    torch.testing.assert_close(got.double(), want.double(), msg=lambda m: f"{what}: {m}", **_tolerance(dtype))


def _reference(q, k, v, mask, scale, grad_out, grad_lse):
    """out, lse and the gradients of sum(out grad_out) + sum(finite lse grad_lse), in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = ops.instance_attention(*leaves, mask, scale=scale, backend="reference")
    finite = torch.isfinite(lse)
    loss = (out * grad_out.double()).sum() + (torch.where(finite, lse, 0) * grad_lse.double()).sum()
    return (out, lse, *torch.autograd.grad(loss, leaves))


def _grads_close(got, want, dtype, what):
    for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"{name} {what}"
        scale = b.abs().max().clamp_min(1.0)  # gradients sum rounding over S and K
        _close(a.double() / scale, b / scale, dtype, f"{name} {what}")


def _emulated(q, k, v, mask, scale, grad_out, grad_lse, multiprocessors=H100_SMS, shared=227 * 1024):
    out, lse = emu.attention_forward(q, k, v, mask, scale, multiprocessors)
    finite_grad_lse = torch.where(torch.isfinite(lse), grad_lse, 0)
    grads = emu.attention_backward(grad_out, finite_grad_lse, q, k, v, mask, out, lse, scale, multiprocessors, shared)
    return (out, lse, *grads)


def _grad_inputs(case: Case, dtype: torch.dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(case.n, case.h, case.k, case.d, generator=gen).to(dtype)
    grad_lse = torch.randn(case.n, case.h, case.k, generator=gen)
    return grad_out, grad_lse


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_attention_matches_reference(case, dtype):
    torch.manual_seed(0)
    q, k, v, mask = attention_inputs(case, dtype, "cpu")
    grad_out, grad_lse = _grad_inputs(case, dtype)
    scale = case.d**-0.5
    got = _emulated(q, k, v, mask, scale, grad_out, grad_lse)
    want = _reference(q, k, v, mask, scale, grad_out, grad_lse)
    assert got[0].dtype == dtype and got[0].is_contiguous() and got[1].dtype == torch.float32
    _close(got[0], want[0], dtype, f"out {case.id}")
    _close(got[1], want[1], torch.float16, f"lse {case.id}")  # lse of low-precision logits
    _grads_close(got[2:], want[2:], dtype, case.id)
    for g, x in zip(got[2:], (q, k, v), strict=True):
        assert g.stride() == x.stride(), "gradients have the strides of their inputs"
    if mask is not None:
        masked = mask[:, None, :, None].expand_as(got[3])
        assert torch.all(got[3][masked] == 0) and torch.all(got[4][masked] == 0), "masked keys get exact 0"
    if case.empty_image:
        assert torch.all(got[0][0] == 0) and torch.all(torch.isneginf(got[1][0]))
        assert all(torch.all(g[0] == 0) for g in got[2:])


def test_attention_with_key_splits_slices_and_query_chunks():
    """Few query tiles and many multiprocessors: the forward splits S (a combine step) and the
    backward cuts it into slices (float32 dq partials summed in order); a small shared memory
    cuts K = 70 into two chunks of 64 rows (dk, dv partials). float16 only: the paths do not
    depend on the dtype, and this is the slowest emulation here."""
    dtype = torch.float16
    # S = 520: nine 64-key tiles (the last partial) in two forward splits, five 128-key backward slices
    # (csrc/tensor_core/plan.h); 700 keys took the same paths at a third more time
    case = Case(1, 2, 70, 520, 16, padding=True, permuted=True)
    torch.manual_seed(1)
    q, k, v, mask = attention_inputs(case, dtype, "cpu")
    mask[0, 130:400] = True  # whole 128-key blocks of padding: skipped
    grad_out, grad_lse = _grad_inputs(case, dtype)
    want = _reference(q, k, v, mask, 0.25, grad_out, grad_lse)
    got = _emulated(q, k, v, mask, 0.25, grad_out, grad_lse, multiprocessors=1000, shared=45_000)
    _close(got[0], want[0], dtype, "out")
    _close(got[1], want[1], torch.float16, "lse")
    _grads_close(got[2:], want[2:], dtype, "split")
    again = _emulated(q, k, v, mask, 0.25, grad_out, grad_lse, multiprocessors=1000, shared=45_000)
    for a, b in zip(got, again, strict=True):
        assert torch.equal(a, b), "results are deterministic"


def test_backward_refuses_a_shared_memory_too_small_for_one_query_block():
    case = Case(1, 1, 3, 20, 16, padding=False)
    q, k, v, _ = attention_inputs(case, torch.float16, "cpu")
    out, lse = emu.attention_forward(q, k, v, None, 0.25, 4)
    with pytest.raises(RuntimeError, match="does not fit in shared_per_block"):
        emu.attention_backward(out, None, q, k, v, None, out, lse, 0.25, 4, 20_000)


@pytest.mark.parametrize("temperature", [1.0, 0.5], ids=["T1", "T0.5"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES[:4], ids=[c.id for c in CASES[:4]])
def test_value_mask_matches_reference(case, dtype, temperature):
    torch.manual_seed(2)
    q = head_tensor(case.n, case.h, case.k, case.d, dtype, "cpu", case.permuted)
    k = head_tensor(case.n, case.h, case.s, case.d, dtype, "cpu", case.permuted)
    weight, mask = instance_weight(case, "cpu"), key_mask(case, "cpu")
    scale = case.d**-0.5
    want = ops.instance_value_mask(q.double(), k.double(), weight.double(), mask, scale, temperature,
                                   backend="reference")  # fmt: skip
    got = emu.value_mask(q, k, weight, mask, None, scale, temperature, H100_SMS)
    _close(got, want.float(), dtype, f"value mask {case.id}")
    if mask is not None:
        assert torch.all(got.permute(0, 2, 1)[mask] == 0), "masked keys get exact 0"
    if temperature == 1.0:  # lse from the forward pass instead of the statistics pass
        _, lse = emu.attention_forward(q, k, k, mask, scale, H100_SMS)
        _close(emu.value_mask(q, k, weight, mask, lse, scale, 1.0, H100_SMS), want.float(), dtype, "with lse")


# --- the non-finite rule ------------------------------------------------------------------------


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_masked_keys_and_zero_weight_slots_are_never_read(poison):
    case = Case(2, 2, 6, 90, 32, padding=True, empty_image=True, permuted=True)
    torch.manual_seed(3)
    q, k, v, mask = attention_inputs(case, torch.float16, "cpu")
    grad_out, grad_lse = _grad_inputs(case, torch.float16)
    keys = mask[:, None, :, None]
    clean = _emulated(q, k, v, mask, 0.2, grad_out, grad_lse)
    poisoned = _emulated(q, k.masked_fill(keys, poison), v.masked_fill(keys, poison), mask, 0.2, grad_out, grad_lse)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), poisoned, clean, strict=True):
        assert torch.equal(a, b), name
    weight = instance_weight(case, "cpu")
    q_bad = q.masked_fill((weight == 0)[:, None, :, None], poison)
    masks = [emu.value_mask(x, k.masked_fill(keys, poison), weight, mask, None, 0.2, 0.5, H100_SMS) for x in (q_bad, q)]
    assert torch.equal(masks[0], masks[1])


def test_nan_reaches_what_it_touches():
    case = Case(2, 2, 6, 90, 32, padding=True, permuted=True)
    torch.manual_seed(4)
    q, k, v, mask = attention_inputs(case, torch.bfloat16, "cpu")
    mask[1] = False
    grad_out, grad_lse = _grad_inputs(case, torch.bfloat16)
    k_bad = k.clone()
    k_bad[1, 0, 50, 3] = float("nan")  # an unmasked key of image 1, head 0
    out, lse, dq, dk, dv = _emulated(q, k_bad, v, mask, 0.2, grad_out, grad_lse)
    assert torch.isnan(out[1, 0]).all() and torch.isnan(lse[1, 0]).all() and torch.isnan(dq[1, 0]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, 1]).all() and torch.isfinite(dq[1, 1]).all()
    q_bad = q.clone()
    q_bad[0, 1, 2, 0] = float("nan")  # one query row
    out, lse, *_ = _emulated(q_bad, k, v, mask, 0.2, grad_out, grad_lse)
    assert torch.isnan(out[0, 1, 2]).all() and torch.isnan(lse[0, 1, 2])
    assert torch.isfinite(out[0, 1, 3]).all() and torch.isfinite(out[1]).all()
    weight = instance_weight(case, "cpu")
    weight[0, 2] = 1.0
    value_mask = emu.value_mask(q_bad, k, weight, mask, None, 0.2, 1.0, H100_SMS)
    assert torch.isnan(value_mask[0, 1][~mask[0]]).all() and torch.all(value_mask[0, 1][mask[0]] == 0)
    assert torch.isfinite(value_mask[0, 0]).all()
