// Tensor-core tile algorithms of the attention forward pass, its backward pass and the value
// mask (docs/cuda-kernels.md), for float16 and bfloat16 inputs with float32 accumulation.
//
// Each function is the body of one CUDA block, written once against a "hardware" interface
// Hw: DeviceHw (device_hw.cuh: inline PTX mma.sync / ldmatrix, __syncthreads) when nvcc
// compiles it into a kernel, EmulatedHw (emulated_hw.h: host threads and the PTX ISA's
// fragment layouts) when the CPU runs it in the tests. Every shared- and global-memory access
// goes through hw.load / hw.store, so that the emulation can check bounds and races.
//
// Letters as in docs/method.md: N images, h heads, K instance slots (queries), S tokens
// (keys), D head dim, bucketed to DB in {16, 32, 64, 128} (columns D..DB-1 zero in shared
// memory). Logits are kept in log2 units (scale * log2(e) folded in) so that exp2 is one
// instruction; lse leaves in natural-log units.
//
// The non-finite rule of every backend: masked keys are loaded as zero rows and their
// logits are replaced by -inf (not added to), weight-0 slots of the value mask are never
// loaded, so NaN or inf stored there reaches nothing; a NaN anywhere else propagates (the
// running max skips it, the sums keep it).
#pragma once

#include <cmath>
#include <cstdint>

#include "tensor_core/fragments.h"

#if defined(__CUDACC__)
#define ICD_TC_DEVICE __device__ __forceinline__
#define ICD_TC_UNROLL _Pragma("unroll")
#else
#define ICD_TC_DEVICE inline
#define ICD_TC_UNROLL
#endif

namespace icd_tc {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Strides of a [N, h, L, D] tensor, in elements.
struct Strides4 {
  int64_t n, h, row, d;
};

// A pair of floats moved as one 8-byte access (shared-memory dq accumulators).
struct alignas(8) FloatPair {
  float x, y;
};

template <typename T>
ICD_TC_DEVICE uint32_t pack_pair(float lo, float hi) {
  const T a(lo);
  const T b(hi);
  return static_cast<uint32_t>(a.x) | (static_cast<uint32_t>(b.x) << 16);
}

// ---- tile geometry ------------------------------------------------------------------------------

// Shared rows of DB + 8 16-bit elements: 16 bytes of padding puts the 8 rows an ldmatrix reads
// in 8 different 4-bank groups (no bank conflict) and keeps every row 16-byte aligned.
template <int DB>
constexpr int tile_stride() {
  return DB + 8;
}

// Forward pass and value mask: 4 warps, 16 query rows each (forward) or 16 keys each (value
// mask); 64-key tiles (forward) or 64-query tiles (value mask).
struct ForwardConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kRows = 16 * kWarps;  // query rows of a block
  static constexpr int kKeys = 64;           // keys per tile
};

template <int DB>
constexpr size_t forward_shared_bytes() {
  return static_cast<size_t>(ForwardConfig::kRows + 2 * ForwardConfig::kKeys) * tile_stride<DB>() * 2 +
         ForwardConfig::kKeys * sizeof(float);
}

struct ValueMaskConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kKeys = 16 * kWarps;  // keys of a block
  static constexpr int kRows = 64;           // query rows per tile
};

template <int DB>
constexpr size_t value_mask_shared_bytes() {
  return static_cast<size_t>(ValueMaskConfig::kKeys + ValueMaskConfig::kRows) * tile_stride<DB>() * 2 +
         2 * ValueMaskConfig::kRows * sizeof(float);
}

// Backward pass: 8 warps, 16 keys each (128-key blocks); query blocks of kRows rows; the dq
// step splits a query block's rows into kRowGroups groups of 16 and DB into kColGroups.
// kDsStride = kRows + 8 keeps the dS^T stores and their ldmatrix reads free of bank conflicts.
template <int DB>
struct BackwardConfig {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kKeys = 16 * kWarps;
  static constexpr int kRows = DB <= 64 ? 64 : 16;  // DB 128: fewer S^T, dP^T registers
  static constexpr int kRowGroups = kRows / 16;
  static constexpr int kColGroups = kWarps / kRowGroups;
  static constexpr int kColsPerWarp = DB / kColGroups;  // 8 (DB 16) or a multiple of 16
  static constexpr int kStride = tile_stride<DB>();
  static constexpr int kDsStride = kRows + 8;
  static constexpr int kDqStride = DB + 8;  // floats: 8-byte pairs of a half warp hit 32 banks
  // Keep each warp's K and V fragments in registers over the query loop (else reload them).
  static constexpr bool kKeepKeyFragments = DB <= 64;
  static constexpr size_t kFixedBytes =
      static_cast<size_t>(2 * kKeys) * kStride * 2 + static_cast<size_t>(kKeys) * kDsStride * 2 +
      kKeys * sizeof(float);
  static constexpr size_t kBytesPerRow =
      2 * kStride * 2 + kDqStride * sizeof(float) + 2 * sizeof(float);
};

// ---- shared helpers -----------------------------------------------------------------------------

// 16 bytes moved as one access (8 elements of a row when the rows allow it).
struct alignas(16) Chunk16 {
  uint32_t w[4];
};

// Rows [row0, row0 + rows) of a strided [L, D] matrix into a shared tile of `stride` 16-bit
// elements per row and DB columns: rows at or past row_end, rows with skip(row), and columns
// at or past dim are zero. Called by all `threads` threads of the block. When every row is
// 16-byte aligned, contiguous and DB wide (D = DB, as at the ICD shape), each thread moves 16
// bytes at a time; otherwise pairs of elements.
template <int DB, int kThreads, typename T, class Hw, class Skip>
ICD_TC_DEVICE void load_tile(Hw& hw, T* tile, int stride, int rows, const T* matrix,
                             int64_t row_stride, int64_t d_stride, int64_t row0, int64_t row_end,
                             int64_t dim, const Skip& skip) {
  const bool whole_rows = d_stride == 1 && dim == DB && row_stride % 8 == 0 &&
                          reinterpret_cast<uintptr_t>(matrix) % 16 == 0;
  if (whole_rows) {
    constexpr int kChunks = DB / 8;
    for (int i = hw.thread(); i < rows * kChunks; i += kThreads) {
      const int r = i / kChunks;
      const int c = (i % kChunks) * 8;
      const int64_t row = row0 + r;
      Chunk16 chunk{{0u, 0u, 0u, 0u}};
      if (row < row_end && !skip(row)) {
        chunk = hw.load(reinterpret_cast<const Chunk16*>(matrix + row * row_stride + c));
      }
      hw.store(reinterpret_cast<Chunk16*>(tile + r * stride + c), chunk);
    }
    return;
  }
  constexpr int kPairs = DB / 2;
  for (int i = hw.thread(); i < rows * kPairs; i += kThreads) {
    const int r = i / kPairs;
    const int c = (i % kPairs) * 2;
    const int64_t row = row0 + r;
    uint32_t word = 0;
    if (row < row_end && !skip(row)) {
      const T* p = matrix + row * row_stride + c * d_stride;
      const uint32_t lo = c < dim ? hw.load(p).x : 0u;
      const uint32_t hi = c + 1 < dim ? hw.load(p + d_stride).x : 0u;
      word = lo | (hi << 16);
    }
    hw.store(reinterpret_cast<uint32_t*>(tile + r * stride + c), word);
  }
}

struct NoSkip {
  ICD_TC_DEVICE bool operator()(int64_t) const { return false; }
};

struct SkipMasked {
  const bool* mask_row;  // [S] or nullptr
  template <class Hw>
  ICD_TC_DEVICE bool is_masked(Hw& hw, int64_t key) const {
    return mask_row != nullptr && hw.load(mask_row + key);
  }
};

// Keys [s0, s0 + kKeys) of one head into k_s and, with values, v_s (keys at or past s_end and
// masked keys as zero rows); live_s[r] = 1 for the keys that count, else 0. Ends with a
// barrier, and returns to every thread whether any key of the block counts.
template <int DB, int kThreads, int kKeys, bool kWithValues, typename T, class Hw>
ICD_TC_DEVICE bool load_key_block(Hw& hw, T* k_s, T* v_s, float* live_s, const T* k_head,
                                  const Strides4& ks, const T* v_head, const Strides4& vs,
                                  int64_t s0, int64_t s_end, int64_t dim, const SkipMasked& masked) {
  const auto skip = [&](int64_t key) { return masked.is_masked(hw, key); };
  load_tile<DB, kThreads>(hw, k_s, tile_stride<DB>(), kKeys, k_head, ks.row, ks.d, s0, s_end, dim, skip);
  if constexpr (kWithValues) {
    load_tile<DB, kThreads>(hw, v_s, tile_stride<DB>(), kKeys, v_head, vs.row, vs.d, s0, s_end, dim, skip);
  }
  bool any_live = false;
  for (int r = hw.thread(); r < kKeys; r += kThreads) {
    const bool live = s0 + r < s_end && !skip(s0 + r);
    hw.store(live_s + r, live ? 1.f : 0.f);
    any_live = any_live || live;
  }
  return hw.sync_or(any_live);
}

// Sum over the 4 lanes of a quad (the lanes that share an accumulator row).
template <class Hw>
ICD_TC_DEVICE float quad_sum(Hw& hw, float x) {
  x += hw.shfl_xor(x, 1);
  return x + hw.shfl_xor(x, 2);
}

template <class Hw>
ICD_TC_DEVICE float quad_max(Hw& hw, float x) {
  x = fmaxf(x, hw.shfl_xor(x, 1));
  return fmaxf(x, hw.shfl_xor(x, 2));
}

// acc[2j], acc[2j+1] (the C fragments of n tiles 2j, 2j+1 of a 16-row product) as the A
// fragment of k step j of the next product: the C layout of two neighbouring n tiles is the
// A layout of one k step (fragments.h), so no data moves between lanes.
template <typename T>
ICD_TC_DEVICE void c_pair_as_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack_pair<T>(c0[0], c0[1]);
  a[1] = pack_pair<T>(c0[2], c0[3]);
  a[2] = pack_pair<T>(c1[0], c1[1]);
  a[3] = pack_pair<T>(c1[2], c1[3]);
}

// acc[0..2*kPairs) += A (16 x 16) times the B fragments of 2*kPairs n tiles, loaded with
// ldmatrix from a shared tile: kTrans = false for a [N][K] tile (B = tile^T), true for [K][N].
template <typename T, bool kTrans, int kPairs, class Hw, typename E>
ICD_TC_DEVICE void mma_row_times_tile(Hw& hw, float (*acc)[4], const uint32_t (&a)[4],
                                      const E* tile, int stride) {
  const int lane = hw.thread() % kWarpSize;
  const int row = kTrans ? b_load_row(lane) : bt_load_row(lane);
  const int col = kTrans ? b_load_col(lane) : bt_load_col(lane);
ICD_TC_UNROLL
  for (int p = 0; p < kPairs; ++p) {
    uint32_t b[4];
    const E* at = kTrans ? tile + row * stride + p * 16 + col : tile + (p * 16 + row) * stride + col;
    hw.template ldmatrix_x4<kTrans>(b, at);
    const uint32_t b0[2] = {b[0], b[1]};
    const uint32_t b1[2] = {b[2], b[3]};
    hw.template mma<T>(acc[2 * p], a, b0);
    hw.template mma<T>(acc[2 * p + 1], a, b1);
  }
}

// ---- forward ------------------------------------------------------------------------------------

template <typename T>
struct ForwardParams {
  const T* q;  // [N, h, K, D]
  const T* k;  // [N, h, S, D]
  const T* v;  // [N, h, S, D]; unused without values
  Strides4 qs, ks, vs;
  const bool* mask;         // [N, S] or nullptr
  const float* row_weight;  // [N, K] or nullptr: a row of weight 0 needs no lse (value mask)
  int64_t heads, queries, keys, dim;
  float scale;
  int64_t keys_per_split;  // a multiple of ForwardConfig::kKeys
  int splits;
  int64_t part_rows;  // N * h * K
  T* out;           // [N, h, K, D] contiguous; unused without values
  float* lse;       // [N * h * K]
  float* part_acc;  // [splits, N * h * K, D] (several splits, with values)
  float* part_max;  // [splits, N * h * K], natural-log units (several splits)
  float* part_sum;  // [splits, N * h * K] (several splits)
};

// Block (x = query tile of 64 rows, y = image * h + head, z = key split): the 4 warps own 16
// query rows each and keep their Q fragments in registers; the split's keys stream through
// shared memory in 64-key tiles (a tile of only masked keys is skipped). Each row keeps a
// running max m and sum l of exp2(logit - m), and with values the running sum of
// exp2(logit - m) v, in mma accumulators. One split writes out = acc / l and lse; several
// write (acc, m, l) for combine_splits_tile.
template <typename T, int DB, bool kWithValues, class Hw>
ICD_TC_DEVICE void attention_forward_tile(Hw& hw, const ForwardParams<T>& p, unsigned char* smem) {
  using C = ForwardConfig;
  constexpr int kStride = tile_stride<DB>();
  constexpr int kSteps = DB / 16;          // k steps of Q K^T
  constexpr int kKeyTiles = C::kKeys / 8;  // n tiles of a logit tile
  constexpr int kDimTiles = DB / 8;        // n tiles of the output
  T* q_s = reinterpret_cast<T*>(smem);
  T* k_s = q_s + C::kRows * kStride;
  T* v_s = k_s + C::kKeys * kStride;
  float* live_s = reinterpret_cast<float*>(v_s + C::kKeys * kStride);

  const int tid = hw.thread();
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int64_t nh = hw.block_y();
  const int64_t n = nh / p.heads;
  const int64_t h = nh % p.heads;
  const int64_t q0 = hw.block_x() * C::kRows;
  const int64_t split = hw.block_z();
  const int64_t s_begin = split * p.keys_per_split;
  const int64_t s_end = s_begin + p.keys_per_split < p.keys ? s_begin + p.keys_per_split : p.keys;
  const SkipMasked masked{p.mask == nullptr ? nullptr : p.mask + n * p.keys};
  const int64_t row_base = nh * p.queries;  // row (n, h, 0) of [N * h * K]
  const float scale_log2 = p.scale * kLog2e;

  if (p.row_weight != nullptr) {
    bool any = false;
    for (int r = tid; r < C::kRows; r += C::kThreads) {
      const int64_t row = q0 + r;
      if (row < p.queries && hw.load(p.row_weight + n * p.queries + row) != 0.f) any = true;
    }
    // no row of the tile needs an lse (value_mask_tile reads none of them, nor does
    // combine_splits_tile given the same weights): leave, the whole block at once
    if (!hw.sync_or(any)) return;
  }

  load_tile<DB, C::kThreads>(hw, q_s, kStride, C::kRows, p.q + n * p.qs.n + h * p.qs.h, p.qs.row,
                             p.qs.d, q0, p.queries, p.dim, NoSkip{});
  hw.sync();
  uint32_t qf[kSteps][4];
ICD_TC_UNROLL
  for (int kk = 0; kk < kSteps; ++kk) {
    hw.template ldmatrix_x4<false>(
        qf[kk], q_s + (warp * 16 + a_load_row(lane)) * kStride + kk * 16 + a_load_col(lane));
  }

  float o[kDimTiles][4];
ICD_TC_UNROLL
  for (int j = 0; j < kDimTiles; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of the warp, log2 units
  float l[2] = {0.f, 0.f};              // this lane's part of the running sums

  const T* k_head = p.k + n * p.ks.n + h * p.ks.h;
  const T* v_head = kWithValues ? p.v + n * p.vs.n + h * p.vs.h : nullptr;
  for (int64_t s0 = s_begin; s0 < s_end; s0 += C::kKeys) {
    hw.sync();  // the previous tile is consumed
    if (!load_key_block<DB, C::kThreads, C::kKeys, kWithValues>(hw, k_s, v_s, live_s, k_head, p.ks,
                                                                v_head, p.vs, s0, s_end, p.dim, masked)) {
      continue;  // a fully padded tile adds nothing
    }

    float s[kKeyTiles][4];
ICD_TC_UNROLL
    for (int j = 0; j < kKeyTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
ICD_TC_UNROLL
    for (int kk = 0; kk < kSteps; ++kk) {
      mma_row_times_tile<T, false, kKeyTiles / 2>(hw, s, qf[kk], k_s + kk * 16, kStride);
    }

    float tile_max[2] = {-INFINITY, -INFINITY};
ICD_TC_UNROLL
    for (int j = 0; j < kKeyTiles; ++j) {
ICD_TC_UNROLL
      for (int i = 0; i < 4; ++i) {
        const bool live = hw.load(live_s + j * 8 + c_col(lane, i)) != 0.f;
        s[j][i] = live ? s[j][i] * scale_log2 : -INFINITY;
        tile_max[i >> 1] = fmaxf(tile_max[i >> 1], s[j][i]);
      }
    }
    float shift[2];
ICD_TC_UNROLL
    for (int r = 0; r < 2; ++r) {
      const float new_max = fmaxf(m[r], quad_max(hw, tile_max[r]));
      // a row that has seen only masked keys keeps m = -inf: shift by 0 (-inf - -inf is NaN)
      shift[r] = new_max == -INFINITY ? 0.f : new_max;
      const float factor = hw.exp2(m[r] - shift[r]);
      m[r] = new_max;
      l[r] *= factor;
ICD_TC_UNROLL
      for (int j = 0; j < kDimTiles; ++j) {
        o[j][2 * r] *= factor;
        o[j][2 * r + 1] *= factor;
      }
    }
ICD_TC_UNROLL
    for (int j = 0; j < kKeyTiles; ++j) {
ICD_TC_UNROLL
      for (int i = 0; i < 4; ++i) {
        s[j][i] = hw.exp2(s[j][i] - shift[i >> 1]);
        l[i >> 1] += s[j][i];
      }
    }
    if constexpr (kWithValues) {
ICD_TC_UNROLL
      for (int kk = 0; kk < kKeyTiles / 2; ++kk) {
        uint32_t a[4];
        c_pair_as_a<T>(a, s[2 * kk], s[2 * kk + 1]);
        mma_row_times_tile<T, true, kDimTiles / 2>(hw, o, a, v_s + kk * 16 * kStride, kStride);
      }
    }
  }

ICD_TC_UNROLL
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(hw, l[r]);
    const int64_t row = q0 + warp * 16 + c_row(lane, 2 * r);
    if (row >= p.queries) continue;
    const int64_t at = row_base + row;  // index in [N * h * K]
    if (p.splits == 1) {
      if constexpr (kWithValues) {
        const float inv = total == 0.f ? 0.f : 1.f / total;
ICD_TC_UNROLL
        for (int j = 0; j < kDimTiles; ++j) {
ICD_TC_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int64_t col = j * 8 + c_col(lane, 2 * r + e);
            if (col < p.dim) hw.store(p.out + at * p.dim + col, T(o[j][2 * r + e] * inv));
          }
        }
      }
      if (thread_in_group(lane) == 0) {
        hw.store(p.lse + at, total == 0.f ? -INFINITY : m[r] * kLn2 + logf(total));
      }
    } else {
      const int64_t part = split * p.part_rows + at;  // row of [splits, N * h * K]
      if constexpr (kWithValues) {
ICD_TC_UNROLL
        for (int j = 0; j < kDimTiles; ++j) {
ICD_TC_UNROLL
          for (int e = 0; e < 2; ++e) {
            const int64_t col = j * 8 + c_col(lane, 2 * r + e);
            if (col < p.dim) hw.store(p.part_acc + part * p.dim + col, o[j][2 * r + e]);
          }
        }
      }
      if (thread_in_group(lane) == 0) {
        hw.store(p.part_max + part, m[r] == -INFINITY ? -INFINITY : m[r] * kLn2);
        hw.store(p.part_sum + part, total);
      }
    }
  }
}

// Merges the key splits of the forward pass, one warp per row of [N * h * K] (4 per block,
// x = block of rows): M = max m, L = sum l exp(m - M), out = sum acc exp(m - M) / L,
// lse = M + log L; a row without any key gets out 0 and lse -inf. A split with m = -inf saw
// no finite logit: its l and acc are 0, or NaN when it met NaN logits, and are added as they
// are. With row_weight ([N, K]), rows of weight 0 are skipped (their lse is never read).
template <typename T, class Hw>
ICD_TC_DEVICE void combine_splits_tile(Hw& hw, const float* part_acc, const float* part_max,
                                       const float* part_sum, int splits, int64_t rows,
                                       int64_t heads, int64_t queries, int64_t dim,
                                       const float* row_weight, T* out, float* lse) {
  const int lane = hw.thread() % kWarpSize;
  const int64_t row = hw.block_x() * (ForwardConfig::kThreads / kWarpSize) + hw.thread() / kWarpSize;
  if (row >= rows) return;  // whole warps leave; there is no barrier
  if (row_weight != nullptr) {
    const int64_t slot = (row / (heads * queries)) * queries + row % queries;
    if (hw.load(row_weight + slot) == 0.f) return;
  }
  float max_all = -INFINITY;
  for (int z = 0; z < splits; ++z) max_all = fmaxf(max_all, hw.load(part_max + z * rows + row));
  float total = 0.f;
  for (int z = 0; z < splits; ++z) {
    const float m = hw.load(part_max + z * rows + row);
    const float l = hw.load(part_sum + z * rows + row);
    total += m == -INFINITY ? l : l * expf(m - max_all);
  }
  if (lane == 0) hw.store(lse + row, total == 0.f ? -INFINITY : max_all + logf(total));
  if (out == nullptr) return;
  for (int64_t d = lane; d < dim; d += kWarpSize) {
    float sum = 0.f;
    if (total != 0.f) {
      for (int z = 0; z < splits; ++z) {
        const float m = hw.load(part_max + z * rows + row);
        const float acc = hw.load(part_acc + (z * rows + row) * dim + d);
        sum += m == -INFINITY ? acc : acc * expf(m - max_all);
      }
      sum /= total;
    }
    hw.store(out + row * dim + d, T(sum));
  }
}

// ---- backward -----------------------------------------------------------------------------------

// delta[row] = sum_d grad_out[row, d] out[row, d] - grad_lse[row] for the rows of [N * h * K],
// one warp per row (4 per block, x = block of rows).
template <typename T, class Hw>
ICD_TC_DEVICE void attention_delta_tile(Hw& hw, const T* grad_out, Strides4 gs, const T* out,
                                        Strides4 os, const float* grad_lse, int64_t heads,
                                        int64_t queries, int64_t dim, int64_t rows, float* delta) {
  const int lane = hw.thread() % kWarpSize;
  const int64_t row = hw.block_x() * (ForwardConfig::kThreads / kWarpSize) + hw.thread() / kWarpSize;
  if (row >= rows) return;  // whole warps leave
  const int64_t nh = row / queries;
  const int64_t kq = row % queries;
  const T* g = grad_out + (nh / heads) * gs.n + (nh % heads) * gs.h + kq * gs.row;
  const T* o = out + (nh / heads) * os.n + (nh % heads) * os.h + kq * os.row;
  float sum = 0.f;
  for (int64_t d = lane; d < dim; d += kWarpSize) {
    sum += static_cast<float>(hw.load(g + d * gs.d)) * static_cast<float>(hw.load(o + d * os.d));
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += hw.shfl_xor(sum, offset);
  if (lane == 0) hw.store(delta + row, sum - (grad_lse == nullptr ? 0.f : hw.load(grad_lse + row)));
}

// out[n, h, l, d] = sum over z of part[z, (n * h + h) * L + l, d] (float32 partials summed in
// the order z = 0, 1, ...: deterministic), written through out's strides; a grid-stride loop
// over the N * h * L * D elements (x = block, ForwardConfig::kThreads threads).
template <typename T, class Hw>
ICD_TC_DEVICE void sum_partials_tile(Hw& hw, const float* part, int parts, int64_t size,
                                     int64_t heads, int64_t length, int64_t dim, Strides4 os,
                                     T* out, int64_t grid_blocks) {
  const int64_t stride = grid_blocks * ForwardConfig::kThreads;
  for (int64_t i = hw.block_x() * ForwardConfig::kThreads + hw.thread(); i < size; i += stride) {
    float sum = 0.f;
    for (int z = 0; z < parts; ++z) sum += hw.load(part + z * size + i);
    const int64_t d = i % dim;
    const int64_t l = (i / dim) % length;
    const int64_t nh = i / (dim * length);
    hw.store(out + (nh / heads) * os.n + (nh % heads) * os.h + l * os.row + d * os.d, T(sum));
  }
}

template <typename T>
struct BackwardParams {
  const T* q;         // [N, h, K, D]
  const T* k;         // [N, h, S, D]
  const T* v;         // [N, h, S, D]
  const T* grad_out;  // [N, h, K, D]
  Strides4 qs, ks, vs, gs;
  const bool* mask;    // [N, S] or nullptr
  const float* lse;    // [N * h * K], natural-log units
  const float* delta;  // [N * h * K]
  int64_t heads, queries, keys, dim;
  float scale;
  int64_t keys_per_slice;  // a multiple of BackwardConfig::kKeys
  int64_t chunk_rows;      // a multiple of BackwardConfig::kRows
  int slices, chunks;
  int64_t part_query_rows;  // N * h * K
  int64_t part_key_rows;    // N * h * S
  T* dq;  // [N, h, K, D], strides dqs (one slice)
  T* dk;  // [N, h, S, D], strides dks (one chunk)
  T* dv;  // [N, h, S, D], strides dvs (one chunk)
  Strides4 dqs, dks, dvs;
  float* part_dq;  // [slices, N * h * K, D] (several slices)
  float* part_dk;  // [chunks, N * h * S, D] (several chunks)
  float* part_dv;  // [chunks, N * h * S, D] (several chunks)
};

// The dq step of attention_backward_tile for query block r0: warp (rg, cg) adds dS K to dq
// rows [r0 + 16 rg, + 16) x cols [cg kColsPerWarp, + kColsPerWarp), A = dS read transposed
// from ds_s ([keys][queries]), B = K from k_s ([keys][D], .trans), k = the block's 128 keys.
template <typename T, int DB, class Hw>
ICD_TC_DEVICE void dq_step(Hw& hw, const T* ds_s, const T* k_s, float* dq_s, int r0, int warp,
                           int lane) {
  using C = BackwardConfig<DB>;
  constexpr int kTiles = C::kColsPerWarp / 8;  // n tiles: 1 (DB 16) or even
  const int rg = warp % C::kRowGroups;
  const int cg = warp / C::kRowGroups;
  const int col0 = cg * C::kColsPerWarp;
  float acc[kTiles][4];
ICD_TC_UNROLL
  for (int j = 0; j < kTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
ICD_TC_UNROLL
  for (int kk = 0; kk < C::kKeys / 16; ++kk) {
    uint32_t a[4];
    hw.template ldmatrix_x4<true>(
        a, ds_s + (kk * 16 + at_load_row(lane)) * C::kDsStride + rg * 16 + at_load_col(lane));
    const T* k_rows = k_s + kk * 16 * C::kStride;
    if constexpr (kTiles == 1) {
      // the ldmatrix brings the n-tile pair holding col0; this warp's tile is half of it
      uint32_t b[4];
      hw.template ldmatrix_x4<true>(
          b, k_rows + b_load_row(lane) * C::kStride + (col0 / 16) * 16 + b_load_col(lane));
      const uint32_t mine[2] = {col0 % 16 == 0 ? b[0] : b[2], col0 % 16 == 0 ? b[1] : b[3]};
      hw.template mma<T>(acc[0], a, mine);
    } else {
      mma_row_times_tile<T, true, kTiles / 2>(hw, acc, a, k_rows + col0, C::kStride);
    }
  }
ICD_TC_UNROLL
  for (int j = 0; j < kTiles; ++j) {
ICD_TC_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int row = r0 + rg * 16 + c_row(lane, 2 * r);
      const int col = col0 + j * 8 + c_col(lane, 2 * r);
      auto* at = reinterpret_cast<FloatPair*>(dq_s + row * C::kDqStride + col);
      FloatPair sum = hw.load(at);
      sum.x += acc[j][2 * r];
      sum.y += acc[j][2 * r + 1];
      hw.store(at, sum);
    }
  }
}

// Block (x = key slice, y = image * h + head, z = query chunk): the chunk's Q, dO, lse and
// delta stay in shared memory, with a float32 dq accumulator, while the slice's keys stream
// through in 128-key blocks (a block of only masked keys is skipped). Warp w owns keys
// [16 w, 16 w + 16) of a block and accumulates their dk and dv in registers over every query
// block of the chunk, computing the transposed tiles (keys as rows) so that P^T and dS^T are
// A fragments without a transpose:
//   S^T = K Q^T,  P^T = exp2(S^T scale log2(e) - lse log2(e)),  dP^T = V dO^T,
//   dS^T = P^T (dP^T - delta),  dv += P^T dO,  dk += dS^T Q,  dq += dS K (through shared memory).
// The dq step gives each warp a fixed 16-row x DB / kColGroups tile of the query block, so each
// accumulator word has one owner thread: no atomics, and the sums run in a fixed order. A
// slice's dq (several slices) and a chunk's dk, dv (several chunks) leave as float32 partials
// that sum_partials_tile adds in order.
template <typename T, int DB, class Hw>
ICD_TC_DEVICE void attention_backward_tile(Hw& hw, const BackwardParams<T>& p, unsigned char* smem) {
  using C = BackwardConfig<DB>;
  constexpr int kStride = C::kStride;
  constexpr int kSteps = DB / 16;          // k steps over the head dim
  constexpr int kRowTiles = C::kRows / 8;  // n tiles of a (keys x queries) tile
  constexpr int kDimTiles = DB / 8;
  const int64_t chunk_rows = p.chunk_rows;
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + C::kKeys * kStride;
  T* ds_s = v_s + C::kKeys * kStride;
  float* live_s = reinterpret_cast<float*>(ds_s + C::kKeys * C::kDsStride);
  T* q_s = reinterpret_cast<T*>(live_s + C::kKeys);
  T* do_s = q_s + chunk_rows * kStride;
  float* dq_s = reinterpret_cast<float*>(do_s + chunk_rows * kStride);
  float* lse_s = dq_s + chunk_rows * C::kDqStride;
  float* delta_s = lse_s + chunk_rows;

  const int tid = hw.thread();
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int64_t nh = hw.block_y();
  const int64_t n = nh / p.heads;
  const int64_t h = nh % p.heads;
  const int64_t slice = hw.block_x();
  const int64_t chunk = hw.block_z();
  const int64_t s_begin = slice * p.keys_per_slice;
  const int64_t s_end = s_begin + p.keys_per_slice < p.keys ? s_begin + p.keys_per_slice : p.keys;
  const int64_t c0 = chunk * chunk_rows;
  const int64_t c_rows = c0 + chunk_rows < p.queries ? chunk_rows : p.queries - c0;
  const int c_blocks = static_cast<int>((c_rows + C::kRows - 1) / C::kRows);
  const int c_padded = c_blocks * C::kRows;
  const SkipMasked masked{p.mask == nullptr ? nullptr : p.mask + n * p.keys};
  const float scale_log2 = p.scale * kLog2e;

  // the chunk's rows; past its end: zero rows, lse +inf (P = 0), delta 0
  load_tile<DB, C::kThreads>(hw, q_s, kStride, c_padded, p.q + n * p.qs.n + h * p.qs.h, p.qs.row,
                             p.qs.d, c0, c0 + c_rows, p.dim, NoSkip{});
  load_tile<DB, C::kThreads>(hw, do_s, kStride, c_padded,
                             p.grad_out + n * p.gs.n + h * p.gs.h, p.gs.row, p.gs.d, c0,
                             c0 + c_rows, p.dim, NoSkip{});
  for (int r = tid; r < c_padded; r += C::kThreads) {
    const int64_t row = c0 + r;
    const bool in = r < c_rows;
    const float lse = in ? hw.load(p.lse + nh * p.queries + row) : -INFINITY;
    // a row without keys (lse -inf) or past the chunk gets P = 0 from lse = +inf
    hw.store(lse_s + r, lse == -INFINITY ? INFINITY : lse * kLog2e);
    hw.store(delta_s + r, in ? hw.load(p.delta + nh * p.queries + row) : 0.f);
  }
  for (int i = tid; i < c_padded * (DB / 2); i += C::kThreads) {
    hw.store(reinterpret_cast<FloatPair*>(dq_s + (i / (DB / 2)) * C::kDqStride + (i % (DB / 2)) * 2),
             FloatPair{0.f, 0.f});
  }

  const T* k_head = p.k + n * p.ks.n + h * p.ks.h;
  const T* v_head = p.v + n * p.vs.n + h * p.vs.h;
  const int key_in_block[2] = {warp * 16 + c_row(lane, 0), warp * 16 + c_row(lane, 2)};
  for (int64_t s0 = s_begin; s0 < s_end; s0 += C::kKeys) {
    hw.sync();  // the previous key block is consumed (and the chunk loaded)
    const bool block_live = load_key_block<DB, C::kThreads, C::kKeys, true>(
        hw, k_s, v_s, live_s, k_head, p.ks, v_head, p.vs, s0, s_end, p.dim, masked);

    float dk[kDimTiles][4], dv[kDimTiles][4];
ICD_TC_UNROLL
    for (int j = 0; j < kDimTiles; ++j) {
ICD_TC_UNROLL
      for (int i = 0; i < 4; ++i) dk[j][i] = dv[j][i] = 0.f;
    }
    bool key_live[2] = {false, false};
    if (block_live) {
      key_live[0] = hw.load(live_s + key_in_block[0]) != 0.f;
      key_live[1] = hw.load(live_s + key_in_block[1]) != 0.f;
      uint32_t kf[C::kKeepKeyFragments ? kSteps : 1][4], vf[C::kKeepKeyFragments ? kSteps : 1][4];
      const auto load_key_fragments = [&](uint32_t (*kfr)[4], uint32_t (*vfr)[4]) {
ICD_TC_UNROLL
        for (int kk = 0; kk < kSteps; ++kk) {
          const int at = (warp * 16 + a_load_row(lane)) * kStride + kk * 16 + a_load_col(lane);
          hw.template ldmatrix_x4<false>(kfr[kk], k_s + at);
          hw.template ldmatrix_x4<false>(vfr[kk], v_s + at);
        }
      };
      if constexpr (C::kKeepKeyFragments) load_key_fragments(kf, vf);

      for (int qb = 0; qb < c_blocks; ++qb) {
        const int r0 = qb * C::kRows;
        float st[kRowTiles][4], dpt[kRowTiles][4];
ICD_TC_UNROLL
        for (int j = 0; j < kRowTiles; ++j) {
ICD_TC_UNROLL
          for (int i = 0; i < 4; ++i) st[j][i] = dpt[j][i] = 0.f;
        }
        if constexpr (C::kKeepKeyFragments) {
ICD_TC_UNROLL
          for (int kk = 0; kk < kSteps; ++kk) {
            mma_row_times_tile<T, false, kRowTiles / 2>(hw, st, kf[kk], q_s + r0 * kStride + kk * 16, kStride);
            mma_row_times_tile<T, false, kRowTiles / 2>(hw, dpt, vf[kk], do_s + r0 * kStride + kk * 16, kStride);
          }
        } else {
          uint32_t kfr[kSteps][4], vfr[kSteps][4];
          load_key_fragments(kfr, vfr);
ICD_TC_UNROLL
          for (int kk = 0; kk < kSteps; ++kk) {
            mma_row_times_tile<T, false, kRowTiles / 2>(hw, st, kfr[kk], q_s + r0 * kStride + kk * 16, kStride);
            mma_row_times_tile<T, false, kRowTiles / 2>(hw, dpt, vfr[kk], do_s + r0 * kStride + kk * 16, kStride);
          }
        }
        // P^T and dS^T; a masked key or a row without keys gets exactly 0 (not 0 * NaN)
ICD_TC_UNROLL
        for (int j = 0; j < kRowTiles; ++j) {
ICD_TC_UNROLL
          for (int i = 0; i < 4; ++i) {
            const int col = r0 + j * 8 + c_col(lane, i);
            const float row_lse = hw.load(lse_s + col);
            const bool live = key_live[i >> 1] && row_lse != INFINITY;
            const float pt = live ? hw.exp2(st[j][i] * scale_log2 - row_lse) : 0.f;
            dpt[j][i] = live ? pt * (dpt[j][i] - hw.load(delta_s + col)) : 0.f;
            st[j][i] = pt;
          }
        }
        // dv += P^T dO and dk += dS^T Q (k = the block's queries)
ICD_TC_UNROLL
        for (int kk = 0; kk < kRowTiles / 2; ++kk) {
          uint32_t a[4];
          c_pair_as_a<T>(a, st[2 * kk], st[2 * kk + 1]);
          mma_row_times_tile<T, true, kDimTiles / 2>(hw, dv, a, do_s + (r0 + kk * 16) * kStride, kStride);
          c_pair_as_a<T>(a, dpt[2 * kk], dpt[2 * kk + 1]);
          mma_row_times_tile<T, true, kDimTiles / 2>(hw, dk, a, q_s + (r0 + kk * 16) * kStride, kStride);
        }
        hw.sync();  // every warp has finished the previous query block's dq step (ds_s reads)
ICD_TC_UNROLL
        for (int j = 0; j < kRowTiles; ++j) {
ICD_TC_UNROLL
          for (int r = 0; r < 2; ++r) {
            hw.store(reinterpret_cast<uint32_t*>(ds_s + key_in_block[r] * C::kDsStride + j * 8 +
                                                 c_col(lane, 2 * r)),
                     pack_pair<T>(dpt[j][2 * r], dpt[j][2 * r + 1]));
          }
        }
        hw.sync();
        dq_step<T, DB>(hw, ds_s, k_s, dq_s, r0, warp, lane);
      }
    }

    // this warp's 16 keys: dk (scaled) and dv, exact zeros for masked keys
ICD_TC_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int64_t key = s0 + key_in_block[r];
      if (key >= s_end) continue;
ICD_TC_UNROLL
      for (int j = 0; j < kDimTiles; ++j) {
ICD_TC_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int64_t col = j * 8 + c_col(lane, 2 * r + e);
          if (col >= p.dim) continue;
          const float dk_value = key_live[r] ? dk[j][2 * r + e] * p.scale : 0.f;
          const float dv_value = key_live[r] ? dv[j][2 * r + e] : 0.f;
          if (p.chunks == 1) {
            hw.store(p.dk + n * p.dks.n + h * p.dks.h + key * p.dks.row + col * p.dks.d, T(dk_value));
            hw.store(p.dv + n * p.dvs.n + h * p.dvs.h + key * p.dvs.row + col * p.dvs.d, T(dv_value));
          } else {
            const int64_t part = (chunk * p.part_key_rows + nh * p.keys + key) * p.dim + col;
            hw.store(p.part_dk + part, dk_value);
            hw.store(p.part_dv + part, dv_value);
          }
        }
      }
    }
  }

  hw.sync();  // the dq accumulators are final
  for (int64_t i = tid; i < c_rows * p.dim; i += C::kThreads) {
    const int64_t r = i / p.dim;
    const int64_t col = i % p.dim;
    const float value = hw.load(dq_s + r * C::kDqStride + col) * p.scale;
    const int64_t row = c0 + r;
    if (p.slices == 1) {
      hw.store(p.dq + n * p.dqs.n + h * p.dqs.h + row * p.dqs.row + col * p.dqs.d, T(value));
    } else {
      hw.store(p.part_dq + (slice * p.part_query_rows + nh * p.queries + row) * p.dim + col, value);
    }
  }
}

// ---- value mask ---------------------------------------------------------------------------------

template <typename T>
struct ValueMaskParams {
  const T* q;  // [N, h, K, D]
  const T* k;  // [N, h, S, D]
  Strides4 qs, ks;
  const bool* mask;     // [N, S] or nullptr
  const float* weight;  // [N, K] contiguous
  const float* lse;     // [N * h * K], natural-log units, of the logits / temperature
  int64_t heads, queries, keys, dim;
  float scale;  // scale / temperature
  float* out;   // [N, h, S]
};

// out[n, h, s] = sum_k weight[n, k] exp(scale q_k . k_s - lse[n, h, k]); masked keys 0.
// Block (x = 64-key tile, y = image * h + head): warp w owns keys [16 w, 16 w + 16) and keeps
// their fragments in registers while the query slots stream through in 64-row tiles; only
// slots of weight != 0 and lse != -inf are loaded and counted (a tile with none is skipped),
// so NaN stored in a weight-0 slot is never read. Each lane sums its columns of S^T in
// registers; a quad adds its four sums at the end: a fixed order, no atomics.
template <typename T, int DB, class Hw>
ICD_TC_DEVICE void value_mask_tile(Hw& hw, const ValueMaskParams<T>& p, unsigned char* smem) {
  using C = ValueMaskConfig;
  constexpr int kStride = tile_stride<DB>();
  constexpr int kSteps = DB / 16;
  constexpr int kRowTiles = C::kRows / 8;
  T* k_s = reinterpret_cast<T*>(smem);
  T* q_s = k_s + C::kKeys * kStride;
  float* lse_s = reinterpret_cast<float*>(q_s + C::kRows * kStride);
  float* weight_s = lse_s + C::kRows;

  const int tid = hw.thread();
  const int warp = tid / kWarpSize;
  const int lane = tid % kWarpSize;
  const int64_t nh = hw.block_y();
  const int64_t n = nh / p.heads;
  const int64_t h = nh % p.heads;
  const int64_t s0 = hw.block_x() * C::kKeys;
  const SkipMasked masked{p.mask == nullptr ? nullptr : p.mask + n * p.keys};
  const auto skip = [&](int64_t key) { return masked.is_masked(hw, key); };
  const float scale_log2 = p.scale * kLog2e;
  const float* weight_row = p.weight + n * p.queries;

  load_tile<DB, C::kThreads>(hw, k_s, kStride, C::kKeys, p.k + n * p.ks.n + h * p.ks.h, p.ks.row,
                             p.ks.d, s0, p.keys, p.dim, skip);
  hw.sync();
  uint32_t kf[kSteps][4];
ICD_TC_UNROLL
  for (int kk = 0; kk < kSteps; ++kk) {
    hw.template ldmatrix_x4<false>(
        kf[kk], k_s + (warp * 16 + a_load_row(lane)) * kStride + kk * 16 + a_load_col(lane));
  }

  float sum[2] = {0.f, 0.f};  // this lane's part of keys g and g + 8 of the warp
  const T* q_head = p.q + n * p.qs.n + h * p.qs.h;
  for (int64_t q0 = 0; q0 < p.queries; q0 += C::kRows) {
    hw.sync();  // the previous query tile is consumed
    bool any = false;
    for (int r = tid; r < C::kRows; r += C::kThreads) {
      const int64_t row = q0 + r;
      float w = 0.f;
      float lse = INFINITY;  // P = 0
      if (row < p.queries) {
        w = hw.load(weight_row + row);
        if (w != 0.f) {
          lse = hw.load(p.lse + nh * p.queries + row);
          if (lse == -INFINITY) {  // a slot without keys adds nothing
            w = 0.f;
            lse = INFINITY;
          }
        }
      }
      hw.store(weight_s + r, w);
      hw.store(lse_s + r, lse * kLog2e);
      any = any || w != 0.f;
    }
    const auto zero_weight = [&](int64_t row) { return hw.load(weight_row + row) == 0.f; };
    load_tile<DB, C::kThreads>(hw, q_s, kStride, C::kRows, q_head, p.qs.row, p.qs.d, q0,
                               p.queries, p.dim, zero_weight);
    if (!hw.sync_or(any)) continue;

    float st[kRowTiles][4];
ICD_TC_UNROLL
    for (int j = 0; j < kRowTiles; ++j) st[j][0] = st[j][1] = st[j][2] = st[j][3] = 0.f;
ICD_TC_UNROLL
    for (int kk = 0; kk < kSteps; ++kk) {
      mma_row_times_tile<T, false, kRowTiles / 2>(hw, st, kf[kk], q_s + kk * 16, kStride);
    }
ICD_TC_UNROLL
    for (int j = 0; j < kRowTiles; ++j) {
ICD_TC_UNROLL
      for (int i = 0; i < 4; ++i) {
        const int col = j * 8 + c_col(lane, i);
        const float w = hw.load(weight_s + col);
        if (w != 0.f) sum[i >> 1] += w * hw.exp2(st[j][i] * scale_log2 - hw.load(lse_s + col));
      }
    }
  }

ICD_TC_UNROLL
  for (int r = 0; r < 2; ++r) {
    const float total = quad_sum(hw, sum[r]);
    const int64_t key = s0 + warp * 16 + c_row(lane, 2 * r);
    if (thread_in_group(lane) == 0 && key < p.keys) {
      hw.store(p.out + nh * p.keys + key, skip(key) ? 0.f : total);
    }
  }
}

}  // namespace icd_tc
