// SPDX-License-Identifier: Apache-2.0
// Packing: exhaustive round trips at every offset and length, the exact bit layout, and that
// writes never touch neighbouring elements.
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kvq/core/random.hpp"
#include "kvq/quant/bits.hpp"
#include "kvq/quant/pack.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"
#include "widths.hpp"

namespace {

using kvq::Bits;
using kvq_test::AllWidths;

}  // namespace

TEMPLATE_LIST_TEST_CASE("pack/unpack round-trips at every offset and length and keeps neighbours",
                        "[quant][pack]", AllWidths) {
  constexpr Bits B = TestType::value;
  using Traits = kvq::BitsTraits<B>;
  const int unit = Traits::unit_codes;
  const std::uint64_t seed = kvq_test::case_seed("pack round trip", static_cast<int>(B));
  CAPTURE(seed);
  kvq::Rng rng(seed);
  const std::size_t capacity = static_cast<std::size_t>(6 * unit + 7);
  for (std::size_t first = 0; first <= static_cast<std::size_t>(3 * unit); ++first) {
    for (std::size_t n = 0; first + n <= capacity; ++n) {
      CAPTURE(first, n);
      // Background: random codes in every element of the stream.
      std::vector<std::uint8_t> background(capacity);
      for (auto& c : background) c = static_cast<std::uint8_t>(rng.below(Traits::max_code + 1));
      std::vector<std::uint8_t> stream(kvq::packed_bytes(B, capacity) + 1, 0xA5);
      stream.back() = 0xA5;  // guard byte
      kvq::pack_codes<B>(background.data(), capacity, stream.data(), 0);

      std::vector<std::uint8_t> codes(n);
      for (auto& c : codes) c = static_cast<std::uint8_t>(rng.below(Traits::max_code + 1));
      kvq::pack_codes<B>(codes.data(), n, stream.data(), first);

      std::vector<std::uint8_t> all(capacity);
      kvq::unpack_codes<B>(stream.data(), 0, capacity, all.data());
      for (std::size_t i = 0; i < capacity; ++i) {
        const bool written = i >= first && i < first + n;
        REQUIRE(all[i] == (written ? codes[i - first] : background[i]));
      }
      std::vector<std::uint8_t> back(n);
      kvq::unpack_codes<B>(stream.data(), first, n, back.data());
      REQUIRE(back == codes);
      for (std::size_t i = 0; i < n; ++i) REQUIRE(kvq::code_at<B>(stream.data(), first + i) == codes[i]);
      REQUIRE(stream.back() == 0xA5);
    }
  }
}

TEMPLATE_LIST_TEST_CASE("every byte value decodes and re-encodes to itself", "[quant][pack]",
                        AllWidths) {
  constexpr Bits B = TestType::value;
  constexpr int unit = kvq::BitsTraits<B>::unit_codes;
  constexpr int unit_bytes = kvq::BitsTraits<B>::unit_bytes;
  const int last = B == Bits::kTernary ? 242 : 255;  // 3^5 - 1 = 242
  for (int v = 0; v <= last; ++v) {
    CAPTURE(v);
    // Put v in every byte of one pack unit, decode the unit, re-encode it.
    std::uint8_t bytes[3] = {static_cast<std::uint8_t>(v), static_cast<std::uint8_t>(v),
                             static_cast<std::uint8_t>(v)};
    std::uint8_t codes[8];
    kvq::unpack_codes<B>(bytes, 0, unit, codes);
    for (int i = 0; i < unit; ++i) REQUIRE(codes[i] <= kvq::BitsTraits<B>::max_code);
    std::uint8_t again[3] = {0, 0, 0};
    kvq::pack_codes<B>(codes, unit, again, 0);
    for (int i = 0; i < unit_bytes; ++i) REQUIRE(again[i] == v);
  }
}

TEST_CASE("packed bit layout is the documented little-endian stream", "[quant][pack]") {
  // 2-bit: code i at bits [2(i%4), 2(i%4)+2) of byte i/4.
  const std::uint8_t c2[] = {1, 2, 3, 0, 3, 3, 0, 1};
  std::uint8_t b2[2] = {};
  kvq::pack_codes<Bits::k2>(c2, 8, b2, 0);
  REQUIRE(b2[0] == 0x39);  // 00 11 10 01
  REQUIRE(b2[1] == 0x4F);  // 01 00 11 11
  // 4-bit: low nibble first.
  const std::uint8_t c4[] = {0x3, 0xC, 0xF};
  std::uint8_t b4[2] = {};
  kvq::pack_codes<Bits::k4>(c4, 3, b4, 0);
  REQUIRE(b4[0] == 0xC3);
  REQUIRE(b4[1] == 0x0F);
  // 3-bit: codes 0..7 fill 24 bits: stream value = sum c_i << 3i = 0xFAC688.
  const std::uint8_t c3[] = {0, 1, 2, 3, 4, 5, 6, 7};
  std::uint8_t b3[3] = {};
  kvq::pack_codes<Bits::k3>(c3, 8, b3, 0);
  REQUIRE(b3[0] == 0x88);
  REQUIRE(b3[1] == 0xC6);
  REQUIRE(b3[2] == 0xFA);
  // Ternary: byte = c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4.
  const std::uint8_t ct[] = {1, 2, 0, 1, 2, 2, 2, 2, 2, 2, 1};
  std::uint8_t bt[3] = {};
  kvq::pack_codes<Bits::kTernary>(ct, 11, bt, 0);
  REQUIRE(bt[0] == 1 + 6 + 0 + 27 + 162);
  REQUIRE(bt[1] == 242);
  REQUIRE(bt[2] == 1);
  // Sizes.
  REQUIRE(kvq::packed_bytes(Bits::kTernary, 128) == 26);
  REQUIRE(kvq::packed_bytes(Bits::k2, 128) == 32);
  REQUIRE(kvq::packed_bytes(Bits::k3, 128) == 48);
  REQUIRE(kvq::packed_bytes(Bits::k3, 3) == 2);
  REQUIRE(kvq::packed_bytes(Bits::k8, 5) == 5);
}

TEST_CASE("bit widths parse from and print as their command-line labels", "[quant][bits]") {
  REQUIRE(kvq::parse_bits("1.5") == Bits::kTernary);
  REQUIRE(kvq::parse_bits("4") == Bits::k4);
  REQUIRE(kvq::bits_label(Bits::k8) == "8");
  REQUIRE(kvq::max_code(Bits::kTernary) == 2);
  REQUIRE(kvq::max_code(Bits::k3) == 7);
  REQUIRE_FALSE(kvq::is_supported(static_cast<Bits>(5)));
  try {
    kvq::parse_bits("5");
    FAIL("no error");
  } catch (const kvq::Error& e) {
    REQUIRE(std::string(e.what()) ==
            "kvq::parse_bits: argument 'bits' = '5'; expected one of 1.5, 2, 3, 4, 8");
  }
  REQUIRE_THROWS_AS(kvq::check_bits("f", "bits", static_cast<Bits>(5)), kvq::Error);
  REQUIRE_THROWS_AS(kvq::dispatch_bits(static_cast<Bits>(7), [](auto) { return 0; }), kvq::Error);
}
