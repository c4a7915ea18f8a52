// Which lane of a warp holds which matrix element, for the two warp-wide instructions the
// tensor-core kernels use (PTX ISA, "Warp-level matrix multiply-accumulate instructions"):
//
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32  D = A B + C
//       A 16x16 (row major), B 16x8 (column major), C and D 16x8 float32
//   ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16
//       four 8x8 matrices of 16-bit elements from shared memory, one row address per lane
//
// The kernels (attention_tiles.h) use these functions to know where the elements of their
// accumulator fragments sit in a tile, and the CPU emulation of the two instructions
// (emulated_hw.h) uses the same functions to define what the instructions compute; a test
// checks them against values written out from the PTX ISA's formulas (tests/
// test_tensor_core_emulation.py). Only the layouts live here: no CUDA header, so the file
// compiles with the host compiler too.
//
// Notation of the PTX ISA: groupID = lane >> 2, threadID_in_group = lane % 4. A 32-bit
// register of an A or B fragment holds two 16-bit elements, the lower-numbered one in its low
// half; element i of a fragment is half (i & 1) of register (i >> 1).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ICD_TC_HD __host__ __device__ __forceinline__
#else
#define ICD_TC_HD inline
#endif

namespace icd_tc {

constexpr int kWarpSize = 32;

ICD_TC_HD constexpr int group_of(int lane) { return lane >> 2; }
ICD_TC_HD constexpr int thread_in_group(int lane) { return lane & 3; }

// ---- mma.m16n8k16, .f16 / .bf16 multiplicands, .f32 accumulators ------------------------------

// A (16 x 16): 8 elements a0..a7 in 4 registers per lane.
constexpr int kAElements = 8;
ICD_TC_HD constexpr int a_row(int lane, int i) {
  return group_of(lane) + (((i >> 1) & 1) ? 8 : 0);
}
ICD_TC_HD constexpr int a_col(int lane, int i) {
  return thread_in_group(lane) * 2 + (i & 1) + (i >= 4 ? 8 : 0);
}

// B (16 x 8): 4 elements b0..b3 in 2 registers per lane.
constexpr int kBElements = 4;
ICD_TC_HD constexpr int b_row(int lane, int i) {
  return thread_in_group(lane) * 2 + (i & 1) + (i >= 2 ? 8 : 0);
}
ICD_TC_HD constexpr int b_col(int lane, int /*i*/) { return group_of(lane); }

// C and D (16 x 8): 4 floats c0..c3 per lane.
constexpr int kCElements = 4;
ICD_TC_HD constexpr int c_row(int lane, int i) { return group_of(lane) + (i >= 2 ? 8 : 0); }
ICD_TC_HD constexpr int c_col(int lane, int i) { return thread_in_group(lane) * 2 + (i & 1); }

// ---- ldmatrix.m8n8.x4.b16 -----------------------------------------------------------------------
// Lanes 8m .. 8m + 7 give the addresses of rows 0..7 of matrix m (16 contiguous bytes each).
// Register m of every lane receives two elements of matrix m: without .trans, row
// (lane >> 2) and columns 2 (lane % 4) + h; with .trans, the transposed matrix's, that is
// rows 2 (lane % 4) + h of column (lane >> 2) as stored; h = 0 is the low half.

// The lane whose row address holds element h (0 low, 1 high) of register m of `lane`, and the
// element's column within that 8-element row.
ICD_TC_HD constexpr int ldmatrix_source_lane(int lane, int m, int h, bool trans) {
  return 8 * m + (trans ? thread_in_group(lane) * 2 + h : group_of(lane));
}
ICD_TC_HD constexpr int ldmatrix_source_col(int lane, int h, bool trans) {
  return trans ? group_of(lane) : thread_in_group(lane) * 2 + h;
}

// ---- the operand tiles the kernels load with ldmatrix.x4 ------------------------------------------
// A tile stored row major in shared memory with `stride` elements per row; each helper gives
// the (row, col) whose address `lane` passes to ldmatrix, relative to the tile's corner.

// A fragment of rows [0, 16) x cols [0, 16) of a row-major [M][K] tile (no .trans):
// matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (8-15, 8-15)
// are registers a0a1, a2a3, a4a5, a6a7.
ICD_TC_HD constexpr int a_load_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
ICD_TC_HD constexpr int a_load_col(int lane) { return (lane >> 4) * 8; }

// B fragments of two neighbouring n tiles from a [N][K] tile stored row major (B = tile^T,
// no .trans): rows [0, 16) of the stored tile are n, cols [0, 16) are k. Registers 0, 1 are
// b0b1, b2b3 of n tile 0 (rows 0-7); registers 2, 3 those of n tile 1 (rows 8-15).
ICD_TC_HD constexpr int bt_load_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
ICD_TC_HD constexpr int bt_load_col(int lane) { return ((lane >> 3) & 1) * 8; }

// B fragments of two neighbouring n tiles from a [K][N] tile stored row major (with .trans):
// rows [0, 16) of the stored tile are k, cols [0, 16) are n. Registers 0, 1 are b0b1, b2b3
// of n tile 0 (cols 0-7); registers 2, 3 those of n tile 1 (cols 8-15).
ICD_TC_HD constexpr int b_load_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
ICD_TC_HD constexpr int b_load_col(int lane) { return (lane >> 4) * 8; }

// An A fragment of rows [0, 16) x cols [0, 16) of A = tile^T, from a [K][M] tile stored row
// major (with .trans): rows of the stored tile are k, its columns m.
ICD_TC_HD constexpr int at_load_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
ICD_TC_HD constexpr int at_load_col(int lane) { return ((lane >> 3) & 1) * 8; }

}  // namespace icd_tc
