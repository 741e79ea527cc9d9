// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief MiniFloat<Format>: a storage type for a binary floating-point format narrower than
///        float, with exact decoding and correctly rounded encoding (nearest-even or directed).
///
/// Formats are described by MiniFloatFormat<ExpBits, ManBits, IeeeSpecials>. With IeeeSpecials
/// the all-ones exponent encodes Inf (zero mantissa) and NaN (fp16, bf16). Without it, only the
/// all-ones magnitude is NaN and there is no Inf (OCP FP8 E4M3, "e4m3fn": max finite 448).
/// Encoding never saturates silently: a value beyond the largest finite number becomes Inf
/// (NaN for formats without Inf), except when the rounding direction is toward zero for that
/// sign, where IEEE-754 gives the largest finite number.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kvq/config.hpp"
#include "kvq/core/bits.hpp"

namespace kvq {

/// Rounding direction of a float -> MiniFloat conversion.
enum class Rounding : std::uint8_t {
  kNearestEven,     ///< round to nearest, ties to even (IEEE default)
  kTowardPositive,  ///< round up (toward +Inf)
  kTowardNegative,  ///< round down (toward -Inf)
};

/// Sign bit, ExpBits exponent bits (bias 2^(ExpBits-1) - 1), ManBits stored mantissa bits.
template <int ExpBits, int ManBits, bool IeeeSpecials>
struct MiniFloatFormat {
  static_assert(ExpBits >= 2 && ExpBits <= 8 && ManBits >= 1 && ManBits <= 10,
                "kvq: MiniFloatFormat supports 2..8 exponent and 1..10 mantissa bits");
  static constexpr int exp_bits = ExpBits;
  static constexpr int man_bits = ManBits;
  static constexpr int total_bits = 1 + ExpBits + ManBits;
  static constexpr int bias = (1 << (ExpBits - 1)) - 1;
  /// Exponent of the smallest normal number (subnormals share it).
  static constexpr int min_exponent = 1 - bias;
  static constexpr bool ieee_specials = IeeeSpecials;

  using storage_type = std::conditional_t<(total_bits <= 8), std::uint8_t, std::uint16_t>;

  static constexpr std::uint32_t sign_mask = 1u << (total_bits - 1);
  static constexpr std::uint32_t magnitude_mask = sign_mask - 1;
  static constexpr std::uint32_t mantissa_mask = (1u << ManBits) - 1;
  /// Magnitude bits of +Inf for IEEE formats; the first non-finite magnitude in both kinds.
  static constexpr std::uint32_t first_special =
      IeeeSpecials ? ((1u << ExpBits) - 1) << ManBits : magnitude_mask;
  static constexpr std::uint32_t max_finite_magnitude = first_special - 1;
  /// Canonical quiet NaN magnitude.
  static constexpr std::uint32_t nan_magnitude =
      IeeeSpecials ? first_special | (1u << (ManBits - 1)) : magnitude_mask;
};

namespace detail {

/// Exact value of a MiniFloat bit pattern as a float (every such value is a float).
template <class Format>
KVQ_HOST_DEVICE float minifloat_bits_to_float(std::uint32_t bits) noexcept {
  constexpr int M = Format::man_bits;
  const std::uint32_t sign = (bits & Format::sign_mask) != 0 ? 0x80000000u : 0u;
  const std::uint32_t mag = bits & Format::magnitude_mask;
  if (mag >= Format::first_special) {
    if (Format::ieee_specials && mag == Format::first_special) return bits_to_float(sign | 0x7F800000u);
    return bits_to_float(sign | 0x7FC00000u);
  }
  const std::uint32_t exponent = mag >> M;
  const std::uint32_t fraction = mag & Format::mantissa_mask;
  if (exponent != 0) {
    const std::uint32_t e = exponent - Format::bias + 127;
    return bits_to_float(sign | (e << 23) | (fraction << (23 - M)));
  }
  if (fraction == 0) return bits_to_float(sign);
  if (Format::min_exponent <= -126) {
    // Subnormals of a format with float's exponent range are float subnormals.
    return bits_to_float(sign | (fraction << (23 - M)));
  }
  // value = fraction * 2^(min_exponent - M); normalize the fraction to a float normal.
  const int width = bit_width(fraction);
  const int e = Format::min_exponent - M + width - 1;
  const std::uint32_t mantissa = (fraction << (24 - width)) & 0x7FFFFFu;
  return bits_to_float(sign | (static_cast<std::uint32_t>(e + 127) << 23) | mantissa);
}

/// Correctly rounded conversion of x to a MiniFloat bit pattern.
template <class Format>
KVQ_HOST_DEVICE std::uint32_t float_to_minifloat_bits(float x, Rounding mode) noexcept {
  constexpr int M = Format::man_bits;
  const std::uint32_t u = float_to_bits(x);
  const bool negative = (u >> 31) != 0;
  const std::uint32_t sign = negative ? Format::sign_mask : 0u;
  const std::uint32_t au = u & 0x7FFFFFFFu;
  if (au > 0x7F800000u) return sign | Format::nan_magnitude;
  if (au == 0x7F800000u) {
    return sign | (Format::ieee_specials ? Format::first_special : Format::nan_magnitude);
  }
  if (au == 0) return sign;

  // |x| = m * 2^e0 with an integer m < 2^24; ea = floor(log2 |x|).
  std::uint32_t m;
  int e0;
  int ea;
  const int biased = static_cast<int>(au >> 23);
  if (biased == 0) {
    m = au;
    e0 = -149;
    ea = bit_width(m) - 1 - 149;
  } else {
    m = (au & 0x7FFFFFu) | 0x800000u;
    e0 = biased - 150;
    ea = biased - 127;
  }
  // Target quantum 2^(te - M) at this magnitude; r = how many low bits of m fall below it.
  // Every supported format has fewer mantissa bits than float and no larger exponent range,
  // so r >= 1.
  const int te = ea < Format::min_exponent ? Format::min_exponent : ea;
  const int r = te - M - e0;
  std::uint32_t n;
  bool above_half;
  bool at_half;
  bool inexact;
  if (r > 24) {
    n = 0;
    above_half = false;
    at_half = false;
    inexact = true;
  } else {
    n = m >> r;
    const std::uint32_t rem = m & ((1u << r) - 1u);
    const std::uint32_t half = 1u << (r - 1);
    above_half = rem > half;
    at_half = rem == half;
    inexact = rem != 0;
  }
  bool round_up_magnitude = false;
  switch (mode) {
    case Rounding::kNearestEven: round_up_magnitude = above_half || (at_half && (n & 1u) != 0); break;
    case Rounding::kTowardPositive: round_up_magnitude = !negative && inexact; break;
    case Rounding::kTowardNegative: round_up_magnitude = negative && inexact; break;
  }
  n += round_up_magnitude ? 1u : 0u;
  // (te - min_exponent) << M plus the significand: a carry out of the significand moves into
  // the exponent field, and subnormals (te == min_exponent, n < 2^M) come out with exponent 0.
  std::uint32_t mag = (static_cast<std::uint32_t>(te - Format::min_exponent) << M) + n;
  if (mag > Format::max_finite_magnitude) {
    const bool toward_zero = (mode == Rounding::kTowardPositive && negative) ||
                             (mode == Rounding::kTowardNegative && !negative);
    if (toward_zero) {
      mag = Format::max_finite_magnitude;
    } else {
      mag = Format::ieee_specials ? Format::first_special : Format::nan_magnitude;
    }
  }
  return sign | mag;
}

}  // namespace detail

/// A value stored in a narrow binary floating-point format. Trivially copyable, the size of
/// its storage (1 or 2 bytes), usable in device memory. Arithmetic happens in float.
template <class Format>
class MiniFloat {
 public:
  using format = Format;
  using storage_type = typename Format::storage_type;

  MiniFloat() = default;

  /// x rounded to nearest, ties to even.
  KVQ_HOST_DEVICE explicit MiniFloat(float x) noexcept
      : bits_(static_cast<storage_type>(
            detail::float_to_minifloat_bits<Format>(x, Rounding::kNearestEven))) {}

  /// x rounded in the given direction.
  KVQ_HOST_DEVICE static MiniFloat from_float(float x, Rounding mode) noexcept {
    return from_bits(
        static_cast<storage_type>(detail::float_to_minifloat_bits<Format>(x, mode)));
  }

  /// The value whose encoding is b.
  KVQ_HOST_DEVICE static constexpr MiniFloat from_bits(storage_type b) noexcept {
    MiniFloat v{};
    v.bits_ = b;
    return v;
  }

  /// Largest finite value.
  KVQ_HOST_DEVICE static constexpr MiniFloat max() noexcept {
    return from_bits(static_cast<storage_type>(Format::max_finite_magnitude));
  }

  KVQ_HOST_DEVICE constexpr storage_type bits() const noexcept { return bits_; }
  KVQ_HOST_DEVICE float to_float() const noexcept {
    return detail::minifloat_bits_to_float<Format>(bits_);
  }
  KVQ_HOST_DEVICE explicit operator float() const noexcept { return to_float(); }

  KVQ_HOST_DEVICE constexpr bool is_nan() const noexcept {
    const std::uint32_t mag = bits_ & Format::magnitude_mask;
    return Format::ieee_specials ? mag > Format::first_special : mag == Format::first_special;
  }
  KVQ_HOST_DEVICE constexpr bool is_finite() const noexcept {
    return (bits_ & Format::magnitude_mask) < Format::first_special;
  }

 private:
  storage_type bits_;
};

}  // namespace kvq
