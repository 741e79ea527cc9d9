// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Paged storage of one layer of a cache as plain data (FlashInfer / vLLM style): what a
///        kernel needs to find every key and value row of a batch of sequences, without owning
///        any of it. The same struct describes a cache in host memory (QuantizedKVCache::paged)
///        and one in GPU memory (kvq::cuda::DeviceKVCache::paged); attention and append kernels
///        take it by value.
///
/// A stream (keys or values) of sequence slot s holds positions [0, length[s]):
///   [0, sinks)                     exact rows in   exact + s * exact_stride + sinks_offset
///   [sinks, sinks + quantized[s])  stored rows in  blocks block_table[s * max_blocks + b]:
///                                  position sinks + i is row i % block_tokens of block i / block_tokens
///   [sinks + quantized[s], length) exact rows in the window ring: position p in slot
///                                  (p - sinks) % ring_capacity of exact + s * exact_stride + ring_offset
/// Exact rows are `width` numbers of the cache's exact type (fp16 / bf16 / fp32), row-major
/// [num_kv_heads, head_dim]. Blocks are `block_bytes` bytes apart in `pool`; a quantized block's
/// bytes are described by `block` (layout/block_layout.hpp), an exact block is
/// [block_tokens][width] of the exact type.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvq/config.hpp"
#include "kvq/layout/block_layout.hpp"

namespace kvq {

/// One stream of one layer. Pointers are to host or device memory, as the owner says.
struct PagedStream {
  std::uint8_t* pool = nullptr;           ///< block b at pool + b * block_bytes
  std::uint64_t block_bytes = 0;
  BlockLayout block{};                    ///< quantized streams: codes and metadata of a block
  bool quantized = false;
  std::int32_t block_tokens = 0;
  std::int32_t width = 0;                 ///< numbers of a stored row (latent rank for CSKV)
  const std::int32_t* block_table = nullptr;  ///< [slots][max_blocks]
  std::int32_t max_blocks = 0;            ///< row stride of block_table
  const std::int32_t* quantized_tokens = nullptr;  ///< [slots] rows in blocks
  std::uint8_t* exact = nullptr;          ///< exact rows of slot s at exact + s * exact_stride
  std::uint64_t exact_stride = 0;         ///< bytes
  std::uint64_t sinks_offset = 0;         ///< bytes from a slot's exact rows to its sinks
  std::uint64_t ring_offset = 0;          ///< bytes from a slot's exact rows to its window ring
  std::int32_t sinks = 0;
  std::int32_t ring_capacity = 0;         ///< rows of the window ring

  /// Block b (b < quantized_tokens[slot] / block_tokens, rounded up) of a slot.
  KVQ_HOST_DEVICE std::uint8_t* block_at(std::int32_t slot, std::int32_t b) const noexcept {
    const std::int32_t id = block_table[static_cast<std::size_t>(slot) * static_cast<std::size_t>(max_blocks) + b];
    return pool + static_cast<std::size_t>(id) * block_bytes;
  }
  /// The block that holds stored row i (i < quantized_tokens[slot]) of a slot.
  KVQ_HOST_DEVICE std::uint8_t* block_of(std::int32_t slot, std::int32_t i) const noexcept {
    return block_at(slot, i / block_tokens);
  }
  /// The exact row of position p of a slot (a sink, or a window position), `row_bytes` bytes a row.
  KVQ_HOST_DEVICE std::uint8_t* exact_row(std::int32_t slot, std::int32_t p, std::size_t row_bytes) const noexcept {
    std::uint8_t* base = exact + static_cast<std::size_t>(slot) * exact_stride;
    if (p < sinks) return base + sinks_offset + static_cast<std::size_t>(p) * row_bytes;
    return base + ring_offset + static_cast<std::size_t>((p - sinks) % ring_capacity) * row_bytes;
  }
};

/// One layer of a cache. Lengths are per slot; a batch names its slots (nullptr: slot i is
/// batch entry i).
struct PagedKVParams {
  PagedStream keys{};
  PagedStream values{};
  const std::int32_t* lengths = nullptr;  ///< [slots] positions held
  std::int32_t slots = 0;                 ///< rows of the tables and lengths (CPU attention checks slots against it)
  std::int32_t num_kv_heads = 0;
  std::int32_t head_dim = 0;
  std::int32_t exact_bytes = 2;           ///< bytes of one exact number

  KVQ_HOST_DEVICE std::int32_t width() const noexcept { return num_kv_heads * head_dim; }
  KVQ_HOST_DEVICE std::size_t exact_row_bytes() const noexcept {
    return static_cast<std::size_t>(width()) * static_cast<std::size_t>(exact_bytes);
  }
};

}  // namespace kvq
