// CUDA kernels of icd_ext::attention_forward and icd_ext::attention_backward (docs/method.md 3.1).
//
// Flash-attention style on CUDA cores, never an [N, h, K, S] tensor. The forward pass is in
// attention_forward.cuh. The backward pass recomputes each tile's probabilities from lse:
//   P = exp(scale q k^T - lse),  dP = dO v^T,  dS = P * (dP - delta),
//   delta = rowsum(dO * out) - grad_lse   (the grad_lse term makes lse differentiable),
//   dv = P^T dO,  dk = scale dS^T q,  dq = scale dS k.
// dk and dv: one block per key tile, looping over all query rows (no atomics). dq: one block
// per query tile and key split, looping over the split's keys; several splits write float32
// partials that a last kernel sums. A row with lse = -inf (all keys masked) has P = 0, so
// it gets exact zero gradients; masked keys are loaded as zero rows, get dS = 0 and are
// written as exact zeros in dk and dv, whatever their k and v or the other rows hold. A NaN
// lse (a NaN reached the row in the forward) makes the row's P, and what it reaches, NaN.
// dq, dk and dv have the strides of q, k and v (at::empty_like) and are written through them.
#include <torch/library.h>

#include <tuple>

#include "cuda/attention_forward.cuh"
#include "cuda/common.cuh"
#include "cuda/tensor_core.cuh"

namespace icd_cuda {
namespace {

struct AttentionDims {
  int64_t n, h, k, s, d;
};

AttentionDims check_attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                                     const char* op) {
  check_rank(q, 4, op, "q", "N, h, K, D");
  check_rank(k, 4, op, "k", "N, h, S, D");
  check_rank(v, 4, op, "v", "N, h, S, D");
  check_device(q, q, op, "q", "q");
  check_device(k, q, op, "k", "q");
  check_device(v, q, op, "v", "q");
  check_input_dtype(q, op, "q");
  check_same_dtype(k, q, op, "k", "q");
  check_same_dtype(v, q, op, "v", "q");
  const AttentionDims dims{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  check_shape(k, {dims.n, dims.h, dims.s, dims.d}, op, "k", "N, h, S, D");
  check_shape(v, k.sizes(), op, "v", "N, h, S, D");
  check_grid_rows(dims.n * dims.h, op);
  return dims;
}

// float32 [N, h, K] statistics (lse, grad_lse) on q's device, made contiguous.
Tensor checked_row_stat(const Tensor& t, const Tensor& q, const AttentionDims& dims,
                        const char* op, const char* name) {
  check_rank(t, 3, op, name, "N, h, K");
  check_shape(t, {dims.n, dims.h, dims.k}, op, name, "N, h, K");
  check_device(t, q, op, name, "q");
  check_float32(t, op, name);
  return t.contiguous();
}

std::tuple<Tensor, Tensor> attention_forward_cuda(const Tensor& q, const Tensor& k,
                                                  const Tensor& v,
                                                  const std::optional<Tensor>& key_padding_mask,
                                                  double scale) {
  const char* op = "icd_ext::attention_forward (CUDA)";
  const AttentionDims dims = check_attention_inputs(q, k, v, op);
  const bool* mask = checked_mask(key_padding_mask, q, dims.n, dims.s, op);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty({dims.n, dims.h, dims.k, dims.d}, q.options());
  Tensor lse = at::empty({dims.n, dims.h, dims.k}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (dims.s == 0) {  // no key at all: every row is fully masked
    out.zero_();
    lse.fill_(-INFINITY);
    return {out, lse};
  }
  if (tensor_cores_take(q)) {
    tensor_core_attention_forward(q, k, v, mask == nullptr ? Tensor() : *key_padding_mask, scale,
                                  out, lse);
    return {out, lse};
  }
  ICD_DISPATCH_FLOAT_TYPES(q.scalar_type(), "attention_forward", [&] {
    dispatch_head_dim(dims.d, op, [&](auto bucket) {
      constexpr int DB = decltype(bucket)::value;
      AttentionForwardArgs<scalar_t> a{};
      a.q = q.data_ptr<scalar_t>();
      a.k = k.data_ptr<scalar_t>();
      a.v = v.data_ptr<scalar_t>();
      a.qs = strides_of(q);
      a.ks = strides_of(k);
      a.vs = strides_of(v);
      a.mask = mask;
      a.heads = dims.h;
      a.queries = dims.k;
      a.keys = dims.s;
      a.dim = dims.d;
      a.scale = static_cast<float>(scale);
      a.out = out.data_ptr<scalar_t>();
      a.lse = lse.data_ptr<float>();
      run_attention_forward<scalar_t, DB, true>(a, dims.n * dims.h, q);
    });
  });
  return {out, lse};
}

// ---- backward -------------------------------------------------------------------------------

template <typename T>
struct AttentionBackwardArgs {
  const T* q;         // [N, h, K, D], strides qs
  const T* k;         // [N, h, S, D], strides ks
  const T* v;         // [N, h, S, D], strides vs
  const T* grad_out;  // [N, h, K, D], strides gs
  HeadStrides qs, ks, vs, gs;
  const bool* mask;    // [N, S] or nullptr
  const float* lse;    // [N * h * K]
  const float* delta;  // [N * h * K]
  int64_t heads, queries, keys, dim;
  float scale;
  int64_t keys_per_split;  // dq pass: a multiple of the key tile
  int splits;
  T* dq;  // [N, h, K, D], strides dqs (written by the q kernel with one split)
  T* dk;  // [N, h, S, D], strides dks
  T* dv;  // [N, h, S, D], strides dvs
  HeadStrides dqs, dks, dvs;
  float* part_dq;  // [splits, N * h * K, D] contiguous (several splits)
};

// dk and dv of one key tile (x = key tile, y = image * h + head), over all query rows.
template <typename T, int DB>
__global__ void __launch_bounds__(kThreads)
    attention_backward_kv_kernel(const AttentionBackwardArgs<T> a) {
  using Tile = AttentionTile<DB>;
  constexpr int QB = Tile::kRowsBackward;
  constexpr int BS = Tile::kKeys;
  constexpr int kEntries = QB * BS / kThreads;  // (row, key) pairs per thread
  constexpr int kAcc = BS * DB / kThreads;      // (key, d) outputs per thread
  __shared__ float k_tile[BS][DB + 1];
  __shared__ float v_tile[BS][DB + 1];
  __shared__ float q_tile[QB][DB + 1];
  __shared__ float g_tile[QB][DB + 1];
  __shared__ float p_tile[QB][BS + 1];  // P, then dS
  __shared__ float lse_tile[QB], delta_tile[QB];

  const int tid = threadIdx.x;
  const int64_t nh = blockIdx.y;
  const int64_t n = nh / a.heads;
  const int64_t h = nh % a.heads;
  const int64_t s0 = int64_t{blockIdx.x} * BS;
  const T* q_head = head_start(a.q, a.qs, n, h);
  const T* g_head = head_start(a.grad_out, a.gs, n, h);
  const float* lse = a.lse + nh * a.queries;
  const float* delta = a.delta + nh * a.queries;

  const bool* mask_row = a.mask == nullptr ? nullptr : a.mask + n * a.keys;
  load_key_rows<BS, DB>(k_tile, head_start(a.k, a.ks, n, h), a.ks.row, a.ks.d, s0, a.keys, a.dim,
                        mask_row);
  load_key_rows<BS, DB>(v_tile, head_start(a.v, a.vs, n, h), a.vs.row, a.vs.d, s0, a.keys, a.dim,
                        mask_row);
  const int j = tid % BS;  // this thread's key in the (row, key) pairs
  const int64_t s = s0 + j;
  const bool live = s < a.keys && (mask_row == nullptr || !mask_row[s]);
  const int d = tid % DB;  // this thread's column in the (key, d) outputs

  float dk[kAcc], dv[kAcc];
#pragma unroll
  for (int e = 0; e < kAcc; ++e) dk[e] = dv[e] = 0.f;

  for (int64_t q0 = 0; q0 < a.queries; q0 += QB) {
    __syncthreads();  // the previous query tile is fully consumed
    load_rows<QB, DB>(q_tile, q_head, a.qs.row, a.qs.d, q0, a.queries, a.dim);
    load_rows<QB, DB>(g_tile, g_head, a.gs.row, a.gs.d, q0, a.queries, a.dim);
    if (tid < QB) {
      const bool in = q0 + tid < a.queries;
      lse_tile[tid] = in ? lse[q0 + tid] : -INFINITY;
      delta_tile[tid] = in ? delta[q0 + tid] : 0.f;
    }
    __syncthreads();
    float ds[kEntries];
#pragma unroll
    for (int e = 0; e < kEntries; ++e) {
      const int r = tid / BS + e * (kThreads / BS);
      const float row_lse = lse_tile[r];
      float p = 0.f;
      ds[e] = 0.f;  // not p * (0 - delta): delta may be NaN
      if (live && row_lse != -INFINITY) {
        p = expf(a.scale * dot_rows<DB>(q_tile[r], k_tile[j]) - row_lse);
        ds[e] = p * (dot_rows<DB>(g_tile[r], v_tile[j]) - delta_tile[r]);
      }
      p_tile[r][j] = p;
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kAcc; ++e) {
      const int key = tid / DB + e * (kThreads / DB);
      float sum = 0.f;
#pragma unroll
      for (int r = 0; r < QB; ++r) sum += p_tile[r][key] * g_tile[r][d];
      dv[e] += sum;
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kEntries; ++e) p_tile[tid / BS + e * (kThreads / BS)][j] = ds[e];
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kAcc; ++e) {
      const int key = tid / DB + e * (kThreads / DB);
      float sum = 0.f;
#pragma unroll
      for (int r = 0; r < QB; ++r) sum += p_tile[r][key] * q_tile[r][d];
      dk[e] += sum;
    }
  }

  T* dk_head = head_start(a.dk, a.dks, n, h);
  T* dv_head = head_start(a.dv, a.dvs, n, h);
#pragma unroll
  for (int e = 0; e < kAcc; ++e) {
    const int64_t key = s0 + tid / DB + e * (kThreads / DB);
    if (key < a.keys && d < a.dim) {
      // a masked key's gradients are exact zeros (a NaN q or grad_out row times its P = 0
      // would otherwise be NaN)
      const bool masked = mask_row != nullptr && mask_row[key];
      dk_head[key * a.dks.row + d * a.dks.d] = static_cast<T>(masked ? 0.f : dk[e] * a.scale);
      dv_head[key * a.dvs.row + d * a.dvs.d] = static_cast<T>(masked ? 0.f : dv[e]);
    }
  }
}

// dq of one query tile over one key split (x = query tile, y = image * h + head, z = split).
template <typename T, int DB>
__global__ void __launch_bounds__(kThreads)
    attention_backward_q_kernel(const AttentionBackwardArgs<T> a) {
  using Tile = AttentionTile<DB>;
  constexpr int QB = Tile::kRowsBackward;
  constexpr int BS = Tile::kKeys;
  constexpr int kEntries = QB * BS / kThreads;  // (row, key) pairs per thread
  constexpr int kAcc = QB * DB / kThreads;      // (row, d) outputs per thread
  __shared__ float q_tile[QB][DB + 1];
  __shared__ float g_tile[QB][DB + 1];
  __shared__ float k_tile[BS][DB + 1];
  __shared__ float v_tile[BS][DB + 1];
  __shared__ float ds_tile[QB][BS + 1];
  __shared__ float lse_tile[QB], delta_tile[QB];

  const int tid = threadIdx.x;
  const int64_t nh = blockIdx.y;
  const int64_t n = nh / a.heads;
  const int64_t h = nh % a.heads;
  const int64_t q0 = int64_t{blockIdx.x} * QB;
  const int64_t s_begin = int64_t{blockIdx.z} * a.keys_per_split;
  const int64_t s_end = s_begin + a.keys_per_split < a.keys ? s_begin + a.keys_per_split : a.keys;
  const T* k_head = head_start(a.k, a.ks, n, h);
  const T* v_head = head_start(a.v, a.vs, n, h);
  const bool* mask_row = a.mask == nullptr ? nullptr : a.mask + n * a.keys;

  load_rows<QB, DB>(q_tile, head_start(a.q, a.qs, n, h), a.qs.row, a.qs.d, q0, a.queries, a.dim);
  load_rows<QB, DB>(g_tile, head_start(a.grad_out, a.gs, n, h), a.gs.row, a.gs.d, q0, a.queries,
                    a.dim);
  if (tid < QB) {
    const bool in = q0 + tid < a.queries;
    lse_tile[tid] = in ? a.lse[nh * a.queries + q0 + tid] : -INFINITY;
    delta_tile[tid] = in ? a.delta[nh * a.queries + q0 + tid] : 0.f;
  }
  float acc[kAcc];
#pragma unroll
  for (int e = 0; e < kAcc; ++e) acc[e] = 0.f;

  const int j = tid % BS;  // this thread's key in the (row, key) pairs
  const int d = tid % DB;  // this thread's column in the (row, d) outputs
  for (int64_t s0 = s_begin; s0 < s_end; s0 += BS) {
    __syncthreads();  // the previous key tile is fully consumed (and the query tile loaded)
    load_key_rows<BS, DB>(k_tile, k_head, a.ks.row, a.ks.d, s0, s_end, a.dim, mask_row);
    load_key_rows<BS, DB>(v_tile, v_head, a.vs.row, a.vs.d, s0, s_end, a.dim, mask_row);
    __syncthreads();
    const int64_t s = s0 + j;
    const bool live = s < s_end && (mask_row == nullptr || !mask_row[s]);
#pragma unroll
    for (int e = 0; e < kEntries; ++e) {
      const int r = tid / BS + e * (kThreads / BS);
      const float row_lse = lse_tile[r];
      float ds = 0.f;
      if (live && row_lse != -INFINITY) {
        const float p = expf(a.scale * dot_rows<DB>(q_tile[r], k_tile[j]) - row_lse);
        ds = p * (dot_rows<DB>(g_tile[r], v_tile[j]) - delta_tile[r]);
      }
      ds_tile[r][j] = ds;
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kAcc; ++e) {
      const int r = tid / DB + e * (kThreads / DB);
      float sum = 0.f;
#pragma unroll 8
      for (int key = 0; key < BS; ++key) sum += ds_tile[r][key] * k_tile[key][d];
      acc[e] += sum;
    }
  }

  const int64_t rows = gridDim.y * a.queries;  // N * h * K
  T* dq_head = head_start(a.dq, a.dqs, n, h);
#pragma unroll
  for (int e = 0; e < kAcc; ++e) {
    const int64_t row = q0 + tid / DB + e * (kThreads / DB);
    if (row < a.queries && d < a.dim) {
      if (a.splits == 1) {
        dq_head[row * a.dqs.row + d * a.dqs.d] = static_cast<T>(acc[e] * a.scale);
      } else {
        const int64_t at = (nh * a.queries + row) * a.dim + d;
        a.part_dq[int64_t{blockIdx.z} * rows * a.dim + at] = acc[e] * a.scale;
      }
    }
  }
}

template <typename T, int DB>
void run_attention_backward(AttentionBackwardArgs<T> a, int64_t nh, const Tensor& out,
                            const float* grad_lse, float* delta) {
  using Tile = AttentionTile<DB>;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = nh * a.queries;
  const auto row_blocks = static_cast<unsigned>(ceil_div(rows, kThreads / kWarp));
  icd_tc::tc_delta_kernel<T><<<row_blocks, kThreads, 0, stream>>>(
      a.grad_out, a.gs, out.data_ptr<T>(), strides_of(out), grad_lse, a.heads, a.queries, a.dim,
      rows, delta);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t key_tiles = ceil_div(a.keys, Tile::kKeys);
  const dim3 kv_grid(static_cast<unsigned>(key_tiles), static_cast<unsigned>(nh));
  attention_backward_kv_kernel<T, DB><<<kv_grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t query_tiles = ceil_div(a.queries, Tile::kRowsBackward);
  int splits = choose_key_splits(query_tiles * nh, key_tiles);
  a.keys_per_split = ceil_div(key_tiles, splits) * Tile::kKeys;
  splits = static_cast<int>(ceil_div(a.keys, a.keys_per_split));  // no empty split
  a.splits = splits;
  Tensor part_dq;
  if (splits > 1) {
    part_dq = at::empty({splits, rows, a.dim}, out.options().dtype(at::kFloat));
    a.part_dq = part_dq.data_ptr<float>();
  }
  const dim3 q_grid(static_cast<unsigned>(query_tiles), static_cast<unsigned>(nh),
                    static_cast<unsigned>(splits));
  attention_backward_q_kernel<T, DB><<<q_grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t size = rows * a.dim;
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(size, kThreads), 4096));
    icd_tc::tc_sum_partials_kernel<T><<<blocks, kThreads, 0, stream>>>(
        a.part_dq, splits, size, a.heads, a.queries, a.dim, a.dqs, a.dq, int64_t{blocks});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<Tensor, Tensor, Tensor> attention_backward_cuda(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q,
    const Tensor& k, const Tensor& v, const std::optional<Tensor>& key_padding_mask,
    const Tensor& out, const Tensor& lse, double scale) {
  const char* op = "icd_ext::attention_backward (CUDA)";
  const AttentionDims dims = check_attention_inputs(q, k, v, op);
  const bool* mask = checked_mask(key_padding_mask, q, dims.n, dims.s, op);
  const auto check_like_q = [&](const Tensor& t, const char* name) {
    check_rank(t, 4, op, name, "N, h, K, D");
    check_shape(t, q.sizes(), op, name, "N, h, K, D");
    check_device(t, q, op, name, "q");
    check_same_dtype(t, q, op, name, "q");
  };
  check_like_q(grad_out, "grad_out");
  check_like_q(out, "out");
  const Tensor lse_c = checked_row_stat(lse, q, dims, op, "lse");
  Tensor grad_lse_c;
  if (grad_lse.has_value() && grad_lse->defined()) {
    grad_lse_c = checked_row_stat(*grad_lse, q, dims, op, "grad_lse");
  }
  const c10::cuda::CUDAGuard guard(q.device());
  // the inputs' strides, so autograd hands the gradients to permuted views without a copy
  Tensor dq = at::empty_like(q);
  Tensor dk = at::empty_like(k);
  Tensor dv = at::empty_like(v);
  if (dq.numel() == 0 || dk.numel() == 0) {  // no query or no key: nothing flows
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  if (tensor_cores_take(q) &&
      tensor_core_attention_backward(grad_out, grad_lse_c, q, k, v,
                                     mask == nullptr ? Tensor() : *key_padding_mask, out, lse_c,
                                     scale, dq, dk, dv)) {
    return {dq, dk, dv};
  }
  Tensor delta = at::empty({dims.n, dims.h, dims.k}, q.options().dtype(at::kFloat));
  ICD_DISPATCH_FLOAT_TYPES(q.scalar_type(), "attention_backward", [&] {
    dispatch_head_dim(dims.d, op, [&](auto bucket) {
      constexpr int DB = decltype(bucket)::value;
      AttentionBackwardArgs<scalar_t> a{};
      a.q = q.data_ptr<scalar_t>();
      a.k = k.data_ptr<scalar_t>();
      a.v = v.data_ptr<scalar_t>();
      a.grad_out = grad_out.data_ptr<scalar_t>();
      a.qs = strides_of(q);
      a.ks = strides_of(k);
      a.vs = strides_of(v);
      a.gs = strides_of(grad_out);
      a.mask = mask;
      a.lse = lse_c.data_ptr<float>();
      a.delta = delta.data_ptr<float>();
      a.heads = dims.h;
      a.queries = dims.k;
      a.keys = dims.s;
      a.dim = dims.d;
      a.scale = static_cast<float>(scale);
      a.dq = dq.data_ptr<scalar_t>();
      a.dk = dk.data_ptr<scalar_t>();
      a.dv = dv.data_ptr<scalar_t>();
      a.dqs = strides_of(dq);
      a.dks = strides_of(dk);
      a.dvs = strides_of(dv);
      const float* grad_lse_ptr = grad_lse_c.defined() ? grad_lse_c.data_ptr<float>() : nullptr;
      run_attention_backward<scalar_t, DB>(a, dims.n * dims.h, out, grad_lse_ptr,
                                           delta.data_ptr<float>());
    });
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace icd_cuda

// Lets a test tell an icd._C built with these kernels from one built without them
// (ICD_NO_CUDA=1, or no nvcc): ctypes finds this symbol only in the former.
extern "C" int icd_cuda_kernels_built() { return 1; }

TORCH_LIBRARY_IMPL(icd_ext, CUDA, m) {
  m.impl("attention_forward", &icd_cuda::attention_forward_cuda);
  m.impl("attention_backward", &icd_cuda::attention_backward_cuda);
}
