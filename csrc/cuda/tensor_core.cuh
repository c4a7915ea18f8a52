// Entry points of the tensor-core kernels (csrc/cuda/tensor_core_attention.cu) for the ops of
// instance_attention.cu and value_mask.cu: float16 and bfloat16 inputs on sm_80 and later,
// float32 accumulation. Arguments arrive checked by the ops (shapes, dtypes, devices,
// D <= 128), with N * h, K and S >= 1; masks are bool [N, S] contiguous or undefined.
#pragma once

#include <ATen/core/Tensor.h>

namespace icd_cuda {

// Whether the tensor-core kernels run inputs like q: float16 or bfloat16 on a device of
// compute capability 8.0 or later (float32 stays on the CUDA-core kernels).
bool tensor_cores_take(const at::Tensor& q);

// Writes out (contiguous [N, h, K, D]) and lse (float32 [N, h, K]).
void tensor_core_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& mask, double scale, const at::Tensor& out,
                                   const at::Tensor& lse);

// Writes dq, dk, dv (any strides); grad_lse may be undefined. Returns false, having launched
// nothing, when a query block does not fit in the device's shared memory.
bool tensor_core_attention_backward(const at::Tensor& grad_out, const at::Tensor& grad_lse,
                                    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& mask, const at::Tensor& out,
                                    const at::Tensor& lse, double scale, const at::Tensor& dq,
                                    const at::Tensor& dk, const at::Tensor& dv);

// Writes out (float32 [N, h, S]); weight float32 [N, K] contiguous; lse (float32 [N, h, K]
// contiguous) may be undefined.
void tensor_core_value_mask(const at::Tensor& q, const at::Tensor& k, const at::Tensor& weight,
                            const at::Tensor& mask, const at::Tensor& lse, double scale,
                            double temperature, const at::Tensor& out);

}  // namespace icd_cuda
