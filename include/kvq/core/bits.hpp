// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Bit-level helpers usable on host and device: float bit casts, bit width, ceil_div.
#pragma once

#include <cstdint>
#include <cstring>

#include "kvq/config.hpp"

namespace kvq {

/// Signed index type of views and shapes (elements, not bytes).
using index_t = std::int64_t;

/// ceil(a / b) for a >= 0, b > 0.
template <class T>
KVQ_HOST_DEVICE constexpr T ceil_div(T a, T b) noexcept {
  return (a + b - 1) / b;
}

/// The IEEE-754 bit pattern of a float.
KVQ_HOST_DEVICE std::uint32_t float_to_bits(float x) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

/// The float whose IEEE-754 bit pattern is u.
KVQ_HOST_DEVICE float bits_to_float(std::uint32_t u) noexcept {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

/// Number of bits needed to represent x (0 for x == 0): floor(log2 x) + 1.
KVQ_HOST_DEVICE int bit_width(std::uint32_t x) noexcept {
  if (x == 0) return 0;
#if KVQ_DEVICE_PASS
  return 32 - __clz(static_cast<int>(x));
#elif defined(__GNUC__) || defined(__clang__)
  return 32 - __builtin_clz(x);
#else
  int w = 0;
  while (x != 0) {
    ++w;
    x >>= 1;
  }
  return w;
#endif
}

}  // namespace kvq
