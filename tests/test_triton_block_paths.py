"""The K << S paths of the Triton kernels against the float64 reference (docs/gpu-kernels.md).

Key blocks of padding skipped and fully valid blocks computed without per-element masking,
in one call with partly padded ones, a padding edge exactly on a block boundary, a fully
padded image; the backward's query blocks kept on chip (one, several, and K walked in chunks
past MAX_QUERY_BLOCKS); several key slices merged; the value mask's on-chip compaction of
nonzero-weight slots (scattered, more than one block of them, an image without any); results
bitwise equal run to run; the occupancy arithmetic that sizes the backward's grid. Without a
GPU the kernels run under TRITON_INTERPRET=1, where blocks are 16 wide: the sizes below cross
them. float32 and float16 (bfloat16 is not faithful under the interpreter).
"""

from __future__ import annotations

import types

import pytest
import torch
from op_cases import TOLERANCES

import icd.ops as ops
from icd.ops import reference
from icd.ops.dispatch import triton_interpreted

if not (torch.cuda.is_available() or triton_interpreted()) or "triton" not in ops.available_backends():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from icd.kernels import feature_mse as mse_kernels  # noqa: E402
from icd.kernels import instance_attention as attention_kernels  # noqa: E402
from icd.kernels import tuning  # noqa: E402
from icd.kernels import value_mask as value_mask_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK = 16  # the interpreter's key and query blocks


def _block_mask(n: int, s: int) -> torch.Tensor:
    """bool [n, s]: image 0 has a fully valid block, a block of padding and partly padded ones;
    image 1 is valid up to exactly a block boundary (2 blocks), padding after; image 2 (if
    any) is all padding."""
    mask = torch.rand(n, s, device=DEVICE) < 0.3
    mask[0, :BLOCK] = False
    mask[0, BLOCK:2 * BLOCK] = True
    if n > 1:
        mask[1, :2 * BLOCK] = False
        mask[1, 2 * BLOCK:] = True
    if n > 2:
        mask[2] = True
    return mask


def _reference(q, k, v, mask, scale, grad_out, grad_lse):
    """out, lse and (dq, dk, dv) in float64."""
    q, k, v = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out, lse = reference.instance_attention(q, k, v, mask, scale)
    finite = torch.where(torch.isfinite(lse), lse, 0.0)
    loss = (out * grad_out.double()).sum() + (finite * grad_lse.double()).sum()
    return out, lse, torch.autograd.grad(loss, (q, k, v))


def _relative(got, want, dtype, what):
    assert torch.isfinite(got).all(), f"{what}: NaN/Inf"
    peak = want.abs().max().clamp_min(1.0)
    tol = dict(atol=2e-6, rtol=2e-5) if dtype == torch.float32 else TOLERANCES[dtype]
    torch.testing.assert_close(got.double() / peak, want / peak, msg=lambda m: f"{what}: {m}", **tol)


def _attention_case(n, kq, s, d, dtype, num_splits=None):
    q = torch.randn(n, kq, 2, d, device=DEVICE).to(dtype).transpose(1, 2)  # a strided view
    k, v = (torch.randn(s, n, 2, d, device=DEVICE).to(dtype).permute(1, 2, 0, 3) for _ in range(2))
    mask = _block_mask(n, s)
    scale = d**-0.5
    out, lse = attention_kernels.attention_forward(q, k, v, mask, scale, num_splits=num_splits)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grad_lse[~torch.isfinite(lse)] = 0.0
    ref_out, ref_lse, ref_grads = _reference(q, k, v, mask, scale, grad_out, grad_lse)
    _relative(out, ref_out, dtype, f"out K={kq}")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-5, rtol=1e-5)
    grads = attention_kernels.attention_backward(
        grad_out, grad_lse, q, k, v, mask, out, lse, scale, num_splits=num_splits
    )
    for name, got, want, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v), strict=True):
        assert got.dtype == dtype and got.stride() == torch.empty_like(x).stride(), name
        _relative(got, want, dtype, f"{name} K={kq} slices={num_splits}")
    masked = mask[:, None, :, None].expand_as(k)
    assert torch.all(grads[1][masked] == 0) and torch.all(grads[2][masked] == 0), "dk, dv at padding"
    if n > 2:
        assert all(torch.all(g[2] == 0) for g in grads), "the fully padded image"
    return grads


@pytest.mark.parametrize(
    "kq, s, dtype",
    [(5, 70, torch.float32), (5, 70, torch.float16), (40, 70, torch.float32), (40, 70, torch.float16),
     (130, 50, torch.float32)],
    ids=["K5-float32", "K5-float16", "K40-float32", "K40-float16", "K130-float32"],
)
def test_attention_with_padded_valid_and_partial_key_blocks(kq, s, dtype):
    # K = 5: one query block; 40: three kept on chip; 130: nine, walked in two chunks of eight
    assert tuning.query_blocks(130, BLOCK) == (tuning.MAX_QUERY_BLOCKS, True)
    _attention_case(3, kq, s, 16, dtype)


@pytest.mark.parametrize("num_splits", [1, 5])
def test_backward_chunks_and_slices(monkeypatch, num_splits):
    # two query blocks per chunk: K = 40 is three blocks in two chunks, with the dk, dv scratch
    monkeypatch.setattr(tuning, "MAX_QUERY_BLOCKS", 2)
    assert tuning.query_blocks(40, BLOCK) == (2, True)
    _attention_case(2, 40, 53, 24, torch.float32, num_splits=num_splits)


def test_results_are_bitwise_equal_run_to_run():
    q = torch.randn(2, 1, 20, 16, device=DEVICE)
    k, v = torch.randn(2, 1, 60, 16, device=DEVICE), torch.randn(2, 1, 60, 16, device=DEVICE)
    mask = _block_mask(2, 60)
    weight = (torch.rand(2, 20, device=DEVICE) < 0.4).float()
    student, teacher = torch.randn_like(k), torch.randn_like(k)
    mse_weight = torch.rand(2, 1, 60, device=DEVICE)

    def run():  # three slices each way: partial results merged in a fixed order
        out, lse = attention_kernels.attention_forward(q, k, v, mask, 0.3, num_splits=3)
        grads = attention_kernels.attention_backward(torch.ones_like(out), lse, q, k, v, mask, out, lse, 0.3,
                                                     num_splits=3)
        value_mask = value_mask_kernels.value_mask(q, k, weight, mask, None, 0.3, 0.5, num_splits=3)
        loss = mse_kernels.feature_mse_forward(student, teacher, mse_weight, "ln", 1e-5, "per_head")
        grad = mse_kernels.feature_mse_backward(loss, student, teacher, mse_weight, "ln", 1e-5, "global")
        return out, lse, *grads, value_mask, loss, grad

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("temperature, with_lse, num_splits", [(0.5, False, 1), (0.5, False, 3), (1.0, True, None)])
def test_value_mask_compacts_scattered_nonzero_slots(temperature, with_lse, num_splits):
    n, kq, s, d = 3, 50, 70, 16
    q = torch.randn(n, 2, kq, d, device=DEVICE)
    k = torch.randn(s, n, 2, d, device=DEVICE).permute(1, 2, 0, 3)
    mask = _block_mask(n, s)
    weight = torch.zeros(n, kq, device=DEVICE)
    weight[0, torch.randperm(kq)[:20]] = torch.rand(20, device=DEVICE) + 0.1  # two compacted blocks
    weight[1, [3, 47]] = 1.0  # two scattered slots; image 2 has none (and no keys)
    q_poisoned = q.masked_fill((weight == 0)[:, None, :, None], float("nan"))  # never read
    lse = None
    if with_lse:
        _, lse = attention_kernels.attention_forward(q, k, k, mask, 0.3)
    got = value_mask_kernels.value_mask(q_poisoned, k, weight, mask, lse, 0.3, temperature, num_splits=num_splits)
    want = reference.instance_value_mask(q.double(), k.double(), weight.double(), mask, 0.3, temperature)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert torch.all(got[2] == 0) and torch.all(got[mask[:, None, :].expand_as(got)] == 0)


def test_feature_mse_never_reads_rows_of_weight_zero():
    student = torch.randn(2, 2, 50, 16, device=DEVICE)
    teacher = torch.randn(2, 2, 50, 16, device=DEVICE)
    weight = torch.rand(2, 2, 50, device=DEVICE)
    weight[..., BLOCK:3 * BLOCK] = 0.0
    weight[1, 1] = 0.0  # a head without weight
    zero = (weight == 0)[..., None]
    for reduction in ("per_head", "global"):
        clean = (mse_kernels.feature_mse_forward(student, teacher, weight, "ln", 1e-5, reduction),
                 mse_kernels.feature_mse_backward(torch.tensor(1.0, device=DEVICE), student, teacher, weight,
                                                  "ln", 1e-5, reduction))
        poisoned = (student.masked_fill(zero, float("nan")), teacher.masked_fill(zero, float("inf")))
        dirty = (mse_kernels.feature_mse_forward(*poisoned, weight, "ln", 1e-5, reduction),
                 mse_kernels.feature_mse_backward(torch.tensor(1.0, device=DEVICE), *poisoned, weight,
                                                  "ln", 1e-5, reduction))
        assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])
        assert torch.all(dirty[1][zero.expand_as(student)] == 0)
        s = student.double().requires_grad_(True)
        ref = reference.masked_feature_mse(s, teacher.double(), weight.double(), "ln", 1e-5, reduction)
        torch.testing.assert_close(clean[0].double(), ref.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(clean[1].double(), torch.autograd.grad(ref, s)[0], atol=1e-8, rtol=1e-4)


# --- launch arithmetic (no kernels) ------------------------------------------------------------


def test_query_blocks_and_backward_configs():
    assert tuning.query_blocks(1, 64) == (1, False)
    assert tuning.query_blocks(300, 64) == (5, False)
    assert tuning.query_blocks(512, 64) == (8, False)
    assert tuning.query_blocks(513, 64) == (8, True)
    for kq in (1, 64, 65, 300, 512, 2000):
        block_m, block_n, warps, stages = tuning.backward_config(kq)
        assert block_m >= 16 and block_n >= 16 and warps in (1, 2, 4, 8) and stages >= 1
    with tuning.pinned(2):
        assert tuning.backward_config(300) == tuning.BACKWARD_CONFIGS[2]


def test_specialisation_keeps_what_triton_specialises_on():
    assert [tuning.specialisation(x) for x in (1, 32, 4096, 7, 2**40, 0.3)] == [1, 16, 16, 3, 2**40, 1.0]


@pytest.mark.parametrize(
    "regs, warps, shared, expected",
    [(255, 8, 57_344, 1), (128, 4, 16_384, 4), (64, 4, 0, 8), (40, 4, 200_000, 1), (32, 2, 1_024, 32)],
)
def test_resident_programs_follow_the_occupancy_rules(monkeypatch, regs, warps, shared, expected):
    h100 = types.SimpleNamespace(warp_size=32, regs_per_multiprocessor=65_536, max_threads_per_multi_processor=2_048,
                                 shared_memory_per_multiprocessor=233_472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h100)
    compiled = types.SimpleNamespace(n_regs=regs, metadata=types.SimpleNamespace(num_warps=warps, shared=shared),
                                     _init_handles=lambda: None)
    assert tuning.resident_programs(compiled, torch.device("cuda", 0)) == expected


def test_backward_grid_is_one_wave(monkeypatch):
    monkeypatch.setattr(tuning, "multiprocessor_count", lambda device: 132)
    for heads_total in (1, 16, 64, 131, 132, 500):
        for residency in (1, 2, 3):
            slots = residency * 132
            slices = tuning.num_backward_slices(DEVICE, heads_total, 22_400, residency)
            assert slices >= 1
            assert slices * heads_total <= max(slots, heads_total), "an almost empty second wave"
            assert slices == 1 or 22_400 / slices >= tuning.MIN_KEYS_PER_SPLIT
    assert tuning.num_backward_slices(DEVICE, 16, 22_400, 1) == 8  # the ICD shape on an H100 or H200
    assert tuning.num_backward_slices(DEVICE, 16, tuning.MIN_KEYS_PER_SPLIT, 1) == 1  # no slice under the minimum
