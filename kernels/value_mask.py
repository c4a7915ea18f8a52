"""Fused instance value mask (docs/method.md 3.2): sum_k weight[n, k] softmax_s(logits / T).

One program per (key block, head) recomputes each probability exp(x / T - lse_T) from q, k
and the row logsumexp, and adds weight[n, k] * p over k: one write per [n, h, s], no atomics,
no [N, h, K, S] tensor. Only the slots of weight > 0 are computed (7-12 of 300 in ICD): each
program compacts its image's nonzero slots on chip (tiles.nonzero_slots) and walks them in
query blocks, so fake and padding slots cost nothing and are never read. The row logsumexp is
the given lse (temperature 1) or comes from the attention forward's split-S pass run without
values over the same compacted slots, whose per-slice (max, sum) the value-mask kernel merges
for the rows it reads (no merge launch: 2 launches without lse, 1 with). Key blocks of
padding are skipped (zeros written), partly padded ones masked per element. Masked keys are
never read (their k may hold NaN or inf without effect).

Shapes: q [N, h, K, D]; k [N, h, S, D] (any strides); weight [N, K] float32 contiguous;
key_padding_mask bool [N, S] or None; lse [N, h, K] float32 or None; out [N, h, S] float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning
from .instance_attention import ATTENTION_KEY, LOG2E, key_mask_argument, merge_step, weighted_row_statistics
from .launch import launcher
from .tiles import head_base, key_block, load_tile, nonzero_count, query_rows


@triton.jit
def _row_lse2(lse_ptr, part_max_ptr, part_sum_ptr, pid_nh, rows, row_ok, num_queries, num_splits,
              FROM_PARTS: tl.constexpr):
    """Base-2 logsumexp of the scaled logits of ``rows``, +inf for rows without keys and past
    the count (P = 0 there): from the natural-log lse, or (FROM_PARTS) merged from the
    statistics pass's per-slice max and sum in slice order. A NaN row stays NaN."""
    if FROM_PARTS:
        row_max = tl.full(rows.shape, float("-inf"), tl.float32)
        row_sum = tl.zeros(rows.shape, tl.float32)
        for split in range(0, num_splits):
            part_rows = (pid_nh * num_splits + split) * num_queries + rows
            split_max = tl.load(part_max_ptr + part_rows, mask=row_ok, other=float("-inf"))
            split_sum = tl.load(part_sum_ptr + part_rows, mask=row_ok, other=0.0)
            row_max, row_sum, _, _ = merge_step(row_max, row_sum, split_max, split_sum)
        has_keys = row_sum != 0.0  # True for NaN
        lse2 = tl.where(has_keys, row_max + tl.log2(tl.where(has_keys, row_sum, 1.0)), float("inf"))
    else:
        lse = tl.load(lse_ptr + pid_nh * num_queries + rows, mask=row_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return lse2


@tuning.autotune("key_block", key=[*ATTENTION_KEY, "FROM_PARTS"])
@triton.jit
def _value_mask_kernel(
    q_ptr, k_ptr, mask_ptr, weight_ptr, lse_ptr, part_max_ptr, part_sum_ptr, out_ptr,
    stride_qn, stride_qh, stride_qk, stride_qd,
    stride_kn, stride_kh, stride_ks, stride_kd,
    heads, num_queries, num_keys, head_dim, qk_scale, num_splits,
    S_CLASS,
    HAS_MASK: tl.constexpr, FROM_PARTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[n, h, s] for one block of keys s; the rows' lse is lse_ptr's (natural log of x / T)
    or merged from the statistics partials (FROM_PARTS), read at the nonzero-weight slots only."""
    pid_s = tl.program_id(0)
    pid_nh = tl.program_id(1)
    n = pid_nh // heads
    keys, valid, num_valid = key_block(mask_ptr, n, pid_s * BLOCK_N, num_keys, HAS_MASK, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    total = tl.zeros([BLOCK_N], tl.float32)
    if num_valid > 0:  # a block of padding is 0
        # masked keys are not loaded: their k reads as 0, whatever memory holds
        k = load_tile(head_base(k_ptr, pid_nh, heads, stride_kn, stride_kh), keys, dims,
                      stride_ks, stride_kd, valid, head_dim)
        q_base = head_base(q_ptr, pid_nh, heads, stride_qn, stride_qh)
        partial = num_valid < BLOCK_N
        count = nonzero_count(weight_ptr + n * num_queries, num_queries, 32)
        for first in range(0, count, BLOCK_M):
            rows, row_ok, _ = query_rows(weight_ptr, n, first, num_queries, True, BLOCK_M)
            # rows past the count read as q = 0, lse = +inf, weight = 0: they add exactly 0
            q = load_tile(q_base, rows, dims, stride_qk, stride_qd, row_ok, head_dim)
            weight = tl.load(weight_ptr + n * num_queries + rows, mask=row_ok, other=0.0)
            lse2 = _row_lse2(lse_ptr, part_max_ptr, part_sum_ptr, pid_nh, rows, row_ok, num_queries,
                             num_splits, FROM_PARTS)
            x = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            p = tl.exp2(x * qk_scale - lse2[:, None]) * weight[:, None]
            if partial:  # masked keys add exactly nothing, even where p is NaN
                p = tl.where(valid[None, :], p, 0.0)
            total += tl.sum(p, 0)
    tl.store(out_ptr + pid_nh * num_keys + keys, total, mask=keys < num_keys)


def value_mask(
    q: Tensor,
    k: Tensor,
    weight: Tensor,
    key_padding_mask: Tensor | None,
    lse: Tensor | None,
    scale: float,
    temperature: float,
    num_splits: int | None = None,
) -> Tensor:
    """[N, h, S] float32: out[n, h, s] = sum_k weight[n, k] softmax_s(scale q k^T / T)[s].

    ``lse`` (float32 [N, h, K], only valid with temperature 1) skips the logsumexp pass;
    ``num_splits`` sets that pass's key slices (tests). Launches 1 kernel with ``lse``, else 2
    (the statistics pass, and the mask, which merges the pass's slices itself).
    """
    n, heads, num_queries, head_dim = q.shape
    num_keys = k.shape[2]
    logit_scale = scale / temperature
    weight = weight.to(torch.float32).contiguous()
    if lse is None:
        part_max, part_sum = weighted_row_statistics(q, k, key_padding_mask, weight, logit_scale, num_splits)
        lse_arg, splits = part_max, part_max.shape[1]
    else:
        lse_arg = part_max = part_sum = lse.to(torch.float32).contiguous()
        splits = 1
    out = torch.empty((n, heads, num_keys), device=k.device, dtype=torch.float32)
    mask, has_mask = key_mask_argument(key_padding_mask, q)

    def grid(meta):
        return (triton.cdiv(num_keys, meta["BLOCK_N"]), n * heads)

    launcher(_value_mask_kernel)[grid](
        q, k, mask, weight, lse_arg, part_max, part_sum, out,
        *q.stride(), *k.stride(),
        heads, num_queries, num_keys, head_dim, logit_scale * LOG2E, splits,
        tuning.size_class(num_keys),
        HAS_MASK=has_mask, FROM_PARTS=lse is None, DOT_PRECISION=tuning.dot_precision(q.dtype),
        BLOCK_D=tuning.block_d(head_dim),
    )
    return out
