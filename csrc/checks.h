// Argument checks shared by the CPU and CUDA kernels: every message names the op and the
// argument, with the shape or dtype received and the one expected. The device-specific
// checks (device, supported dtypes) live in cpu/common.h and cuda/common.cuh.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace icd_checks {

using at::Tensor;

inline std::string shape_of(const Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

// `t` has rank len(dims) (dims like "N, h, K, D").
inline void check_rank(const Tensor& t, int64_t rank, const char* op, const char* name,
                       const char* dims) {
  TORCH_CHECK(t.dim() == rank, op, ": `", name, "` has shape ", shape_of(t), "; expected [",
              dims, "] (", rank, " dims)");
}

inline void check_shape(const Tensor& t, at::IntArrayRef expected, const char* op,
                        const char* name, const char* dims) {
  TORCH_CHECK(t.sizes() == expected, op, ": `", name, "` has shape ", shape_of(t),
              "; expected [", dims, "] = ", expected);
}

inline void check_same_dtype(const Tensor& t, const Tensor& ref, const char* op,
                             const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": `", name, "` has dtype ",
              t.scalar_type(), " but `", ref_name, "` has ", ref.scalar_type(),
              "; expected one dtype");
}

inline void check_contiguous(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": `", name, "` must be contiguous");
}

}  // namespace icd_checks
