// Row kernels of the tiled softmax (declared in cpu/common.h): one pass over a row of a logits
// tile each, fused where possible.
//
// float rows use a polynomial exp (Cephes expf: range reduction by ln 2 and a degree-6
// polynomial, ~1 ulp) written so the compiler vectorises it, in AVX2 / AVX-512 versions
// (ICD_VECTOR_CLONES). ATen's exp_ took ~2.8 ns per float on the 2-core AMD EPYC dev
// machine, these loops well under 1 ns. double rows use std::exp.
// exp(x) is exactly 0 for x < -87 and for x = -inf (a row without keys has shift +inf).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/common.h"

namespace icd_cpu {
namespace {

constexpr float kExpUnderflow = -87.0f;  // below this exp(x) is taken as 0

ICD_INLINE float vector_exp(float x) {
  const float c = std::min(std::max(x, kExpUnderflow), 88.0f);
  // c = n ln2 + r with n = round(c / ln2) (the 1.5 * 2^23 trick rounds to nearest)
  const float n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = c - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof(two_to_n));
  return x < kExpUnderflow ? 0.0f : p * two_to_n;
}

ICD_VECTOR_CLONES
float row_max_f(const float* x, int64_t len) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < len; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

ICD_VECTOR_CLONES
float exp_shifted_sum_f(float* x, int64_t len, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < len; ++i) {
    x[i] = vector_exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

ICD_VECTOR_CLONES
void probs_and_dlogits_f(float* x, float shift, float* dx, float delta, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    x[i] = vector_exp(x[i] - shift);
    dx[i] = x[i] * (dx[i] - delta);
  }
}

ICD_VECTOR_CLONES
void add_weighted_probs_f(float* out, const float* x, float shift, float weight, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) out[i] += weight * vector_exp(x[i] - shift);
}

}  // namespace

float row_max(const float* x, int64_t len) { return row_max_f(x, len); }

double row_max(const double* x, int64_t len) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < len; ++i) m = std::max(m, x[i]);
  return m;
}

float exp_shifted_sum(float* x, int64_t len, float shift) {
  return exp_shifted_sum_f(x, len, shift);
}

double exp_shifted_sum(double* x, int64_t len, double shift) {
  double sum = 0.0;
  for (int64_t i = 0; i < len; ++i) {
    x[i] = std::exp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

void probs_and_dlogits(float* x, float shift, float* dx, float delta, int64_t len) {
  probs_and_dlogits_f(x, shift, dx, delta, len);
}

void probs_and_dlogits(double* x, double shift, double* dx, double delta, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    x[i] = std::exp(x[i] - shift);
    dx[i] = x[i] * (dx[i] - delta);
  }
}

void add_weighted_probs(float* out, const float* x, float shift, float weight, int64_t len) {
  add_weighted_probs_f(out, x, shift, weight, len);
}

void add_weighted_probs(double* out, const double* x, double shift, double weight,
                        int64_t len) {
  for (int64_t i = 0; i < len; ++i) out[i] += weight * std::exp(x[i] - shift);
}

}  // namespace icd_cpu
