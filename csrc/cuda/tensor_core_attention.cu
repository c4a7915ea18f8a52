// The tensor-core kernels: the bodies of tensor_core/attention_tiles.h on DeviceHw (inline
// PTX mma.sync m16n8k16 and ldmatrix), launched in the sequences of tensor_core/run.h. The
// CPU emulation (csrc/cpu/tensor_core_emulation.cpp) runs the same bodies and sequences.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/tensor_core.cuh"
#include "cuda/tile_kernels.cuh"
#include "tensor_core/attention_tiles.h"
#include "tensor_core/device_hw.cuh"
#include "tensor_core/plan.h"
#include "tensor_core/run.h"

namespace icd_tc {
namespace {

extern __shared__ uint4 dynamic_shared[];  // 16-byte aligned (ldmatrix rows)

template <typename T, int DB, bool kWithValues>
__global__ void __launch_bounds__(ForwardConfig::kThreads)
    tc_attention_forward_kernel(const ForwardParams<T> p) {
  DeviceHw hw;
  attention_forward_tile<T, DB, kWithValues>(hw, p, reinterpret_cast<unsigned char*>(dynamic_shared));
}

template <typename T, int DB>
__global__ void __launch_bounds__(BackwardConfig<DB>::kThreads, 1)
    tc_attention_backward_kernel(const BackwardParams<T> p) {
  DeviceHw hw;
  attention_backward_tile<T, DB>(hw, p, reinterpret_cast<unsigned char*>(dynamic_shared));
}

template <typename T, int DB>
__global__ void __launch_bounds__(ValueMaskConfig::kThreads)
    tc_value_mask_kernel(const ValueMaskParams<T> p) {
  DeviceHw hw;
  value_mask_tile<T, DB>(hw, p, reinterpret_cast<unsigned char*>(dynamic_shared));
}

int64_t device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

// run.h's Launch policy on the current CUDA device and stream.
class CudaLaunch {
 public:
  CudaLaunch() : stream_(c10::cuda::getCurrentCUDAStream()) {
    const int device = c10::cuda::current_device();
    limits_ = {device_attribute(cudaDevAttrMultiProcessorCount, device),
               device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
               device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device)};
  }

  DeviceLimits limits() const { return limits_; }
  void uses(const at::Tensor&, bool) const {}

  template <typename T, int DB, bool kWithValues>
  void forward(Grid g, size_t shared, const ForwardParams<T>& p) {
    launch(tc_attention_forward_kernel<T, DB, kWithValues>, g, ForwardConfig::kThreads, shared, p);
  }
  template <typename T, int DB>
  void backward(Grid g, size_t shared, const BackwardParams<T>& p) {
    launch(tc_attention_backward_kernel<T, DB>, g, BackwardConfig<DB>::kThreads, shared, p);
  }
  template <typename T, int DB>
  void value_mask(Grid g, size_t shared, const ValueMaskParams<T>& p) {
    launch(tc_value_mask_kernel<T, DB>, g, ValueMaskConfig::kThreads, shared, p);
  }
  template <typename T, typename... Args>
  void combine(Grid g, Args... args) {
    launch(tc_combine_kernel<T>, g, ForwardConfig::kThreads, 0, args...);
  }
  template <typename T, typename... Args>
  void delta(Grid g, Args... args) {
    launch(tc_delta_kernel<T>, g, ForwardConfig::kThreads, 0, args...);
  }
  template <typename T, typename... Args>
  void sum_partials(Grid g, Args... args) {
    launch(tc_sum_partials_kernel<T>, g, ForwardConfig::kThreads, 0, args...);
  }

 private:
  template <typename... Params, typename... Args>
  void launch(void (*kernel)(Params...), Grid g, int threads, size_t shared, Args... args) {
    if (shared > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(shared)));
    }
    const dim3 grid(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
    kernel<<<grid, threads, shared, stream_>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  cudaStream_t stream_;
  DeviceLimits limits_{};
};

// Calls body(T{}) with T = c10::Half or c10::BFloat16, the dtype of `t`.
template <typename Body>
void dispatch_half(const at::Tensor& t, const Body& body) {
  if (t.scalar_type() == at::kHalf) {
    body(c10::Half{});
  } else {
    body(c10::BFloat16{});
  }
}

}  // namespace
}  // namespace icd_tc

namespace icd_cuda {

bool tensor_cores_take(const at::Tensor& q) {
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) return false;
  if (icd_tc::head_dim_bucket(q.size(3)) == 0) return false;  // D > 128: the ops' error
  return icd_tc::device_attribute(cudaDevAttrComputeCapabilityMajor, q.device().index()) >= 8;
}

void tensor_core_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& mask, double scale, const at::Tensor& out,
                                   const at::Tensor& lse) {
  icd_tc::CudaLaunch launch;
  icd_tc::dispatch_half(q, [&](auto type) {
    using T = decltype(type);
    icd_tc::dispatch_bucket(q.size(3), [&](auto bucket) {
      icd_tc::run_forward<T, decltype(bucket)::value, true>(launch, q, k, v, mask, at::Tensor(),
                                                            static_cast<float>(scale), out, lse);
    });
  });
}

bool tensor_core_attention_backward(const at::Tensor& grad_out, const at::Tensor& grad_lse,
                                    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& mask, const at::Tensor& out,
                                    const at::Tensor& lse, double scale, const at::Tensor& dq,
                                    const at::Tensor& dk, const at::Tensor& dv) {
  icd_tc::CudaLaunch launch;
  bool ran = false;
  icd_tc::dispatch_half(q, [&](auto type) {
    using T = decltype(type);
    icd_tc::dispatch_bucket(q.size(3), [&](auto bucket) {
      ran = icd_tc::run_backward<T, decltype(bucket)::value>(launch, grad_out, grad_lse, q, k, v,
                                                             mask, out, lse,
                                                             static_cast<float>(scale), dq, dk, dv);
    });
  });
  return ran;
}

void tensor_core_value_mask(const at::Tensor& q, const at::Tensor& k, const at::Tensor& weight,
                            const at::Tensor& mask, const at::Tensor& lse, double scale,
                            double temperature, const at::Tensor& out) {
  icd_tc::CudaLaunch launch;
  icd_tc::dispatch_half(q, [&](auto type) {
    using T = decltype(type);
    icd_tc::dispatch_bucket(q.size(3), [&](auto bucket) {
      icd_tc::run_value_mask<T, decltype(bucket)::value>(launch, q, k, weight, mask, lse,
                                                         static_cast<float>(scale),
                                                         static_cast<float>(temperature), out);
    });
  });
}

}  // namespace icd_cuda
