// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The byte layout of one quantized stream block as plain data: the one place that says
///        where a block's codes, scales and zero-points are, for the CPU codec, CPU attention and
///        the CUDA kernels alike (every accessor is KVQ_HOST_DEVICE; the struct holds no pointer
///        and is copied to the device by value).
///
/// A block holds block_tokens token rows of one layer, `width` numbers per row (all kv heads:
/// num_kv_heads * head_dim, or the latent rank for CSKV), as
///
///   [codes: lines x line_bytes][scales: lines x groups_per_line metadata values][zeros: the same][padding]
///
/// - per-channel streams (GroupAxis::kTokens, groups along tokens): line c = channel c holds the
///   block's block_tokens codes of that channel; group g = tokens [g * group_size, (g+1) * group_size);
/// - per-token streams (GroupAxis::kChannels, groups along channels): line r = token row r holds its
///   width codes (with SKVQ channel groups in permuted order); group g = the g-th channel group.
///
/// Codes are packed LSB-first within a line (quant/pack.hpp), lines start on byte boundaries;
/// scales and zeros are raw little-endian metadata values (fp16, bf16 or FP8 E4M3), index
/// meta_index(line, g):
/// - per-channel streams: line-major, [lines][groups_per_line] (a kv head's channels are one run);
/// - per-token streams: group-major, [groups_per_line][lines] (one group's scales over the
///   block's tokens are one run, so a kv head's metadata is contiguous for the GPU's copies).
/// The block's size is padded to kBlockAlignment bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "kvq/config.hpp"
#include "kvq/core/bits.hpp"
#include "kvq/quant/matrix.hpp"
#include "kvq/quant/meta_format.hpp"
#include "kvq/quant/params.hpp"

namespace kvq {

/// Blocks start and end on this many bytes (a cache line; the widest SIMD load).
inline constexpr std::size_t kBlockAlignment = 64;

/// Where everything of one quantized block is (see the file comment). Plain data: built on the
/// host by make_block_layout(), passed to kernels by value.
struct BlockLayout {
  Bits bits = Bits::k2;
  MetaFormat meta = MetaFormat::kFp16;
  GroupAxis axis = GroupAxis::kTokens;
  index_t block_tokens = 0;
  index_t width = 0;            ///< numbers per token row
  index_t lines = 0;            ///< per-channel: width; per-token: block_tokens
  index_t line_length = 0;      ///< codes per line: per-channel block_tokens, per-token width
  index_t groups_per_line = 0;  ///< metadata pairs per line
  index_t group_size = 0;       ///< uniform groups (per-channel streams; per-token without channel groups)
  std::uint32_t line_bytes = 0; ///< packed bytes of one line
  std::uint32_t meta_line_stride = 0;   ///< metadata values between lines (per-channel: groups_per_line, per-token: 1)
  std::uint32_t meta_group_stride = 0;  ///< metadata values between groups of a line (per-channel: 1, per-token: lines)
  std::uint64_t scales_offset = 0;
  std::uint64_t zeros_offset = 0;
  std::uint64_t block_bytes = 0;  ///< padded size of one block

  /// Codes of `line` (0 <= line < lines).
  KVQ_HOST_DEVICE std::uint8_t* line_codes(std::uint8_t* block, index_t line) const noexcept {
    return block + static_cast<std::size_t>(line) * line_bytes;
  }
  KVQ_HOST_DEVICE const std::uint8_t* line_codes(const std::uint8_t* block, index_t line) const noexcept {
    return block + static_cast<std::size_t>(line) * line_bytes;
  }
  /// The scale array [lines, groups_per_line] and the zero-point array of a block.
  KVQ_HOST_DEVICE std::uint8_t* scales(std::uint8_t* block) const noexcept { return block + scales_offset; }
  KVQ_HOST_DEVICE const std::uint8_t* scales(const std::uint8_t* block) const noexcept { return block + scales_offset; }
  KVQ_HOST_DEVICE std::uint8_t* zeros(std::uint8_t* block) const noexcept { return block + zeros_offset; }
  KVQ_HOST_DEVICE const std::uint8_t* zeros(const std::uint8_t* block) const noexcept { return block + zeros_offset; }
  /// Index of group g of `line` in the scale and zero arrays (in metadata values, not bytes).
  KVQ_HOST_DEVICE std::size_t meta_index(index_t line, index_t group) const noexcept {
    return static_cast<std::size_t>(line) * meta_line_stride + static_cast<std::size_t>(group) * meta_group_stride;
  }
  /// The scale and zero-point of group g of `line`, in the metadata type Meta of the stream
  /// (raw bytes: the arrays need no alignment).
  template <class Meta>
  KVQ_HOST_DEVICE GroupParams<Meta> load_group(const std::uint8_t* block, index_t line, index_t group) const noexcept {
    GroupParams<Meta> p{};
    const std::size_t at = meta_index(line, group) * sizeof(Meta);
    std::memcpy(&p.scale, scales(block) + at, sizeof(Meta));
    std::memcpy(&p.zero, zeros(block) + at, sizeof(Meta));
    return p;
  }
  template <class Meta>
  KVQ_HOST_DEVICE void store_group(std::uint8_t* block, index_t line, index_t group, const GroupParams<Meta>& p) const noexcept {
    const std::size_t at = meta_index(line, group) * sizeof(Meta);
    std::memcpy(scales(block) + at, &p.scale, sizeof(Meta));
    std::memcpy(zeros(block) + at, &p.zero, sizeof(Meta));
  }
  /// Per-channel streams: the token group that holds block row `row`.
  KVQ_HOST_DEVICE index_t token_group(index_t row) const noexcept { return row / group_size; }
  /// Codes, scales and zero-points: every byte but the padding.
  KVQ_HOST_DEVICE std::uint64_t used_bytes() const noexcept { return zeros_offset + (zeros_offset - scales_offset); }
};

/// The block layout of [block_tokens, width] quantized by `spec` (channel groups, if any, count
/// only by their number). Throws kvq::Error as plan_matrix does for shapes it rejects.
inline BlockLayout make_block_layout(index_t block_tokens, index_t width, const MatrixQuantSpec& spec) {
  const MatrixLayout m = plan_matrix(block_tokens, width, spec);
  BlockLayout b;
  b.bits = spec.bits;
  b.meta = spec.meta;
  b.axis = spec.axis;
  b.block_tokens = block_tokens;
  b.width = width;
  b.lines = m.lines;
  b.line_length = m.line_length;
  b.groups_per_line = m.groups_per_line;
  b.group_size = spec.channel_groups.empty() ? spec.group_size : 0;
  b.line_bytes = static_cast<std::uint32_t>(m.line_bytes);
  const bool per_token = spec.axis == GroupAxis::kChannels;
  b.meta_line_stride = static_cast<std::uint32_t>(per_token ? 1 : m.groups_per_line);
  b.meta_group_stride = static_cast<std::uint32_t>(per_token ? m.lines : 1);
  b.scales_offset = m.code_bytes;
  b.zeros_offset = m.code_bytes + m.meta_bytes;
  b.block_bytes = (static_cast<std::uint64_t>(m.total_bytes()) + kBlockAlignment - 1) / kBlockAlignment * kBlockAlignment;
  return b;
}

}  // namespace kvq
