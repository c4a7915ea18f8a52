// The forward pass of instance attention (online softmax over key tiles, split over S with a
// combine step), shared by icd_ext::attention_forward and by the first pass of
// icd_ext::value_mask, which needs only the logsumexp of each row (kWithValues = false).
//
// Block (x = query tile, y = image * h + head, z = key split): 16 query rows stay in shared
// memory while the split's keys stream through in tiles of AttentionTile<DB>::kKeys. Each
// row keeps a running max m and sum l of exp(logit - m) (and, with values, the running
// sum of exp(logit - m) v); a row that has seen only masked keys keeps m = -inf and l = 0.
// With one split the block writes out = acc / l and lse = m + log l; with several, each
// split writes (acc, m, l) and tc_combine_kernel (cuda/tile_kernels.cuh) merges them.
//
// Non-finite inputs: masked keys get logit -inf and zeroed k and v rows (load_key_rows), so
// nothing stored there reaches a result. A NaN logit is skipped by the running max (fmaxf)
// but kept by the running sum, so l is NaN and the row's out and lse are NaN; the tests
// below therefore ask "l == 0" (no key) rather than "l > 0".
#pragma once

#include "cuda/common.cuh"
#include "cuda/tile_kernels.cuh"

namespace icd_cuda {

template <typename T>
struct AttentionForwardArgs {
  const T* q;  // [N, h, K, D], strides qs
  const T* k;  // [N, h, S, D], strides ks
  const T* v;  // [N, h, S, D], strides vs; unused without values
  HeadStrides qs, ks, vs;
  const bool* mask;  // [N, S] or nullptr
  int64_t heads, queries, keys, dim;
  float scale;
  int64_t keys_per_split;  // a multiple of the key tile
  int splits;
  T* out;           // [N, h, K, D] contiguous; unused without values
  float* lse;       // [N, h, K]
  float* part_acc;  // [splits, N * h * K, D] (several splits, with values)
  float* part_max;  // [splits, N * h * K] (several splits)
  float* part_sum;  // [splits, N * h * K] (several splits)
};

// One online-softmax step over a tile of logits p[QB][BS] (-inf for masked keys): replaces
// the logits by exp(logit - m_new) and updates each row's running max and sum; rescale[r]
// is the factor exp(m_old - m_new) for sums accumulated before this tile. Called by the
// whole block; warp w handles rows w, w + 4, ...
template <int QB, int BS>
__device__ __forceinline__ void online_softmax_step(float (*p)[BS + 1], float* row_max,
                                                    float* row_sum, float* rescale) {
  constexpr int kPerLane = BS / kWarp;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  for (int r = warp; r < QB; r += kThreads / kWarp) {
    float x[kPerLane];
    float tile_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      x[i] = p[r][lane + i * kWarp];
      tile_max = fmaxf(tile_max, x[i]);
    }
    tile_max = warp_max(tile_max);
    const float old_max = row_max[r];
    const float new_max = fmaxf(old_max, tile_max);
    // While a row has seen only masked keys its max is -inf: shift by 0, never by -inf
    // (-inf - -inf would be NaN); exp(-inf) = 0 then keeps its sums at 0.
    const float shift = new_max == -INFINITY ? 0.f : new_max;
    float tile_sum = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const float e = expf(x[i] - shift);
      p[r][lane + i * kWarp] = e;
      tile_sum += e;
    }
    tile_sum = warp_sum(tile_sum);
    // every lane has read row_max[r] above; make that ordering explicit before lane 0
    // overwrites it (compute-sanitizer racecheck reported the read/write pair as a hazard)
    __syncwarp();
    if (lane == 0) {
      const float factor = expf(old_max - shift);
      rescale[r] = factor;
      row_sum[r] = row_sum[r] * factor + tile_sum;
      row_max[r] = new_max;
    }
  }
}

template <typename T, int DB, bool kWithValues>
__global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(const AttentionForwardArgs<T> a) {
  using Tile = AttentionTile<DB>;
  constexpr int QB = Tile::kRows;
  constexpr int BS = Tile::kKeys;
  constexpr int kEntries = QB * BS / kThreads;           // logits per thread
  constexpr int kAcc = kWithValues ? QB * DB / kThreads : 1;  // outputs per thread
  __shared__ float q_tile[QB][DB + 1];
  __shared__ float k_tile[BS][DB + 1];
  __shared__ float v_tile[kWithValues ? BS : 1][DB + 1];
  __shared__ float p_tile[QB][BS + 1];
  __shared__ float row_max[QB], row_sum[QB], rescale[QB];

  const int tid = threadIdx.x;
  const int64_t nh = blockIdx.y;
  const int64_t n = nh / a.heads;
  const int64_t h = nh % a.heads;
  const int64_t q0 = int64_t{blockIdx.x} * QB;
  const int64_t s_begin = int64_t{blockIdx.z} * a.keys_per_split;
  const int64_t s_end = s_begin + a.keys_per_split < a.keys ? s_begin + a.keys_per_split : a.keys;
  const T* k_head = head_start(a.k, a.ks, n, h);
  const T* v_head = kWithValues ? head_start(a.v, a.vs, n, h) : nullptr;
  const bool* mask_row = a.mask == nullptr ? nullptr : a.mask + n * a.keys;

  load_rows<QB, DB>(q_tile, head_start(a.q, a.qs, n, h), a.qs.row, a.qs.d, q0, a.queries, a.dim);
  if (tid < QB) {
    row_max[tid] = -INFINITY;
    row_sum[tid] = 0.f;
  }
  float acc[kAcc];
#pragma unroll
  for (int e = 0; e < kAcc; ++e) acc[e] = 0.f;

  const int j = tid % BS;  // this thread's key column in every tile
  for (int64_t s0 = s_begin; s0 < s_end; s0 += BS) {
    __syncthreads();  // the previous tile is fully consumed
    load_key_rows<BS, DB>(k_tile, k_head, a.ks.row, a.ks.d, s0, s_end, a.dim, mask_row);
    if constexpr (kWithValues) {
      load_key_rows<BS, DB>(v_tile, v_head, a.vs.row, a.vs.d, s0, s_end, a.dim, mask_row);
    }
    __syncthreads();
    const int64_t s = s0 + j;
    const bool live = s < s_end && (mask_row == nullptr || !mask_row[s]);
#pragma unroll
    for (int e = 0; e < kEntries; ++e) {
      const int r = tid / BS + e * (kThreads / BS);
      p_tile[r][j] = live ? a.scale * dot_rows<DB>(q_tile[r], k_tile[j]) : -INFINITY;
    }
    __syncthreads();
    online_softmax_step<QB, BS>(p_tile, row_max, row_sum, rescale);
    __syncthreads();
    if constexpr (kWithValues) {
      const int d = tid % DB;
#pragma unroll
      for (int e = 0; e < kAcc; ++e) {
        const int r = tid / DB + e * (kThreads / DB);
        float sum = 0.f;
#pragma unroll 8
        for (int jj = 0; jj < BS; ++jj) sum += p_tile[r][jj] * v_tile[jj][d];
        acc[e] = acc[e] * rescale[r] + sum;
      }
    }
  }
  __syncthreads();  // row statistics are final (also when the split had no key)

  const int64_t rows = gridDim.y * a.queries;  // N * h * K
  if (a.splits == 1) {
    if constexpr (kWithValues) {
      const int d = tid % DB;
#pragma unroll
      for (int e = 0; e < kAcc; ++e) {
        const int r = tid / DB + e * (kThreads / DB);
        const int64_t row = q0 + r;
        if (row < a.queries && d < a.dim) {
          const float total = row_sum[r];
          a.out[(nh * a.queries + row) * a.dim + d] =
              static_cast<T>(total == 0.f ? 0.f : acc[e] / total);
        }
      }
    }
    if (tid < QB && q0 + tid < a.queries) {
      const float total = row_sum[tid];
      a.lse[nh * a.queries + q0 + tid] = total == 0.f ? -INFINITY : row_max[tid] + logf(total);
    }
  } else {
    const int64_t part = int64_t{blockIdx.z} * rows;
    if constexpr (kWithValues) {
      const int d = tid % DB;
#pragma unroll
      for (int e = 0; e < kAcc; ++e) {
        const int r = tid / DB + e * (kThreads / DB);
        const int64_t row = q0 + r;
        if (row < a.queries && d < a.dim) {
          a.part_acc[(part + nh * a.queries + row) * a.dim + d] = acc[e];
        }
      }
    }
    if (tid < QB && q0 + tid < a.queries) {
      a.part_max[part + nh * a.queries + q0 + tid] = row_max[tid];
      a.part_sum[part + nh * a.queries + q0 + tid] = row_sum[tid];
    }
  }
}

// How many pieces to cut the keys of each block's work into: enough blocks for about four
// per multiprocessor, each piece at least four key tiles long.
inline int choose_key_splits(int64_t blocks, int64_t key_tiles) {
  const int64_t target = 4 * static_cast<int64_t>(sm_count());
  if (blocks >= target) return 1;
  int64_t splits = ceil_div(target, blocks);
  splits = std::min<int64_t>(splits, std::max<int64_t>(key_tiles / 4, 1));
  return static_cast<int>(std::min<int64_t>(splits, 256));
}

// Runs the forward pass: writes out [N, h, K, D] (with values) and lse [N, h, K]; a.out and
// a.lse must be set, the remaining fields are filled in here. N * h, K and S are >= 1.
template <typename T, int DB, bool kWithValues>
void run_attention_forward(AttentionForwardArgs<T> a, int64_t nh, const Tensor& like) {
  using Tile = AttentionTile<DB>;
  const int64_t query_tiles = ceil_div(a.queries, Tile::kRows);
  const int64_t key_tiles = ceil_div(a.keys, Tile::kKeys);
  int splits = choose_key_splits(query_tiles * nh, key_tiles);
  a.keys_per_split = ceil_div(key_tiles, splits) * Tile::kKeys;
  splits = static_cast<int>(ceil_div(a.keys, a.keys_per_split));  // no empty split
  a.splits = splits;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(query_tiles), static_cast<unsigned>(nh),
                  static_cast<unsigned>(splits));
  if (splits == 1) {
    attention_forward_kernel<T, DB, kWithValues><<<grid, kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t rows = nh * a.queries;
  const auto f32 = like.options().dtype(at::kFloat);
  Tensor part_acc = kWithValues ? at::empty({splits, rows, a.dim}, f32) : Tensor();
  Tensor part_max = at::empty({splits, rows}, f32);
  Tensor part_sum = at::empty({splits, rows}, f32);
  a.part_acc = kWithValues ? part_acc.data_ptr<float>() : nullptr;
  a.part_max = part_max.data_ptr<float>();
  a.part_sum = part_sum.data_ptr<float>();
  attention_forward_kernel<T, DB, kWithValues><<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto combine_blocks = static_cast<unsigned>(ceil_div(rows, kThreads / kWarp));
  icd_tc::tc_combine_kernel<T><<<combine_blocks, kThreads, 0, stream>>>(
      a.part_acc, a.part_max, a.part_sum, splits, rows, a.heads, a.queries, a.dim, nullptr,
      kWithValues ? a.out : nullptr, a.lse);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace icd_cuda
