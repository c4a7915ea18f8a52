// The hardware the tensor-core tile algorithms (attention_tiles.h) run on, on a GPU: the
// block's thread index and position in the grid, barriers, warp shuffles, ldmatrix and
// mma.sync as inline PTX (sm_80 and later), and plain shared/global memory accesses.
// emulated_hw.h is the same interface on the CPU, where each instruction is emulated from
// the layouts of fragments.h.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "tensor_core/fragments.h"

namespace icd_tc {

struct DeviceHw {
  __device__ __forceinline__ int thread() const { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ int64_t block_x() const { return blockIdx.x; }
  __device__ __forceinline__ int64_t block_y() const { return blockIdx.y; }
  __device__ __forceinline__ int64_t block_z() const { return blockIdx.z; }

  // __syncthreads, and __syncthreads_or: true when `p` holds in some thread of the block.
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ bool sync_or(bool p) const { return __syncthreads_or(p) != 0; }

  __device__ __forceinline__ float shfl_xor(float x, int mask) const {
    return __shfl_xor_sync(0xffffffffu, x, mask);
  }

  __device__ __forceinline__ float exp2(float x) const { return exp2f(x); }

  template <typename U>
  __device__ __forceinline__ U load(const U* p) const {
    return *p;
  }
  template <typename U>
  __device__ __forceinline__ void store(U* p, U x) const {
    *p = x;
  }

  // ldmatrix .x4 (trans: .trans); `row` is this lane's row address in shared memory.
  template <bool kTrans>
  __device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // the host side launches these kernels on sm_80 and later only
#else
    const auto address = static_cast<unsigned>(__cvta_generic_to_shared(row));
    if constexpr (kTrans) {
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(address));
    } else {
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(address));
    }
#endif
  }

  // d += a b for one m16n8k16 tile; T (c10::Half or c10::BFloat16) names the multiplicands.
  template <typename T>
  __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4],
                                      const uint32_t (&b)[2]) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();
#else
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
      static_assert(std::is_same_v<T, c10::Half>, "tensor-core multiplicands are half or bfloat16");
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#endif
  }
};

}  // namespace icd_tc
