// Shared pieces of the CPU kernels: argument checks, compute dtypes, key tiles and the
// work-item scheduler.
//
// Letters as in docs/method.md: N images, h heads, K instance slots, S tokens, D head dim.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "checks.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

// Loops over float rows are written so the compiler vectorises them. The build targets
// baseline x86-64, so with GCC on x86-64 Linux such functions are also compiled for AVX2 and
// AVX-512 and the best version is picked when the library loads (target_clones). Helpers
// they call are ICD_INLINE so they are compiled inside each version.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    __GNUC__ >= 12
#define ICD_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ICD_VECTOR_CLONES
#endif
#if defined(__GNUC__)
#define ICD_INLINE inline __attribute__((always_inline))
#else
#define ICD_INLINE inline
#endif

namespace icd_cpu {

using at::Tensor;

// ---- argument checks: every message names the op and the argument --------------------------

using icd_checks::check_contiguous;
using icd_checks::check_same_dtype;
using icd_checks::check_shape;
using icd_checks::shape_of;
using icd_checks::text_of;

inline void check_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": `", name, "` is on ", text_of(t.device()),
              "; the CPU kernel expects CPU tensors");
}

// `t` has rank len(dims) (dims like "N, h, K, D") and lives on the CPU.
inline void check_rank(const Tensor& t, int64_t rank, const char* op, const char* name,
                       const char* dims) {
  icd_checks::check_rank(t, rank, op, name, dims);
  check_cpu(t, op, name);
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_input_dtype(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": `", name, "` has dtype ",
              text_of(t.scalar_type()), "; expected float32, float64, float16 or bfloat16");
}

// float64 inputs are computed in float64, every other float dtype in float32.
inline at::ScalarType compute_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// Statistics (lse, weights, the value mask, the loss) use the compute dtype.
inline void check_stat_tensor(const Tensor& t, at::ScalarType stat, const char* op,
                              const char* name) {
  TORCH_CHECK(t.scalar_type() == stat, op, ": `", name, "` has dtype ", text_of(t.scalar_type()),
              "; expected ", text_of(stat), " (float64 for float64 inputs, else float32)");
}

inline void check_optional_mask(const c10::optional<Tensor>& mask, int64_t n, int64_t s,
                                const char* op) {
  if (!mask.has_value()) return;
  const Tensor& m = *mask;
  check_rank(m, 2, op, "key_padding_mask", "N, S");
  TORCH_CHECK(m.scalar_type() == at::kBool, op, ": `key_padding_mask` has dtype ",
              text_of(m.scalar_type()), "; expected bool (True = ignore that key)");
  check_shape(m, {n, s}, op, "key_padding_mask", "N, S");
}

// ---- key tiles ---------------------------------------------------------------------------

// Elements of one logits tile (rows x keys): 64 Ki values, 256 KiB in float32, so the one or
// two tiles a thread works on stay in a 1 MiB L2 cache. Measured here: MKL's sgemm on these
// shapes (D = 32) drops from ~90 to ~45 GFLOPS per core when the tile grows past ~150 Ki.
constexpr int64_t kTileElements = int64_t{1} << 16;

// Keys per tile for a tile of `rows` query rows: a multiple of 16 in [64, 4096].
inline int64_t key_block_for(int64_t rows) {
  const int64_t block = kTileElements / std::max<int64_t>(rows, 1);
  return std::clamp<int64_t>((block + 15) / 16 * 16, 64, 4096);
}

// The unmasked keys of each image, cut into tiles of at most `block` keys. Masked keys are in
// no tile: no logit is computed for them (20% padding saves 20% of the GEMMs), their k and v
// rows are never read (NaN or inf there cannot reach any result), and their probabilities
// and gradients are exactly 0.
class KeyTiles {
 public:
  KeyTiles(const c10::optional<Tensor>& mask, int64_t n, int64_t s, int64_t block)
      : block_(std::max<int64_t>(1, block)), keys_(n), masked_(n) {
    const Tensor m = mask.has_value() ? mask->contiguous() : Tensor();
    const bool* data = m.defined() ? m.data_ptr<bool>() : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      keys_[i].reserve(s);
      for (int64_t j = 0; j < s; ++j) {
        (data != nullptr && data[i * s + j] ? masked_[i] : keys_[i]).push_back(j);
      }
      max_count_ = std::max(max_count_, count(i));
    }
  }

  int64_t block() const { return block_; }
  // The number of tiles of image n, and the most of any image.
  int64_t count(int64_t n) const {
    return (static_cast<int64_t>(keys_[n].size()) + block_ - 1) / block_;
  }
  int64_t max_count() const { return max_count_; }
  // The ascending key indices of tile t of image n, and how many there are.
  const int64_t* keys(int64_t n, int64_t t) const { return keys_[n].data() + t * block_; }
  int64_t length(int64_t n, int64_t t) const {
    return std::min(block_, static_cast<int64_t>(keys_[n].size()) - t * block_);
  }
  // The masked keys of image n.
  const std::vector<int64_t>& masked(int64_t n) const { return masked_[n]; }

 private:
  int64_t block_;
  int64_t max_count_ = 0;
  std::vector<std::vector<int64_t>> keys_, masked_;
};

// Whether keys[0, len) are consecutive, so that a tile is a slice of the head.
inline bool consecutive(const int64_t* keys, int64_t len) {
  return keys[len - 1] - keys[0] == len - 1;
}

// A [rows, cols] contiguous view at the start of a flat scratch buffer.
inline Tensor scratch_view(Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

template <typename scalar_t, typename acc_t>
void gather_rows(const Tensor& head, const int64_t* keys, int64_t len, acc_t* dst) {
  const scalar_t* base = head.data_ptr<scalar_t>();
  const int64_t d = head.size(1), row_stride = head.stride(0), col_stride = head.stride(1);
  for (int64_t i = 0; i < len; ++i) {
    const scalar_t* src = base + keys[i] * row_stride;
    acc_t* row = dst + i * d;
    if (col_stride == 1) {
      for (int64_t j = 0; j < d; ++j) row[j] = static_cast<acc_t>(src[j]);
    } else {
      for (int64_t j = 0; j < d; ++j) row[j] = static_cast<acc_t>(src[j * col_stride]);
    }
  }
}

// Rows keys[0, len) of one head's [S, D] matrix (any strides) in the compute dtype, which is
// `buffer`'s: a view when the keys are consecutive, the rows unit-stride and the dtype the
// compute dtype; else gathered (and converted) into `buffer`. Only a tile is ever copied.
inline Tensor key_tile(const Tensor& head, const int64_t* keys, int64_t len, Tensor& buffer) {
  if (head.scalar_type() == buffer.scalar_type() && head.stride(1) == 1 &&
      consecutive(keys, len)) {
    return head.narrow(0, keys[0], len);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, head.scalar_type(), "key_tile", [&] {
    if (buffer.scalar_type() == at::kDouble) {
      gather_rows<scalar_t, double>(head, keys, len, buffer.data_ptr<double>());
    } else {
      gather_rows<scalar_t, float>(head, keys, len, buffer.data_ptr<float>());
    }
  });
  return scratch_view(buffer, len, head.size(1));
}

template <typename scalar_t, typename acc_t>
void scatter_rows_typed(const acc_t* src, const int64_t* keys, int64_t len, int64_t d,
                        int64_t row_stride, int64_t col_stride, scalar_t* dst) {
  for (int64_t i = 0; i < len; ++i) {
    scalar_t* row = dst + keys[i] * row_stride;
    const acc_t* from = src + i * d;
    if (col_stride == 1) {
      for (int64_t j = 0; j < d; ++j) row[j] = static_cast<scalar_t>(from[j]);
    } else {
      for (int64_t j = 0; j < d; ++j) row[j * col_stride] = static_cast<scalar_t>(from[j]);
    }
  }
}

// Row keys[i] of `head` (an [S, D] output of any strides) = row i of `rows` ([len, D]
// contiguous, the compute dtype), converted to head's dtype.
inline void scatter_rows(const Tensor& rows, const int64_t* keys, Tensor& head) {
  const int64_t len = rows.size(0), d = rows.size(1);
  const int64_t row_stride = head.stride(0), col_stride = head.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, head.scalar_type(), "scatter_rows",
                                  [&] {
    scalar_t* dst = head.data_ptr<scalar_t>();
    if (rows.scalar_type() == at::kDouble) {
      scatter_rows_typed(rows.data_ptr<double>(), keys, len, d, row_stride, col_stride, dst);
    } else {
      scatter_rows_typed(rows.data_ptr<float>(), keys, len, d, row_stride, col_stride, dst);
    }
  });
}

// Zeroes the rows `keys` of `head`, an [S, D] output of any strides.
inline void zero_rows(const std::vector<int64_t>& keys, Tensor& head) {
  const int64_t d = head.size(1), row_stride = head.stride(0), col_stride = head.stride(1);
  const int64_t elem = head.element_size();
  char* base = static_cast<char*>(head.data_ptr());
  for (int64_t key : keys) {
    char* row = base + key * row_stride * elem;
    if (col_stride == 1) {
      std::memset(row, 0, d * elem);
    } else {
      for (int64_t j = 0; j < d; ++j) std::memset(row + j * col_stride * elem, 0, elem);
    }
  }
}

// ---- softmax over key tiles ---------------------------------------------------------------

// Row kernels (softmax_rows.cpp), vectorised for float; exp(-inf), and in float exp(x) for
// any x < -87, is exactly 0.
//   row_max:            returns max(x)
//   exp_shifted_sum:    x = exp(x - shift); returns sum(x)
//   probs_and_dlogits:  x = exp(x - shift); dx = x * (dx - delta)
//   add_weighted_probs: out += weight * exp(x - shift)
float row_max(const float* x, int64_t len);
double row_max(const double* x, int64_t len);
float exp_shifted_sum(float* x, int64_t len, float shift);
double exp_shifted_sum(double* x, int64_t len, double shift);
void probs_and_dlogits(float* x, float shift, float* dx, float delta, int64_t len);
void probs_and_dlogits(double* x, double shift, double* dx, double delta, int64_t len);
void add_weighted_probs(float* out, const float* x, float shift, float weight, int64_t len);
void add_weighted_probs(double* out, const double* x, double shift, double weight, int64_t len);

// One online-softmax step over a contiguous [rows, len] tile of logits, in place: updates
// each row's running max and sum of exp(logit - max), and leaves exp(logit - shift) in the
// tile, with rescale[r] = exp(old shift - new shift) for what was accumulated before. A row
// whose max is still -inf (only with infinite inputs) is shifted by 0, never by -inf (NaN).
template <typename acc_t>
void online_softmax_tile(acc_t* logits, int64_t rows, int64_t len, acc_t* run_max,
                         acc_t* total, acc_t* rescale) {
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* x = logits + r * len;
    const acc_t m_new = std::max(run_max[r], row_max(x, len));
    const acc_t shift = std::isfinite(m_new) ? m_new : acc_t(0);
    rescale[r] = std::exp(run_max[r] - shift);
    total[r] = total[r] * rescale[r] + exp_shifted_sum(x, len, shift);
    run_max[r] = m_new;
  }
}

// logsumexp of a row from its max and its sum of exp(logit - max): -inf without any key (a
// sum of exactly 0), NaN when a NaN reached the sum (the row max skips NaN, the sum keeps it).
template <typename acc_t>
acc_t row_logsumexp(acc_t run_max, acc_t total) {
  return total == acc_t(0) ? -std::numeric_limits<acc_t>::infinity()
                           : run_max + std::log(total);
}

// 1 / sum of a row: 0 for a row without any key (its out is 0), NaN for a NaN sum.
template <typename acc_t>
acc_t row_inverse_sum(acc_t total) {
  return total == acc_t(0) ? acc_t(0) : acc_t(1) / total;
}

// The shift that turns a logit into a probability, exp(logit - shift): lse, or +inf for a
// row without any key (lse = -inf), whose probabilities are then 0. A NaN lse stays NaN, so
// the row's probabilities (and what they reach) are NaN.
template <typename acc_t>
acc_t probability_shift(acc_t lse) {
  return lse == -std::numeric_limits<acc_t>::infinity() ? std::numeric_limits<acc_t>::infinity()
                                                          : lse;
}

// ---- scheduling ---------------------------------------------------------------------------

// Runs body(item, scratch) for item in [0, count) on at::parallel_for's threads. Items are
// handed out one at a time (dynamic scheduling), so uneven items (e.g. images with
// different padding) balance; each thread builds its scratch once with make_scratch().
// The result of an item never depends on the thread that ran it.
template <typename MakeScratch, typename Body>
void for_each_item(int64_t count, const MakeScratch& make_scratch, const Body& body) {
  if (count <= 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    if (begin >= end) return;
    auto scratch = make_scratch();
    for (int64_t item = next++; item < count; item = next++) body(item, scratch);
  });
}

// How many pieces to cut each of `groups` independent jobs (e.g. (image, head) pairs) into so
// that there are at least kMinItems items, without exceeding `max_pieces`. The split depends
// only on the sizes, never on the thread count, so results are the same for any number of
// threads.
constexpr int64_t kMinItems = 16;

inline int64_t pieces_per_group(int64_t groups, int64_t max_pieces) {
  const int64_t pieces = (kMinItems + groups - 1) / std::max<int64_t>(groups, 1);
  return std::max<int64_t>(1, std::min(pieces, max_pieces));
}

}  // namespace icd_cpu
