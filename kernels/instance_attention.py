"""Fused instance attention (docs/method.md 3.1), built for K << S (docs/gpu-kernels.md).

K (instance queries, <= a few hundred) is small and S (keys of every FPN level, 20k-90k)
large. Forward: split-S flash decoding, one program per (key slice, query block, head), each
keeping an online softmax over its slice; a small kernel merges the slices into out and lse
(with one slice the split kernel finishes the rows itself). Backward: one program per (key
slice, head) keeps its head's queries, dO, lse and delta (rowsum(dO * out), computed there:
no kernel of its own) on chip as a resident block set of one or two query blocks, walks the
slice's key blocks, and accumulates dk and dv of each key block and the slice's dq on chip:
dk and dv are written once per key block, dq once per slice; a small kernel adds the slices'
dq up in a fixed order (deterministic; with one slice the program writes dq itself). K larger
than the resident set (tuning.MAX_RESIDENT_QUERIES) is walked in chunks, dk and dv then
accumulated in a float32 scratch. The number of slices comes from the compiled kernel's
occupancy (tuning.resident_programs): one full wave. Both passes read the key mask once per
key block, skip blocks that are all padding (the backward writes their zero dk and dv) and
mask per element only blocks that are partly padding. Logits are kept in base 2 (scaled by
log2(e)) and the scale is folded into exp2's argument (one FMA).

Shapes: q [N, h, K, D]; k, v [N, h, S, D]; key_padding_mask bool [N, S] (True = ignore);
out [N, h, K, D]; lse [N, h, K] float32. Inputs of any strides; out contiguous; dq, dk, dv
laid out like ``torch.empty_like`` of q, k, v (the inputs' strides when those are dense).
A row whose keys are all masked gets out 0, lse -inf and zero gradients. Masked keys are
never read (their k and v may hold NaN or inf without effect); NaN in the unmasked inputs
gives NaN. With ``weight`` (the value mask's statistics pass) only the slots of weight > 0
are computed and their lse written; the others are never read.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning
from .launch import launcher
from .tiles import (
    dense_offsets,
    head_base,
    key_block,
    load_tile,
    query_rows,
    store_tile,
)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

# --- forward -----------------------------------------------------------------------------------


# Autotune keys: coarse on purpose (see tuning.py); Triton adds every tensor argument's dtype.
ATTENTION_KEY = ["BLOCK_D", "S_CLASS", "HAS_MASK", "DOT_PRECISION"]


@triton.jit
def finish_rows(row_max, row_sum, acc, out_ptr, lse_ptr, stats_rows, row_ok, dims, head_dim,
                WITH_VALUES: tl.constexpr):
    """Store lse [rows] (natural log) and out [rows, D] = acc / row_sum of merged softmax states
    (row_max in base-2 logits). A row sum of 0 means no valid key (lse -inf, out 0); a NaN row
    sum (NaN in the row's unmasked inputs) stays NaN in lse and out."""
    has_keys = row_sum != 0.0  # True for NaN: a NaN row is not mistaken for an empty one
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    lse = tl.where(has_keys, (row_max + tl.log2(safe_sum)) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + stats_rows, lse, mask=row_ok)
    if WITH_VALUES:
        out = tl.where(has_keys[:, None], acc / safe_sum[:, None], 0.0)
        ptrs = out_ptr + dense_offsets(stats_rows, dims, head_dim)
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dims[None, :] < head_dim))


@triton.jit
def merge_step(row_max, row_sum, split_max, split_sum):
    """One slice's softmax state into the running one (base-2 maxima): (new max, new sum, the
    running state's rescale, the slice's). Rows still without a valid key keep max -inf and
    shift by 0, so exp2 gives 0, not NaN."""
    new_max = tl.maximum(row_max, split_max)
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    old_scale = tl.exp2(row_max - shift)
    split_scale = tl.exp2(split_max - shift)
    return new_max, row_sum * old_scale + split_sum * split_scale, old_scale, split_scale


@tuning.autotune("split", key=[*ATTENTION_KEY, "WITH_VALUES"])
@triton.jit
def _forward_split_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, weight_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, lse_ptr,
    stride_qn, stride_qh, stride_qk, stride_qd,
    stride_kn, stride_kh, stride_ks, stride_kd,
    stride_vn, stride_vh, stride_vs, stride_vd,
    heads, num_queries, num_keys, head_dim, qk_scale, num_splits,
    S_CLASS,
    HAS_MASK: tl.constexpr, WITH_VALUES: tl.constexpr, COMPACT: tl.constexpr, FINAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online softmax of one query block over one slice of the keys.

    Writes the slice's row max m (base 2), row sum l = sum 2^(x - m) and, WITH_VALUES, the
    un-normalised sum_s 2^(x_s - m) v_s into [N h, splits, K(, D)] float32 buffers; FINAL
    (one slice) writes lse and out instead. With COMPACT the block's rows are the slots of
    weight > 0 (blocks past their count do nothing).
    """
    pid_split = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_nh = tl.program_id(2)
    n = pid_nh // heads
    first = pid_m * BLOCK_M
    rows, row_ok, count = query_rows(weight_ptr, n, first, num_queries, COMPACT, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    if first < count:
        q = load_tile(head_base(q_ptr, pid_nh, heads, stride_qn, stride_qh), rows, dims,
                      stride_qk, stride_qd, row_ok, head_dim)
        # the scale's sign goes into q, so that the running max is one of the raw logits and
        # exp2's argument is one FMA, x |scale| - max |scale|
        scale_abs = tl.abs(qk_scale)
        if qk_scale < 0:
            q = -q
        k_base = head_base(k_ptr, pid_nh, heads, stride_kn, stride_kh)
        v_base = head_base(v_ptr, pid_nh, heads, stride_vn, stride_vh)

        blocks_per_split = tl.cdiv(tl.cdiv(num_keys, BLOCK_N), num_splits)
        start = pid_split * blocks_per_split * BLOCK_N
        end = tl.minimum(start + blocks_per_split * BLOCK_N, num_keys)

        row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for key_start in range(start, end, BLOCK_N):
            keys, valid, num_valid = key_block(mask_ptr, n, key_start, num_keys, HAS_MASK, BLOCK_N)
            # masked keys are not loaded: their k and v read as 0, whatever memory holds; a
            # block of padding loads nothing and computes nothing
            k = load_tile(k_base, keys, dims, stride_ks, stride_kd, valid, head_dim)
            if WITH_VALUES:
                v = load_tile(v_base, keys, dims, stride_vs, stride_vd, valid, head_dim)
            if num_valid > 0:
                x = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                partial = num_valid < BLOCK_N
                x_max = tl.max(x, 1)
                if partial:
                    x_max = tl.max(tl.where(valid[None, :], x, float("-inf")), 1)
                new_max = tl.maximum(row_max, x_max * scale_abs)
                # rows that have seen no valid key yet keep max -inf: shift by 0, not -inf
                shift = tl.where(new_max == float("-inf"), 0.0, new_max)
                rescale = tl.exp2(row_max - shift)
                p = tl.exp2(x * scale_abs - shift[:, None])
                if partial:  # selection, not arithmetic: also right for a scale of 0
                    p = tl.where(valid[None, :], p, 0.0)
                row_sum = row_sum * rescale + tl.sum(p, 1)
                if WITH_VALUES:
                    acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
                row_max = new_max

        if FINAL:
            finish_rows(row_max, row_sum, acc, out_ptr, lse_ptr, pid_nh * num_queries + rows, row_ok,
                        dims, head_dim, WITH_VALUES)
        else:
            part_rows = (pid_nh * num_splits + pid_split) * num_queries + rows
            tl.store(part_max_ptr + part_rows, row_max, mask=row_ok)
            tl.store(part_sum_ptr + part_rows, row_sum, mask=row_ok)
            if WITH_VALUES:
                ptrs = part_out_ptr + dense_offsets(part_rows, dims, head_dim)
                tl.store(ptrs, acc, mask=row_ok[:, None] & (dims[None, :] < head_dim))


@tuning.autotune("row", key=["BLOCK_D", "S_CLASS"], tensor_arg="part_sum_ptr")
@triton.jit
def _forward_merge_kernel(
    part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, lse_ptr,
    num_queries, head_dim, num_splits,
    S_CLASS,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merge the per-slice softmax states into lse [N h, K] and out [N h, K, D], in slice order."""
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
        row_max, row_sum, old_scale, split_scale = merge_step(row_max, row_sum, split_max, split_sum)
        split_out = tl.load(part_out_ptr + dense_offsets(part_rows, dims, head_dim), mask=tile_ok, other=0.0)
        acc = acc * old_scale[:, None] + split_out * split_scale[:, None]
    finish_rows(row_max, row_sum, acc, out_ptr, lse_ptr, pid_nh * num_queries + rows, row_ok, dims, head_dim,
                True)


def _strides(t: Tensor) -> tuple[int, ...]:
    return tuple(t.stride())


def key_mask_argument(key_padding_mask: Tensor | None, fallback: Tensor) -> tuple[Tensor, bool]:
    """(pointer tensor, HAS_MASK): the bool [N, S] mask read as bytes, or any tensor if None."""
    if key_padding_mask is None:
        return fallback, False
    return key_padding_mask.contiguous().view(torch.uint8), True


def _split_pass(
    q: Tensor, k: Tensor, v: Tensor | None, key_padding_mask: Tensor | None, weight: Tensor | None,
    scale: float, num_splits: int, final: bool, out: Tensor, lse: Tensor,
    part_out: Tensor, part_max: Tensor, part_sum: Tensor,
) -> None:
    """Launch the split kernel (one program per key slice, query block, (image, head))."""
    n, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    values = v if v is not None else k
    mask, has_mask = key_mask_argument(key_padding_mask, q)

    def split_grid(meta):
        return (num_splits, triton.cdiv(num_queries, meta["BLOCK_M"]), n * heads)

    launcher(_forward_split_kernel)[split_grid](
        q, k, values, mask, weight if weight is not None else lse, part_out, part_max, part_sum, out, lse,
        *_strides(q), *_strides(k), *_strides(values),
        heads, num_queries, num_keys, head_dim, scale * LOG2E, num_splits, tuning.size_class(num_keys),
        HAS_MASK=has_mask, WITH_VALUES=v is not None, COMPACT=weight is not None, FINAL=final,
        DOT_PRECISION=tuning.dot_precision(q.dtype), BLOCK_D=tuning.block_d(head_dim),
    )


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """out [N, h, K, D] (q's dtype) and lse [N, h, K] float32 of softmax(scale q k^T) v, by
    split-S flash decoding: the split kernel, then the merge (none with one slice).
    ``num_splits`` overrides the number of key slices (tests); by default it fills the GPU."""
    n, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    nh = n * heads
    if num_splits is None:
        num_splits = tuning.num_key_splits(q.device, nh, num_queries, num_keys)
    f32 = dict(device=q.device, dtype=torch.float32)
    out = torch.empty((n, heads, num_queries, head_dim), device=q.device, dtype=q.dtype)
    lse = torch.empty((n, heads, num_queries), **f32)
    if num_splits == 1:  # the split kernel finishes the rows; the partials' pointers are unused
        _split_pass(q, k, v, key_padding_mask, None, scale, 1, True, out, lse, lse, lse, lse)
        return out, lse
    part_max = torch.empty((nh, num_splits, num_queries), **f32)
    part_sum = torch.empty((nh, num_splits, num_queries), **f32)
    part_out = torch.empty((nh, num_splits, num_queries, head_dim), **f32)
    _split_pass(q, k, v, key_padding_mask, None, scale, num_splits, False, out, lse, part_out, part_max, part_sum)

    def merge_grid(meta):
        return (triton.cdiv(num_queries, meta["BLOCK_M"]), nh)

    launcher(_forward_merge_kernel)[merge_grid](
        part_out, part_max, part_sum, out, lse, num_queries, head_dim, num_splits,
        tuning.size_class(num_keys), BLOCK_D=tuning.block_d(head_dim),
    )
    return out, lse


def weighted_row_statistics(
    q: Tensor, k: Tensor, key_padding_mask: Tensor | None, weight: Tensor, scale: float,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The softmax statistics of the rows of weight > 0 only, per key slice, unmerged:
    (part_max, part_sum) [N h, splits, K] float32, max in base-2 logits (scale log2(e) q k^T),
    sum = sum_s 2^(x_s - max); rows of weight 0 are left unwritten. The value mask merges the
    rows it reads itself. ``weight`` [N, K] float32 contiguous."""
    n, heads, num_queries, _ = q.shape
    nh = n * heads
    if num_splits is None:  # ~one query block of weighted rows per (image, head)
        num_splits = tuning.num_key_splits(q.device, nh, tuning.ROW_BLOCK_GUESS, k.shape[2])
    part_max = torch.empty((nh, num_splits, num_queries), device=q.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    _split_pass(q, k, None, key_padding_mask, weight, scale, num_splits, False, part_max, part_max, part_max,
                part_max, part_sum)
    return part_max, part_sum


# --- backward ----------------------------------------------------------------------------------


@triton.jit
def _chunk_delta(o_base, g_base, glse_base, delta_base, chunk, chunk_end, dims,
                 stride_ok, stride_od, stride_gk, stride_gd, stride_lk, head_dim,
                 HAS_GRAD_LSE: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[rows] = rowsum(dO * out) - grad_lse (float32) of the chunk's rows: dS = P (dP -
    delta) for out and lse. Every slice of the (image, head) writes the same bits, so the
    buffer needs no kernel of its own."""
    for first in range(chunk, chunk_end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < chunk_end
        grad_out = load_tile(g_base, rows, dims, stride_gk, stride_gd, row_ok, head_dim).to(tl.float32)
        out = load_tile(o_base, rows, dims, stride_ok, stride_od, row_ok, head_dim).to(tl.float32)
        delta = tl.sum(grad_out * out, 1)
        if HAS_GRAD_LSE:
            delta -= tl.load(glse_base + rows.to(tl.int64) * stride_lk, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(delta_base + rows, delta, mask=row_ok)


@triton.jit
def _load_query_block(first, q_base, g_base, lse_base, delta_base, dims, stride_qk, stride_qd,
                      stride_gk, stride_gd, num_queries, head_dim, BLOCK_M: tl.constexpr):
    """(q, dO in q's dtype, lse2, delta) of the query rows first ... first + BLOCK_M - 1: lse2
    = lse log2(e) is +inf for rows without keys and past K (P = 0 there)."""
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    q = load_tile(q_base, rows, dims, stride_qk, stride_qd, row_ok, head_dim)
    grad_out = load_tile(g_base, rows, dims, stride_gk, stride_gd, row_ok, head_dim).to(q.dtype)
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    return q, grad_out, lse2, delta


@triton.jit
def _query_block_step(dk, dv, dq, q, grad_out, lse2, delta, k, v, valid, partial, qk_scale,
                      DOT_PRECISION: tl.constexpr):
    """One query block against one key block: dk / scale and dv [BLOCK_N, D] and the block's
    dq / scale [BLOCK_M, D] accumulators, float32, plus this tile's share.

    The tile is kept transposed, [BLOCK_N, BLOCK_M]: P^T and dS^T feed the dv and dk dots as
    they are, only dq needs dS itself. In a ``partial`` block masked keys get P = dS = 0 by
    selection, not by arithmetic: a NaN lse or delta (NaN in the row's unmasked inputs) must
    not reach the masked keys' dk and dv.
    """
    x_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    p_t = tl.exp2(x_t * qk_scale - lse2[None, :])
    if partial:
        p_t = tl.where(valid[:, None], p_t, 0.0)
    dv += tl.dot(p_t.to(q.dtype), grad_out, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    if partial:
        ds_t = tl.where(valid[:, None], ds_t, 0.0)
    ds_t = ds_t.to(q.dtype)
    dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
    dq += tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
    return dk, dv, dq


@triton.jit
def _store_query_gradient(dq, first, dims, num_queries, head_dim, part_base, dq_base, stride_dqk,
                          stride_dqd, scale, DQ_PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """The slice's dq of a query block: a float32 partial (DQ_PARTIAL) or, with one slice, dq."""
    rows = first + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    if DQ_PARTIAL:
        tl.store(part_base + dense_offsets(rows, dims, head_dim), dq,
                 mask=row_ok[:, None] & (dims[None, :] < head_dim))
    else:
        store_tile(dq_base, rows, dims, stride_dqk, stride_dqd, row_ok, head_dim, dq * scale)


@triton.jit
def _backward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, grad_out_ptr, lse_ptr, grad_lse_ptr,
    dq_ptr, dk_ptr, dv_ptr, part_dq_ptr, delta_ptr, scratch_ptr,
    stride_qn, stride_qh, stride_qk, stride_qd,
    stride_kn, stride_kh, stride_ks, stride_kd,
    stride_vn, stride_vh, stride_vs, stride_vd,
    stride_on, stride_oh, stride_ok, stride_od,
    stride_gn, stride_gh, stride_gk, stride_gd,
    stride_ln, stride_lh, stride_lk,
    stride_dqn, stride_dqh, stride_dqk, stride_dqd,
    stride_dkn, stride_dkh, stride_dks, stride_dkd,
    stride_dvn, stride_dvh, stride_dvs, stride_dvd,
    heads, num_queries, num_keys, head_dim, scale, qk_scale, num_slices,
    HAS_MASK: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, DQ_PARTIAL: tl.constexpr,
    CHUNKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, QUERY_BLOCKS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv of the key blocks of one slice of one (image, head), and the slice's dq.

    The resident set: QUERY_BLOCKS (1 to 8, unrolled) query blocks of BLOCK_M rows, whose dq
    accumulators stay in registers while the program walks its slice's key blocks; without
    CHUNKED they cover all K rows and the chunk loop runs once. For each key block (k, v and
    the mask read once): skipped if all padding (dk = dv = 0), else every query block adds
    its dk, dv (registers, stored once per key block) and dq. With CHUNKED (K > 8 BLOCK_M),
    dk and dv add up over the chunks in a float32 scratch [N h, S, 2, D] that only this
    program reads and writes; the last chunk writes dk and dv.
    """
    pid_slice = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // heads
    dims = tl.arange(0, BLOCK_D)
    q_base = head_base(q_ptr, pid_nh, heads, stride_qn, stride_qh)
    o_base = head_base(out_ptr, pid_nh, heads, stride_on, stride_oh)
    g_base = head_base(grad_out_ptr, pid_nh, heads, stride_gn, stride_gh)
    glse_base = head_base(grad_lse_ptr, pid_nh, heads, stride_ln, stride_lh)
    lse_base = lse_ptr + pid_nh * num_queries
    delta_base = delta_ptr + pid_nh * num_queries
    k_base = head_base(k_ptr, pid_nh, heads, stride_kn, stride_kh)
    v_base = head_base(v_ptr, pid_nh, heads, stride_vn, stride_vh)
    dq_base = head_base(dq_ptr, pid_nh, heads, stride_dqn, stride_dqh)
    dk_base = head_base(dk_ptr, pid_nh, heads, stride_dkn, stride_dkh)
    dv_base = head_base(dv_ptr, pid_nh, heads, stride_dvn, stride_dvh)
    part_base = part_dq_ptr + (pid_nh * num_slices + pid_slice).to(tl.int64) * num_queries * head_dim
    scratch_base = scratch_ptr + pid_nh.to(tl.int64) * num_keys * 2 * head_dim
    CHUNK: tl.constexpr = QUERY_BLOCKS * BLOCK_M

    blocks_per_slice = tl.cdiv(tl.cdiv(num_keys, BLOCK_N), num_slices)
    start = pid_slice * blocks_per_slice * BLOCK_N
    end = tl.minimum(start + blocks_per_slice * BLOCK_N, num_keys)
    for chunk in range(0, num_queries, CHUNK):
        _chunk_delta(o_base, g_base, glse_base, delta_base, chunk, tl.minimum(chunk + CHUNK, num_queries),
                     dims, stride_ok, stride_od, stride_gk, stride_gd, stride_lk, head_dim,
                     HAS_GRAD_LSE, BLOCK_M)
        tl.debug_barrier()  # the blocks below read delta back, from other threads
        dq0 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if QUERY_BLOCKS > 1:
            dq1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if QUERY_BLOCKS > 2:
            dq2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if QUERY_BLOCKS > 3:
            dq3 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if QUERY_BLOCKS > 4:
            dq4 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if QUERY_BLOCKS > 5:
            dq5 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if QUERY_BLOCKS > 6:
            dq6 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if QUERY_BLOCKS > 7:
            dq7 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        for key_start in range(start, end, BLOCK_N):
            keys, valid, num_valid = key_block(mask_ptr, n, key_start, num_keys, HAS_MASK, BLOCK_N)
            # masked keys are not loaded: their k and v read as 0, whatever memory holds
            k = load_tile(k_base, keys, dims, stride_ks, stride_kd, valid, head_dim)
            v = load_tile(v_base, keys, dims, stride_vs, stride_vd, valid, head_dim)
            # every query block's q, dO, lse and delta, read from L1/L2 (19 KB per 300 queries of
            # D = 32 in 16 bits) at the loop's top level, where Triton's pipeliner stages them
            q0, g0, l0, e0 = _load_query_block(
                chunk, q_base, g_base, lse_base, delta_base, dims, stride_qk, stride_qd, stride_gk,
                stride_gd, num_queries, head_dim, BLOCK_M)
            if QUERY_BLOCKS > 1:
                q1, g1, l1, e1 = _load_query_block(
                    chunk + BLOCK_M, q_base, g_base, lse_base, delta_base, dims, stride_qk, stride_qd, stride_gk,
                    stride_gd, num_queries, head_dim, BLOCK_M)
            if QUERY_BLOCKS > 2:
                q2, g2, l2, e2 = _load_query_block(
                    chunk + 2 * BLOCK_M, q_base, g_base, lse_base, delta_base, dims, stride_qk, stride_qd, stride_gk,
                    stride_gd, num_queries, head_dim, BLOCK_M)
            if QUERY_BLOCKS > 3:
                q3, g3, l3, e3 = _load_query_block(
                    chunk + 3 * BLOCK_M, q_base, g_base, lse_base, delta_base, dims, stride_qk, stride_qd, stride_gk,
                    stride_gd, num_queries, head_dim, BLOCK_M)
            if QUERY_BLOCKS > 4:
                q4, g4, l4, e4 = _load_query_block(
                    chunk + 4 * BLOCK_M, q_base, g_base, lse_base, delta_base, dims, stride_qk, stride_qd, stride_gk,
                    stride_gd, num_queries, head_dim, BLOCK_M)
            if QUERY_BLOCKS > 5:
                q5, g5, l5, e5 = _load_query_block(
                    chunk + 5 * BLOCK_M, q_base, g_base, lse_base, delta_base, dims, stride_qk, stride_qd, stride_gk,
                    stride_gd, num_queries, head_dim, BLOCK_M)
            if QUERY_BLOCKS > 6:
                q6, g6, l6, e6 = _load_query_block(
                    chunk + 6 * BLOCK_M, q_base, g_base, lse_base, delta_base, dims, stride_qk, stride_qd, stride_gk,
                    stride_gd, num_queries, head_dim, BLOCK_M)
            if QUERY_BLOCKS > 7:
                q7, g7, l7, e7 = _load_query_block(
                    chunk + 7 * BLOCK_M, q_base, g_base, lse_base, delta_base, dims, stride_qk, stride_qd, stride_gk,
                    stride_gd, num_queries, head_dim, BLOCK_M)
            dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            if num_valid > 0:  # a block of padding keeps dk = dv = 0 and adds nothing to dq
                partial = num_valid < BLOCK_N
                dk, dv, dq0 = _query_block_step(dk, dv, dq0, q0, g0, l0, e0, k, v, valid, partial, qk_scale,
                                                DOT_PRECISION)
                if QUERY_BLOCKS > 1:
                    dk, dv, dq1 = _query_block_step(dk, dv, dq1, q1, g1, l1, e1, k, v, valid, partial,
                                                    qk_scale, DOT_PRECISION)
                if QUERY_BLOCKS > 2:
                    dk, dv, dq2 = _query_block_step(dk, dv, dq2, q2, g2, l2, e2, k, v, valid, partial,
                                                    qk_scale, DOT_PRECISION)
                if QUERY_BLOCKS > 3:
                    dk, dv, dq3 = _query_block_step(dk, dv, dq3, q3, g3, l3, e3, k, v, valid, partial,
                                                    qk_scale, DOT_PRECISION)
                if QUERY_BLOCKS > 4:
                    dk, dv, dq4 = _query_block_step(dk, dv, dq4, q4, g4, l4, e4, k, v, valid, partial,
                                                    qk_scale, DOT_PRECISION)
                if QUERY_BLOCKS > 5:
                    dk, dv, dq5 = _query_block_step(dk, dv, dq5, q5, g5, l5, e5, k, v, valid, partial,
                                                    qk_scale, DOT_PRECISION)
                if QUERY_BLOCKS > 6:
                    dk, dv, dq6 = _query_block_step(dk, dv, dq6, q6, g6, l6, e6, k, v, valid, partial,
                                                    qk_scale, DOT_PRECISION)
                if QUERY_BLOCKS > 7:
                    dk, dv, dq7 = _query_block_step(dk, dv, dq7, q7, g7, l7, e7, k, v, valid, partial,
                                                    qk_scale, DOT_PRECISION)
            key_ok = keys < num_keys
            if CHUNKED:
                tile_ok = key_ok[:, None] & (dims[None, :] < head_dim)
                dk_ptrs = scratch_base + dense_offsets(keys * 2, dims, head_dim)
                dv_ptrs = dk_ptrs + head_dim
                if chunk > 0:
                    dk += tl.load(dk_ptrs, mask=tile_ok, other=0.0)
                    dv += tl.load(dv_ptrs, mask=tile_ok, other=0.0)
                if chunk + CHUNK < num_queries:
                    tl.store(dk_ptrs, dk, mask=tile_ok)
                    tl.store(dv_ptrs, dv, mask=tile_ok)
                else:
                    store_tile(dk_base, keys, dims, stride_dks, stride_dkd, key_ok, head_dim, dk * scale)
                    store_tile(dv_base, keys, dims, stride_dvs, stride_dvd, key_ok, head_dim, dv)
            else:
                store_tile(dk_base, keys, dims, stride_dks, stride_dkd, key_ok, head_dim, dk * scale)
                store_tile(dv_base, keys, dims, stride_dvs, stride_dvd, key_ok, head_dim, dv)

        _store_query_gradient(dq0, chunk, dims, num_queries, head_dim, part_base, dq_base,
                              stride_dqk, stride_dqd, scale, DQ_PARTIAL, BLOCK_M)
        if QUERY_BLOCKS > 1:
            _store_query_gradient(dq1, chunk + BLOCK_M, dims, num_queries, head_dim, part_base, dq_base,
                                  stride_dqk, stride_dqd, scale, DQ_PARTIAL, BLOCK_M)
        if QUERY_BLOCKS > 2:
            _store_query_gradient(dq2, chunk + 2 * BLOCK_M, dims, num_queries, head_dim, part_base, dq_base,
                                  stride_dqk, stride_dqd, scale, DQ_PARTIAL, BLOCK_M)
        if QUERY_BLOCKS > 3:
            _store_query_gradient(dq3, chunk + 3 * BLOCK_M, dims, num_queries, head_dim, part_base, dq_base,
                                  stride_dqk, stride_dqd, scale, DQ_PARTIAL, BLOCK_M)
        if QUERY_BLOCKS > 4:
            _store_query_gradient(dq4, chunk + 4 * BLOCK_M, dims, num_queries, head_dim, part_base, dq_base,
                                  stride_dqk, stride_dqd, scale, DQ_PARTIAL, BLOCK_M)
        if QUERY_BLOCKS > 5:
            _store_query_gradient(dq5, chunk + 5 * BLOCK_M, dims, num_queries, head_dim, part_base, dq_base,
                                  stride_dqk, stride_dqd, scale, DQ_PARTIAL, BLOCK_M)
        if QUERY_BLOCKS > 6:
            _store_query_gradient(dq6, chunk + 6 * BLOCK_M, dims, num_queries, head_dim, part_base, dq_base,
                                  stride_dqk, stride_dqd, scale, DQ_PARTIAL, BLOCK_M)
        if QUERY_BLOCKS > 7:
            _store_query_gradient(dq7, chunk + 7 * BLOCK_M, dims, num_queries, head_dim, part_base, dq_base,
                                  stride_dqk, stride_dqd, scale, DQ_PARTIAL, BLOCK_M)
        # the next chunk rewrites delta and (CHUNKED) reads the scratch back, possibly from
        # other threads: Triton orders one program's global stores and loads only across a barrier
        tl.debug_barrier()


@tuning.autotune("row", key=["BLOCK_D", "S_CLASS"], tensor_arg="part_dq_ptr")
@triton.jit
def _backward_dq_merge_kernel(
    part_dq_ptr, dq_ptr,
    stride_dqn, stride_dqh, stride_dqk, stride_dqd,
    heads, num_queries, head_dim, num_slices, scale,
    S_CLASS,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dq [N, h, K, D] (any strides) = scale * the sum over slices of the partial dq, added in
    slice order: the same bits on every run."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < num_queries
    tile_ok = row_ok[:, None] & (dims[None, :] < head_dim)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for part in range(0, num_slices):
        part_rows = (pid_nh * num_slices + part) * num_queries + rows
        dq += tl.load(part_dq_ptr + dense_offsets(part_rows, dims, head_dim), mask=tile_ok, other=0.0)
    dq_base = head_base(dq_ptr, pid_nh, heads, stride_dqn, stride_dqh)
    store_tile(dq_base, rows, dims, stride_dqk, stride_dqd, row_ok, head_dim, dq * scale)


@functools.cache
def _backward_residency(device: torch.device, specialisation: tuple, config: tuple) -> int:
    """Programs of the backward kernel one multiprocessor holds at once, from its compiled
    registers, shared memory and warps (compiled here, without tensors, if not yet)."""
    dtype, ints, constants = specialisation
    block_m, block_n, num_warps, num_stages = config
    pointers = (dtype, dtype, dtype, torch.uint8, dtype, dtype, torch.float32, torch.float32,
                dtype, dtype, dtype, torch.float32, torch.float32, torch.float32)
    with torch.cuda.device(device):
        compiled = _backward_kernel.warmup(
            *pointers, *ints, grid=(1,), **dict(constants), BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=num_warps, num_stages=num_stages,
        )
    return tuning.resident_programs(compiled, device)


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
    stride-0 expanded ones included; lse is the forward's (float32, contiguous). Launches
    the key-slice kernel, plus the dq merge when there is more than one slice.
    ``num_splits`` overrides the number of key slices (tests); by default the compiled
    kernel's occupancy sets it.
    """
    n, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    nh = n * heads
    lse = lse.to(torch.float32).contiguous()  # [N, h, K] float32: already so from the forward
    mask, has_mask = key_mask_argument(key_padding_mask, q)
    config = tuning.backward_config(num_queries)
    block_m, block_n, num_warps, num_stages = config
    num_blocks, chunked = tuning.query_blocks(num_queries, block_m)
    grad_lse_arg = grad_lse if grad_lse is not None else lse
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    ints = (
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out),
        *_strides(grad_lse_arg), *_strides(dq), *_strides(dk), *_strides(dv),
        heads, num_queries, num_keys, head_dim, scale, scale * LOG2E,
    )
    constants = dict(
        HAS_MASK=has_mask, HAS_GRAD_LSE=grad_lse is not None, CHUNKED=chunked,
        DOT_PRECISION=tuning.dot_precision(q.dtype), BLOCK_D=tuning.block_d(head_dim),
        QUERY_BLOCKS=num_blocks,
    )
    if num_splits is None:
        residency = tuning.INTERPRETED_RESIDENCY  # no compiled kernel to ask
        if not tuning.INTERPRETED:
            specialised = tuple(tuning.specialisation(i) for i in (*ints, 2))
            constants_key = tuple(sorted({**constants, "DQ_PARTIAL": True}.items()))
            residency = _backward_residency(q.device, (q.dtype, specialised, constants_key), config)
        num_splits = tuning.num_backward_slices(q.device, nh, num_keys, residency)
    dq_partial = num_splits > 1
    f32 = dict(device=q.device, dtype=torch.float32)
    part_dq = torch.empty((nh, num_splits, num_queries, head_dim), **f32) if dq_partial else dq
    delta = torch.empty((nh, num_queries), **f32)
    scratch = torch.empty((nh, num_keys, 2, head_dim), **f32) if chunked else delta
    launcher(_backward_kernel)[(num_splits, nh)](
        q, k, v, mask, out, grad_out, lse, grad_lse_arg, dq, dk, dv, part_dq, delta, scratch,
        *ints, num_splits, **constants, DQ_PARTIAL=dq_partial, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps, num_stages=num_stages,
    )
    if dq_partial:

        def row_grid(meta):
            return (triton.cdiv(num_queries, meta["BLOCK_M"]), nh)

        launcher(_backward_dq_merge_kernel)[row_grid](
            part_dq, dq, *_strides(dq), heads, num_queries, head_dim, num_splits, scale,
            tuning.size_class(num_keys), BLOCK_D=tuning.block_d(head_dim),
        )
    return dq, dk, dv
