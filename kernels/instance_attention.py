"""Fused instance attention (docs/method.md 3.1): flash-decoding forward, one-pass backward.

K (instance queries, <= 300) is small and S (keys of every FPN level, 20k-90k) is large, so
the forward splits the keys into slices and runs one program per (slice, query block, head):
each keeps an online softmax over its slice and writes un-normalised partial results, which
a second small kernel merges into out and lse. The backward never stores probabilities: one
program per (key slice, head) walks its key blocks, and for each key block every query
block (K is small): P and dP are computed once per tile and give dk and dv (kept in
registers, stored once per key block) and the slice's partial dq (float32, one buffer per
slice, updated in place by its own program only); a small kernel adds the slices' partial
dq up, in a fixed order, so the result is deterministic. Logits are kept in base 2 (scaled
by log2(e)) so that exp is exp2.

Shapes: q [N, h, K, D]; k, v [N, h, S, D]; key_padding_mask bool [N, S] (True = ignore);
out [N, h, K, D]; lse [N, h, K] float32. Inputs of any strides; out contiguous; dq, dk, dv
laid out like ``torch.empty_like`` of q, k, v (the inputs' strides when those are dense).
A row whose keys are all masked gets out 0, lse -inf and zero gradients. Masked keys are
never read (their k and v may hold NaN or inf without effect); NaN in the unmasked inputs
gives NaN.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning
from .tiles import dense_offsets, head_base, key_is_valid, load_rows, load_tile, store_tile

LOG2E = math.log2(math.e)

# --- forward -----------------------------------------------------------------------------------


# Autotune keys: coarse on purpose (see tuning.py); Triton adds every tensor argument's dtype.
ATTENTION_KEY = ["BLOCK_D", "S_CLASS", "HAS_MASK", "DOT_PRECISION"]


@tuning.autotune("split", key=[*ATTENTION_KEY, "WITH_VALUES"])
@triton.jit
def _forward_split_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    stride_qn, stride_qh, stride_qk, stride_qd,
    stride_kn, stride_kh, stride_ks, stride_kd,
    stride_vn, stride_vh, stride_vs, stride_vd,
    heads, num_queries, num_keys, head_dim, qk_scale, num_splits,
    S_CLASS,
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
        # masked keys are not loaded: their k and v read as 0, whatever memory holds
        k = load_tile(k_base, keys, dims, stride_ks, stride_kd, valid, head_dim)
        x = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        x = tl.where(valid[None, :], x, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(x, 1))
        # rows that have seen no valid key yet keep max -inf: shift by 0 so exp2 gives 0, not NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp2(row_max - shift)
        p = tl.exp2(x - shift[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        if WITH_VALUES:
            v = load_tile(v_base, keys, dims, stride_vs, stride_vd, valid, head_dim)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    part_rows = (pid_nh * num_splits + pid_split) * num_queries + rows
    row_ok = rows < num_queries
    tl.store(part_max_ptr + part_rows, row_max, mask=row_ok)
    tl.store(part_sum_ptr + part_rows, row_sum, mask=row_ok)
    if WITH_VALUES:
        ptrs = part_out_ptr + dense_offsets(part_rows, dims, head_dim)
        tl.store(ptrs, acc, mask=row_ok[:, None] & (dims[None, :] < head_dim))


@tuning.autotune("row", key=["BLOCK_D", "S_CLASS", "WITH_VALUES"], tensor_arg="part_sum_ptr")
@triton.jit
def _forward_merge_kernel(
    part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, lse_ptr,
    num_queries, head_dim, num_splits,
    S_CLASS,
    WITH_VALUES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the per-slice softmax states: lse [N h, K] (natural log) and out [N h, K, D].

    A row sum of 0 means no valid key (lse -inf, out 0); a NaN row sum (NaN in the row's
    unmasked inputs) stays NaN in lse and out.
    """
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

    has_keys = row_sum != 0.0  # True for NaN: a NaN row is not mistaken for an empty one
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
    s_class = tuning.size_class(num_keys)

    def split_grid(meta):
        return (num_splits, triton.cdiv(num_queries, meta["BLOCK_M"]), nh)

    _forward_split_kernel[split_grid](
        q, k, values, mask, part_out, part_max, part_sum,
        *_strides(q), *_strides(k), *_strides(values),
        heads, num_queries, num_keys, head_dim, scale * LOG2E, num_splits, s_class,
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
        num_queries, head_dim, num_splits, s_class,
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


@tuning.autotune("row", key=["BLOCK_D", "S_CLASS", "HAS_GRAD_LSE"], tensor_arg="grad_out_ptr")
@triton.jit
def _backward_delta_kernel(
    grad_out_ptr, out_ptr, grad_lse_ptr, delta_ptr,
    stride_gn, stride_gh, stride_gk, stride_gd,
    stride_on, stride_oh, stride_ok, stride_od,
    stride_ln, stride_lh, stride_lk,
    heads, num_queries, head_dim,
    S_CLASS,
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


@tuning.autotune("backward", key=ATTENTION_KEY)
@triton.jit
def _backward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, grad_out_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, part_dq_ptr,
    stride_qn, stride_qh, stride_qk, stride_qd,
    stride_kn, stride_kh, stride_ks, stride_kd,
    stride_vn, stride_vh, stride_vs, stride_vd,
    stride_gn, stride_gh, stride_gk, stride_gd,
    stride_dkn, stride_dkh, stride_dks, stride_dkd,
    stride_dvn, stride_dvh, stride_dvs, stride_dvd,
    heads, num_queries, num_keys, head_dim, scale, qk_scale, num_splits,
    S_CLASS,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv of the key blocks of one slice, and the slice's partial dq / scale.

    For each key block (k, v held), for each query block: P = 2^(x - lse2) and
    dP = dO v^T once; dv += P^T dO, dS = P (dP - delta), dk += dS^T q, and the slice's
    partial dq [K, D] (float32, part_dq[nh, slice]) += dS k, read and written by this
    program only. Fully masked rows (lse -inf) and rows past K get P = 0.
    """
    pid_split = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // heads
    dims = tl.arange(0, BLOCK_D)
    q_base = head_base(q_ptr, pid_nh, heads, stride_qn, stride_qh)
    g_base = head_base(grad_out_ptr, pid_nh, heads, stride_gn, stride_gh)
    k_base = head_base(k_ptr, pid_nh, heads, stride_kn, stride_kh)
    v_base = head_base(v_ptr, pid_nh, heads, stride_vn, stride_vh)
    dk_base = head_base(dk_ptr, pid_nh, heads, stride_dkn, stride_dkh)
    dv_base = head_base(dv_ptr, pid_nh, heads, stride_dvn, stride_dvh)
    part_base = part_dq_ptr + (pid_nh * num_splits + pid_split).to(tl.int64) * num_queries * head_dim
    stats_base = pid_nh * num_queries

    blocks_per_split = tl.cdiv(tl.cdiv(num_keys, BLOCK_N), num_splits)
    start = pid_split * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, num_keys)
    for key_start in range(start, end, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        valid = key_is_valid(mask_ptr, n, keys, num_keys, HAS_MASK)
        # masked keys are not loaded: their k and v read as 0, whatever memory holds
        k = load_tile(k_base, keys, dims, stride_ks, stride_kd, valid, head_dim)
        v = load_tile(v_base, keys, dims, stride_vs, stride_vd, valid, head_dim)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        not_first = key_start != start  # the slice's first key block writes its dq, the others add
        for row_start in range(0, num_queries, BLOCK_M):
            rows = row_start + tl.arange(0, BLOCK_M)
            row_ok = rows < num_queries
            q = load_tile(q_base, rows, dims, stride_qk, stride_qd, row_ok, head_dim)
            grad_out = load_tile(g_base, rows, dims, stride_gk, stride_gd, row_ok, head_dim).to(q.dtype)
            lse = tl.load(lse_ptr + stats_base + rows, mask=row_ok, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(delta_ptr + stats_base + rows, mask=row_ok, other=0.0)

            # the tile transposed, [BLOCK_N, BLOCK_M]: P^T and dS^T feed the dk and dv dots as
            # they are, only dq needs dS itself (one layout change instead of two)
            x_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
            # masked keys get P = dS = 0 by selection, not by arithmetic: a NaN lse or delta
            # (NaN in the row's unmasked inputs) must not reach the masked keys' dk and dv
            p_t = tl.where(valid[:, None], tl.exp2(x_t - lse2[None, :]), 0.0)
            dv += tl.dot(p_t.to(q.dtype), grad_out, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
            ds_t = tl.where(valid[:, None], p_t * (dp_t - delta[None, :]), 0.0).to(q.dtype)
            dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)

            dq_ptrs = part_base + dense_offsets(rows, dims, head_dim)
            dq_ok = row_ok[:, None] & (dims[None, :] < head_dim)
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
            dq += tl.load(dq_ptrs, mask=dq_ok & not_first, other=0.0)
            tl.store(dq_ptrs, dq, mask=dq_ok)
        key_ok = keys < num_keys
        store_tile(dk_base, keys, dims, stride_dks, stride_dkd, key_ok, head_dim, dk * scale)
        store_tile(dv_base, keys, dims, stride_dvs, stride_dvd, key_ok, head_dim, dv)
        # the next key block reads the partial dq tiles back, possibly from other threads:
        # Triton orders global stores and loads of one program only across a barrier
        tl.debug_barrier()
    if start >= end:  # a slice without keys (more slices than key blocks) adds nothing to dq
        for row_start in range(0, num_queries, BLOCK_M):
            rows = row_start + tl.arange(0, BLOCK_M)
            tl.store(part_base + dense_offsets(rows, dims, head_dim),
                     tl.zeros([BLOCK_M, BLOCK_D], tl.float32),
                     mask=(rows[:, None] < num_queries) & (dims[None, :] < head_dim))


@tuning.autotune("row", key=["BLOCK_D", "S_CLASS"], tensor_arg="part_dq_ptr")
@triton.jit
def _backward_dq_merge_kernel(
    part_dq_ptr, dq_ptr,
    stride_dqn, stride_dqh, stride_dqk, stride_dqd,
    heads, num_queries, head_dim, num_splits, scale,
    S_CLASS,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dq [N, h, K, D] (any strides) = scale * the sum over slices of the partial dq."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < num_queries
    tile_ok = row_ok[:, None] & (dims[None, :] < head_dim)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(0, num_splits):
        part_rows = (pid_nh * num_splits + split) * num_queries + rows
        dq += tl.load(part_dq_ptr + dense_offsets(part_rows, dims, head_dim), mask=tile_ok, other=0.0)
    dq_base = head_base(dq_ptr, pid_nh, heads, stride_dqn, stride_dqh)
    store_tile(dq_base, rows, dims, stride_dqk, stride_dqd, row_ok, head_dim, dq * scale)


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
    """(dq, dk, dv) in the inputs' dtypes and layouts (``torch.empty_like`` of q, k, v), by
    recomputing the probabilities from q, k and lse.

    grad_out [N, h, K, D] and grad_lse [N, h, K] (or None: zeros) may have any strides,
    stride-0 expanded ones included. ``num_splits`` overrides the number of key slices
    (tests); by default they fill the GPU.
    """
    n, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    nh = n * heads
    if num_splits is None:
        num_splits = tuning.num_backward_splits(q.device, nh, num_keys)
    lse = lse.to(torch.float32).contiguous()  # [N, h, K] float32: already so from the forward
    mask, has_mask = key_mask_argument(key_padding_mask, q)
    bd = tuning.block_d(head_dim)
    s_class = tuning.size_class(num_keys)

    def row_grid(meta):
        return (triton.cdiv(num_queries, meta["BLOCK_M"]), nh)

    delta = torch.empty((nh, num_queries), device=q.device, dtype=torch.float32)
    grad_lse_arg = grad_lse if grad_lse is not None else lse
    _backward_delta_kernel[row_grid](
        grad_out, out, grad_lse_arg, delta,
        *_strides(grad_out), *_strides(out), *_strides(grad_lse_arg),
        heads, num_queries, head_dim, s_class,
        HAS_GRAD_LSE=grad_lse is not None, BLOCK_D=bd,
    )

    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    part_dq = torch.empty((nh, num_splits, num_queries, head_dim), device=q.device,
                          dtype=torch.float32)
    _backward_kernel[(num_splits, nh)](
        q, k, v, mask, grad_out, lse, delta, dk, dv, part_dq,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
        heads, num_queries, num_keys, head_dim, scale, scale * LOG2E, num_splits, s_class,
        HAS_MASK=has_mask, DOT_PRECISION=tuning.dot_precision(q.dtype), BLOCK_D=bd,
    )
    _backward_dq_merge_kernel[row_grid](
        part_dq, dq, *_strides(dq), heads, num_queries, head_dim, num_splits, scale, s_class,
        BLOCK_D=bd,
    )
    return dq, dk, dv
