// CUDA kernels of icd_ext::feature_mse_forward and icd_ext::feature_mse_backward (docs/method.md 3.3).
//
// e[n, h, s, d] = (a - b)^2 with a = LN(student) (norm "ln") or student, b = LN(teacher)
// (norm "ln", "tln") or teacher, LN over D without affine. With num = sum_s w_s sum_d e and
// W = sum_s w_s per (image, head):
//   "per_head": loss = sum_{n,h} num / max(W, 1e-6) / (N h D)
//   "global":   loss = sum_{n,h} num / D / max(sum_{n,h} W, 1e-6)
// One warp per token row (LayerNorm statistics by warp reductions, nothing normalised is
// stored). Forward: blocks over (S piece, image * h + head) write (num, W) partials that a
// single block adds in a fixed order, so the loss is deterministic (no atomics). Backward:
// dL/da = 2 c w_s (a - b) with c the reduction's factor, through LN when the student is
// normalised: dx = rstd (g - mean(g) - a mean(g a)). Rows of weight 0 are skipped (forward)
// and get a zero gradient, whatever they hold; the gradient has the student's strides.
#include <torch/library.h>

#include <string_view>

#include "cuda/common.cuh"

namespace icd_cuda {
namespace {

constexpr int kMseThreads = 256;
constexpr int kMseWarps = kMseThreads / kWarp;
constexpr int kTokensPerGradBlock = 64;
constexpr float kWeightFloor = 1e-6f;  // floor of the weight sums

enum NormKind : int { kNormNone = 0, kNormTeacher = 1, kNormBoth = 2 };

template <typename T>
struct FeatureMseArgs {
  const T* student;  // [N, h, S, D], strides ss
  const T* teacher;  // [N, h, S, D], strides ts
  HeadStrides ss, ts;
  const float* weight;  // [N, h, S] contiguous
  int64_t heads, tokens, dim;
  float eps;
  int norm;  // NormKind
};

// Sum over a block of kMseThreads threads, returned to every thread. scratch: [kMseWarps].
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  x = warp_sum(x);
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = x;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kMseWarps; ++w) total += scratch[w];
  __syncthreads();  // scratch may be reused
  return total;
}

// LayerNorm statistics of one row: mean and 1 / sqrt(biased var + eps).
struct Moments {
  float mean, rstd;
};

// Called by a whole warp; every lane gets the row's moments.
template <typename T>
__device__ __forceinline__ Moments row_moments(const T* row, int64_t d_stride, int64_t dim,
                                               float eps) {
  const int lane = threadIdx.x % kWarp;
  float sum = 0.f;
  for (int64_t d = lane; d < dim; d += kWarp) sum += to_float(row[d * d_stride]);
  const float mean = warp_sum(sum) / static_cast<float>(dim);
  float squares = 0.f;
  for (int64_t d = lane; d < dim; d += kWarp) {
    const float c = to_float(row[d * d_stride]) - mean;
    squares += c * c;
  }
  return {mean, rsqrtf(warp_sum(squares) / static_cast<float>(dim) + eps)};
}

// The rows compared are a = (student - s.mean) s.rstd and b = (teacher - t.mean) t.rstd,
// with (0, 1) for a tensor the norm leaves as it is.
struct RowNorm {
  Moments s, t;
};

template <typename T>
__device__ __forceinline__ RowNorm row_norm(const FeatureMseArgs<T>& a, const T* s_row,
                                            const T* t_row) {
  const Moments identity{0.f, 1.f};
  return {a.norm == kNormBoth ? row_moments(s_row, a.ss.d, a.dim, a.eps) : identity,
          a.norm != kNormNone ? row_moments(t_row, a.ts.d, a.dim, a.eps) : identity};
}

// Partial (num, W) of one piece of the tokens of one head (x = piece, y = image * h + head)
// into partial[(nh * pieces + piece) * 2 + {0, 1}].
template <typename T>
__global__ void __launch_bounds__(kMseThreads)
    feature_mse_partial_kernel(const FeatureMseArgs<T> a, int64_t tokens_per_piece,
                               float* partial) {
  __shared__ float scratch[kMseWarps];
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t nh = blockIdx.y;
  const int64_t n = nh / a.heads;
  const int64_t h = nh % a.heads;
  const int64_t s_begin = int64_t{blockIdx.x} * tokens_per_piece;
  const int64_t s_end =
      s_begin + tokens_per_piece < a.tokens ? s_begin + tokens_per_piece : a.tokens;
  const T* s_head = head_start(a.student, a.ss, n, h);
  const T* t_head = head_start(a.teacher, a.ts, n, h);
  const float* w_head = a.weight + nh * a.tokens;

  float num = 0.f;
  float den = 0.f;
  for (int64_t s = s_begin + warp; s < s_end; s += kMseWarps) {
    const float w = w_head[s];
    if (w == 0.f) continue;  // the same for the whole warp
    const T* s_row = s_head + s * a.ss.row;
    const T* t_row = t_head + s * a.ts.row;
    const RowNorm r = row_norm(a, s_row, t_row);
    float err = 0.f;
    for (int64_t d = lane; d < a.dim; d += kWarp) {
      const float diff = (to_float(s_row[d * a.ss.d]) - r.s.mean) * r.s.rstd -
                         (to_float(t_row[d * a.ts.d]) - r.t.mean) * r.t.rstd;
      err += diff * diff;
    }
    num += w * warp_sum(err);
    den += w;
  }
  // every lane of a warp holds the warp's sums: count lane 0's only
  num = block_sum(lane == 0 ? num : 0.f, scratch);
  den = block_sum(lane == 0 ? den : 0.f, scratch);
  if (threadIdx.x == 0) {
    float* out = partial + (nh * gridDim.x + blockIdx.x) * 2;
    out[0] = num;
    out[1] = den;
  }
}

// The loss from the partials of nh_count heads (one block).
__global__ void __launch_bounds__(kMseThreads)
    feature_mse_finalize_kernel(const float* partial, int64_t nh_count, int pieces, int64_t dim,
                                bool per_head, float* loss) {
  __shared__ float scratch[kMseWarps];
  float total = 0.f;       // per_head: sum of num / W; global: sum of num
  float weight_sum = 0.f;  // global: sum of W
  for (int64_t i = threadIdx.x; i < nh_count; i += kMseThreads) {
    float num = 0.f;
    float den = 0.f;
    for (int z = 0; z < pieces; ++z) {
      num += partial[(i * pieces + z) * 2];
      den += partial[(i * pieces + z) * 2 + 1];
    }
    if (per_head) {
      total += num / fmaxf(den, kWeightFloor);
    } else {
      total += num;
      weight_sum += den;
    }
  }
  total = block_sum(total, scratch);
  weight_sum = block_sum(weight_sum, scratch);
  if (threadIdx.x == 0) {
    *loss = per_head ? total / static_cast<float>(nh_count * dim)
                     : total / (static_cast<float>(dim) * fmaxf(weight_sum, kWeightFloor));
  }
}

// weight_sum[nh] = sum_s weight[nh, s] (one block per image * h + head).
__global__ void __launch_bounds__(kMseThreads)
    feature_mse_weight_sum_kernel(const float* weight, int64_t tokens, float* weight_sum) {
  __shared__ float scratch[kMseWarps];
  const float* row = weight + int64_t{blockIdx.x} * tokens;
  float sum = 0.f;
  for (int64_t s = threadIdx.x; s < tokens; s += kMseThreads) sum += row[s];
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) weight_sum[blockIdx.x] = sum;
}

// factor[nh] = dL/da / (w_s (a - b)) = 2 grad_loss / (N h D max(W_nh, 1e-6)) ("per_head") or
// 2 grad_loss / (D max(sum W, 1e-6)) ("global"). One block.
__global__ void __launch_bounds__(kMseThreads)
    feature_mse_factor_kernel(const float* grad_loss, const float* weight_sum, int64_t nh_count,
                              int64_t dim, bool per_head, float* factor) {
  __shared__ float scratch[kMseWarps];
  const float twice_grad = 2.f * grad_loss[0];
  if (per_head) {
    const float norm = static_cast<float>(nh_count * dim);
    for (int64_t i = threadIdx.x; i < nh_count; i += kMseThreads) {
      factor[i] = twice_grad / (norm * fmaxf(weight_sum[i], kWeightFloor));
    }
    return;
  }
  float total = 0.f;
  for (int64_t i = threadIdx.x; i < nh_count; i += kMseThreads) total += weight_sum[i];
  total = block_sum(total, scratch);
  const float value = twice_grad / (static_cast<float>(dim) * fmaxf(total, kWeightFloor));
  for (int64_t i = threadIdx.x; i < nh_count; i += kMseThreads) factor[i] = value;
}

// Gradient of the student, [N, h, S, D] with strides gs (the student's), x = block of tokens,
// y = image * h + head. Rows of weight 0 get exact zeros, whatever the features hold.
template <typename T>
__global__ void __launch_bounds__(kMseThreads)
    feature_mse_grad_kernel(const FeatureMseArgs<T> a, const float* factor, T* grad,
                            HeadStrides gs) {
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t nh = blockIdx.y;
  const int64_t n = nh / a.heads;
  const int64_t h = nh % a.heads;
  const int64_t s_begin = int64_t{blockIdx.x} * kTokensPerGradBlock;
  const int64_t s_end =
      s_begin + kTokensPerGradBlock < a.tokens ? s_begin + kTokensPerGradBlock : a.tokens;
  const T* s_head = head_start(a.student, a.ss, n, h);
  const T* t_head = head_start(a.teacher, a.ts, n, h);
  const float head_factor = factor[nh];
  T* grad_head = head_start(grad, gs, n, h);

  for (int64_t s = s_begin + warp; s < s_end; s += kMseWarps) {
    T* out = grad_head + s * gs.row;
    const float w = a.weight[nh * a.tokens + s];
    if (w == 0.f) {  // the same for the whole warp
      for (int64_t d = lane; d < a.dim; d += kWarp) out[d * gs.d] = static_cast<T>(0.f);
      continue;
    }
    const T* s_row = s_head + s * a.ss.row;
    const T* t_row = t_head + s * a.ts.row;
    const RowNorm r = row_norm(a, s_row, t_row);
    const float c = head_factor * w;
    float mean_g = 0.f;   // mean over d of g = c (a - b)
    float mean_ga = 0.f;  // mean over d of g a
    if (a.norm == kNormBoth) {
      float sum_g = 0.f;
      float sum_ga = 0.f;
      for (int64_t d = lane; d < a.dim; d += kWarp) {
        const float x = (to_float(s_row[d * a.ss.d]) - r.s.mean) * r.s.rstd;
        const float g = c * (x - (to_float(t_row[d * a.ts.d]) - r.t.mean) * r.t.rstd);
        sum_g += g;
        sum_ga += g * x;
      }
      mean_g = warp_sum(sum_g) / static_cast<float>(a.dim);
      mean_ga = warp_sum(sum_ga) / static_cast<float>(a.dim);
    }
    for (int64_t d = lane; d < a.dim; d += kWarp) {
      const float x = (to_float(s_row[d * a.ss.d]) - r.s.mean) * r.s.rstd;
      const float g = c * (x - (to_float(t_row[d * a.ts.d]) - r.t.mean) * r.t.rstd);
      const float dx = a.norm == kNormBoth ? r.s.rstd * (g - mean_g - x * mean_ga) : g;
      out[d * gs.d] = static_cast<T>(dx);
    }
  }
}

// ---- host side ------------------------------------------------------------------------------

struct MseDims {
  int64_t n, h, s, d;
};

MseDims check_mse_inputs(const Tensor& student, const Tensor& teacher, const Tensor& weight,
                         double eps, const char* op) {
  check_rank(student, 4, op, "student", "N, h, S, D");
  check_rank(teacher, 4, op, "teacher", "N, h, S, D");
  check_rank(weight, 3, op, "weight", "N, h, S");
  check_device(student, student, op, "student", "student");
  check_device(teacher, student, op, "teacher", "student");
  check_device(weight, student, op, "weight", "student");
  check_input_dtype(student, op, "student");
  check_same_dtype(teacher, student, op, "teacher", "student");
  check_float32(weight, op, "weight");
  check_shape(teacher, student.sizes(), op, "teacher", "N, h, S, D");
  const MseDims dims{student.size(0), student.size(1), student.size(2), student.size(3)};
  check_shape(weight, {dims.n, dims.h, dims.s}, op, "weight", "N, h, S");
  check_grid_rows(dims.n * dims.h, op);
  TORCH_CHECK(eps > 0, op, ": `eps` = ", text_of(eps), "; expected a number > 0");
  return dims;
}

int parse_norm(std::string_view norm, const char* op) {
  if (norm == "ln") return kNormBoth;
  if (norm == "tln") return kNormTeacher;
  TORCH_CHECK(norm == "none", op, ": `norm` = '", std::string(norm),
              "'; expected one of ln, tln, none");
  return kNormNone;
}

bool parse_per_head(std::string_view reduction, const char* op) {
  TORCH_CHECK(reduction == "per_head" || reduction == "global", op, ": `reduction` = '",
              std::string(reduction), "'; expected one of per_head, global");
  return reduction == "per_head";
}

template <typename T>
FeatureMseArgs<T> mse_args(const Tensor& student, const Tensor& teacher, const Tensor& weight,
                           const MseDims& dims, double eps, int norm) {
  FeatureMseArgs<T> a{};
  a.student = student.data_ptr<T>();
  a.teacher = teacher.data_ptr<T>();
  a.ss = strides_of(student);
  a.ts = strides_of(teacher);
  a.weight = weight.data_ptr<float>();
  a.heads = dims.h;
  a.tokens = dims.s;
  a.dim = dims.d;
  a.eps = static_cast<float>(eps);
  a.norm = norm;
  return a;
}

Tensor feature_mse_forward_cuda(const Tensor& student, const Tensor& teacher,
                                const Tensor& weight, std::string_view norm, double eps,
                                std::string_view reduction) {
  const char* op = "icd_ext::feature_mse_forward (CUDA)";
  const MseDims dims = check_mse_inputs(student, teacher, weight, eps, op);
  const int norm_kind = parse_norm(norm, op);
  const bool per_head = parse_per_head(reduction, op);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto f32 = student.options().dtype(at::kFloat);
  Tensor loss = at::empty({}, f32);
  const int64_t nh = dims.n * dims.h;
  if (nh == 0 || dims.d == 0) return loss.zero_();
  const Tensor weight_c = weight.contiguous();
  // pieces of S per head: about four blocks per multiprocessor, at least 256 tokens each
  const int64_t target = 4 * static_cast<int64_t>(sm_count());
  const int64_t pieces = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(target, nh), ceil_div(dims.s, 256)));
  const int64_t tokens_per_piece = std::max<int64_t>(ceil_div(dims.s, pieces), 1);
  Tensor partial = at::empty({nh, pieces, 2}, f32);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  ICD_DISPATCH_FLOAT_TYPES(student.scalar_type(), "feature_mse_forward", [&] {
    const auto a = mse_args<scalar_t>(student, teacher, weight_c, dims, eps, norm_kind);
    const dim3 grid(static_cast<unsigned>(pieces), static_cast<unsigned>(nh));
    feature_mse_partial_kernel<scalar_t><<<grid, kMseThreads, 0, stream>>>(
        a, tokens_per_piece, partial.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  feature_mse_finalize_kernel<<<1, kMseThreads, 0, stream>>>(
      partial.data_ptr<float>(), nh, static_cast<int>(pieces), dims.d, per_head,
      loss.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

Tensor feature_mse_backward_cuda(const Tensor& grad_loss, const Tensor& student,
                                 const Tensor& teacher, const Tensor& weight,
                                 std::string_view norm, double eps, std::string_view reduction) {
  const char* op = "icd_ext::feature_mse_backward (CUDA)";
  const MseDims dims = check_mse_inputs(student, teacher, weight, eps, op);
  const int norm_kind = parse_norm(norm, op);
  const bool per_head = parse_per_head(reduction, op);
  TORCH_CHECK(grad_loss.numel() == 1, op, ": `grad_loss` has shape ", shape_of(grad_loss),
              "; expected a single value (the gradient of the 0-dim loss)");
  check_device(grad_loss, student, op, "grad_loss", "student");
  const c10::cuda::CUDAGuard guard(student.device());
  Tensor grad = at::empty_like(student);  // the student's strides: no copy by autograd
  const int64_t nh = dims.n * dims.h;
  if (grad.numel() == 0) return grad;
  const Tensor grad_c = grad_loss.to(at::kFloat).contiguous();
  const Tensor weight_c = weight.contiguous();
  const auto f32 = student.options().dtype(at::kFloat);
  Tensor weight_sum = at::empty({nh}, f32);
  Tensor factor = at::empty({nh}, f32);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  feature_mse_weight_sum_kernel<<<static_cast<unsigned>(nh), kMseThreads, 0, stream>>>(
      weight_c.data_ptr<float>(), dims.s, weight_sum.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  feature_mse_factor_kernel<<<1, kMseThreads, 0, stream>>>(
      grad_c.data_ptr<float>(), weight_sum.data_ptr<float>(), nh, dims.d, per_head,
      factor.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ICD_DISPATCH_FLOAT_TYPES(student.scalar_type(), "feature_mse_backward", [&] {
    const auto a = mse_args<scalar_t>(student, teacher, weight_c, dims, eps, norm_kind);
    const dim3 grid(static_cast<unsigned>(ceil_div(dims.s, kTokensPerGradBlock)),
                    static_cast<unsigned>(nh));
    feature_mse_grad_kernel<scalar_t><<<grid, kMseThreads, 0, stream>>>(
        a, factor.data_ptr<float>(), grad.data_ptr<scalar_t>(), strides_of(grad));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace
}  // namespace icd_cuda

TORCH_LIBRARY_IMPL(icd_ext, CUDA, m) {
  m.impl("feature_mse_forward", &icd_cuda::feature_mse_forward_cuda);
  m.impl("feature_mse_backward", &icd_cuda::feature_mse_backward_cuda);
}
