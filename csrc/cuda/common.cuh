// Shared pieces of the CUDA kernels: argument checks, dtype and head-dim dispatch, strided
// loads into shared-memory tiles, warp reductions and the launch geometry.
//
// Letters as in docs/method.md: N images, h heads, K instance slots, S tokens, D head dim. Inputs
// of any strides are read in place (the kernels take every stride); forward outputs are
// contiguous, gradients have the strides of their inputs (at::empty_like) and are written
// through them. Everything is computed in float32, whatever the input dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "checks.h"
#include "tensor_core/attention_tiles.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

namespace icd_cuda {

using at::Tensor;

// Threads of the attention and value-mask blocks (4 warps); the tile geometry below is
// derived from it.
constexpr int kThreads = 128;
constexpr int kWarp = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- argument checks: every message names the op and the argument --------------------------

using icd_checks::check_contiguous;
using icd_checks::check_rank;
using icd_checks::check_same_dtype;
using icd_checks::check_shape;
using icd_checks::shape_of;
using icd_checks::text_of;

// `t` is a CUDA tensor on the device of `ref` (the op's first input).
inline void check_device(const Tensor& t, const Tensor& ref, const char* op, const char* name,
                         const char* ref_name) {
  TORCH_CHECK(t.is_cuda(), op, ": `", name, "` is on ", text_of(t.device()),
              "; the CUDA kernel expects CUDA tensors");
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name, "` is on ", text_of(t.device()),
              " but `", ref_name, "` is on ", text_of(ref.device()), "; expected one device");
}

inline void check_input_dtype(const Tensor& t, const char* op, const char* name) {
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op, ": `", name,
              "` has dtype ", text_of(type),
              "; the CUDA kernels take float32, float16 or bfloat16 (float64 runs on the "
              "reference and cpu backends)");
}

inline void check_float32(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": `", name, "` has dtype ",
              text_of(t.scalar_type()), "; expected float32");
}

// bool [N, S], contiguous, on the device of `ref`; returns its data or nullptr.
inline const bool* checked_mask(const std::optional<Tensor>& mask, const Tensor& ref,
                                int64_t n, int64_t s, const char* op) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  const Tensor& m = *mask;
  check_rank(m, 2, op, "key_padding_mask", "N, S");
  TORCH_CHECK(m.scalar_type() == at::kBool, op, ": `key_padding_mask` has dtype ",
              text_of(m.scalar_type()), "; expected bool (True = ignore that key)");
  check_shape(m, {n, s}, op, "key_padding_mask", "N, S");
  check_device(m, ref, op, "key_padding_mask", "q");
  check_contiguous(m, op, "key_padding_mask");
  return m.data_ptr<bool>();
}

// The grid's y dimension holds the (image, head) pairs.
inline void check_grid_rows(int64_t nh, const char* op) {
  TORCH_CHECK(nh <= 65535, op, ": N * h = ", text_of(nh), " exceeds the 65535 (image, head) pairs of a ",
              "CUDA grid dimension");
}

// Multiprocessors of the current device (sizes the grids that split work over S).
inline int sm_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  return count;
}

// ---- dispatch -------------------------------------------------------------------------------

// float32, float16 and bfloat16 as scalar_t (float64 is rejected before, by the checks).
#define ICD_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                        \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

constexpr int64_t kMaxHeadDim = 128;

// Calls body(std::integral_constant<int, DB>) with the head-dim bucket DB in {8, 16, 32, 64,
// 128} that holds D: tiles are DB wide and the columns D..DB-1 are zero-filled (a masked
// tail), so every D from 1 to 128 runs.
template <typename Body>
void dispatch_head_dim(int64_t d, const char* op, const Body& body) {
  TORCH_CHECK(d >= 1 && d <= kMaxHeadDim, op, ": head dim D = ", text_of(d),
              "; the CUDA kernels take 1 <= D <= ", text_of(kMaxHeadDim));
  if (d <= 8) {
    body(std::integral_constant<int, 8>{});
  } else if (d <= 16) {
    body(std::integral_constant<int, 16>{});
  } else if (d <= 32) {
    body(std::integral_constant<int, 32>{});
  } else if (d <= 64) {
    body(std::integral_constant<int, 64>{});
  } else {
    body(std::integral_constant<int, 128>{});
  }
}

// ---- strided [N, h, L, D] tensors -----------------------------------------------------------

using HeadStrides = icd_tc::Strides4;  // [N, h, L, D] strides, shared with the tile bodies

inline HeadStrides strides_of(const Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Start of head (n, h) of a strided [N, h, L, D] tensor (Ptr: const T* or T*).
template <typename Ptr>
__host__ __device__ __forceinline__ Ptr head_start(Ptr base, const HeadStrides& st, int64_t n,
                                                   int64_t h) {
  return base + n * st.n + h * st.h;
}

// ---- tile geometry --------------------------------------------------------------------------

// Tiles of the attention kernels for head-dim bucket DB. Shared rows are DB + 1 floats long
// so that threads reading one column of consecutive rows hit distinct banks. The sizes keep
// every kernel's static shared memory under 48 KiB.
template <int DB>
struct AttentionTile {
  static constexpr int kKeys = DB <= 64 ? 64 : 32;         // keys per tile
  static constexpr int kRows = 16;                         // query rows: forward, value mask
  static constexpr int kRowsBackward = DB <= 64 ? 16 : 8;  // query rows: backward kernels
  static constexpr int kStride = DB + 1;
};

// ---- device helpers -------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

// Rows [row0, row0 + ROWS) of a strided [L, D] matrix into a float tile [ROWS][DB + 1]; rows
// at or past row_end and columns at or past dim are zero. Called by the whole block.
template <int ROWS, int DB, typename T>
__device__ __forceinline__ void load_rows(float (*tile)[DB + 1], const T* matrix,
                                          int64_t row_stride, int64_t d_stride, int64_t row0,
                                          int64_t row_end, int64_t dim) {
  for (int i = threadIdx.x; i < ROWS * DB; i += blockDim.x) {
    const int r = i / DB;
    const int d = i % DB;
    const int64_t row = row0 + r;
    float x = 0.f;
    if (row < row_end && d < dim) x = to_float(matrix[row * row_stride + d * d_stride]);
    tile[r][d] = x;
  }
}

// As load_rows, for the keys or values of one head: the rows of masked keys (mask_row[row]
// true; mask_row may be nullptr) are zero too. A masked key's probability is exactly 0, and
// zeroing its row keeps NaN or inf stored there out of every product (0 * NaN = NaN).
template <int ROWS, int DB, typename T>
__device__ __forceinline__ void load_key_rows(float (*tile)[DB + 1], const T* matrix,
                                              int64_t row_stride, int64_t d_stride, int64_t row0,
                                              int64_t row_end, int64_t dim,
                                              const bool* mask_row) {
  for (int i = threadIdx.x; i < ROWS * DB; i += blockDim.x) {
    const int r = i / DB;
    const int d = i % DB;
    const int64_t row = row0 + r;
    float x = 0.f;
    if (row < row_end && d < dim && (mask_row == nullptr || !mask_row[row])) {
      x = to_float(matrix[row * row_stride + d * d_stride]);
    }
    tile[r][d] = x;
  }
}

// Dot product of two tile rows over the bucket width (the zero tail adds nothing).
template <int DB>
__device__ __forceinline__ float dot_rows(const float* a, const float* b) {
  float sum = 0.f;
#pragma unroll
  for (int d = 0; d < DB; ++d) sum += a[d] * b[d];
  return sum;
}

}  // namespace icd_cuda
