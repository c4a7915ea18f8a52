// CPU kernels of icd_ext::feature_mse_forward and icd_ext::feature_mse_backward (docs/method.md 3.3).
//
// Both reductions are one weighted sum over rows (n, h, s) of E = sum_d (ŝ - t̂)^2, where ŝ,
// t̂ are the (optionally LayerNormed) student and teacher rows:
//   loss = sum_{n,h,s} c[n, h] * weight[n, h, s] * E[n, h, s],
//   c[n, h] = 1 / (N h D max(sum_s weight[n, h, :], 1e-6))   ("per_head")
//   c[n, h] = 1 / (D max(sum weight, 1e-6))                   ("global").
// The forward reads each row once; the backward reads it once more and writes its gradient
// 2 g c w (ŝ - t̂), pulled back through the LayerNorm for "ln". No normalised copy is kept:
// runs of kRowsPerItem rows are read as contiguous blocks (in place, or one block copied in
// the compute dtype) and reduced by vectorised loops over D. The runs' partial sums are
// added in order, so the loss does not depend on the number of threads. The gradient has the
// student's strides (at::empty_like), so autograd hands it to a permuted view without a copy.
// Rows of weight 0 are left out of the loss and get a zero gradient, whatever they hold.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "cpu/common.h"

namespace icd_cpu {
namespace {

constexpr double kWeightFloor = 1e-6;  // LN_FLOOR of icd/ops/reference.py
constexpr int64_t kRowsPerItem = 512;

enum class Norm { kBoth, kTeacher, kNone };

Norm parse_norm(c10::string_view norm, const char* op) {
  if (norm == "ln") return Norm::kBoth;
  if (norm == "tln") return Norm::kTeacher;
  TORCH_CHECK(norm == "none", op, ": `norm` = '", std::string(norm),
              "'; expected one of ln, tln, none");
  return Norm::kNone;
}

bool parse_per_head(c10::string_view reduction, const char* op) {
  TORCH_CHECK(reduction == "per_head" || reduction == "global", op, ": `reduction` = '",
              std::string(reduction), "'; expected one of per_head, global");
  return reduction == "per_head";
}

struct Dims {
  int64_t n, h, s, d;
};

Dims check_mse_inputs(const Tensor& student, const Tensor& teacher, const Tensor& weight,
                      double eps, const char* op) {
  check_rank(student, 4, op, "student", "N, h, S, D");
  check_rank(teacher, 4, op, "teacher", "N, h, S, D");
  check_rank(weight, 3, op, "weight", "N, h, S");
  check_input_dtype(student, op, "student");
  check_same_dtype(teacher, student, op, "teacher", "student");
  check_shape(teacher, student.sizes(), op, "teacher", "N, h, S, D");
  const Dims dim{student.size(0), student.size(1), student.size(2), student.size(3)};
  check_shape(weight, {dim.n, dim.h, dim.s}, op, "weight", "N, h, S");
  check_stat_tensor(weight, compute_type(student.scalar_type()), op, "weight");
  check_contiguous(weight, op, "weight");
  TORCH_CHECK(eps > 0, op, ": `eps` = ", text_of(eps), "; expected a number > 0");
  return dim;
}

// c[n, h] of the header comment, one per (image, head).
template <typename acc_t>
std::vector<double> row_coefficients(const Tensor& weight, const Dims& dim, bool per_head) {
  const acc_t* w = weight.data_ptr<acc_t>();
  std::vector<double> sums(dim.n * dim.h, 0.0);
  double total = 0.0;
  for (int64_t nh = 0; nh < dim.n * dim.h; ++nh) {
    for (int64_t s = 0; s < dim.s; ++s) sums[nh] += w[nh * dim.s + s];
    total += sums[nh];
  }
  std::vector<double> coef(sums.size());
  const double count = static_cast<double>(dim.n * dim.h * dim.d);
  for (size_t nh = 0; nh < sums.size(); ++nh) {
    coef[nh] = per_head ? 1.0 / (count * std::max(sums[nh], kWeightFloor))
                        : 1.0 / (static_cast<double>(dim.d) * std::max(total, kWeightFloor));
  }
  return coef;
}

// Rows are processed kLanes at a time, side by side: element i of row l of a group is at
// [i * kLanes + l] of a "lanes" block, so every reduction over D is a vertical add across
// vector lanes (one AVX-512 register of floats), never a horizontal one per row.
constexpr int64_t kLanes = 16;

template <typename T>
ICD_INLINE void to_lanes(const T* rows, int64_t count, int64_t d, T* lanes) {
  if (count < kLanes) std::fill(lanes, lanes + d * kLanes, T(0));
  for (int64_t l = 0; l < count; ++l) {
    for (int64_t i = 0; i < d; ++i) lanes[i * kLanes + l] = rows[l * d + i];
  }
}

// Lane l goes to rows + l * ld (ld >= d: rows of a strided output).
template <typename T>
ICD_INLINE void from_lanes(const T* lanes, int64_t count, int64_t d, int64_t ld, T* rows) {
  for (int64_t l = 0; l < count; ++l) {
    for (int64_t i = 0; i < d; ++i) rows[l * ld + i] = lanes[i * kLanes + l];
  }
}

// Per lane, the normalisation x -> (x - mean) * rstd: LayerNorm's (biased variance, two
// passes as the reference) when `normalise`, else the identity.
template <typename T>
ICD_INLINE void lane_stats(const T* x, int64_t d, bool normalise, T eps, T* mean, T* rstd) {
  for (int64_t l = 0; l < kLanes; ++l) {
    mean[l] = T(0);
    rstd[l] = T(1);
  }
  if (!normalise) return;
  T squares[kLanes] = {};
  for (int64_t i = 0; i < d; ++i) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) mean[l] += x[i * kLanes + l];
  }
  for (int64_t l = 0; l < kLanes; ++l) mean[l] /= static_cast<T>(d);
  for (int64_t i = 0; i < d; ++i) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const T c = x[i * kLanes + l] - mean[l];
      squares[l] += c * c;
    }
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    rstd[l] = T(1) / std::sqrt(squares[l] / static_cast<T>(d) + eps);
  }
}

// A group of up to kLanes student and teacher rows in lanes, with their normalisations.
template <typename T>
struct LaneGroup {
  T* s;
  T* t;
  T s_mean[kLanes], s_rstd[kLanes], t_mean[kLanes], t_rstd[kLanes];

  ICD_INLINE LaneGroup(const T* s_rows, const T* t_rows, int64_t count, int64_t d, Norm norm,
                       T eps, T* scratch)
      : s(scratch), t(scratch + d * kLanes) {
    to_lanes(s_rows, count, d, s);
    to_lanes(t_rows, count, d, t);
    lane_stats(s, d, norm == Norm::kBoth, eps, s_mean, s_rstd);
    lane_stats(t, d, norm != Norm::kNone, eps, t_mean, t_rstd);
  }
  ICD_INLINE T s_hat(int64_t i, int64_t l) const {
    return (s[i * kLanes + l] - s_mean[l]) * s_rstd[l];
  }
  ICD_INLINE T t_hat(int64_t i, int64_t l) const {
    return (t[i * kLanes + l] - t_mean[l]) * t_rstd[l];
  }
};

// sum over rows r of w[r] * sum_d (ŝ - t̂)^2, for contiguous [rows, d] blocks s and t. Rows of
// weight 0 are left out (whatever they hold, even NaN or inf). scratch: 2 d kLanes values.
template <typename T>
ICD_INLINE double weighted_errors(const T* s, const T* t, const T* w, int64_t rows, int64_t d,
                                  Norm norm, T eps, T* scratch) {
  double total = 0.0;
  for (int64_t r0 = 0; r0 < rows; r0 += kLanes) {
    const int64_t count = std::min(kLanes, rows - r0);
    const LaneGroup<T> g(s + r0 * d, t + r0 * d, count, d, norm, eps, scratch);
    T err[kLanes] = {};
    for (int64_t i = 0; i < d; ++i) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const T diff = g.s_hat(i, l) - g.t_hat(i, l);
        err[l] += diff * diff;
      }
    }
    for (int64_t l = 0; l < count; ++l) {
      if (w[r0 + l] != T(0)) total += static_cast<double>(w[r0 + l]) * static_cast<double>(err[l]);
    }
  }
  return total;
}

// grad[r] = d loss / d s[r] for contiguous [rows, d] blocks s and t, where row r adds
// factor * w[r] * sum_d (ŝ - t̂)^2 to the loss: gy = 2 factor w (ŝ - t̂), pulled back through
// the LayerNorm for "ln": rstd * (gy - mean(gy) - ŝ mean(gy ŝ)); exactly 0 for rows of weight
// 0. Row r of grad starts at grad + r * ld. scratch: 3 d kLanes values.
template <typename T>
ICD_INLINE void error_grads(const T* s, const T* t, const T* w, T factor, int64_t rows,
                            int64_t d, Norm norm, T eps, T* scratch, int64_t ld, T* grad) {
  T* g_lanes = scratch + 2 * d * kLanes;
  for (int64_t r0 = 0; r0 < rows; r0 += kLanes) {
    const int64_t count = std::min(kLanes, rows - r0);
    const LaneGroup<T> g(s + r0 * d, t + r0 * d, count, d, norm, eps, scratch);
    T f[kLanes] = {};
    for (int64_t l = 0; l < count; ++l) f[l] = T(2) * factor * w[r0 + l];
    if (norm != Norm::kBoth) {
      for (int64_t i = 0; i < d; ++i) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) {
          g_lanes[i * kLanes + l] = f[l] * (g.s_hat(i, l) - g.t_hat(i, l));
        }
      }
    } else {
      T mean_g[kLanes] = {}, mean_gx[kLanes] = {};
      for (int64_t i = 0; i < d; ++i) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) {
          const T xs = g.s_hat(i, l);
          const T gy = f[l] * (xs - g.t_hat(i, l));
          mean_g[l] += gy;
          mean_gx[l] += gy * xs;
        }
      }
      for (int64_t l = 0; l < kLanes; ++l) {
        mean_g[l] /= static_cast<T>(d);
        mean_gx[l] /= static_cast<T>(d);
      }
      for (int64_t i = 0; i < d; ++i) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) {
          const T xs = g.s_hat(i, l);
          const T gy = f[l] * (xs - g.t_hat(i, l));
          g_lanes[i * kLanes + l] = g.s_rstd[l] * (gy - mean_g[l] - xs * mean_gx[l]);
        }
      }
    }
    for (int64_t l = 0; l < count; ++l) {
      if (w[r0 + l] != T(0)) continue;
      for (int64_t i = 0; i < d; ++i) g_lanes[i * kLanes + l] = T(0);
    }
    from_lanes(g_lanes, count, d, ld, grad + r0 * ld);
  }
}

ICD_VECTOR_CLONES
double weighted_errors_f(const float* s, const float* t, const float* w, int64_t rows,
                         int64_t d, Norm norm, float eps, float* scratch) {
  return weighted_errors(s, t, w, rows, d, norm, eps, scratch);
}

ICD_VECTOR_CLONES
void error_grads_f(const float* s, const float* t, const float* w, float factor, int64_t rows,
                   int64_t d, Norm norm, float eps, float* scratch, int64_t ld, float* grad) {
  error_grads(s, t, w, factor, rows, d, norm, eps, scratch, ld, grad);
}

double weighted_errors_of(const float* s, const float* t, const float* w, int64_t rows,
                          int64_t d, Norm norm, float eps, float* scratch) {
  return weighted_errors_f(s, t, w, rows, d, norm, eps, scratch);
}

double weighted_errors_of(const double* s, const double* t, const double* w, int64_t rows,
                          int64_t d, Norm norm, double eps, double* scratch) {
  return weighted_errors(s, t, w, rows, d, norm, eps, scratch);
}

void error_grads_of(const float* s, const float* t, const float* w, float factor, int64_t rows,
                    int64_t d, Norm norm, float eps, float* scratch, int64_t ld, float* grad) {
  error_grads_f(s, t, w, factor, rows, d, norm, eps, scratch, ld, grad);
}

void error_grads_of(const double* s, const double* t, const double* w, double factor,
                    int64_t rows, int64_t d, Norm norm, double eps, double* scratch, int64_t ld,
                    double* grad) {
  error_grads(s, t, w, factor, rows, d, norm, eps, scratch, ld, grad);
}

// Rows [s0, s0 + rows) of head nh of an [N, h, S, D] tensor as a contiguous [rows, D] block
// in the compute dtype: the tensor's own memory when it already is one, else a copy in
// `buffer` (one block, never the whole tensor).
template <typename acc_t>
const acc_t* row_block(const Tensor& x, int64_t nh, int64_t s0, int64_t rows, Tensor& buffer) {
  const Tensor block = x[nh / x.size(1)][nh % x.size(1)].narrow(0, s0, rows);
  if (block.scalar_type() == buffer.scalar_type() && block.is_contiguous()) {
    return block.data_ptr<acc_t>();
  }
  return scratch_view(buffer, rows, x.size(3)).copy_(block).data_ptr<acc_t>();
}

// Rows are processed in runs of kRowsPerItem inside one (image, head).
struct RowRuns {
  int64_t per_head, count;

  explicit RowRuns(const Dims& dim)
      : per_head((dim.s + kRowsPerItem - 1) / kRowsPerItem), count(dim.n * dim.h * per_head) {}
  int64_t head(int64_t item) const { return item / per_head; }
  int64_t start(int64_t item) const { return (item % per_head) * kRowsPerItem; }
};

struct BlockScratch {
  Tensor student, teacher, grad;  // [kRowsPerItem * D]: blocks copied in the compute dtype
  Tensor lanes;                   // [3 * kLanes * D]
};

template <typename acc_t>
double forward_kernel(const Tensor& student, const Tensor& teacher, const Tensor& weight,
                      Norm norm, acc_t eps, bool per_head, const Dims& dim) {
  const std::vector<double> coef = row_coefficients<acc_t>(weight, dim, per_head);
  const acc_t* w = weight.data_ptr<acc_t>();
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const RowRuns runs(dim);
  std::vector<double> partial(runs.count, 0.0);
  auto make_scratch = [&] {
    return BlockScratch{at::empty({kRowsPerItem * dim.d}, opts),
                        at::empty({kRowsPerItem * dim.d}, opts), Tensor(),
                        at::empty({3 * kLanes * dim.d}, opts)};
  };
  for_each_item(runs.count, make_scratch, [&](int64_t item, BlockScratch& sc) {
    const int64_t nh = runs.head(item), s0 = runs.start(item);
    const int64_t rows = std::min(kRowsPerItem, dim.s - s0);
    const acc_t* s = row_block<acc_t>(student, nh, s0, rows, sc.student);
    const acc_t* t = row_block<acc_t>(teacher, nh, s0, rows, sc.teacher);
    partial[item] = coef[nh] * weighted_errors_of(s, t, w + nh * dim.s + s0, rows, dim.d, norm,
                                                  eps, sc.lanes.data_ptr<acc_t>());
  });
  double loss = 0.0;
  for (double p : partial) loss += p;
  return loss;
}

template <typename acc_t>
void backward_kernel(double grad_loss, const Tensor& student, const Tensor& teacher,
                     const Tensor& weight, Norm norm, acc_t eps, bool per_head, const Dims& dim,
                     Tensor& grad) {
  const std::vector<double> coef = row_coefficients<acc_t>(weight, dim, per_head);
  const acc_t* w = weight.data_ptr<acc_t>();
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const bool same_dtype = grad.scalar_type() == opts.dtype().toScalarType();
  const RowRuns runs(dim);
  auto make_scratch = [&] {
    return BlockScratch{at::empty({kRowsPerItem * dim.d}, opts),
                        at::empty({kRowsPerItem * dim.d}, opts),
                        at::empty({kRowsPerItem * dim.d}, opts),
                        at::empty({3 * kLanes * dim.d}, opts)};
  };
  for_each_item(runs.count, make_scratch, [&](int64_t item, BlockScratch& sc) {
    const int64_t nh = runs.head(item), s0 = runs.start(item);
    const int64_t rows = std::min(kRowsPerItem, dim.s - s0);
    const acc_t* s = row_block<acc_t>(student, nh, s0, rows, sc.student);
    const acc_t* t = row_block<acc_t>(teacher, nh, s0, rows, sc.teacher);
    // written through grad's strides when its rows are unit-stride in the compute dtype
    Tensor grad_rows = grad[nh / dim.h][nh % dim.h].narrow(0, s0, rows);
    const bool in_place = same_dtype && grad_rows.stride(1) == 1 && grad_rows.stride(0) >= dim.d;
    Tensor out = in_place ? grad_rows : scratch_view(sc.grad, rows, dim.d);
    error_grads_of(s, t, w + nh * dim.s + s0, static_cast<acc_t>(grad_loss * coef[nh]), rows,
                   dim.d, norm, eps, sc.lanes.data_ptr<acc_t>(), out.stride(0),
                   out.data_ptr<acc_t>());
    if (!in_place) grad_rows.copy_(out);
  });
}

Tensor feature_mse_forward_cpu(const Tensor& student, const Tensor& teacher,
                               const Tensor& weight, c10::string_view norm, double eps,
                               c10::string_view reduction) {
  const char* op = "feature_mse_forward";
  const Dims dim = check_mse_inputs(student, teacher, weight, eps, op);
  const Norm norm_kind = parse_norm(norm, op);
  const bool per_head = parse_per_head(reduction, op);
  const at::ScalarType stat = compute_type(student.scalar_type());
  double loss = 0.0;
  if (student.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(stat, "feature_mse_forward", [&] {
      loss = forward_kernel<scalar_t>(student, teacher, weight, norm_kind,
                                      static_cast<scalar_t>(eps), per_head, dim);
    });
  }
  return at::scalar_tensor(loss, student.options().dtype(stat));
}

Tensor feature_mse_backward_cpu(const Tensor& grad_loss, const Tensor& student,
                                const Tensor& teacher, const Tensor& weight,
                                c10::string_view norm, double eps, c10::string_view reduction) {
  const char* op = "feature_mse_backward";
  const Dims dim = check_mse_inputs(student, teacher, weight, eps, op);
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.dim() == 0, op, ": `grad_loss` has shape ",
              shape_of(grad_loss), "; expected a 0-dim tensor");
  check_cpu(grad_loss, op, "grad_loss");
  const Norm norm_kind = parse_norm(norm, op);
  const bool per_head = parse_per_head(reduction, op);
  Tensor grad = at::empty_like(student);  // the student's strides (see the header comment)
  if (student.numel() == 0) return grad;
  const double g = grad_loss.item<double>();
  AT_DISPATCH_FLOATING_TYPES(compute_type(student.scalar_type()), "feature_mse_backward", [&] {
    backward_kernel<scalar_t>(g, student, teacher, weight, norm_kind, static_cast<scalar_t>(eps),
                              per_head, dim, grad);
  });
  return grad;
}

}  // namespace
}  // namespace icd_cpu

TORCH_LIBRARY_IMPL(icd_ext, CPU, m) {
  m.impl("feature_mse_forward", &icd_cpu::feature_mse_forward_cpu);
  m.impl("feature_mse_backward", &icd_cpu::feature_mse_backward_cpu);
}
