// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief A host cache described as PagedKVParams (layout/paged_params.hpp): HostPagedTables owns
///        the flat block tables, quantized counts and lengths of one layer that a sequence table
///        keeps as per-sequence vectors, and hands out PagedKVParams that point into them and
///        into the cache's pools and exact rows (QuantizedKVCache::paged); export_sequence_paged
///        describes one sequence as a one-slot PagedKVParams without copying (what attend() on a
///        cache reads).
///
/// Ownership: the tables own their std::vectors; the pools and exact rows stay the cache's.
/// params() points into both, so it is valid while the tables object lives and the cache is not
/// modified (an append, add_sequence, fork or free may move or rewrite what it points to; take
/// a new export after one). The pointers of PagedKVParams are not const (the struct serves
/// writers too), but an export of a const cache is for reading: writing through it bypasses the
/// cache. Threading: building an export reads the cache (like any const member function); the
/// tables object is plain data.
///
/// The paged_stream() helpers fill PagedStream from a stream's StreamLayout; the device cache
/// (kvq/cuda/device_cache.cuh) builds its PagedKVParams with them too, so both describe a cache
/// of one configuration with identical layout fields.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvq/cache/block_pool.hpp"
#include "kvq/cache/sequence_table.hpp"
#include "kvq/cache/window_schedule.hpp"
#include "kvq/core/bits.hpp"
#include "kvq/layout/paged_params.hpp"
#include "kvq/layout/stream_layout.hpp"

namespace kvq {
namespace detail {

/// The layout fields of a PagedStream (pool, block layout, token and row sizes, the exact rows'
/// offsets within a slot) for one layer of a stream whose slots hold `exact_rows` of E_bytes-byte
/// numbers [num_layers][rows.layer_stride()]. Tables and counts are left for the owner to set.
inline PagedStream paged_stream(const StreamLayout& layout, std::uint8_t* pool, const ExactRows& rows,
                                std::size_t exact_value_bytes, index_t num_layers, index_t layer, bool is_key,
                                const WindowRule& rule, std::uint8_t* exact) {
  PagedStream s;
  s.pool = pool;
  s.block_bytes = layout.block_bytes;
  s.block = layout.block;
  s.quantized = layout.quantized;
  s.block_tokens = static_cast<std::int32_t>(layout.block_tokens);
  s.width = static_cast<std::int32_t>(layout.width);
  s.exact = exact;
  s.exact_stride = static_cast<std::uint64_t>(num_layers * rows.layer_stride()) * exact_value_bytes;
  s.sinks_offset = static_cast<std::uint64_t>(rows.offset(layer, is_key, false)) * exact_value_bytes;
  s.ring_offset = static_cast<std::uint64_t>(rows.offset(layer, is_key, true)) * exact_value_bytes;
  s.sinks = static_cast<std::int32_t>(rule.sinks);
  s.ring_capacity = static_cast<std::int32_t>(rows.ring_capacity(is_key));
  return s;
}

}  // namespace detail

/// The block tables, quantized counts and lengths of one layer of a host cache as flat int32
/// arrays indexed by slot (sequence id), and the PagedKVParams that point into them. Free slots
/// have length 0 and empty tables. See the file comment for lifetimes.
struct HostPagedTables {
  std::int32_t slots = 0;       ///< rows of the tables: the cache's slot count
  std::int32_t max_blocks = 0;  ///< row stride of the tables: the longest table of the layer (at least 1)
  std::vector<std::int32_t> key_table;        ///< [slots][max_blocks], -1 past a slot's blocks
  std::vector<std::int32_t> value_table;      ///< [slots][max_blocks]
  std::vector<std::int32_t> key_quantized;    ///< [slots]
  std::vector<std::int32_t> value_quantized;  ///< [slots]
  std::vector<std::int32_t> lengths;          ///< [slots]
  PagedKVParams base{};  ///< pools, layouts and exact rows; params() adds the tables

  /// The layer as PagedKVParams pointing into these vectors (valid while *this is unchanged).
  PagedKVParams params() const noexcept {
    PagedKVParams p = base;
    p.keys.block_table = key_table.data();
    p.keys.max_blocks = max_blocks;
    p.keys.quantized_tokens = key_quantized.data();
    p.values.block_table = value_table.data();
    p.values.max_blocks = max_blocks;
    p.values.quantized_tokens = value_quantized.data();
    p.lengths = lengths.data();
    p.slots = slots;
    return p;
  }
};

/// Exports one layer of a host cache: its sequence table, pools and stream layouts (what
/// QuantizedKVCache::paged passes).
template <class E>
HostPagedTables export_paged(const SequenceTable<E>& sequences, index_t layer, const StreamLayout& key_layout,
                             const StreamLayout& value_layout, const BlockPool& key_pool, const BlockPool& value_pool,
                             const WindowRule& key_rule, const WindowRule& value_rule, index_t num_kv_heads,
                             index_t head_dim) {
  HostPagedTables t;
  const index_t slots = sequences.slots();
  index_t max_blocks = 1;
  for (SequenceId s = 0; s < slots; ++s) {
    if (!sequences.is_live(s)) continue;
    const LayerState& ls = sequences.layer(s, layer);
    max_blocks = std::max({max_blocks, static_cast<index_t>(ls.key.blocks.size()), static_cast<index_t>(ls.value.blocks.size())});
  }
  t.slots = static_cast<std::int32_t>(slots);
  t.max_blocks = static_cast<std::int32_t>(max_blocks);
  const auto cells = static_cast<std::size_t>(slots * max_blocks);
  t.key_table.assign(cells, -1);
  t.value_table.assign(cells, -1);
  t.key_quantized.assign(static_cast<std::size_t>(slots), 0);
  t.value_quantized.assign(static_cast<std::size_t>(slots), 0);
  t.lengths.assign(static_cast<std::size_t>(slots), 0);
  for (SequenceId s = 0; s < slots; ++s) {
    if (!sequences.is_live(s)) continue;
    const LayerState& ls = sequences.layer(s, layer);
    const auto row = static_cast<std::size_t>(s) * static_cast<std::size_t>(max_blocks);
    std::copy(ls.key.blocks.begin(), ls.key.blocks.end(), t.key_table.begin() + static_cast<std::ptrdiff_t>(row));
    std::copy(ls.value.blocks.begin(), ls.value.blocks.end(), t.value_table.begin() + static_cast<std::ptrdiff_t>(row));
    t.key_quantized[static_cast<std::size_t>(s)] = static_cast<std::int32_t>(ls.key.counts.quantized);
    t.value_quantized[static_cast<std::size_t>(s)] = static_cast<std::int32_t>(ls.value.counts.quantized);
    t.lengths[static_cast<std::size_t>(s)] = static_cast<std::int32_t>(ls.key.counts.length);
  }
  // The exact rows and pools of a const cache: see the file comment.
  auto* exact = reinterpret_cast<std::uint8_t*>(const_cast<E*>(sequences.exact_data()));
  const ExactRows& rows = sequences.exact_rows();
  t.base.keys = detail::paged_stream(key_layout, const_cast<std::uint8_t*>(key_pool.data()), rows, sizeof(E),
                                     sequences.num_layers(), layer, true, key_rule, exact);
  t.base.values = detail::paged_stream(value_layout, const_cast<std::uint8_t*>(value_pool.data()), rows, sizeof(E),
                                       sequences.num_layers(), layer, false, value_rule, exact);
  t.base.num_kv_heads = static_cast<std::int32_t>(num_kv_heads);
  t.base.head_dim = static_cast<std::int32_t>(head_dim);
  t.base.exact_bytes = static_cast<std::int32_t>(sizeof(E));
  return t;
}

/// The counts a one-sequence export points to (export_sequence_paged).
struct PagedSlotCounts {
  std::int32_t key_quantized = 0;
  std::int32_t value_quantized = 0;
  std::int32_t length = 0;
};

/// One sequence of one layer of a host cache as a one-slot PagedKVParams (slot 0, slots = 1):
/// the layout fields of export_paged, the sequence's own block tables (no copy) and the counts in
/// `counts`, which must outlive the result like the cache. O(1), no allocation: what attend() on a
/// cache builds for every call. The sequence must be live and the layer valid (not checked).
template <class E>
PagedKVParams export_sequence_paged(const SequenceTable<E>& sequences, SequenceId seq, index_t layer,
                                    const StreamLayout& key_layout, const StreamLayout& value_layout,
                                    const BlockPool& key_pool, const BlockPool& value_pool, const WindowRule& key_rule,
                                    const WindowRule& value_rule, index_t num_kv_heads, index_t head_dim,
                                    PagedSlotCounts& counts) noexcept {
  const LayerState& ls = sequences.layer(seq, layer);
  counts.key_quantized = static_cast<std::int32_t>(ls.key.counts.quantized);
  counts.value_quantized = static_cast<std::int32_t>(ls.value.counts.quantized);
  counts.length = static_cast<std::int32_t>(ls.key.counts.length);
  // The sequence's exact rows are slot 0 of the export (see export_paged for the const_casts).
  auto* exact = reinterpret_cast<std::uint8_t*>(const_cast<E*>(sequences.exact_data())) +
                static_cast<std::size_t>(seq) * static_cast<std::size_t>(sequences.slot_stride()) * sizeof(E);
  const ExactRows& rows = sequences.exact_rows();
  PagedKVParams p;
  p.keys = detail::paged_stream(key_layout, const_cast<std::uint8_t*>(key_pool.data()), rows, sizeof(E),
                                sequences.num_layers(), layer, true, key_rule, exact);
  p.values = detail::paged_stream(value_layout, const_cast<std::uint8_t*>(value_pool.data()), rows, sizeof(E),
                                  sequences.num_layers(), layer, false, value_rule, exact);
  p.keys.block_table = ls.key.blocks.data();
  p.keys.max_blocks = static_cast<std::int32_t>(ls.key.blocks.size());
  p.keys.quantized_tokens = &counts.key_quantized;
  p.values.block_table = ls.value.blocks.data();
  p.values.max_blocks = static_cast<std::int32_t>(ls.value.blocks.size());
  p.values.quantized_tokens = &counts.value_quantized;
  p.lengths = &counts.length;
  p.slots = 1;
  p.num_kv_heads = static_cast<std::int32_t>(num_kv_heads);
  p.head_dim = static_cast<std::int32_t>(head_dim);
  p.exact_bytes = static_cast<std::int32_t>(sizeof(E));
  return p;
}

}  // namespace kvq
