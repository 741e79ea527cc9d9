// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The sequences of a cache: per sequence and layer the token counts and block tables of
///        both streams, and the exact storage (sinks and window rings); fork, free, and the
///        accounting of exact bytes and stored elements.
///
/// The exact rows of every slot (sequence id) live in one contiguous vector, slot s at
/// exact_data() + s * slot_stride(), laid out [num_layers][ExactRows::layer_stride()]: the layout
/// PagedKVParams describes (layout/paged_params.hpp) and the device cache copies. The vector grows
/// when a new slot is added, so pointers into it (views) are valid until the next add or fork.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kvq/cache/block_pool.hpp"
#include "kvq/cache/window_schedule.hpp"
#include "kvq/core/bits.hpp"

namespace kvq {

/// Identifies a sequence of a cache (an index, reused after free).
using SequenceId = std::int32_t;

/// One stream of one sequence and layer: its counts and its block table (quantized rows
/// [b * T, (b + 1) * T) live in block blocks[b]).
struct StreamState {
  StreamCounts counts{};
  std::vector<std::int32_t> blocks;
};

struct LayerState {
  StreamState key;
  StreamState value;
  const StreamState& stream(bool is_key) const noexcept { return is_key ? key : value; }
};

/// Exact rows each sequence keeps per layer: key sinks, key ring, value sinks, value ring, in
/// this order, rows of `width` numbers.
struct ExactRows {
  index_t key_sinks = 0;
  index_t key_ring = 0;
  index_t value_sinks = 0;
  index_t value_ring = 0;
  index_t width = 0;

  index_t layer_stride() const noexcept { return (key_sinks + key_ring + value_sinks + value_ring) * width; }
  /// Offset of a layer's sinks (ring = false) or ring (ring = true) of one stream.
  index_t offset(index_t layer, bool is_key, bool ring) const noexcept {
    index_t rows = is_key ? 0 : key_sinks + key_ring;
    if (ring) rows += is_key ? key_sinks : value_sinks;
    return layer * layer_stride() + rows * width;
  }
  index_t ring_capacity(bool is_key) const noexcept { return is_key ? key_ring : value_ring; }
};

/// The sequence table of a cache whose exact rows are of type E. A table built with ExactRows{}
/// keeps no exact storage (the device cache's host mirror: its exact rows live on the GPU).
template <class E>
class SequenceTable {
 public:
  SequenceTable() = default;
  SequenceTable(index_t num_layers, ExactRows rows) : num_layers_(num_layers), rows_(rows) {}

  const ExactRows& exact_rows() const noexcept { return rows_; }
  index_t num_layers() const noexcept { return num_layers_; }
  index_t slots() const noexcept { return static_cast<index_t>(sequences_.size()); }
  /// Numbers of exact storage per slot: num_layers * exact_rows().layer_stride().
  index_t slot_stride() const noexcept { return num_layers_ * rows_.layer_stride(); }
  /// The exact rows of all slots, slot s at exact_data() + s * slot_stride() (free slots hold
  /// stale rows; add() zero-fills a slot).
  const E* exact_data() const noexcept { return exact_.data(); }
  E* exact_data() noexcept { return exact_.data(); }
  /// Live sequences.
  index_t live() const noexcept {
    index_t n = 0;
    for (const Sequence& s : sequences_) n += s.live ? 1 : 0;
    return n;
  }

  /// A copy of the sequences, counts and block tables without exact storage.
  SequenceTable without_exact() const {
    SequenceTable t(num_layers_, ExactRows{});
    t.sequences_ = sequences_;
    return t;
  }
  /// A copy of the sequences, counts and block tables with exact storage of layout `rows`,
  /// zero-filled, for every slot (the reverse of without_exact; QuantizedKVCache::restore).
  SequenceTable with_exact(ExactRows rows) const {
    SequenceTable t(num_layers_, rows);
    t.sequences_ = sequences_;
    t.exact_.assign(sequences_.size() * static_cast<std::size_t>(t.slot_stride()), E{});
    return t;
  }

  bool is_live(SequenceId seq) const noexcept {
    return seq >= 0 && seq < static_cast<SequenceId>(sequences_.size()) && sequences_[static_cast<std::size_t>(seq)].live;
  }

  /// Starts an empty sequence (the lowest free id) and allocates its exact storage.
  SequenceId add() {
    SequenceId id = 0;
    while (id < static_cast<SequenceId>(sequences_.size()) && sequences_[static_cast<std::size_t>(id)].live) ++id;
    const auto stride = static_cast<std::size_t>(slot_stride());
    if (id == static_cast<SequenceId>(sequences_.size())) {
      sequences_.emplace_back();
      exact_.resize(sequences_.size() * stride);
    }
    Sequence& s = sequences_[static_cast<std::size_t>(id)];
    s.live = true;
    s.layers.assign(static_cast<std::size_t>(num_layers_), LayerState{});
    std::fill_n(exact_.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(id) * stride), stride, E{});
    return id;
  }

  /// Blocks a fork of `seq` must copy (partially filled last blocks) in each pool.
  void partial_blocks(SequenceId seq, index_t block_tokens, index_t* keys, index_t* values) const noexcept {
    *keys = 0;
    *values = 0;
    for (const LayerState& ls : sequences_[static_cast<std::size_t>(seq)].layers) {
      *keys += ls.key.counts.quantized % block_tokens != 0;
      *values += ls.value.counts.quantized % block_tokens != 0;
    }
  }

  /// A new sequence with the contents of `source`: full blocks are shared, a partial last block
  /// and the exact storage are copied (precondition: the pools hold partial_blocks()).
  SequenceId fork(SequenceId source, index_t block_tokens, BlockPool& key_pool, BlockPool& value_pool) {
    const SequenceId id = add();
    Sequence& dst = sequences_[static_cast<std::size_t>(id)];
    const Sequence& src = sequences_[static_cast<std::size_t>(source)];
    const auto stride = static_cast<std::size_t>(slot_stride());
    std::copy_n(exact_.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(source) * stride), stride,
                exact_.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(id) * stride));
    for (std::size_t l = 0; l < dst.layers.size(); ++l) {
      fork_stream(src.layers[l].key, dst.layers[l].key, block_tokens, key_pool);
      fork_stream(src.layers[l].value, dst.layers[l].value, block_tokens, value_pool);
    }
    return id;
  }

  /// Ends a sequence: its blocks return to the pools (unless a fork shares them; Pool: BlockPool or
  /// BlockIdAllocator) and its exact storage stops counting (the slot keeps it for the next add).
  template <class Pool>
  void free(SequenceId seq, Pool& key_pool, Pool& value_pool) {
    Sequence& s = sequences_[static_cast<std::size_t>(seq)];
    for (LayerState& ls : s.layers) {
      for (std::int32_t b : ls.key.blocks) key_pool.release(b);
      for (std::int32_t b : ls.value.blocks) value_pool.release(b);
    }
    s = Sequence{};
  }

  LayerState& layer(SequenceId seq, index_t layer) noexcept {
    return sequences_[static_cast<std::size_t>(seq)].layers[static_cast<std::size_t>(layer)];
  }
  const LayerState& layer(SequenceId seq, index_t layer) const noexcept {
    return sequences_[static_cast<std::size_t>(seq)].layers[static_cast<std::size_t>(layer)];
  }

  /// A layer's sinks [sinks, width] or window ring [ring_capacity, width] of one stream.
  E* exact(SequenceId seq, index_t layer, bool is_key, bool ring) noexcept {
    return exact_.data() + static_cast<std::size_t>(seq) * static_cast<std::size_t>(slot_stride()) +
           rows_.offset(layer, is_key, ring);
  }
  const E* exact(SequenceId seq, index_t layer, bool is_key, bool ring) const noexcept {
    return exact_.data() + static_cast<std::size_t>(seq) * static_cast<std::size_t>(slot_stride()) +
           rows_.offset(layer, is_key, ring);
  }

  /// Bytes of the exact storage of live sequences.
  std::size_t exact_bytes() const noexcept {
    return static_cast<std::size_t>(live()) * static_cast<std::size_t>(slot_stride()) * sizeof(E);
  }
  /// Tokens held, summed over live sequences, layers and both streams.
  double stored_tokens() const noexcept {
    double n = 0;
    for (const Sequence& s : sequences_) {
      for (const LayerState& ls : s.layers) n += static_cast<double>(ls.key.counts.length + ls.value.counts.length);
    }
    return n;
  }

 private:
  struct Sequence {
    bool live = false;
    std::vector<LayerState> layers;
  };

  static void fork_stream(const StreamState& src, StreamState& dst, index_t block_tokens, BlockPool& pool) {
    dst.counts = src.counts;
    dst.blocks.clear();
    const index_t full = src.counts.quantized / block_tokens;
    for (std::size_t b = 0; b < src.blocks.size(); ++b) {
      if (static_cast<index_t>(b) < full) {
        pool.retain(src.blocks[b]);
        dst.blocks.push_back(src.blocks[b]);
      } else {
        const std::int32_t copy = pool.allocate();
        std::memcpy(pool.data(copy), pool.data(src.blocks[b]), pool.block_bytes());
        dst.blocks.push_back(copy);
      }
    }
  }

  index_t num_layers_ = 0;
  ExactRows rows_{};
  std::vector<Sequence> sequences_;
  std::vector<E> exact_;  ///< [slots][num_layers][rows_.layer_stride()]
};

}  // namespace kvq
