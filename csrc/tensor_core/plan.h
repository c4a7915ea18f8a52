// Launch plans of the tensor-core kernels (attention_tiles.h): grid sizes, key splits and
// slices, query chunks and shared memory, from the problem size and the device's limits.
// Host code only, shared by the CUDA launchers (csrc/cuda/tensor_core_attention.cu) and the
// CPU emulation (csrc/cpu/tensor_core_emulation.cpp), which can pass small limits to reach
// the several-chunk and several-slice paths at test sizes.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "tensor_core/attention_tiles.h"

namespace icd_tc {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The head-dim bucket of the tensor-core kernels: D rounded up to 16, 32, 64 or 128 (0 when
// D > 128: not taken).
inline int head_dim_bucket(int64_t d) {
  if (d <= 16) return 16;
  if (d <= 32) return 32;
  if (d <= 64) return 64;
  if (d <= 128) return 128;
  return 0;
}

// What a plan needs to know of the device.
struct DeviceLimits {
  int64_t multiprocessors;
  int64_t shared_per_block;  // bytes a block may opt in to
  int64_t shared_per_multiprocessor;
};

struct ForwardPlan {
  int64_t query_tiles;
  int64_t keys_per_split;
  int splits;
  size_t shared_bytes;
};

// Query tiles x (image, head) blocks; when they are fewer than four per multiprocessor the
// keys are cut into splits of at least four 64-key tiles each, merged by combine_splits_tile.
template <int DB>
ForwardPlan plan_forward(int64_t nh, int64_t queries, int64_t keys, const DeviceLimits& device) {
  ForwardPlan plan{};
  plan.query_tiles = ceil_div(queries, ForwardConfig::kRows);
  const int64_t key_tiles = ceil_div(keys, ForwardConfig::kKeys);
  const int64_t blocks = plan.query_tiles * nh;
  const int64_t target = 4 * device.multiprocessors;
  int64_t splits = 1;
  if (blocks < target) {
    splits = std::min<int64_t>(ceil_div(target, blocks), std::max<int64_t>(key_tiles / 4, 1));
    splits = std::min<int64_t>(splits, 256);
  }
  plan.keys_per_split = ceil_div(key_tiles, splits) * ForwardConfig::kKeys;
  plan.splits = static_cast<int>(ceil_div(keys, plan.keys_per_split));  // no empty split
  plan.shared_bytes = forward_shared_bytes<DB>();
  return plan;
}

struct BackwardPlan {
  bool fits;  // false: not even one query block fits in a block's shared memory
  int64_t chunk_rows;
  int chunks;
  int64_t keys_per_slice;
  int slices;
  size_t shared_bytes;
};

// The queries of an (image, head) in as few chunks as shared memory allows (one at the ICD
// shape); then as many key slices as fill the device once: (slices x N h x chunks) blocks
// for (multiprocessors x blocks per multiprocessor) places, never more (a second, partial
// wave would cost a whole extra pass).
template <int DB>
BackwardPlan plan_backward(int64_t nh, int64_t queries, int64_t keys, const DeviceLimits& device) {
  using C = BackwardConfig<DB>;
  BackwardPlan plan{};
  const int64_t room = device.shared_per_block - static_cast<int64_t>(C::kFixedBytes);
  const int64_t max_rows =
      room <= 0 ? 0 : (room / static_cast<int64_t>(C::kBytesPerRow)) / C::kRows * C::kRows;
  plan.fits = max_rows >= C::kRows;
  if (!plan.fits) return plan;
  plan.chunk_rows = std::min<int64_t>(ceil_div(queries, C::kRows) * C::kRows, max_rows);
  plan.chunks = static_cast<int>(ceil_div(queries, plan.chunk_rows));
  plan.shared_bytes = C::kFixedBytes + static_cast<size_t>(plan.chunk_rows) * C::kBytesPerRow;
  const int64_t per_multiprocessor = std::max<int64_t>(
      1, std::min<int64_t>(device.shared_per_multiprocessor /
                               (static_cast<int64_t>(plan.shared_bytes) + 1024),
                           2048 / C::kThreads));
  const int64_t places = device.multiprocessors * per_multiprocessor;
  const int64_t key_blocks = ceil_div(keys, C::kKeys);
  const int64_t slices = std::clamp<int64_t>(places / (nh * plan.chunks), 1, key_blocks);
  plan.keys_per_slice = ceil_div(key_blocks, slices) * C::kKeys;
  plan.slices = static_cast<int>(ceil_div(keys, plan.keys_per_slice));
  return plan;
}

inline int64_t value_mask_blocks(int64_t keys) { return ceil_div(keys, ValueMaskConfig::kKeys); }

// Blocks of the one-warp-per-row kernels (delta, combine) and of sum_partials_tile.
inline int64_t row_blocks(int64_t rows) {
  return ceil_div(rows, ForwardConfig::kThreads / kWarpSize);
}
inline int64_t partial_blocks(int64_t size) {
  return std::min<int64_t>(ceil_div(size, ForwardConfig::kThreads), 4096);
}

}  // namespace icd_tc
