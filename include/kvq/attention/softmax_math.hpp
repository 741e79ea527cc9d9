// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Vectorizable float kernels of decode attention: exp, dot product, axpy.
#pragma once

#include <cstdint>
#include <cstring>

#include "kvq/core/bits.hpp"
#include "kvq/quant/decode_affine.hpp"  // KVQ_HAVE_AVX2 and <immintrin.h>

namespace kvq::detail {

/// e^x for x <= 0 with relative error below 2e-7 (0 below -87): Cody–Waite reduction
/// x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r, and 2^n from the exponent bits.
/// Branch-free, so loops over it vectorize.
inline float exp_nonpositive(float x) noexcept {
  x = x < -87.0f ? -87.0f : x;
  const float n = static_cast<float>(static_cast<std::int32_t>(x * 1.44269504f - 0.5f));
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const std::uint32_t bits = static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

/// s[t] = e^(s[t] - m) for t < n, where every s[t] <= m (the AVX2 kernel evaluates
/// exp_nonpositive's formula 8 lanes at a time).
inline void exp_shifted(float* s, index_t n, float m) noexcept {
  index_t t = 0;
#if KVQ_HAVE_AVX2
  const __m256 vm = _mm256_set1_ps(m);
  for (; t + 8 <= n; t += 8) {
    __m256 x = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm), _mm256_set1_ps(-87.0f));
    const __m256i ni = _mm256_cvttps_epi32(_mm256_fmsub_ps(x, _mm256_set1_ps(1.44269504f), _mm256_set1_ps(0.5f)));
    const __m256 n8 = _mm256_cvtepi32_ps(ni);
    const __m256 r = _mm256_fnmadd_ps(n8, _mm256_set1_ps(1.42860677e-6f),
                                      _mm256_fnmadd_ps(n8, _mm256_set1_ps(0.693145752f), x));
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
    _mm256_storeu_ps(s + t, _mm256_mul_ps(p, scale));
  }
#endif
  for (; t < n; ++t) s[t] = exp_nonpositive(s[t] - m);
}

/// Sum of a[i] * b[i] over n elements, with 16 independent partial sums.
inline float dot(const float* a, const float* b, index_t n) noexcept {
  float lanes[16] = {};
  index_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int l = 0; l < 16; ++l) lanes[l] += a[i + l] * b[i + l];
  }
  for (; i < n; ++i) lanes[0] += a[i] * b[i];
  float s = 0.0f;
  for (int l = 0; l < 16; ++l) s += lanes[l];
  return s;
}

/// Largest of x[0 .. n), n >= 1, with 8 independent lanes (vectorizes without fast-math).
inline float max_of(const float* x, index_t n) noexcept {
  float lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = x[0];
  index_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] = x[i + l] > lanes[l] ? x[i + l] : lanes[l];
  }
  for (; i < n; ++i) lanes[0] = x[i] > lanes[0] ? x[i] : lanes[0];
  float m = lanes[0];
  for (int l = 1; l < 8; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

/// Sum of x[0 .. n) with 8 independent lanes.
inline float sum_of(const float* x, index_t n) noexcept {
  float lanes[8] = {};
  index_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += x[i + l];
  }
  for (; i < n; ++i) lanes[0] += x[i];
  float s = 0.0f;
  for (int l = 0; l < 8; ++l) s += lanes[l];
  return s;
}

/// y[i] += a * x[i].
inline void axpy(float* y, float a, const float* x, index_t n) noexcept {
  for (index_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace kvq::detail
