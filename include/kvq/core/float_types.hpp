// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The storage types Float16 (IEEE binary16), BFloat16 and Float8E4M3 (OCP FP8 E4M3,
///        "e4m3fn"), and to_float / from_float over them and float.
#pragma once

#include <type_traits>

#include "kvq/config.hpp"
#include "kvq/core/minifloat.hpp"

namespace kvq {

/// IEEE-754 binary16: 5 exponent bits, 10 mantissa bits, max 65504.
using Float16 = MiniFloat<MiniFloatFormat<5, 10, true>>;
/// bfloat16: float's 8 exponent bits, 7 mantissa bits.
using BFloat16 = MiniFloat<MiniFloatFormat<8, 7, true>>;
/// OCP FP8 E4M3 (e4m3fn): 4 exponent bits, 3 mantissa bits, no Inf, NaN = S.1111.111, max 448.
using Float8E4M3 = MiniFloat<MiniFloatFormat<4, 3, false>>;

static_assert(sizeof(Float16) == 2 && sizeof(BFloat16) == 2 && sizeof(Float8E4M3) == 1,
              "kvq: storage types must be exactly as wide as their encoding");
static_assert(std::is_trivially_copyable_v<Float16> && std::is_trivially_copyable_v<Float8E4M3>,
              "kvq: storage types must be trivially copyable");

/// True for the element types kvq reads and writes: float and the MiniFloat formats.
template <class T>
struct is_storage_float : std::false_type {};
template <>
struct is_storage_float<float> : std::true_type {};
template <class Format>
struct is_storage_float<MiniFloat<Format>> : std::true_type {};
template <class T>
inline constexpr bool is_storage_float_v = is_storage_float<std::remove_cv_t<T>>::value;

KVQ_HOST_DEVICE float to_float(float x) noexcept { return x; }
template <class Format>
KVQ_HOST_DEVICE float to_float(MiniFloat<Format> x) noexcept {
  return x.to_float();
}

/// x converted to T (float, or a MiniFloat rounded to nearest-even).
template <class T>
KVQ_HOST_DEVICE T from_float(float x) noexcept {
  static_assert(is_storage_float_v<T>, "kvq: from_float<T> needs float or a MiniFloat type");
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    return T(x);
  }
}

}  // namespace kvq
