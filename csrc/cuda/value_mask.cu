// CUDA kernel of icd_ext::value_mask (docs/method.md 3.2):
//   out[n, h, s] = sum_k weight[n, k] * exp(scale q_k . k_s / temperature - lse[n, h, k]),
// masked keys 0, rows with lse = -inf (all keys masked) adding nothing.
//
// Two passes, never an [N, h, K, S] tensor. First, unless lse is given (temperature 1), the
// logsumexp of every row of logits / temperature: the attention forward pass without values
// (attention_forward.cuh). Then one block per key tile loops over all K query rows and sums
// each key's weighted probabilities in registers; the threads that share a key add their
// sums in shared memory at the end, so there are no atomics and the result is deterministic.
#include <torch/library.h>

#include "cuda/attention_forward.cuh"
#include "cuda/common.cuh"
#include "cuda/tensor_core.cuh"

namespace icd_cuda {
namespace {

template <typename T>
struct ValueMaskArgs {
  const T* q;  // [N, h, K, D], strides qs
  const T* k;  // [N, h, S, D], strides ks
  HeadStrides qs, ks;
  const bool* mask;     // [N, S] or nullptr
  const float* weight;  // [N, K]
  const float* lse;     // [N * h * K], of the logits / temperature
  int64_t heads, queries, keys, dim;
  float scale;  // scale / temperature
  float* out;   // [N, h, S]
};

// x = key tile, y = image * h + head.
template <typename T, int DB>
__global__ void __launch_bounds__(kThreads) value_mask_kernel(const ValueMaskArgs<T> a) {
  using Tile = AttentionTile<DB>;
  constexpr int QB = Tile::kRows;
  constexpr int BS = Tile::kKeys;
  constexpr int kEntries = QB * BS / kThreads;  // (row, key) pairs per thread
  constexpr int kSharers = kThreads / BS;       // threads that hold pairs of one key
  __shared__ float k_tile[BS][DB + 1];
  __shared__ float q_tile[QB][DB + 1];
  __shared__ float lse_tile[QB], weight_tile[QB];
  __shared__ float key_sums[kThreads];

  const int tid = threadIdx.x;
  const int64_t nh = blockIdx.y;
  const int64_t n = nh / a.heads;
  const int64_t h = nh % a.heads;
  const int64_t s0 = int64_t{blockIdx.x} * BS;
  const T* q_head = head_start(a.q, a.qs, n, h);
  load_rows<BS, DB>(k_tile, head_start(a.k, a.ks, n, h), a.ks.row, a.ks.d, s0, a.keys, a.dim);
  const int j = tid % BS;
  const int64_t s = s0 + j;
  const bool live = s < a.keys && (a.mask == nullptr || !a.mask[n * a.keys + s]);

  float total = 0.f;
  for (int64_t q0 = 0; q0 < a.queries; q0 += QB) {
    __syncthreads();  // the previous query tile is fully consumed (and the key tile loaded)
    load_rows<QB, DB>(q_tile, q_head, a.qs.row, a.qs.d, q0, a.queries, a.dim);
    if (tid < QB) {
      const bool in = q0 + tid < a.queries;
      lse_tile[tid] = in ? a.lse[nh * a.queries + q0 + tid] : -INFINITY;
      weight_tile[tid] = in ? a.weight[n * a.queries + q0 + tid] : 0.f;
    }
    __syncthreads();
    if (live) {
#pragma unroll
      for (int e = 0; e < kEntries; ++e) {
        const int r = tid / BS + e * kSharers;
        const float w = weight_tile[r];
        const float row_lse = lse_tile[r];
        if (w != 0.f && row_lse != -INFINITY) {
          total += w * expf(a.scale * dot_rows<DB>(q_tile[r], k_tile[j]) - row_lse);
        }
      }
    }
  }
  key_sums[tid] = total;
  __syncthreads();
  if (tid < BS && s0 + tid < a.keys) {
    float sum = 0.f;
#pragma unroll
    for (int g = 0; g < kSharers; ++g) sum += key_sums[tid + g * BS];
    a.out[nh * a.keys + s0 + tid] = sum;
  }
}

Tensor value_mask_cuda(const Tensor& q, const Tensor& k, const Tensor& weight,
                       const std::optional<Tensor>& key_padding_mask,
                       const std::optional<Tensor>& lse, double scale, double temperature) {
  const char* op = "icd_ext::value_mask (CUDA)";
  check_rank(q, 4, op, "q", "N, h, K, D");
  check_rank(k, 4, op, "k", "N, h, S, D");
  check_device(q, q, op, "q", "q");
  check_device(k, q, op, "k", "q");
  check_input_dtype(q, op, "q");
  check_same_dtype(k, q, op, "k", "q");
  const int64_t n = q.size(0), heads = q.size(1), queries = q.size(2), dim = q.size(3);
  const int64_t keys = k.size(2);
  check_shape(k, {n, heads, keys, dim}, op, "k", "N, h, S, D");
  check_grid_rows(n * heads, op);
  check_rank(weight, 2, op, "weight", "N, K");
  check_shape(weight, {n, queries}, op, "weight", "N, K");
  check_device(weight, q, op, "weight", "q");
  check_float32(weight, op, "weight");
  const Tensor weight_c = weight.contiguous();
  const bool* mask = checked_mask(key_padding_mask, q, n, keys, op);
  TORCH_CHECK(temperature > 0, op, ": `temperature` = ", text_of(temperature), "; expected a number > 0");
  Tensor lse_c;
  if (lse.has_value() && lse->defined()) {
    TORCH_CHECK(temperature == 1.0, op, ": `lse` was given with temperature = ", text_of(temperature),
                "; lse from attention_forward is only valid with temperature == 1");
    check_rank(*lse, 3, op, "lse", "N, h, K");
    check_shape(*lse, {n, heads, queries}, op, "lse", "N, h, K");
    check_device(*lse, q, op, "lse", "q");
    check_float32(*lse, op, "lse");
    lse_c = lse->contiguous();
  }
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty({n, heads, keys}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (queries == 0) return out.zero_();
  if (tensor_cores_take(q)) {
    tensor_core_value_mask(q, k, weight_c, mask == nullptr ? Tensor() : *key_padding_mask, lse_c,
                           scale, temperature, out);
    return out;
  }
  const float logit_scale = static_cast<float>(scale / temperature);
  if (!lse_c.defined()) lse_c = at::empty({n, heads, queries}, out.options());

  ICD_DISPATCH_FLOAT_TYPES(q.scalar_type(), "value_mask", [&] {
    dispatch_head_dim(dim, op, [&](auto bucket) {
      constexpr int DB = decltype(bucket)::value;
      if (!(lse.has_value() && lse->defined())) {
        AttentionForwardArgs<scalar_t> f{};
        f.q = q.data_ptr<scalar_t>();
        f.k = k.data_ptr<scalar_t>();
        f.qs = strides_of(q);
        f.ks = strides_of(k);
        f.mask = mask;
        f.heads = heads;
        f.queries = queries;
        f.keys = keys;
        f.dim = dim;
        f.scale = logit_scale;
        f.lse = lse_c.data_ptr<float>();
        run_attention_forward<scalar_t, DB, false>(f, n * heads, q);
      }
      ValueMaskArgs<scalar_t> a{};
      a.q = q.data_ptr<scalar_t>();
      a.k = k.data_ptr<scalar_t>();
      a.qs = strides_of(q);
      a.ks = strides_of(k);
      a.mask = mask;
      a.weight = weight_c.data_ptr<float>();
      a.lse = lse_c.data_ptr<float>();
      a.heads = heads;
      a.queries = queries;
      a.keys = keys;
      a.dim = dim;
      a.scale = logit_scale;
      a.out = out.data_ptr<float>();
      const dim3 grid(static_cast<unsigned>(ceil_div(keys, AttentionTile<DB>::kKeys)),
                      static_cast<unsigned>(n * heads));
      const auto stream = c10::cuda::getCurrentCUDAStream();
      value_mask_kernel<scalar_t, DB><<<grid, kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace
}  // namespace icd_cuda

TORCH_LIBRARY_IMPL(icd_ext, CUDA, m) { m.impl("value_mask", &icd_cuda::value_mask_cuda); }
