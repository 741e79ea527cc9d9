// SPDX-License-Identifier: Apache-2.0
// The group quantizer: hand-computed KIVI examples (ALGORITHMS.md §1.2), SKVQ clipping, the
// scale floor, outward metadata rounding, and the half-step bound on random and adversarial
// groups for every width and metadata format.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kvq/core/float_types.hpp"
#include "kvq/core/random.hpp"
#include "kvq/quant/group.hpp"
#include "kvq/quant/meta_format.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::Bits;
using kvq::BFloat16;
using kvq::Float16;
using kvq::Float8E4M3;
using kvq::Status;

template <class Meta>
struct Quantized {
  Status status;
  std::vector<std::uint8_t> codes;
  std::vector<float> values;
  kvq::GroupParams<Meta> params;
};

template <Bits B, class Meta>
Quantized<Meta> run_group(const std::vector<float>& x, float clip = 1.0f) {
  Quantized<Meta> q;
  const auto n = static_cast<kvq::index_t>(x.size());
  std::vector<std::uint8_t> stream(kvq::packed_bytes(B, x.size()) + 1, 0);
  q.params.scale = Meta(-1.0f);
  q.params.zero = Meta(-1.0f);
  q.status = kvq::quantize_group<B>(kvq::StridedLoader<float>{x.data(), 1}, n, clip,
                                    stream.data(), 0, &q.params);
  if (q.status != Status::kOk) return q;
  q.codes.resize(x.size());
  kvq::unpack_codes<B>(stream.data(), 0, x.size(), q.codes.data());
  q.values.resize(x.size());
  kvq::dequantize_group<B>(stream.data(), 0, n, q.params,
                           kvq::StridedStorer<float>{q.values.data(), 1});
  return q;
}

// |x' - clamp(x, lo, hi)| <= scale / 2 plus the float rounding of (code * scale + zero) and of
// the clip products (a few ulps of the largest magnitude involved).
template <class Meta>
void require_half_step(const std::vector<float>& x, const Quantized<Meta>& q, float clip,
                       int max_code) {
  REQUIRE(q.status == Status::kOk);
  float mn = x[0], mx = x[0];
  for (float v : x) {
    mn = std::min(mn, v);
    mx = std::max(mx, v);
  }
  const float lo = clip * mn, hi = clip * mx;
  const double scale = q.params.scale.to_float();
  const double zero = q.params.zero.to_float();
  const double top = zero + max_code * scale;
  const double magnitude = std::max({std::abs(zero), std::abs(top), 1e-30});
  const double slack = 4.0 * std::numeric_limits<float>::epsilon() * magnitude;
  REQUIRE(zero <= lo);          // the grid starts at or below lo
  REQUIRE(top >= hi - slack);   // and reaches hi (up to float rounding of hi - zero)
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double clipped = std::min<double>(std::max<double>(x[i], lo), hi);
    CAPTURE(i, x[i], clipped, q.values[i], scale, zero);
    REQUIRE(q.codes[i] <= max_code);
    REQUIRE(std::abs(q.values[i] - clipped) <= scale / 2 + slack);
  }
}

}  // namespace

TEST_CASE("KIVI hand-computed examples match exactly", "[quant][params][kivi]") {
  // 2 bits, group [0, 1, 2, 3]: z = 0, s = 1, q = x.
  {
    const auto q = run_group<Bits::k2, Float16>({0.0f, 1.0f, 2.0f, 3.0f});
    REQUIRE(q.status == Status::kOk);
    REQUIRE(q.params.zero.bits() == 0x0000);
    REQUIRE(q.params.scale.bits() == 0x3C00);  // 1.0
    REQUIRE(q.codes == std::vector<std::uint8_t>{0, 1, 2, 3});
    REQUIRE(q.values == std::vector<float>{0.0f, 1.0f, 2.0f, 3.0f});
  }
  // 2 bits, halves round to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
  {
    const auto q = run_group<Bits::k2, Float16>({0.0f, 0.5f, 1.5f, 2.5f, 3.0f});
    REQUIRE(q.codes == std::vector<std::uint8_t>{0, 0, 2, 2, 3});
    REQUIRE(q.values == std::vector<float>{0.0f, 0.0f, 2.0f, 2.0f, 3.0f});
  }
  // 4 bits, group [-1.5, 0, 6, 2.24, 2.26]: z = -1.5, s = 7.5 / 15 = 0.5;
  // (2.24 + 1.5) / 0.5 = 7.48 -> 7 -> 2.0; (2.26 + 1.5) / 0.5 = 7.52 -> 8 -> 2.5.
  {
    const auto q = run_group<Bits::k4, Float16>({-1.5f, 0.0f, 6.0f, 2.24f, 2.26f});
    REQUIRE(q.params.zero.to_float() == -1.5f);
    REQUIRE(q.params.scale.to_float() == 0.5f);
    REQUIRE(q.codes == std::vector<std::uint8_t>{0, 3, 15, 7, 8});
    REQUIRE(q.values == std::vector<float>{-1.5f, 0.0f, 6.0f, 2.0f, 2.5f});
  }
  // Ternary (SKVQ "1.5 bits"): q_max = 2, group [-1, -0.4, 0.6, 1]: z = -1, s = 1;
  // codes round((x + 1) / 1) = 0, 1 (0.6), 2 (1.6), 2.
  {
    const auto q = run_group<Bits::kTernary, Float16>({-1.0f, -0.4f, 0.6f, 1.0f});
    REQUIRE(q.params.zero.to_float() == -1.0f);
    REQUIRE(q.params.scale.to_float() == 1.0f);
    REQUIRE(q.codes == std::vector<std::uint8_t>{0, 1, 2, 2});
    REQUIRE(q.values == std::vector<float>{-1.0f, 0.0f, 1.0f, 1.0f});
  }
  // When (max - min) / q_max is not an fp16 number, the scale is the fp16 number just above it
  // (outward rounding; KIVI's fp16 arithmetic would take the nearest, 0x3555): 2 bits, [0, 1]:
  // 1/3 -> 0x3556 = 0.33349609375, and 1 -> code 3 -> 1.00048828125.
  {
    const auto q = run_group<Bits::k2, Float16>({0.0f, 1.0f});
    REQUIRE(q.params.scale.bits() == 0x3556);
    REQUIRE(q.codes == std::vector<std::uint8_t>{0, 3});
    REQUIRE(q.values[1] == 1.00048828125f);
  }
}

TEST_CASE("SKVQ clipping scales both ends of the range by alpha", "[quant][params][skvq]") {
  // alpha = 0.5, group [-4, -1, 1, 4], 2 bits: lo = -2, hi = 2, z = -2, s = 4/3 -> fp16 up.
  const auto q = run_group<Bits::k2, Float16>({-4.0f, -1.0f, 1.0f, 4.0f}, 0.5f);
  REQUIRE(q.status == Status::kOk);
  REQUIRE(q.params.zero.to_float() == -2.0f);
  REQUIRE(q.params.scale.to_float() == Float16::from_float(4.0f / 3.0f, kvq::Rounding::kTowardPositive).to_float());
  REQUIRE(q.codes == std::vector<std::uint8_t>{0, 1, 2, 3});  // -4 and 4 are clipped to -2 and 2
  require_half_step(std::vector<float>{-4.0f, -1.0f, 1.0f, 4.0f}, q, 0.5f, 3);
  // A positive group moves its lower end down: alpha * min < min.
  const auto p = run_group<Bits::k2, Float16>({2.0f, 3.0f, 4.0f}, 0.5f);
  REQUIRE(p.params.zero.to_float() == 1.0f);
  // Invalid ratios are rejected without writing.
  for (float bad : {0.0f, -0.5f, 1.5f, std::numeric_limits<float>::quiet_NaN()}) {
    const auto r = run_group<Bits::k2, Float16>({1.0f, 2.0f}, bad);
    REQUIRE(r.status == Status::kInvalidArgument);
    REQUIRE(r.params.scale.to_float() == -1.0f);
  }
}

TEST_CASE("the scale floor is 1e-5 of the group's magnitude, at least 1e-5", "[quant][params]") {
  // Constant groups: every element comes back exactly when the value is a metadata number.
  for (float c : {0.0f, 1.0f, -3.5f, 1000.0f, 0.25f}) {
    CAPTURE(c);
    const auto q = run_group<Bits::k2, Float16>(std::vector<float>(7, c));
    REQUIRE(q.status == Status::kOk);
    REQUIRE(q.params.zero.to_float() == c);
    const float floor = 1e-5f * std::max(1.0f, std::abs(c));
    REQUIRE(q.params.scale.to_float() >= floor);
    REQUIRE(q.params.scale.to_float() < 2.0f * floor);
    for (float v : q.values) REQUIRE(v == c);
  }
  // A range below the floor uses the floor.
  const auto q = run_group<Bits::k4, Float16>({100.0f, 100.0001f});
  REQUIRE(q.params.scale.to_float() >= 1e-3f);
}

TEST_CASE("non-finite inputs and metadata overflow are reported, nothing is written",
          "[quant][params]") {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (float bad : {inf, -inf, nan}) {
    const auto q = run_group<Bits::k2, Float16>({1.0f, bad, 2.0f});
    REQUIRE(q.status == Status::kNonFiniteInput);
    REQUIRE(q.params.scale.to_float() == -1.0f);
    REQUIRE(q.params.zero.to_float() == -1.0f);
  }
  // FP8 E4M3 holds at most 448: a zero-point below -448 or a scale above 448 cannot be stored.
  REQUIRE(run_group<Bits::k2, Float8E4M3>({-500.0f, 0.0f}).status == Status::kMetadataOverflow);
  REQUIRE(run_group<Bits::k2, Float8E4M3>({-400.0f, 0.0f}).status == Status::kOk);
  REQUIRE(run_group<Bits::kTernary, Float8E4M3>({0.0f, 1000.0f}).status == Status::kMetadataOverflow);
  REQUIRE(run_group<Bits::k8, Float8E4M3>({0.0f, 1000.0f}).status == Status::kOk);  // 1000/255
  REQUIRE(run_group<Bits::k2, Float16>({-70000.0f, 0.0f}).status == Status::kMetadataOverflow);
  REQUIRE(run_group<Bits::k2, Float16>({-60000.0f, 60000.0f}).status == Status::kOk);
  REQUIRE(run_group<Bits::k2, BFloat16>({-1e38f, 1e38f}).status == Status::kOk);
  REQUIRE(run_group<Bits::kTernary, BFloat16>({-3e38f, 3e38f}).status == Status::kMetadataOverflow);
}

namespace {

template <Bits B, class Meta>
struct Case {
  static constexpr Bits bits = B;
  using meta = Meta;
};
using Cases = std::tuple<Case<Bits::kTernary, Float16>, Case<Bits::k2, Float16>,
                         Case<Bits::k3, Float16>, Case<Bits::k4, Float16>, Case<Bits::k8, Float16>,
                         Case<Bits::kTernary, BFloat16>, Case<Bits::k2, BFloat16>,
                         Case<Bits::k4, BFloat16>, Case<Bits::kTernary, Float8E4M3>,
                         Case<Bits::k2, Float8E4M3>, Case<Bits::k4, Float8E4M3>,
                         Case<Bits::k8, Float8E4M3>>;

}  // namespace

TEMPLATE_LIST_TEST_CASE("every element is within half a step of its clipped input",
                        "[quant][params][property]", Cases) {
  constexpr Bits B = TestType::bits;
  using Meta = typename TestType::meta;
  const int max_code = kvq::max_code(B);
  const bool fp8 = std::is_same_v<Meta, Float8E4M3>;
  const std::uint64_t seed =
      kvq_test::case_seed("half step", static_cast<int>(B) * 16 + static_cast<int>(kvq::meta_format_of_v<Meta>));
  CAPTURE(seed);
  kvq::Rng rng(seed);
  for (int trial = 0; trial < 3000; ++trial) {
    const int n = 1 + static_cast<int>(rng.below(160));
    // Magnitudes from 1e-6 up to what the metadata format can hold with the outlier below
    // (fp8: 10, |x| <= 448; fp16: 1e3, |x| <= 65504; bf16: 1e4).
    const float top_exponent = fp8 ? 1.0f : std::is_same_v<Meta, Float16> ? 3.0f : 4.0f;
    const float magnitude = std::pow(10.0f, rng.uniform(-6.0f, top_exponent));
    const float offset = magnitude * rng.uniform(-3.0f, 3.0f);
    std::vector<float> x(static_cast<std::size_t>(n));
    const int shape = static_cast<int>(rng.below(4));
    for (auto& v : x) {
      switch (shape) {
        case 0: v = offset + magnitude * rng.normal(); break;       // Gaussian
        case 1: v = offset; break;                                   // constant
        case 2: v = offset + magnitude * 1e-4f * rng.uniform(); break;  // nearly constant
        default: v = magnitude * rng.uniform(-1.0f, 1.0f); break;    // uniform around 0
      }
    }
    if (rng.below(3) == 0) {  // a single outlier
      x[rng.below(static_cast<std::uint32_t>(n))] = offset + magnitude * (fp8 ? 3.0f : 50.0f);
    }
    const float clip = rng.below(2) == 0 ? 1.0f : rng.uniform(0.85f, 1.0f);
    CAPTURE(trial, n, magnitude, offset, shape, clip);
    const auto q = run_group<B, Meta>(x, clip);
    require_half_step(x, q, clip, max_code);
  }
}

TEST_CASE("huge and tiny magnitudes quantize within half a step", "[quant][params]") {
  for (float m : {1e-30f, 1e-12f, 1e-3f, 1.0f, 1e6f, 1e30f}) {
    CAPTURE(m);
    const std::vector<float> x{-m, -0.3f * m, 0.1f * m, m};
    const auto q = run_group<Bits::k4, BFloat16>(x);
    require_half_step(x, q, 1.0f, 15);
  }
  // Float subnormal inputs.
  const std::vector<float> sub{1e-40f, -3e-41f, 0.0f};
  require_half_step(sub, run_group<Bits::k2, Float16>(sub), 1.0f, 3);
}

TEST_CASE("group_range finds the minimum, the maximum and any NaN or Inf of arbitrary floats",
          "[quant][params][property]") {
  const std::uint64_t seed = kvq_test::case_seed("group range", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  const float specials[] = {0.0f, -0.0f, 1e-45f, -1e-45f, 1e-40f, -1e-40f,
                            std::numeric_limits<float>::max(), -std::numeric_limits<float>::max()};
  for (int trial = 0; trial < 2000; ++trial) {
    const int n = 1 + static_cast<int>(rng.below(100));
    std::vector<float> x(static_cast<std::size_t>(n));
    for (auto& v : x) {
      do {  // any finite bit pattern, or one of the edge values
        v = rng.below(8) == 0 ? specials[rng.below(8)] : kvq::bits_to_float(static_cast<std::uint32_t>(rng.next_u64()));
      } while (!std::isfinite(v));
    }
    CAPTURE(trial, n);
    const auto r = kvq::group_range(kvq::ContiguousLoader<float>{x.data()}, n);
    REQUIRE(r.finite);
    REQUIRE(r.min == *std::min_element(x.begin(), x.end()));
    REQUIRE(r.max == *std::max_element(x.begin(), x.end()));
    const float bad[] = {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                         std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN()};
    x[rng.below(static_cast<std::uint32_t>(n))] = bad[rng.below(4)];
    REQUIRE_FALSE(kvq::group_range(kvq::StridedLoader<float>{x.data(), 1}, n).finite);
  }
}
