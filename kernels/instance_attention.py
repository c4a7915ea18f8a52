"""Fused instance attention (docs/method.md 3.1): flash-decoding forward, recomputing backward.

K (instance queries, <= 300) is small and S (keys of every FPN level, 20k-90k) is large, so
the forward splits the keys into slices and runs one program per (slice, query block, head):
each keeps an online softmax over its slice and writes un-normalised partial results, which
a second small kernel merges into out and lse. The backward never stores probabilities: it
recomputes them from q, k and lse. dk and dv come from one program per key block that loops
over the few query blocks (no atomics); dq comes from a split-S pass whose partial sums a
small kernel adds up. Logits are kept in base 2 (scaled by log2(e)) so that exp is exp2.

Shapes: q [N, h, K, D]; k, v [N, h, S, D]; key_padding_mask bool [N, S] (True = ignore);
out [N, h, K, D]; lse [N, h, K] float32. Inputs of any strides; outputs contiguous.
A row whose keys are all masked gets out 0, lse -inf and zero gradients.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning
from .tiles import dense_offsets, head_base, key_is_valid, load_rows

LOG2E = math.log2(math.e)

# --- forward -----------------------------------------------------------------------------------


@triton.autotune(configs=tuning.SPLIT_CONFIGS, key=[*tuning.ATTENTION_KEY, "WITH_VALUES"])
@triton.jit
def _forward_split_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    stride_qn, stride_qh, stride_qk, stride_qd,
    stride_kn, stride_kh, stride_ks, stride_kd,
    stride_vn, stride_vh, stride_vs, stride_vd,
    heads, num_queries, num_keys, head_dim, qk_scale, num_splits,
    S_BUCKET, K_BUCKET,
    HAS_MASK: tl.constexpr, WITH_VALUES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online softmax of one query block over one slice of the keys.

    Writes the slice's row max m (base 2), row sum l = sum 2^(x - m) and, WITH_VALUES, the
    un-normalised sum_s 2^(x_s - m) v_s, into [N h, splits, K(, D)] float32 buffers.
    """
    pid_split = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_nh = tl.program_id(2)
    n = pid_nh // heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = load_rows(head_base(q_ptr, pid_nh, heads, stride_qn, stride_qh), rows, dims,
                  stride_qk, stride_qd, num_queries, head_dim)
    k_base = head_base(k_ptr, pid_nh, heads, stride_kn, stride_kh)
    v_base = head_base(v_ptr, pid_nh, heads, stride_vn, stride_vh)

    blocks_per_split = tl.cdiv(tl.cdiv(num_keys, BLOCK_N), num_splits)
    start = pid_split * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, num_keys)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for key_start in range(start, end, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        valid = key_is_valid(mask_ptr, n, keys, num_keys, HAS_MASK)
        k = load_rows(k_base, keys, dims, stride_ks, stride_kd, num_keys, head_dim)
        x = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        x = tl.where(valid[None, :], x, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(x, 1))
        # rows that have seen no valid key yet keep max -inf: shift by 0 so exp2 gives 0, not NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(row_max - shift)
        p = tl.exp2(x - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        if WITH_VALUES:
            v = load_rows(v_base, keys, dims, stride_vs, stride_vd, num_keys, head_dim)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    part_rows = (pid_nh * num_splits + pid_split) * num_queries + rows
    row_ok = rows < num_queries
    tl.store(part_max_ptr + part_rows, row_max, mask=row_ok)
    tl.store(part_sum_ptr + part_rows, row_sum, mask=row_ok)
    if WITH_VALUES:
        ptrs = part_out_ptr + dense_offsets(part_rows, dims, head_dim)
        tl.store(ptrs, acc, mask=row_ok[:, None] & (dims[None, :] < head_dim))


@triton.autotune(configs=tuning.ROW_CONFIGS, key=["BLOCK_D", "K_BUCKET", "WITH_VALUES"])
@triton.jit
def _forward_merge_kernel(
    part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, lse_ptr,
    num_queries, head_dim, num_splits,
    K_BUCKET,
    WITH_VALUES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the per-slice softmax states: lse [N h, K] (natural log) and out [N h, K, D]."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < num_queries
    tile_ok = row_ok[:, None] & (dims[None, :] < head_dim)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(0, num_splits):
        part_rows = (pid_nh * num_splits + split) * num_queries + rows
        split_max = tl.load(part_max_ptr + part_rows, mask=row_ok, other=float("-inf"))
        split_sum = tl.load(part_sum_ptr + part_rows, mask=row_ok, other=0.0)
        new_max = tl.maximum(row_max, split_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        old_scale = tl.exp2(row_max - shift)
        split_scale = tl.exp2(split_max - shift)
        row_sum = row_sum * old_scale + split_sum * split_scale
        if WITH_VALUES:
            ptrs = part_out_ptr + dense_offsets(part_rows, dims, head_dim)
            split_out = tl.load(ptrs, mask=tile_ok, other=0.0)
            acc = acc * old_scale[:, None] + split_out * split_scale[:, None]
        row_max = new_max

    has_keys = row_sum > 0
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    lse = tl.where(has_keys, (row_max + tl.log2(safe_sum)) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + pid_nh * num_queries + rows, lse, mask=row_ok)
    if WITH_VALUES:
        out = tl.where(has_keys[:, None], acc / safe_sum[:, None], 0.0)
        ptrs = out_ptr + dense_offsets(pid_nh * num_queries + rows, dims, head_dim)
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=tile_ok)


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def key_mask_argument(key_padding_mask: Tensor | None, fallback: Tensor) -> tuple[Tensor, bool]:
    """(pointer tensor, HAS_MASK): the bool [N, S] mask read as bytes, or any tensor if None."""
    if key_padding_mask is None:
        return fallback, False
    return key_padding_mask.contiguous().view(torch.uint8), True


def softmax_statistics(
    q: Tensor,
    k: Tensor,
    v: Tensor | None,
    key_padding_mask: Tensor | None,
    scale: float,
    num_splits: int | None = None,
) -> tuple[Tensor | None, Tensor]:
    """(out or None, lse) of softmax(scale q k^T) over the keys, by split-S flash decoding.

    With ``v`` None only lse [N, h, K] float32 is computed (the value mask's first pass).
    ``num_splits`` overrides the number of key slices (tests); by default it fills the GPU.
    """
    n, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    nh = n * heads
    if num_splits is None:
        num_splits = tuning.num_key_splits(q.device, nh, num_queries, num_keys)
    with_values = v is not None
    f32 = dict(device=q.device, dtype=torch.float32)
    part_max = torch.empty((nh, num_splits, num_queries), **f32)
    part_sum = torch.empty((nh, num_splits, num_queries), **f32)
    part_out = part_max  # a placeholder pointer when only lse is wanted
    if with_values:
        part_out = torch.empty((nh, num_splits, num_queries, head_dim), **f32)
    values = v if with_values else k
    mask, has_mask = key_mask_argument(key_padding_mask, q)
    bd = tuning.block_d(head_dim)
    k_bucket = tuning.bucket(num_queries)

    def split_grid(meta):
        return (num_splits, triton.cdiv(num_queries, meta["BLOCK_M"]), nh)

    _forward_split_kernel[split_grid](
        q, k, values, mask, part_out, part_max, part_sum,
        *_strides(q), *_strides(k), *_strides(values),
        heads, num_queries, num_keys, head_dim, scale * LOG2E, num_splits,
        tuning.bucket(num_keys), k_bucket,
        HAS_MASK=has_mask, WITH_VALUES=with_values, DOT_PRECISION=tuning.dot_precision(q.dtype),
        BLOCK_D=bd,
    )
    out = None
    if with_values:
        out = torch.empty((n, heads, num_queries, head_dim), device=q.device, dtype=q.dtype)
    lse = torch.empty((n, heads, num_queries), **f32)

    def merge_grid(meta):
        return (triton.cdiv(num_queries, meta["BLOCK_M"]), nh)

    _forward_merge_kernel[merge_grid](
        part_out, part_max, part_sum, out if with_values else lse, lse,
        num_queries, head_dim, num_splits, k_bucket,
        WITH_VALUES=with_values, BLOCK_D=bd,
    )
    return out, lse


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """out [N, h, K, D] (q's dtype) and lse [N, h, K] float32 of softmax(scale q k^T) v."""
    out, lse = softmax_statistics(q, k, v, key_padding_mask, scale, num_splits)
    assert out is not None
    return out, lse


# --- backward ----------------------------------------------------------------------------------


@triton.autotune(configs=tuning.ROW_CONFIGS, key=["BLOCK_D", "K_BUCKET", "HAS_GRAD_LSE"])
@triton.jit
def _backward_delta_kernel(
    grad_out_ptr, out_ptr, grad_lse_ptr, delta_ptr,
    stride_gn, stride_gh, stride_gk, stride_gd,
    stride_on, stride_oh, stride_ok, stride_od,
    stride_ln, stride_lh, stride_lk,
    heads, num_queries, head_dim,
    K_BUCKET,
    HAS_GRAD_LSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta [N h, K] = rowsum(dO * O) - grad_lse: dS = P (dP - delta) for out and lse."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    grad_out = load_rows(head_base(grad_out_ptr, pid_nh, heads, stride_gn, stride_gh), rows, dims,
                         stride_gk, stride_gd, num_queries, head_dim).to(tl.float32)
    out = load_rows(head_base(out_ptr, pid_nh, heads, stride_on, stride_oh), rows, dims,
                    stride_ok, stride_od, num_queries, head_dim).to(tl.float32)
    delta = tl.sum(grad_out * out, 1)
    row_ok = rows < num_queries
    if HAS_GRAD_LSE:
        grad_lse_base = head_base(grad_lse_ptr, pid_nh, heads, stride_ln, stride_lh)
        delta -= tl.load(grad_lse_base + rows * stride_lk, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + pid_nh * num_queries + rows, delta, mask=row_ok)


@triton.jit
def recompute_probabilities(q, k, valid, lse_ptr, delta_ptr, pid_nh, rows, num_queries,
                            qk_scale, DOT_PRECISION: tl.constexpr):
    """(P [BLOCK_M, BLOCK_N] float32, delta [BLOCK_M]) of one tile, from q, k and lse.

    Fully masked rows (lse -inf) and rows past K get P = 0 instead of exp2(-inf + inf).
    """
    row_ok = rows < num_queries
    lse = tl.load(lse_ptr + pid_nh * num_queries + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(delta_ptr + pid_nh * num_queries + rows, mask=row_ok, other=0.0)
    x = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    x = tl.where(valid[None, :], x, float("-inf"))
    return tl.exp2(x - lse2[:, None]), delta


@triton.autotune(configs=tuning.KEY_BLOCK_CONFIGS, key=tuning.ATTENTION_KEY)
@triton.jit
def _backward_key_block_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, grad_out_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qn, stride_qh, stride_qk, stride_qd,
    stride_kn, stride_kh, stride_ks, stride_kd,
    stride_vn, stride_vh, stride_vs, stride_vd,
    stride_gn, stride_gh, stride_gk, stride_gd,
    heads, num_queries, num_keys, head_dim, scale, qk_scale,
    S_BUCKET, K_BUCKET,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv of one key block: loop over every query block (K is small), no atomics."""
    pid_s = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // heads
    keys = pid_s * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    valid = key_is_valid(mask_ptr, n, keys, num_keys, HAS_MASK)
    k = load_rows(head_base(k_ptr, pid_nh, heads, stride_kn, stride_kh), keys, dims,
                  stride_ks, stride_kd, num_keys, head_dim)
    v = load_rows(head_base(v_ptr, pid_nh, heads, stride_vn, stride_vh), keys, dims,
                  stride_vs, stride_vd, num_keys, head_dim)
    q_base = head_base(q_ptr, pid_nh, heads, stride_qn, stride_qh)
    g_base = head_base(grad_out_ptr, pid_nh, heads, stride_gn, stride_gh)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for row_start in range(0, num_queries, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        q = load_rows(q_base, rows, dims, stride_qk, stride_qd, num_queries, head_dim)
        grad_out = load_rows(g_base, rows, dims, stride_gk, stride_gd, num_queries, head_dim)
        grad_out = grad_out.to(q.dtype)
        p, delta = recompute_probabilities(q, k, valid, lse_ptr, delta_ptr, pid_nh, rows,
                                           num_queries, qk_scale, DOT_PRECISION)
        dv += tl.dot(tl.trans(p.to(q.dtype)), grad_out, input_precision=DOT_PRECISION)
        dp = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    out_rows = dense_offsets(pid_nh * num_keys + keys, dims, head_dim)
    tile_ok = (keys[:, None] < num_keys) & (dims[None, :] < head_dim)
    tl.store(dk_ptr + out_rows, (dk * scale).to(dk_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dv_ptr + out_rows, dv.to(dv_ptr.dtype.element_ty), mask=tile_ok)


@triton.autotune(configs=tuning.SPLIT_CONFIGS, key=tuning.ATTENTION_KEY)
@triton.jit
def _backward_query_split_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, grad_out_ptr, lse_ptr, delta_ptr, part_dq_ptr,
    stride_qn, stride_qh, stride_qk, stride_qd,
    stride_kn, stride_kh, stride_ks, stride_kd,
    stride_vn, stride_vh, stride_vs, stride_vd,
    stride_gn, stride_gh, stride_gk, stride_gd,
    heads, num_queries, num_keys, head_dim, qk_scale, num_splits,
    S_BUCKET, K_BUCKET,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial dq / scale of one query block over one slice of keys -> [N h, splits, K, D]."""
    pid_split = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_nh = tl.program_id(2)
    n = pid_nh // heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = load_rows(head_base(q_ptr, pid_nh, heads, stride_qn, stride_qh), rows, dims,
                  stride_qk, stride_qd, num_queries, head_dim)
    grad_out = load_rows(head_base(grad_out_ptr, pid_nh, heads, stride_gn, stride_gh), rows, dims,
                         stride_gk, stride_gd, num_queries, head_dim).to(q.dtype)
    k_base = head_base(k_ptr, pid_nh, heads, stride_kn, stride_kh)
    v_base = head_base(v_ptr, pid_nh, heads, stride_vn, stride_vh)

    blocks_per_split = tl.cdiv(tl.cdiv(num_keys, BLOCK_N), num_splits)
    start = pid_split * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, num_keys)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for key_start in range(start, end, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        valid = key_is_valid(mask_ptr, n, keys, num_keys, HAS_MASK)
        k = load_rows(k_base, keys, dims, stride_ks, stride_kd, num_keys, head_dim)
        v = load_rows(v_base, keys, dims, stride_vs, stride_vd, num_keys, head_dim)
        p, delta = recompute_probabilities(q, k, valid, lse_ptr, delta_ptr, pid_nh, rows,
                                           num_queries, qk_scale, DOT_PRECISION)
        dp = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(q.dtype), k, input_precision=DOT_PRECISION)

    part_rows = (pid_nh * num_splits + pid_split) * num_queries + rows
    ptrs = part_dq_ptr + dense_offsets(part_rows, dims, head_dim)
    tl.store(ptrs, dq, mask=(rows[:, None] < num_queries) & (dims[None, :] < head_dim))


@triton.autotune(configs=tuning.ROW_CONFIGS, key=["BLOCK_D", "K_BUCKET"])
@triton.jit
def _backward_query_merge_kernel(
    part_dq_ptr, dq_ptr, num_queries, head_dim, num_splits, scale,
    K_BUCKET,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dq [N h, K, D] = scale * sum over slices of the partial dq."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    tile_ok = (rows[:, None] < num_queries) & (dims[None, :] < head_dim)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(0, num_splits):
        part_rows = (pid_nh * num_splits + split) * num_queries + rows
        ptrs = part_dq_ptr + dense_offsets(part_rows, dims, head_dim)
        dq += tl.load(ptrs, mask=tile_ok, other=0.0)
    ptrs = dq_ptr + dense_offsets(pid_nh * num_queries + rows, dims, head_dim)
    tl.store(ptrs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=tile_ok)


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
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), contiguous in the inputs' dtype, by recomputing P from q, k and lse.

    grad_out [N, h, K, D] and grad_lse [N, h, K] (or None: zeros) may have any strides,
    stride-0 expanded ones included. ``num_splits`` as in ``softmax_statistics``.
    """
    n, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    nh = n * heads
    if num_splits is None:
        num_splits = tuning.num_key_splits(q.device, nh, num_queries, num_keys)
    lse = lse.to(torch.float32).contiguous()  # [N, h, K] float32: already so from the forward
    mask, has_mask = key_mask_argument(key_padding_mask, q)
    bd = tuning.block_d(head_dim)
    s_bucket, k_bucket = tuning.bucket(num_keys), tuning.bucket(num_queries)
    precision = tuning.dot_precision(q.dtype)

    def row_grid(meta):
        return (triton.cdiv(num_queries, meta["BLOCK_M"]), nh)

    delta = torch.empty((nh, num_queries), device=q.device, dtype=torch.float32)
    grad_lse_arg = grad_lse if grad_lse is not None else lse
    _backward_delta_kernel[row_grid](
        grad_out, out, grad_lse_arg, delta,
        *_strides(grad_out), *_strides(out), *_strides(grad_lse_arg),
        heads, num_queries, head_dim, k_bucket,
        HAS_GRAD_LSE=grad_lse is not None, BLOCK_D=bd,
    )

    dk = torch.empty((n, heads, num_keys, head_dim), device=k.device, dtype=k.dtype)
    dv = torch.empty((n, heads, num_keys, head_dim), device=v.device, dtype=v.dtype)

    def key_grid(meta):
        return (triton.cdiv(num_keys, meta["BLOCK_N"]), nh)

    _backward_key_block_kernel[key_grid](
        q, k, v, mask, grad_out, lse, delta, dk, dv,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
        heads, num_queries, num_keys, head_dim, scale, scale * LOG2E,
        s_bucket, k_bucket,
        HAS_MASK=has_mask, DOT_PRECISION=precision, BLOCK_D=bd,
    )

    part_dq = torch.empty((nh, num_splits, num_queries, head_dim), device=q.device,
                          dtype=torch.float32)

    def split_grid(meta):
        return (num_splits, triton.cdiv(num_queries, meta["BLOCK_M"]), nh)

    _backward_query_split_kernel[split_grid](
        q, k, v, mask, grad_out, lse, delta, part_dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
        heads, num_queries, num_keys, head_dim, scale * LOG2E, num_splits,
        s_bucket, k_bucket,
        HAS_MASK=has_mask, DOT_PRECISION=precision, BLOCK_D=bd,
    )
    dq = torch.empty((n, heads, num_queries, head_dim), device=q.device, dtype=q.dtype)
    _backward_query_merge_kernel[row_grid](
        part_dq, dq, num_queries, head_dim, num_splits, scale, k_bucket, BLOCK_D=bd,
    )
    return dq, dk, dv
