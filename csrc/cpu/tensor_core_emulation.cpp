// The tensor-core CUDA kernels' tile algorithms, run on the CPU (ops icd_emu::*), so that
// tests without a GPU check them against the reference: the same bodies
// (tensor_core/attention_tiles.h) and the same launch sequences (tensor_core/run.h) as the
// CUDA build, on EmulatedHw (tensor_core/emulated_hw.h), which executes mma.sync and
// ldmatrix from the PTX ISA's fragment layouts and stops on races, uninitialised shared
// memory, out-of-bounds accesses and divergent warp-wide instructions.
//
// Not a backend: slow (a host thread per CUDA thread), for small test shapes, and compiled
// into every build of icd._C (no CUDA needed). `multiprocessors` and `shared_per_block` stand
// for the device's limits, so a test can reach the several-split, several-slice and
// several-chunk paths at small sizes. Also icd_emu::mma and icd_emu::ldmatrix (one warp-wide
// instruction each) and icd_emu::fragment_layout (the lane -> element tables of
// tensor_core/fragments.h) for the tests of the emulation itself.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "tensor_core/attention_tiles.h"
#include "tensor_core/emulated_hw.h"
#include "tensor_core/fragments.h"
#include "tensor_core/plan.h"
#include "tensor_core/run.h"

namespace icd_tc {
namespace {

using at::Tensor;
using icd_checks::text_of;

// run.h's Launch policy on the CPU.
class EmulatedLaunch {
 public:
  EmulatedLaunch(int64_t multiprocessors, int64_t shared_per_block)
      : limits_{multiprocessors, shared_per_block, 2 * shared_per_block} {}

  DeviceLimits limits() const { return limits_; }

  void uses(const Tensor& t, bool writable) {
    if (!t.defined() || t.numel() == 0) return;
    // the span of a strided view: offsets 0 .. sum (size - 1) stride
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    ranges_.push_back({t.data_ptr(), static_cast<size_t>(last + 1) * t.element_size(), writable});
  }

  template <typename T, int DB, bool kWithValues>
  void forward(Grid g, size_t shared, const ForwardParams<T>& p) {
    run(g, ForwardConfig::kThreads, shared, [&](EmulatedHw& hw) {
      attention_forward_tile<T, DB, kWithValues>(hw, p, hw.shared_memory());
    });
  }

  template <typename T, typename... Args>
  void combine(Grid g, Args... args) {
    run(g, ForwardConfig::kThreads, 0, [&](EmulatedHw& hw) { combine_splits_tile<T>(hw, args...); });
  }

  template <typename T, typename... Args>
  void delta(Grid g, Args... args) {
    run(g, ForwardConfig::kThreads, 0, [&](EmulatedHw& hw) { attention_delta_tile<T>(hw, args...); });
  }

  template <typename T, int DB>
  void backward(Grid g, size_t shared, const BackwardParams<T>& p) {
    run(g, BackwardConfig<DB>::kThreads, shared, [&](EmulatedHw& hw) {
      attention_backward_tile<T, DB>(hw, p, hw.shared_memory());
    });
  }

  template <typename T, typename... Args>
  void sum_partials(Grid g, Args... args) {
    run(g, ForwardConfig::kThreads, 0, [&](EmulatedHw& hw) { sum_partials_tile<T>(hw, args...); });
  }

  template <typename T, int DB>
  void value_mask(Grid g, size_t shared, const ValueMaskParams<T>& p) {
    run(g, ValueMaskConfig::kThreads, shared, [&](EmulatedHw& hw) {
      value_mask_tile<T, DB>(hw, p, hw.shared_memory());
    });
  }

 private:
  template <typename Body>
  void run(Grid g, int threads, size_t shared, const Body& body) {
    TORCH_CHECK(static_cast<int64_t>(shared) <= limits_.shared_per_block,
                "icd_emu: a launch asks for ", text_of(static_cast<int64_t>(shared)),
                " bytes of shared memory, more than the ", text_of(limits_.shared_per_block),
                " of a block");
    try {
      emulate_launch(g.x, g.y, g.z, threads, shared, ranges_, body);
    } catch (const std::runtime_error& e) {
      TORCH_CHECK(false, std::string(e.what()));
    }
  }

  DeviceLimits limits_;
  std::vector<GlobalRange> ranges_;
};

void check_half(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "icd_emu: `", name, "` must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, "icd_emu: `",
              name, "` has dtype ", text_of(t.scalar_type()),
              "; the tensor-core kernels take float16 or bfloat16");
}

Tensor mask_or_undefined(const std::optional<Tensor>& mask) {
  return mask.has_value() && mask->defined() ? mask->contiguous() : Tensor();
}

// Calls body(T{}) with T = c10::Half or c10::BFloat16, the dtype of `t`.
template <typename Body>
void dispatch_half(const Tensor& t, const Body& body) {
  if (t.scalar_type() == at::kHalf) {
    body(c10::Half{});
  } else {
    body(c10::BFloat16{});
  }
}

std::tuple<Tensor, Tensor> attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const std::optional<Tensor>& key_padding_mask,
                                             double scale, int64_t multiprocessors) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) check_half(*t, name);
  Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  if (k.size(2) == 0) return {out.zero_(), lse.fill_(-INFINITY)};
  EmulatedLaunch launch(multiprocessors, 227 * 1024);
  const Tensor mask = mask_or_undefined(key_padding_mask);
  dispatch_half(q, [&](auto type) {
    using T = decltype(type);
    dispatch_bucket(q.size(3), [&](auto bucket) {
      run_forward<T, decltype(bucket)::value, true>(launch, q, k, v, mask, Tensor(),
                                                    static_cast<float>(scale), out, lse);
    });
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_backward(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q, const Tensor& k,
    const Tensor& v, const std::optional<Tensor>& key_padding_mask, const Tensor& out,
    const Tensor& lse, double scale, int64_t multiprocessors, int64_t shared_per_block) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&grad_out, "grad_out"}}) {
    check_half(*t, name);
  }
  Tensor dq = at::empty_like(q);
  Tensor dk = at::empty_like(k);
  Tensor dv = at::empty_like(v);
  if (dq.numel() == 0 || dk.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  EmulatedLaunch launch(multiprocessors, shared_per_block);
  const Tensor mask = mask_or_undefined(key_padding_mask);
  const Tensor grad_lse_c =
      grad_lse.has_value() && grad_lse->defined() ? grad_lse->contiguous() : Tensor();
  const Tensor lse_c = lse.contiguous();
  bool ran = false;
  dispatch_half(q, [&](auto type) {
    using T = decltype(type);
    dispatch_bucket(q.size(3), [&](auto bucket) {
      ran = run_backward<T, decltype(bucket)::value>(launch, grad_out, grad_lse_c, q, k, v, mask,
                                                     out, lse_c, static_cast<float>(scale), dq, dk, dv);
    });
  });
  TORCH_CHECK(ran, "icd_emu::attention_backward: one query block does not fit in ",
              "shared_per_block = ", text_of(shared_per_block), " bytes");
  return {dq, dk, dv};
}

Tensor value_mask(const Tensor& q, const Tensor& k, const Tensor& weight,
                  const std::optional<Tensor>& key_padding_mask, const std::optional<Tensor>& lse,
                  double scale, double temperature, int64_t multiprocessors) {
  check_half(q, "q");
  check_half(k, "k");
  Tensor out = at::empty({q.size(0), q.size(1), k.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (q.size(2) == 0) return out.zero_();
  EmulatedLaunch launch(multiprocessors, 227 * 1024);
  const Tensor mask = mask_or_undefined(key_padding_mask);
  const Tensor lse_c = lse.has_value() && lse->defined() ? lse->contiguous() : Tensor();
  const Tensor weight_c = weight.contiguous();
  dispatch_half(q, [&](auto type) {
    using T = decltype(type);
    dispatch_bucket(q.size(3), [&](auto bucket) {
      run_value_mask<T, decltype(bucket)::value>(launch, q, k, weight_c, mask, lse_c,
                                                 static_cast<float>(scale),
                                                 static_cast<float>(temperature), out);
    });
  });
  return out;
}

// ---- single warp-wide instructions ----------------------------------------------------------

uint32_t register_of(const uint16_t* bits, int lo, int hi) {
  return static_cast<uint32_t>(bits[lo]) | (static_cast<uint32_t>(bits[hi]) << 16);
}

// D = A B + C by one emulated mma.sync: A [16, 16] and B [16, 8] float16 or bfloat16, C [16, 8]
// float32; each lane's fragments are taken from the matrices with fragments.h's layouts.
Tensor mma(const Tensor& a, const Tensor& b, const Tensor& c) {
  check_half(a, "a");
  check_half(b, "b");
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && b.sizes() == at::IntArrayRef({16, 8}) &&
                  c.sizes() == at::IntArrayRef({16, 8}) && b.scalar_type() == a.scalar_type() &&
                  c.scalar_type() == at::kFloat,
              "icd_emu::mma: expected a [16, 16] and b [16, 8] of one 16-bit dtype, c [16, 8] ",
              "float32");
  const Tensor ab = a.contiguous(), bb = b.contiguous(), cc = c.contiguous();
  const auto* a_bits = reinterpret_cast<const uint16_t*>(ab.data_ptr());
  const auto* b_bits = reinterpret_cast<const uint16_t*>(bb.data_ptr());
  const float* c_values = cc.data_ptr<float>();
  Tensor d = at::empty({16, 8}, c.options());
  float* d_values = d.data_ptr<float>();
  const std::vector<GlobalRange> ranges;
  dispatch_half(a, [&](auto type) {
    using T = decltype(type);
    emulate_launch(1, 1, 1, kWarpSize, 0, ranges, [&](EmulatedHw& hw) {
      const int lane = hw.thread();
      uint32_t fa[4], fb[2];
      float acc[4];
      for (int r = 0; r < 4; ++r) {
        fa[r] = register_of(a_bits, a_row(lane, 2 * r) * 16 + a_col(lane, 2 * r),
                            a_row(lane, 2 * r + 1) * 16 + a_col(lane, 2 * r + 1));
      }
      for (int r = 0; r < 2; ++r) {
        fb[r] = register_of(b_bits, b_row(lane, 2 * r) * 8 + b_col(lane, 2 * r),
                            b_row(lane, 2 * r + 1) * 8 + b_col(lane, 2 * r + 1));
      }
      for (int i = 0; i < 4; ++i) acc[i] = c_values[c_row(lane, i) * 8 + c_col(lane, i)];
      hw.template mma<T>(acc, fa, fb);
      for (int i = 0; i < 4; ++i) d_values[c_row(lane, i) * 8 + c_col(lane, i)] = acc[i];
    });
  });
  return d;
}

// ldmatrix.x4 (trans: .trans) by one emulated warp from `matrices` [4, 8, 8] of 16-bit
// elements laid out in shared memory row after row (16 bytes each); lane 8 m + r passes the
// address of row r of matrix m. -> int64 [32, 4, 2]: element h of register m of each lane,
// as the matrices' flat index (m * 64 + row * 8 + col) it came from.
Tensor ldmatrix(bool trans) {
  Tensor result = at::empty({kWarpSize, 4, 2}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = result.data_ptr<int64_t>();
  const std::vector<GlobalRange> ranges;
  emulate_launch(1, 1, 1, kWarpSize, 4 * 64 * 2, ranges, [&](EmulatedHw& hw) {
    auto* tile = reinterpret_cast<uint16_t*>(hw.shared_memory());
    const int lane = hw.thread();
    for (int i = lane; i < 256; i += kWarpSize) hw.store(tile + i, static_cast<uint16_t>(i));
    hw.sync();
    uint32_t r[4];
    const uint16_t* row = tile + (lane / 8) * 64 + (lane % 8) * 8;
    if (trans) {
      hw.ldmatrix_x4<true>(r, row);
    } else {
      hw.ldmatrix_x4<false>(r, row);
    }
    for (int m = 0; m < 4; ++m) {
      out[(lane * 4 + m) * 2] = r[m] & 0xffffu;
      out[(lane * 4 + m) * 2 + 1] = r[m] >> 16;
    }
  });
  return result;
}

// (row, col) of every element of every lane's fragment: which in {"a", "b", "c"} ->
// int64 [32, elements, 2].
Tensor fragment_layout(const std::string& which) {
  TORCH_CHECK(which == "a" || which == "b" || which == "c",
              "icd_emu::fragment_layout: `which` is '", std::string(which),
              "'; expected 'a', 'b' or 'c'");
  const int elements = which == "a" ? kAElements : which == "b" ? kBElements : kCElements;
  Tensor result = at::empty({kWarpSize, elements, 2}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = result.data_ptr<int64_t>();
  for (int lane = 0; lane < kWarpSize; ++lane) {
    for (int i = 0; i < elements; ++i) {
      const int row = which == "a" ? a_row(lane, i) : which == "b" ? b_row(lane, i) : c_row(lane, i);
      const int col = which == "a" ? a_col(lane, i) : which == "b" ? b_col(lane, i) : c_col(lane, i);
      out[(lane * elements + i) * 2] = row;
      out[(lane * elements + i) * 2 + 1] = col;
    }
  }
  return result;
}

}  // namespace
}  // namespace icd_tc

TORCH_LIBRARY(icd_emu, m) {
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale, "
        "int multiprocessors) -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
        "Tensor? key_padding_mask, Tensor out, Tensor lse, float scale, int multiprocessors, "
        "int shared_per_block) -> (Tensor, Tensor, Tensor)");
  m.def("value_mask(Tensor q, Tensor k, Tensor weight, Tensor? key_padding_mask, Tensor? lse, "
        "float scale, float temperature, int multiprocessors) -> Tensor");
  m.def("mma(Tensor a, Tensor b, Tensor c) -> Tensor");
  m.def("ldmatrix(bool trans) -> Tensor");
  m.def("fragment_layout(str which) -> Tensor");
}

TORCH_LIBRARY_IMPL(icd_emu, CPU, m) {
  m.impl("attention_forward", &icd_tc::attention_forward);
  m.impl("attention_backward", &icd_tc::attention_backward);
  m.impl("value_mask", &icd_tc::value_mask);
  m.impl("mma", &icd_tc::mma);
}

TORCH_LIBRARY_IMPL(icd_emu, CompositeExplicitAutograd, m) {
  m.impl("ldmatrix", &icd_tc::ldmatrix);
  m.impl("fragment_layout", &icd_tc::fragment_layout);
}
