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
def load_rows(base, rows, dims, stride_row, stride_dim, num_rows, head_dim):
    """[BLOCK, BLOCK_D] tile of a strided [rows, D] matrix, zeros outside it."""
    return load_tile(base, rows, dims, stride_row, stride_dim, rows < num_rows, head_dim)


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
