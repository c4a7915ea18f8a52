// The passes of the tensor-core attention forward, backward and value mask as sequences of
// launches (attention_tiles.h bodies) with their workspaces, written once against a Launch
// policy: csrc/cuda/tensor_core_attention.cu launches CUDA kernels, csrc/cpu/
// tensor_core_emulation.cpp runs the same bodies on the CPU (emulated_hw.h). A Launch has
//   limits() -> DeviceLimits
//   uses(tensor, writable)            the tensors the next launches may touch (emulation checks)
//   forward<T, DB, kWithValues>(grid, shared_bytes, ForwardParams<T>)
//   combine<T>(grid, args of combine_splits_tile)
//   delta<T>(grid, args of attention_delta_tile)
//   backward<T, DB>(grid, shared_bytes, BackwardParams<T>)
//   sum_partials<T>(grid, args of sum_partials_tile)
//   value_mask<T, DB>(grid, shared_bytes, ValueMaskParams<T>)
// Inputs arrive checked (shapes, dtypes, devices), with N * h, K and S >= 1.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <initializer_list>
#include <type_traits>

#include "tensor_core/plan.h"

namespace icd_tc {

using at::Tensor;

struct Grid {
  int64_t x, y, z;
};

inline Strides4 strides4(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename T>
const T* data_of(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}
template <typename T>
T* mutable_data_of(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// q [N, h, K, D], k and v [N, h, S, D] (v undefined without values), mask bool [N, S]
// contiguous or undefined; weight float [N, K] contiguous or undefined (rows of weight 0 get
// no lse). Writes out (contiguous [N, h, K, D], with values) and lse (float [N, h, K]).
template <typename T, int DB, bool kWithValues, class Launch>
void run_forward(Launch& launch, const Tensor& q, const Tensor& k, const Tensor& v,
                 const Tensor& mask, const Tensor& weight, float scale, const Tensor& out,
                 const Tensor& lse) {
  const int64_t heads = q.size(1), queries = q.size(2), keys = k.size(2), dim = q.size(3);
  const int64_t nh = q.size(0) * heads;
  const ForwardPlan plan = plan_forward<DB>(nh, queries, keys, launch.limits());
  ForwardParams<T> p{};
  p.q = data_of<T>(q);
  p.k = data_of<T>(k);
  p.v = kWithValues ? data_of<T>(v) : nullptr;
  p.qs = strides4(q);
  p.ks = strides4(k);
  p.vs = kWithValues ? strides4(v) : Strides4{0, 0, 0, 0};
  p.mask = data_of<bool>(mask);
  p.row_weight = data_of<float>(weight);
  p.heads = heads;
  p.queries = queries;
  p.keys = keys;
  p.dim = dim;
  p.scale = scale;
  p.keys_per_split = plan.keys_per_split;
  p.splits = plan.splits;
  p.part_rows = nh * queries;
  p.out = kWithValues ? mutable_data_of<T>(out) : nullptr;
  p.lse = mutable_data_of<float>(lse);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&q, &k, &v, &mask, &weight}) launch.uses(*t, false);
  launch.uses(out, true);
  launch.uses(lse, true);
  Tensor part_acc, part_max, part_sum;
  if (plan.splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    if (kWithValues) part_acc = at::empty({plan.splits, p.part_rows, dim}, f32);
    part_max = at::empty({plan.splits, p.part_rows}, f32);
    part_sum = at::empty({plan.splits, p.part_rows}, f32);
    p.part_acc = mutable_data_of<float>(part_acc);
    p.part_max = mutable_data_of<float>(part_max);
    p.part_sum = mutable_data_of<float>(part_sum);
    for (const Tensor* t : std::initializer_list<const Tensor*>{&part_acc, &part_max, &part_sum}) launch.uses(*t, true);
  }
  launch.template forward<T, DB, kWithValues>(Grid{plan.query_tiles, nh, plan.splits},
                                              plan.shared_bytes, p);
  if (plan.splits > 1) {
    launch.template combine<T>(Grid{row_blocks(p.part_rows), 1, 1}, p.part_acc, p.part_max,
                               p.part_sum, plan.splits, p.part_rows, heads, queries, dim,
                               p.row_weight, p.out, p.lse);
  }
}

// Gradients dq, dk, dv (allocated by the caller, any strides) of the attention; grad_lse may
// be undefined (zeros). Returns false, having launched nothing, when one query block does not
// fit in a block's shared memory (the caller falls back to the CUDA-core kernels).
template <typename T, int DB, class Launch>
bool run_backward(Launch& launch, const Tensor& grad_out, const Tensor& grad_lse, const Tensor& q,
                  const Tensor& k, const Tensor& v, const Tensor& mask, const Tensor& out,
                  const Tensor& lse, float scale, const Tensor& dq, const Tensor& dk,
                  const Tensor& dv) {
  const int64_t heads = q.size(1), queries = q.size(2), keys = k.size(2), dim = q.size(3);
  const int64_t nh = q.size(0) * heads;
  const BackwardPlan plan = plan_backward<DB>(nh, queries, keys, launch.limits());
  if (!plan.fits) return false;
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t rows = nh * queries;
  Tensor delta = at::empty({rows}, f32);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&grad_out, &grad_lse, &q, &k, &v, &mask, &out, &lse}) launch.uses(*t, false);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dq, &dk, &dv, &delta}) launch.uses(*t, true);
  launch.template delta<T>(Grid{row_blocks(rows), 1, 1}, data_of<T>(grad_out), strides4(grad_out),
                           data_of<T>(out), strides4(out), data_of<float>(grad_lse), heads, queries,
                           dim, rows, mutable_data_of<float>(delta));

  BackwardParams<T> p{};
  p.q = data_of<T>(q);
  p.k = data_of<T>(k);
  p.v = data_of<T>(v);
  p.grad_out = data_of<T>(grad_out);
  p.qs = strides4(q);
  p.ks = strides4(k);
  p.vs = strides4(v);
  p.gs = strides4(grad_out);
  p.mask = data_of<bool>(mask);
  p.lse = data_of<float>(lse);
  p.delta = data_of<float>(delta);
  p.heads = heads;
  p.queries = queries;
  p.keys = keys;
  p.dim = dim;
  p.scale = scale;
  p.keys_per_slice = plan.keys_per_slice;
  p.chunk_rows = plan.chunk_rows;
  p.slices = plan.slices;
  p.chunks = plan.chunks;
  p.part_query_rows = rows;
  p.part_key_rows = nh * keys;
  p.dq = mutable_data_of<T>(dq);
  p.dk = mutable_data_of<T>(dk);
  p.dv = mutable_data_of<T>(dv);
  p.dqs = strides4(dq);
  p.dks = strides4(dk);
  p.dvs = strides4(dv);
  Tensor part_dq, part_dk, part_dv;
  if (plan.slices > 1) {
    part_dq = at::empty({plan.slices, rows, dim}, f32);
    p.part_dq = mutable_data_of<float>(part_dq);
    launch.uses(part_dq, true);
  }
  if (plan.chunks > 1) {
    part_dk = at::empty({plan.chunks, p.part_key_rows, dim}, f32);
    part_dv = at::empty({plan.chunks, p.part_key_rows, dim}, f32);
    p.part_dk = mutable_data_of<float>(part_dk);
    p.part_dv = mutable_data_of<float>(part_dv);
    launch.uses(part_dk, true);
    launch.uses(part_dv, true);
  }
  launch.template backward<T, DB>(Grid{plan.slices, nh, plan.chunks}, plan.shared_bytes, p);

  const auto sum = [&](const float* part, int parts, int64_t length, const Tensor& target) {
    const int64_t size = nh * length * dim;
    const int64_t blocks = partial_blocks(size);
    launch.template sum_partials<T>(Grid{blocks, 1, 1}, part, parts, size, heads, length, dim,
                                    strides4(target), mutable_data_of<T>(target), blocks);
  };
  if (plan.slices > 1) sum(p.part_dq, plan.slices, queries, dq);
  if (plan.chunks > 1) {
    sum(p.part_dk, plan.chunks, keys, dk);
    sum(p.part_dv, plan.chunks, keys, dv);
  }
  return true;
}

// out [N, h, S] float32 of the value mask; weight float [N, K] contiguous; lse (float
// [N, h, K] contiguous, of the logits / temperature) may be undefined: then a forward pass
// without values computes it, for the rows of weight != 0 only.
template <typename T, int DB, class Launch>
void run_value_mask(Launch& launch, const Tensor& q, const Tensor& k, const Tensor& weight,
                    const Tensor& mask, const Tensor& lse, float scale, float temperature,
                    const Tensor& out) {
  const float logit_scale = scale / temperature;
  Tensor lse_used = lse;
  if (!lse_used.defined()) {
    lse_used = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
    run_forward<T, DB, false>(launch, q, k, Tensor(), mask, weight, logit_scale, Tensor(), lse_used);
  }
  ValueMaskParams<T> p{};
  p.q = data_of<T>(q);
  p.k = data_of<T>(k);
  p.qs = strides4(q);
  p.ks = strides4(k);
  p.mask = data_of<bool>(mask);
  p.weight = data_of<float>(weight);
  p.lse = data_of<float>(lse_used);
  p.heads = q.size(1);
  p.queries = q.size(2);
  p.keys = k.size(2);
  p.dim = q.size(3);
  p.scale = logit_scale;
  p.out = mutable_data_of<float>(out);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&q, &k, &weight, &mask, &lse_used}) launch.uses(*t, false);
  launch.uses(out, true);
  launch.template value_mask<T, DB>(Grid{value_mask_blocks(p.keys), q.size(0) * p.heads, 1},
                                    value_mask_shared_bytes<DB>(), p);
}

// Calls body(std::integral_constant<int, DB>) for the tensor-core head-dim bucket of d.
template <typename Body>
void dispatch_bucket(int64_t d, const Body& body) {
  switch (head_dim_bucket(d)) {
    case 16:
      body(std::integral_constant<int, 16>{});
      break;
    case 32:
      body(std::integral_constant<int, 32>{});
      break;
    case 64:
      body(std::integral_constant<int, 64>{});
      break;
    default:
      body(std::integral_constant<int, 128>{});
      break;
  }
}

}  // namespace icd_tc
