// SPDX-License-Identifier: Apache-2.0
// decode_affine (the SIMD dequantizer every cache reader uses) equals dequantize_value of the
// codes PackedReader reads, at every offset and length, for every width; it writes exactly n
// floats; half_to_float equals Float16::to_float for all 65536 patterns.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kvq/core/float_types.hpp"
#include "kvq/core/random.hpp"
#include "kvq/quant/decode_affine.hpp"
#include "kvq/quant/pack.hpp"
#include "kvq/quant/params.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"
#include "widths.hpp"

namespace {

using kvq::Bits;
using kvq_test::AllWidths;

std::uint32_t bits_of(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

}  // namespace

TEMPLATE_LIST_TEST_CASE("decode_affine equals dequantize_value of PackedReader's codes at every offset and length",
                        "[quant][decode]", AllWidths) {
  constexpr Bits B = TestType::value;
  const std::uint64_t seed = kvq_test::case_seed("decode_affine", static_cast<int>(B));
  CAPTURE(seed);
  kvq::Rng rng(seed);
  constexpr std::size_t kCodes = 200;
  std::vector<std::uint8_t> codes(kCodes);
  for (auto& c : codes) c = static_cast<std::uint8_t>(rng.below(kvq::BitsTraits<B>::max_code + 1));
  std::vector<std::uint8_t> stream(kvq::packed_bytes(B, kCodes));
  kvq::pack_codes<B>(codes.data(), kCodes, stream.data(), 0);
  const float scale = 0.3712f;
  const float zero = -1.25f;
  for (std::size_t first = 0; first < 24; ++first) {
    for (kvq::index_t n = 0; first + static_cast<std::size_t>(n) + 8 <= kCodes && n <= 90; ++n) {
      CAPTURE(first, n);
      std::vector<float> out(static_cast<std::size_t>(n) + 8, 12345.0f);  // 8 guard floats
      kvq::decode_affine<B>(stream.data(), first, n, scale, zero, out.data());
      kvq::PackedReader<B> reader(stream.data(), first);
      bool ok = true;
      for (kvq::index_t i = 0; i < n; ++i) {
        const float want = kvq::dequantize_value(reader.get(), scale, zero);
        ok = ok && bits_of(out[static_cast<std::size_t>(i)]) == bits_of(want);
      }
      for (std::size_t g = static_cast<std::size_t>(n); g < out.size(); ++g) ok = ok && out[g] == 12345.0f;
      REQUIRE(ok);
    }
  }
}

TEST_CASE("half_to_float equals Float16::to_float for every bit pattern", "[quant][decode]") {
  std::vector<std::uint16_t> all(65536);
  for (std::uint32_t b = 0; b < 65536; ++b) all[b] = static_cast<std::uint16_t>(b);
  std::vector<float> out(all.size());
  kvq::half_to_float(all.data(), static_cast<kvq::index_t>(all.size()), out.data());
  std::uint32_t mismatches = 0;
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const float want = kvq::Float16::from_bits(static_cast<std::uint16_t>(b)).to_float();
    const bool same = std::isnan(want) ? std::isnan(out[b]) : bits_of(out[b]) == bits_of(want);
    mismatches += same ? 0 : 1;
  }
  REQUIRE(mismatches == 0);
}
