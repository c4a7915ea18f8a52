// The small one-warp-per-row and grid-stride kernels of the attention passes (the bodies in
// tensor_core/attention_tiles.h), shared by the tensor-core and the CUDA-core paths: the merge
// of key splits, delta = rowsum(dO out) - grad_lse, and the in-order sum of float32 partials.
// ForwardConfig::kThreads (128) threads per block.
#pragma once

#include "tensor_core/attention_tiles.h"
#include "tensor_core/device_hw.cuh"

namespace icd_tc {

template <typename T>
__global__ void __launch_bounds__(ForwardConfig::kThreads)
    tc_combine_kernel(const float* part_acc, const float* part_max, const float* part_sum,
                      int splits, int64_t rows, int64_t heads, int64_t queries, int64_t dim,
                      const float* row_weight, T* out, float* lse) {
  DeviceHw hw;
  combine_splits_tile<T>(hw, part_acc, part_max, part_sum, splits, rows, heads, queries, dim,
                         row_weight, out, lse);
}

template <typename T>
__global__ void __launch_bounds__(ForwardConfig::kThreads)
    tc_delta_kernel(const T* grad_out, Strides4 gs, const T* out, Strides4 os,
                    const float* grad_lse, int64_t heads, int64_t queries, int64_t dim,
                    int64_t rows, float* delta) {
  DeviceHw hw;
  attention_delta_tile<T>(hw, grad_out, gs, out, os, grad_lse, heads, queries, dim, rows, delta);
}

template <typename T>
__global__ void __launch_bounds__(ForwardConfig::kThreads)
    tc_sum_partials_kernel(const float* part, int parts, int64_t size, int64_t heads,
                           int64_t length, int64_t dim, Strides4 os, T* out, int64_t grid_blocks) {
  DeviceHw hw;
  sum_partials_tile<T>(hw, part, parts, size, heads, length, dim, os, out, grid_blocks);
}

}  // namespace icd_tc
