// SPDX-License-Identifier: Apache-2.0
// kvq::BlockLayout, the host-device contract of a block's bytes: plain data, sizes and offsets
// equal to the quantized-matrix plan, and the bytes its accessors address are exactly what the
// block codec writes and what quantize_matrix produces for the same rows (every code width,
// axis, group size and metadata format).
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kvq/kvq.hpp"
#include "cache_testing.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::index_t;

static_assert(std::is_trivially_copyable_v<kvq::BlockLayout> && std::is_standard_layout_v<kvq::BlockLayout>,
              "a BlockLayout is passed to CUDA kernels by value");

template <kvq::Bits B, class Meta>
void check_block(kvq::Rng& rng, kvq::GroupAxis axis, index_t group, index_t block_tokens, index_t width) {
  const kvq::MatrixQuantSpec spec = kvq_test::make_spec(B, axis, group, 0.92f, kvq::meta_format_of_v<Meta>);
  const kvq::StreamLayout l = kvq::make_quantized_layout(block_tokens, width, spec);
  const kvq::BlockLayout& b = l.block;
  const kvq::MatrixLayout m = kvq::plan_matrix(block_tokens, width, spec);
  REQUIRE(b.lines == m.lines);
  REQUIRE(b.line_length == m.line_length);
  REQUIRE(b.groups_per_line == m.groups_per_line);
  REQUIRE(b.line_bytes == m.line_bytes);
  REQUIRE(b.scales_offset == m.code_bytes);
  REQUIRE(b.zeros_offset == m.code_bytes + m.meta_bytes);
  REQUIRE(b.used_bytes() == m.total_bytes());
  REQUIRE(b.block_bytes % kvq::kBlockAlignment == 0);
  REQUIRE(b.block_bytes >= b.used_bytes());
  REQUIRE(b.block_bytes < b.used_bytes() + kvq::kBlockAlignment);
  REQUIRE(l.block_bytes == b.block_bytes);

  // The rows of one block, with an outlier now and then, written into a zeroed block as the
  // block pool hands it out (the codec keeps the bits of codes it does not write, so the unused
  // digits of a line's last byte stay as they were).
  std::vector<float> x(static_cast<std::size_t>(block_tokens * width));
  for (float& v : x) v = 2.0f * rng.normal() + (rng.below(40) == 0 ? 25.0f : 0.0f);
  std::vector<std::uint8_t> block(b.block_bytes, 0);
  kvq::EncodeFailure failure;
  REQUIRE(kvq::encode_rows(l, {}, spec.clip, block.data(), 0, x.data(), width, block_tokens, &failure) ==
          kvq::Status::kOk);

  std::vector<std::uint8_t> codes(m.code_bytes), scales(m.meta_bytes), zeros(m.meta_bytes);
  kvq::quantize_matrix(kvq::StridedView<const float, 2>(x.data(), {block_tokens, width}), spec,
                       {{codes.data(), codes.size()}, {scales.data(), scales.size()}, {zeros.data(), zeros.size()}});
  for (index_t line = 0; line < b.lines; ++line) {
    CAPTURE(line);
    REQUIRE(std::memcmp(b.line_codes(block.data(), line), codes.data() + static_cast<std::size_t>(line) * m.line_bytes,
                        m.line_bytes) == 0);
    for (index_t g = 0; g < b.groups_per_line; ++g) {
      const kvq::GroupParams<Meta> p = b.load_group<Meta>(block.data(), line, g);
      const std::size_t at = static_cast<std::size_t>(line * m.groups_per_line + g) * sizeof(Meta);  // matrix: line-major
      REQUIRE(std::memcmp(&p.scale, scales.data() + at, sizeof(Meta)) == 0);
      REQUIRE(std::memcmp(&p.zero, zeros.data() + at, sizeof(Meta)) == 0);
    }
  }
  // store_group writes exactly the scale and zero bytes that load_group reads, and nothing else:
  // every group stored into an empty block rebuilds the block's metadata, codes untouched.
  std::vector<std::uint8_t> rebuilt(block.size(), 0);
  for (index_t line = 0; line < b.lines; ++line) {
    for (index_t g = 0; g < b.groups_per_line; ++g) {
      b.store_group<Meta>(rebuilt.data(), line, g, b.load_group<Meta>(block.data(), line, g));
    }
  }
  std::vector<std::uint8_t> expected(block.size(), 0);
  std::memcpy(expected.data() + b.scales_offset, block.data() + b.scales_offset, b.used_bytes() - b.scales_offset);
  REQUIRE(rebuilt == expected);
}

template <kvq::Bits B>
void check_all(kvq::Rng& rng) {
  for (const auto axis : {kvq::GroupAxis::kTokens, kvq::GroupAxis::kChannels}) {
    for (const index_t group : {32, 64, 128}) {
      // A block of 128 tokens of 3 kv heads x 64 (SmolLM2) or 8 x 128 (Llama-3-8B) channels,
      // where the group divides the grouped axis.
      for (const index_t width : {192, 1024}) {
        if (axis == kvq::GroupAxis::kChannels && width % group != 0) continue;
        CAPTURE(kvq::bits_label(B), kvq::axis_label(axis), group, width);
        check_block<B, kvq::Float16>(rng, axis, group, 128, width);
        check_block<B, kvq::BFloat16>(rng, axis, group, 128, width);
        check_block<B, kvq::Float8E4M3>(rng, axis, group, 128, width);
      }
    }
  }
}

}  // namespace

TEST_CASE("a block layout addresses exactly the bytes the codec and quantize_matrix write", "[layout]") {
  const std::uint64_t seed = kvq_test::case_seed("block layout", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  check_all<kvq::Bits::kTernary>(rng);
  check_all<kvq::Bits::k2>(rng);
  check_all<kvq::Bits::k4>(rng);
  check_all<kvq::Bits::k8>(rng);
}
