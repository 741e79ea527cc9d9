// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The byte layout of one block of a stream: block_tokens rows of `width` numbers, the
///        contract between the cache, CPU attention and the CUDA kernels.
///
/// Quantized block: layout/block_layout.hpp (BlockLayout, the host-device contract of where its
/// codes, scales and zero-points are). Exact block: [block_tokens][width] of the exact type,
/// row-major.
/// Every block is padded to kBlockAlignment bytes; the padding is part of the stream's memory.
#pragma once

#include <cstddef>

#include "kvq/core/bits.hpp"
#include "kvq/core/error.hpp"
#include "kvq/layout/block_layout.hpp"
#include "kvq/quant/matrix.hpp"

namespace kvq {

/// Sizes and offsets of one stream block.
struct StreamLayout {
  bool quantized = false;
  index_t block_tokens = 0;
  index_t width = 0;                 ///< numbers per token row
  std::size_t exact_value_bytes = 0; ///< bytes per number of an exact stream
  MatrixQuantSpec spec{};            ///< quantized streams: bits, axis, group, clip, meta
  BlockLayout block{};               ///< quantized streams: where a block's codes and metadata are
  std::size_t block_bytes = 0;       ///< padded size of one block

  /// Stored bytes per number, padding included.
  double bits_per_element() const noexcept {
    const double n = static_cast<double>(block_tokens) * static_cast<double>(width);
    return n > 0 ? 8.0 * static_cast<double>(block_bytes) / n : 0.0;
  }
};

/// Layout of a quantized stream block. `spec` may carry channel groups (only their count
/// matters for the sizes).
inline StreamLayout make_quantized_layout(index_t block_tokens, index_t width,
                                          const MatrixQuantSpec& spec) {
  StreamLayout l;
  l.quantized = true;
  l.block_tokens = block_tokens;
  l.width = width;
  l.spec = spec;
  l.spec.channel_groups = {};
  l.block = make_block_layout(block_tokens, width, spec);
  l.block_bytes = static_cast<std::size_t>(l.block.block_bytes);
  return l;
}

/// Layout of an exact stream block of values of `value_bytes` bytes.
inline StreamLayout make_exact_layout(index_t block_tokens, index_t width,
                                      std::size_t value_bytes) {
  StreamLayout l;
  l.quantized = false;
  l.block_tokens = block_tokens;
  l.width = width;
  l.exact_value_bytes = value_bytes;
  const auto bytes = static_cast<index_t>(static_cast<std::size_t>(block_tokens) *
                                          static_cast<std::size_t>(width) * value_bytes);
  l.block_bytes = static_cast<std::size_t>(ceil_div(bytes, static_cast<index_t>(kBlockAlignment))) *
                  kBlockAlignment;
  return l;
}

}  // namespace kvq
