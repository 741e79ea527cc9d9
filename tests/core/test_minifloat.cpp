// SPDX-License-Identifier: Apache-2.0
// Float16, BFloat16 and Float8E4M3 against exhaustive enumeration of their bit patterns, an
// independent brute-force rounding oracle, and Eigen's half / bfloat16.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kvq/core/bits.hpp"
#include "kvq/core/float_types.hpp"
#include "kvq/core/random.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::BFloat16;
using kvq::Float16;
using kvq::Float8E4M3;
using kvq::Rounding;

// Value of a bit pattern computed with ldexp from the format's definition (independent of
// kvq's bit manipulation). NaN for NaN encodings.
template <class T>
double reference_value(std::uint32_t bits) {
  using F = typename T::format;
  const int E = F::exp_bits, M = F::man_bits;
  const bool negative = (bits >> (E + M)) & 1u;
  const std::uint32_t e = (bits >> M) & ((1u << E) - 1u);
  const std::uint32_t f = bits & ((1u << M) - 1u);
  double v;
  if (F::ieee_specials && e == (1u << E) - 1u) {
    v = f == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  } else if (!F::ieee_specials && e == (1u << E) - 1u && f == (1u << M) - 1u) {
    v = std::numeric_limits<double>::quiet_NaN();
  } else if (e == 0) {
    v = std::ldexp(static_cast<double>(f), F::min_exponent - M);
  } else {
    v = std::ldexp(static_cast<double>(f + (1u << M)), static_cast<int>(e) - F::bias - M);
  }
  return negative ? -v : v;
}

template <class T>
constexpr std::uint32_t pattern_count() {
  return 1u << T::format::total_bits;
}

template <class T>
T make(std::uint32_t bits) {
  return T::from_bits(static_cast<typename T::storage_type>(bits));
}

template <class T>
std::uint32_t encode(float x, Rounding r) {
  return T::from_float(x, r).bits();
}

// All finite non-negative values of T in increasing order, with their patterns.
template <class T>
std::vector<std::pair<float, std::uint32_t>> finite_non_negative() {
  std::vector<std::pair<float, std::uint32_t>> out;
  for (std::uint32_t b = 0; b < pattern_count<T>() / 2; ++b) {
    const double v = reference_value<T>(b);
    if (std::isfinite(v)) out.emplace_back(static_cast<float>(v), b);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Nearest-even oracle by exhaustive search over the finite values of T (non-negative x only);
// returns the pattern, or the overflow encoding when x is at or beyond the overflow threshold.
template <class T>
std::uint32_t oracle_nearest(float x, const std::vector<std::pair<float, std::uint32_t>>& values,
                             std::uint32_t overflow_bits, double overflow_threshold) {
  if (static_cast<double>(x) >= overflow_threshold) return overflow_bits;
  auto hi = std::lower_bound(values.begin(), values.end(), std::make_pair(x, 0u));
  if (hi == values.end()) return values.back().second;  // above max, below the threshold
  if (hi->first == x) return hi->second;
  auto lo = hi - 1;
  const double dlo = static_cast<double>(x) - lo->first;
  const double dhi = static_cast<double>(hi->first) - x;
  if (dlo < dhi) return lo->second;
  if (dhi < dlo) return hi->second;
  return (lo->second & 1u) == 0 ? lo->second : hi->second;
}

}  // namespace

TEMPLATE_TEST_CASE("minifloat decodes every bit pattern exactly", "[core][minifloat]", Float16,
                   BFloat16, Float8E4M3) {
  for (std::uint32_t b = 0; b < pattern_count<TestType>(); ++b) {
    CAPTURE(b);
    const double ref = reference_value<TestType>(b);
    const float got = make<TestType>(b).to_float();
    if (std::isnan(ref)) {
      REQUIRE(std::isnan(got));
      REQUIRE(make<TestType>(b).is_nan());
      REQUIRE_FALSE(make<TestType>(b).is_finite());
    } else {
      REQUIRE(static_cast<double>(got) == ref);
      REQUIRE(std::signbit(got) == std::signbit(ref));
      REQUIRE_FALSE(make<TestType>(b).is_nan());
      REQUIRE(make<TestType>(b).is_finite() == std::isfinite(ref));
    }
  }
}

TEMPLATE_TEST_CASE("minifloat re-encodes every value to its own pattern in every rounding mode",
                   "[core][minifloat]", Float16, BFloat16, Float8E4M3) {
  for (std::uint32_t b = 0; b < pattern_count<TestType>(); ++b) {
    CAPTURE(b);
    const float v = make<TestType>(b).to_float();
    for (Rounding r : {Rounding::kNearestEven, Rounding::kTowardPositive, Rounding::kTowardNegative}) {
      if (std::isnan(v)) {
        REQUIRE(make<TestType>(encode<TestType>(v, r)).is_nan());
      } else {
        REQUIRE(encode<TestType>(v, r) == b);
      }
    }
  }
}

TEMPLATE_TEST_CASE("minifloat rounds midpoints to even and neighbours to the nearest",
                   "[core][minifloat]", Float16, BFloat16, Float8E4M3) {
  const auto values = finite_non_negative<TestType>();
  const std::uint32_t sign = TestType::format::sign_mask;
  for (std::size_t i = 0; i + 1 < values.size(); ++i) {
    const float a = values[i].first, b = values[i + 1].first;
    const std::uint32_t pa = values[i].second, pb = values[i + 1].second;
    const float mid = static_cast<float>((static_cast<double>(a) + b) / 2);  // exact in float
    CAPTURE(a, b, mid);
    REQUIRE(static_cast<double>(mid) == (static_cast<double>(a) + b) / 2);
    const std::uint32_t even = (pa & 1u) == 0 ? pa : pb;
    REQUIRE(encode<TestType>(mid, Rounding::kNearestEven) == even);
    REQUIRE(encode<TestType>(-mid, Rounding::kNearestEven) == (even | sign));
    REQUIRE(encode<TestType>(std::nextafter(mid, 0.0f), Rounding::kNearestEven) == pa);
    REQUIRE(encode<TestType>(std::nextafter(mid, std::numeric_limits<float>::infinity()),
                             Rounding::kNearestEven) == pb);
    // Directed rounding: anything strictly between a and b goes to b upward, a downward.
    const float inside = std::nextafter(a, b);
    if (inside < b) {
      REQUIRE(encode<TestType>(inside, Rounding::kTowardPositive) == pb);
      REQUIRE(encode<TestType>(inside, Rounding::kTowardNegative) == pa);
      REQUIRE(encode<TestType>(-inside, Rounding::kTowardPositive) == (pa | sign));
      REQUIRE(encode<TestType>(-inside, Rounding::kTowardNegative) == (pb | sign));
    }
  }
}

TEST_CASE("minifloat overflow, infinities and NaN follow IEEE-754 and OCP FP8", "[core][minifloat]") {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // fp16: max 65504; 65520 is the midpoint to the next (non-existent) value: ties go up to Inf.
  REQUIRE(Float16(65504.0f).bits() == 0x7BFF);
  REQUIRE(Float16(65519.99f).bits() == 0x7BFF);
  REQUIRE(Float16(65520.0f).bits() == 0x7C00);
  REQUIRE(Float16(-65520.0f).bits() == 0xFC00);
  REQUIRE(Float16(inf).bits() == 0x7C00);
  REQUIRE(Float16(nan).is_nan());
  REQUIRE(Float16::from_float(1e30f, Rounding::kTowardNegative).bits() == 0x7BFF);
  REQUIRE(Float16::from_float(1e30f, Rounding::kTowardPositive).bits() == 0x7C00);
  REQUIRE(Float16::from_float(-1e30f, Rounding::kTowardPositive).bits() == 0xFBFF);
  REQUIRE(Float16::from_float(-1e30f, Rounding::kTowardNegative).bits() == 0xFC00);
  // fp16 subnormals and underflow.
  REQUIRE(Float16(0x1.0p-24f).bits() == 0x0001);
  REQUIRE(Float16(0x1.0p-25f).bits() == 0x0000);                   // tie to even (zero)
  REQUIRE(Float16(0x1.8p-25f).bits() == 0x0001);
  REQUIRE(Float16::from_float(1e-30f, Rounding::kTowardPositive).bits() == 0x0001);
  REQUIRE(Float16::from_float(-1e-30f, Rounding::kTowardPositive).bits() == 0x8000);
  REQUIRE(Float16(-0.0f).bits() == 0x8000);
  // bf16 keeps float's range; float subnormals map to bf16 subnormals.
  REQUIRE(BFloat16(0x1.0p-133f).bits() == 0x0001);
  REQUIRE(BFloat16(std::numeric_limits<float>::max()).bits() == 0x7F80);  // rounds past max
  REQUIRE(BFloat16::from_float(std::numeric_limits<float>::max(), Rounding::kTowardNegative).bits() == 0x7F7F);
  REQUIRE(BFloat16(inf).bits() == 0x7F80);
  REQUIRE(BFloat16(nan).is_nan());
  // e4m3fn: max 448, no Inf; 464 is the tie between 448 (even) and the NaN slot.
  REQUIRE(Float8E4M3(448.0f).bits() == 0x7E);
  REQUIRE(Float8E4M3(464.0f).bits() == 0x7E);
  REQUIRE(Float8E4M3(std::nextafter(464.0f, 1e9f)).bits() == 0x7F);
  REQUIRE(Float8E4M3(-500.0f).bits() == 0xFF);
  REQUIRE(Float8E4M3(inf).bits() == 0x7F);
  REQUIRE(Float8E4M3(-inf).bits() == 0xFF);
  REQUIRE(Float8E4M3::from_float(1000.0f, Rounding::kTowardNegative).bits() == 0x7E);
  REQUIRE(Float8E4M3::from_float(1000.0f, Rounding::kTowardPositive).is_nan());
  REQUIRE(Float8E4M3(0x1.0p-9f).bits() == 0x01);  // smallest subnormal
  REQUIRE(Float8E4M3::max().to_float() == 448.0f);
  REQUIRE(Float16::max().to_float() == 65504.0f);
}

TEMPLATE_TEST_CASE("minifloat nearest-even matches a brute-force oracle on random floats",
                   "[core][minifloat][property]", Float16, BFloat16, Float8E4M3) {
  const auto values = finite_non_negative<TestType>();
  using F = typename TestType::format;
  // Overflow threshold: max + half an ulp at max, ties to even go up when max's pattern is odd.
  const double max = values.back().first;
  const double ulp = max - values[values.size() - 2].first;
  const std::uint32_t overflow_bits = F::ieee_specials ? F::first_special : F::nan_magnitude;
  const bool max_is_odd = (values.back().second & 1u) != 0;
  const double threshold = max_is_odd ? max + ulp / 2 : std::nextafter(max + ulp / 2, 1e300);
  const std::uint64_t seed = kvq_test::case_seed("minifloat oracle", F::total_bits);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  for (int i = 0; i < 200000; ++i) {
    // Random magnitude spanning the format's whole range and beyond, random mantissa bits.
    const int exponent = static_cast<int>(rng.below(2 * (F::bias + 12))) - (F::bias + F::man_bits + 6);
    const float x = std::ldexp(1.0f + rng.uniform(), exponent);
    if (!std::isfinite(x)) continue;
    CAPTURE(x);
    const std::uint32_t expected = oracle_nearest<TestType>(x, values, overflow_bits, threshold);
    REQUIRE(encode<TestType>(x, Rounding::kNearestEven) == expected);
    REQUIRE(encode<TestType>(-x, Rounding::kNearestEven) == (expected | F::sign_mask));
  }
}

TEST_CASE("Float16 and BFloat16 agree with Eigen::half and Eigen::bfloat16", "[core][minifloat]") {
  const std::uint64_t seed = kvq_test::case_seed("eigen agreement", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  for (int i = 0; i < 500000; ++i) {
    const std::uint32_t u = static_cast<std::uint32_t>(rng.next_u64());
    const float x = kvq::bits_to_float(u);
    if (std::isnan(x)) continue;
    CAPTURE(u);
    REQUIRE(Float16(x).bits() == Eigen::numext::bit_cast<std::uint16_t>(Eigen::half(x)));
    REQUIRE(BFloat16(x).bits() == Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(x)));
  }
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto h = Eigen::numext::bit_cast<Eigen::half>(static_cast<std::uint16_t>(b));
    const float ours = make<Float16>(b).to_float();
    if (std::isnan(ours)) continue;
    REQUIRE(ours == static_cast<float>(h));
  }
}
