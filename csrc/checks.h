// Argument checks shared by the CPU and CUDA kernels: every message names the op and the
// argument, with the shape or dtype received and the one expected. The device-specific
// checks (device, supported dtypes) live in cpu/common.h and cuda/common.cuh.
//
// Messages hold numbers, shapes, dtypes and devices as text made without std::ostream
// (std::to_string, snprintf, c10::toString, Device::str): with torch 2.11 built by GCC 13.3
// (Ubuntu 24.04), inserting an integer into a std::ostream from an extension was measured to
// crash the process, so a message built by TORCH_CHECK's `<<` would segfault instead of raising.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>

namespace icd_checks {

using at::Tensor;

inline std::string text_of(int64_t x) { return std::to_string(x); }

inline std::string text_of(double x) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%g", x);
  return buffer;
}

inline const char* text_of(at::ScalarType type) { return c10::toString(type); }

inline std::string text_of(const at::Device& device) { return device.str(); }

// "[2, 3, 7]", as torch prints a shape.
inline std::string shape_text(at::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(sizes[i]);
  }
  return text + "]";
}

inline std::string shape_of(const Tensor& t) { return shape_text(t.sizes()); }

// `t` has rank len(dims) (dims like "N, h, K, D").
inline void check_rank(const Tensor& t, int64_t rank, const char* op, const char* name,
                       const char* dims) {
  TORCH_CHECK(t.dim() == rank, op, ": `", name, "` has shape ", shape_of(t), "; expected [",
              dims, "] (", text_of(rank), " dims)");
}

inline void check_shape(const Tensor& t, at::IntArrayRef expected, const char* op,
                        const char* name, const char* dims) {
  TORCH_CHECK(t.sizes() == expected, op, ": `", name, "` has shape ", shape_of(t),
              "; expected [", dims, "] = ", shape_text(expected));
}

inline void check_same_dtype(const Tensor& t, const Tensor& ref, const char* op,
                             const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": `", name, "` has dtype ",
              text_of(t.scalar_type()), " but `", ref_name, "` has ", text_of(ref.scalar_type()),
              "; expected one dtype");
}

inline void check_contiguous(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": `", name, "` must be contiguous");
}

}  // namespace icd_checks
