// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Vectorizable float kernels of decode attention: exp, dot product, axpy.
#pragma once

#include <cstdint>
#include <cstring>

#include "kvq/core/bits.hpp"

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

/// y[i] += a * x[i].
inline void axpy(float* y, float a, const float* x, index_t n) noexcept {
  for (index_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace kvq::detail
