"""Tile helpers shared by the icd Triton kernels (called from inside @triton.jit code)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def key_is_valid(mask_ptr, n, keys, num_keys, HAS_MASK: tl.constexpr):
    """bool [BLOCK_N]: the key exists (< S) and is not padding in image n."""
    valid = keys < num_keys
    if HAS_MASK:
        padded = tl.load(mask_ptr + n.to(tl.int64) * num_keys + keys, mask=valid, other=1)
        valid = valid & (padded == 0)
    return valid


@triton.jit
def tile_pointers(base, rows, dims, stride_row, stride_dim):
    """[BLOCK, BLOCK_D] pointers to rows of a strided [rows, D] matrix (int64 offsets)."""
    return base + rows[:, None].to(tl.int64) * stride_row + dims[None, :].to(tl.int64) * stride_dim


@triton.jit
def load_tile(base, rows, dims, stride_row, stride_dim, row_ok, head_dim):
    """[BLOCK, BLOCK_D] tile of a strided [rows, D] matrix; rows where ``row_ok`` is False and
    columns past D read as 0 and are never loaded (their memory may hold NaN or inf)."""
    ptrs = tile_pointers(base, rows, dims, stride_row, stride_dim)
    return tl.load(ptrs, mask=row_ok[:, None] & (dims[None, :] < head_dim), other=0.0)


@triton.jit
def store_tile(base, rows, dims, stride_row, stride_dim, row_ok, head_dim, value):
    """Store ``value`` [BLOCK, BLOCK_D] into the rows ``row_ok`` of a strided [rows, D] matrix,
    converted to its element type."""
    ptrs = tile_pointers(base, rows, dims, stride_row, stride_dim)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=row_ok[:, None] & (dims[None, :] < head_dim))


@triton.jit
def head_base(ptr, pid_nh, heads, stride_n, stride_h):
    """Pointer to the [L, D] matrix of (image, head) pid_nh of a strided [N, h, L, D] tensor."""
    n = pid_nh // heads
    return ptr + n.to(tl.int64) * stride_n + (pid_nh % heads).to(tl.int64) * stride_h


@triton.jit
def dense_offsets(rows, dims, head_dim):
    """[BLOCK, BLOCK_D] element offsets of rows of a contiguous [rows, D] matrix."""
    return rows[:, None].to(tl.int64) * head_dim + dims[None, :]


@triton.jit
def key_block(mask_ptr, n, key_start, num_keys, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """(keys, valid, num_valid) of the key block starting at ``key_start`` in image n: the
    mask is read once per block; num_valid (int32) 0 means the block can be skipped, BLOCK_N
    that it needs no per-element masking."""
    keys = key_start + tl.arange(0, BLOCK_N)
    valid = key_is_valid(mask_ptr, n, keys, num_keys, HAS_MASK)
    return keys, valid, tl.sum(valid.to(tl.int32), 0)


@triton.jit
def nonzero_slots(weight_row_ptr, num_slots, first, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """(slots int32 [BLOCK_M], count): the slot indices of the nonzero weights number
    first ... first + BLOCK_M - 1 of the row weight_row_ptr[0:num_slots], in slot order (0
    past the last), and how many nonzero weights the row has. On chip, no host count: the
    row is read in chunks of CHUNK, each nonzero slot's rank is a running prefix sum."""
    wanted = first + tl.arange(0, BLOCK_M)
    slots = tl.zeros([BLOCK_M], tl.int32)
    count = tl.sum(tl.zeros([CHUNK], tl.int32), 0)
    for start in range(0, num_slots, CHUNK):
        index = start + tl.arange(0, CHUNK)
        nonzero = (tl.load(weight_row_ptr + index, mask=index < num_slots, other=0.0) > 0).to(tl.int32)
        rank = count + tl.cumsum(nonzero, 0) - 1
        hit = (rank[None, :] == wanted[:, None]) & (nonzero[None, :] != 0)
        slots += tl.sum(tl.where(hit, index[None, :], 0), 1)
        count += tl.sum(nonzero, 0)
    return slots, count


@triton.jit
def nonzero_count(weight_row_ptr, num_slots, CHUNK: tl.constexpr):
    """int32: how many of weight_row_ptr[0:num_slots] are > 0."""
    count = tl.sum(tl.zeros([CHUNK], tl.int32), 0)
    for start in range(0, num_slots, CHUNK):
        index = start + tl.arange(0, CHUNK)
        count += tl.sum((tl.load(weight_row_ptr + index, mask=index < num_slots, other=0.0) > 0).to(tl.int32), 0)
    return count


@triton.jit
def query_rows(weight_ptr, n, first, num_queries, COMPACT: tl.constexpr, BLOCK_M: tl.constexpr):
    """(rows, row_ok, count) of the query block whose first row is ``first``: rows
    first ... of the K queries, or with COMPACT the slots of image n whose weight is > 0 (the
    value mask: weight-0 slots are never read) with count their number; count is K without."""
    if COMPACT:
        rows, count = nonzero_slots(weight_ptr + n * num_queries, num_queries, first, BLOCK_M, 32)
    else:
        rows = first + tl.arange(0, BLOCK_M)
        count = num_queries
    row_ok = (first + tl.arange(0, BLOCK_M)) < count
    return rows, row_ok, count
