"""The Triton backend on a real GPU at the ICD size, against the reference (skipped without CUDA).

N = 2 images, h = 8 heads, K = 300 instance slots, S = 22,400 keys (P3-P7 of an 800x1333
input), D = 32, ~20% padded keys; bfloat16 included; gradients; an image whose keys are all
padding; [S, N, h, D] buffers viewed as [N, h, S, D] (gradients come back in that layout);
NaN behind the key mask; autotuning only in the first step; torch.compile(fullgraph=True) of a
step that calls the three icd.ops ops; the memory bound (no [N, h, K, S] tensor); and for the
K << S kernels (docs/gpu-kernels.md): bitwise determinism, K = 600 (the chunked backward), the
backward's one-wave grid from the loaded kernel's occupancy, CUDA-graph capture and replay.
"""

from __future__ import annotations

import math

import pytest
import torch
from op_cases import TOLERANCES, assert_close

import icd.ops as ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

N, H, K, S, D = 2, 8, 300, 22_400, 32
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_SCALE = 2.0**16  # torch.amp.GradScaler's initial scale


def _permuted(*shape_nhsd, dtype):
    n, h, s, d = shape_nhsd
    return torch.randn(s, n, h, d, device="cuda", dtype=dtype).permute(1, 2, 0, 3)


def _attention_inputs(dtype, empty_image=False, requires_grad=False):
    q = torch.randn(N, H, K, D, device="cuda", dtype=dtype)
    k = _permuted(N, H, S, D, dtype=dtype)
    v = _permuted(N, H, S, D, dtype=dtype)
    mask = torch.rand(N, S, device="cuda") < 0.2
    if empty_image:
        mask[0] = True
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, mask


def _instance_weight():
    weight = torch.zeros(N, K, device="cuda")
    weight[0, :40] = 1.0
    weight[1, :7] = 1.0
    return weight


def _forward_backward(q, k, v, mask, backend, grad_out, grad_lse):
    out, lse = ops.instance_attention(q, k, v, mask, backend=backend)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (out.float() * grad_out).sum() + (finite * grad_lse).sum()
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, v)))


def _relative(a, b, dtype, what):
    scale = b.float().abs().max().clamp_min(1.0)
    assert torch.isfinite(a).all(), f"{what}: NaN/Inf"
    assert_close(a / scale, b / scale, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("empty_image", [False, True], ids=["padded", "empty-image"])
def test_attention_full_size(dtype, empty_image):
    q, k, v, mask = _attention_inputs(dtype, empty_image, requires_grad=True)
    grad_out = torch.randn(N, H, K, D, device="cuda")
    grad_lse = torch.randn(N, H, K, device="cuda")
    got = _forward_backward(q, k, v, mask, "triton", grad_out, grad_lse)
    want = _forward_backward(q, k, v, mask, "reference", grad_out, grad_lse)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_close(got[0], want[0], dtype, f"out {dtype}")
    assert_close(got[1], want[1], torch.float32, f"lse {dtype}")
    for name, a, b, x in zip(("dq", "dk", "dv"), got[2:], want[2:], (q, k, v), strict=True):
        assert a.dtype == dtype and a.stride() == x.stride(), f"{name}: not in its input's layout"
        _relative(a, b, dtype, f"{name} {dtype}")
    if empty_image:
        assert torch.all(got[0][0] == 0) and torch.all(torch.isneginf(got[1][0]))
        for g in got[2:]:
            assert torch.all(g[0] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_value_mask_full_size(dtype):
    q, k, v, mask = _attention_inputs(dtype, empty_image=True)
    weight = _instance_weight()
    for temperature in (1.0, 0.5):
        got, want = (
            ops.instance_value_mask(q, k, weight, mask, temperature=temperature, backend=backend)
            for backend in ("triton", "reference")
        )
        assert got.dtype == torch.float32
        assert_close(got, want, dtype, f"value mask {dtype} T={temperature}")
    _, lse = ops.instance_attention(q, k, v, mask, backend="triton")
    got = ops.instance_value_mask(q, k, weight, mask, lse=lse, backend="triton")
    want = ops.instance_value_mask(q, k, weight, mask, backend="reference")
    assert_close(got, want, dtype, f"value mask with lse {dtype}")
    assert torch.all(got[0] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_feature_mse_full_size(dtype):
    student = _permuted(N, H, S, D, dtype=dtype).requires_grad_(True)
    teacher = _permuted(N, H, S, D, dtype=dtype) * 2 + 0.5
    weight = torch.rand(N, H, S, device="cuda")
    weight[weight < 0.3] = 0.0
    weight[1, 3] = 0.0  # one head without weight
    for norm in ("ln", "tln", "none"):
        for reduction in ("per_head", "global"):
            what = f"{dtype} {norm} {reduction}"
            losses, grads = [], []
            for backend in ("triton", "reference"):
                loss = ops.masked_feature_mse(student, teacher, weight, norm, reduction=reduction,
                                              backend=backend)
                losses.append(loss.detach())
                # scaled as torch.amp.GradScaler does: unscaled, the float16 gradients of a
                # mean over 10^7 elements (~1e-7) are subnormals with a few bits of precision
                grads.append(torch.autograd.grad(loss * GRAD_SCALE, student)[0])
            assert losses[0].dtype == torch.float32 and losses[0].dim() == 0
            assert_close(losses[0], losses[1], dtype, f"loss {what}")
            assert grads[0].dtype == dtype and grads[0].stride() == student.stride()
            scale = grads[1].float().abs().max().clamp_min(1e-12)
            assert_close(grads[0].float() / scale, grads[1].float() / scale, dtype, f"grad {what}")


def test_masked_nan_keys_change_nothing():
    q, k, v, mask = _attention_inputs(torch.bfloat16, empty_image=True, requires_grad=True)
    grad_out = torch.randn(N, H, K, D, device="cuda")
    grad_lse = torch.randn(N, H, K, device="cuda")
    clean = _forward_backward(q, k, v, mask, "triton", grad_out, grad_lse)
    masked = mask[:, None, :, None].expand(N, H, S, D)
    with torch.no_grad():
        k_bad = k.detach().masked_fill(masked, float("nan")).requires_grad_(True)
        v_bad = v.detach().masked_fill(masked, float("inf")).requires_grad_(True)
    bad = _forward_backward(q, k_bad, v_bad, mask, "triton", grad_out, grad_lse)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), bad, clean, strict=True):
        assert torch.equal(a, b), f"{name}: NaN/inf behind the mask changed it"


def test_autotuning_only_in_the_first_step():
    """Box counts (K) and image sizes (S) change every step; the autotune keys must not."""
    from icd.kernels import tuning

    def step(kq, s):
        q = torch.randn(N, H, kq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = _permuted(N, H, s, D, dtype=torch.bfloat16).requires_grad_(True)
        v = _permuted(N, H, s, D, dtype=torch.bfloat16).requires_grad_(True)
        mask = torch.rand(N, s, device="cuda") < 0.2
        out, lse = ops.instance_attention(q, k, v, mask, backend="triton")
        weight = torch.ones(N, kq, device="cuda")
        vm = ops.instance_value_mask(q.detach(), k.detach(), weight, mask, lse=lse.detach(), backend="triton")
        loss = ops.masked_feature_mse(v, k.detach(), vm, backend="triton")
        (out.float().square().sum() + lse.sum() + loss).backward()

    step(K, S)
    tuners = tuning.autotuners()
    sizes = {name: len(t.cache) for name, t in tuners.items()}
    for kq, s in ((57, 19_803), (300, 26_111), (12, 14_000)):
        step(kq, s)
    torch.cuda.synchronize()
    assert {name: len(t.cache) for name, t in tuners.items()} == sizes, "autotuned again"


def test_no_logits_sized_tensor():
    """fwd + bwd allocate far less than one [N, h, K, S] float32 tensor (430 MB here)."""
    q, k, v, mask = _attention_inputs(torch.bfloat16, requires_grad=True)
    # autotune forward and backward outside the measurement (the autotuner's timing runs
    # allocate a 256 MB cache-flush buffer)
    out, lse = ops.instance_attention(q, k, v, mask, backend="triton")
    torch.autograd.grad(out.float().sum() + lse.sum(), (q, k, v))
    del out, lse
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, lse = ops.instance_attention(q, k, v, mask, backend="triton")
    torch.autograd.grad(out.float().sum() + lse.sum(), (q, k, v))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    logits_bytes = N * H * K * S * 4
    assert extra < logits_bytes / 4, f"peak extra {extra / 2**20:.0f} MiB"


def test_tf32_setting_is_followed_and_close():
    q, k, v, mask = _attention_inputs(torch.float32)
    want, _ = ops.instance_attention(q, k, v, mask, backend="reference")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        got, _ = ops.instance_attention(q, k, v, mask, backend="triton")
    finally:
        torch.set_float32_matmul_precision(previous)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_torch_compile_fullgraph_of_a_distillation_step():
    q, k, v, mask = _attention_inputs(torch.bfloat16, empty_image=True, requires_grad=True)
    student = _permuted(N, H, S, D, dtype=torch.bfloat16).requires_grad_(True)
    weight = _instance_weight()

    def step(q, k, v, student):
        out, lse = ops.instance_attention(q, k, v, mask, backend="triton")
        value_mask = ops.instance_value_mask(q, k, weight, mask, lse=lse, backend="triton")
        distill = ops.masked_feature_mse(student, v.detach(), value_mask, backend="triton")
        return out.float().square().mean() + distill

    compiled = torch.compile(step, fullgraph=True)
    inputs = (q, k, v, student)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    eager_loss = step(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, inputs)
    tol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(loss, eager_loss, **tol)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, **tol)


# --- the K << S kernels (docs/gpu-kernels.md) ----------------------------------------------------


def test_fwd_bwd_and_value_mask_are_bitwise_deterministic():
    q, k, v, mask = _attention_inputs(torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(N, H, K, D, device="cuda")
    grad_lse = torch.randn(N, H, K, device="cuda")
    weight = _instance_weight()
    first = _forward_backward(q, k, v, mask, "triton", grad_out, grad_lse)
    second = _forward_backward(q, k, v, mask, "triton", grad_out, grad_lse)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two runs"
    masks = [ops.instance_value_mask(q.detach(), k.detach(), weight, mask, temperature=0.5, backend="triton")
             for _ in range(2)]
    assert torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_backward_beyond_the_resident_queries(dtype):
    """K = 600 > 8 query blocks of 64: the backward walks K in chunks (dk, dv via a scratch)."""
    from icd.kernels import tuning

    kq, s = 600, 4_096
    assert tuning.query_blocks(kq, tuning.backward_config(kq)[0])[1]
    q = torch.randn(N, H, kq, D, device="cuda", dtype=dtype, requires_grad=True)
    k = _permuted(N, H, s, D, dtype=dtype).requires_grad_(True)
    v = _permuted(N, H, s, D, dtype=dtype).requires_grad_(True)
    mask = torch.rand(N, s, device="cuda") < 0.2
    grad_out = torch.randn(N, H, kq, D, device="cuda")
    grad_lse = torch.randn(N, H, kq, device="cuda")
    got = _forward_backward(q, k, v, mask, "triton", grad_out, grad_lse)
    want = _forward_backward(q, k, v, mask, "reference", grad_out, grad_lse)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want, strict=True):
        _relative(a, b, dtype if name != "lse" else torch.float32, f"{name} K={kq} {dtype}")


def test_backward_grid_is_one_full_wave():
    """The slice count comes from the loaded kernel's registers, shared memory and warps."""
    from icd.kernels import instance_attention, tuning

    q, k, v, mask = _attention_inputs(torch.bfloat16, requires_grad=True)
    out, lse = ops.instance_attention(q, k, v, mask, backend="triton")
    torch.autograd.grad(out.float().sum(), (q, k, v))
    assert instance_attention._backward_residency.cache_info().currsize >= 1, "occupancy not computed"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for residency in range(1, 5):
        slices = tuning.num_backward_slices(q.device, N * H, S, residency)
        assert 1 <= slices and slices * N * H <= residency * sms, "more programs than one wave"
        assert slices == math.ceil(S / tuning.MIN_KEYS_PER_SPLIT) or (slices + 1) * N * H > residency * sms


def test_cuda_graph_capture_and_replay_of_a_step():
    """A distillation step's forward and backward captured in one CUDA graph: every launch on
    the current stream, grids from shapes, nothing read on the host."""
    q, k, v, mask = _attention_inputs(torch.bfloat16, empty_image=True, requires_grad=True)
    student = _permuted(N, H, S, D, dtype=torch.bfloat16).requires_grad_(True)
    weight = _instance_weight()

    def step():
        out, lse = ops.instance_attention(q, k, v, mask, backend="triton")
        value_mask = ops.instance_value_mask(q.detach(), k.detach(), weight, mask, lse=lse.detach(),
                                             backend="triton")
        loss = out.float().square().mean() + ops.masked_feature_mse(student, v.detach(), value_mask,
                                                                     backend="triton")
        return (loss, *torch.autograd.grad(loss, (q, k, v, student)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # autotuning and compilation before the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in (q, k, v, student):
            t.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(captured, eager, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.bfloat16])
