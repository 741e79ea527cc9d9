// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief QuantizedKVCache<Policy>: a paged, multi-sequence KV cache that stores keys and values
///        as the policy says (sinks, quantized blocks, full-precision window).
///
/// Shapes: a layer's key or value row of one token is [num_kv_heads, head_dim] (width
/// W = num_kv_heads * head_dim). Per sequence and layer the cache keeps two streams (keys,
/// values); see policy/spec.hpp for their segments and transforms and cache/window_schedule.hpp
/// for the state machine. Quantized rows live in blocks of Policy::block_tokens tokens of one
/// layer, taken from a key pool and a value pool of CacheConfig::num_blocks blocks each
/// (allocated by the constructor); sinks and windows live in the exact storage of the
/// sequence's slot, one array for all slots that add_sequence grows (paged() describes a layer of
/// all of it as PagedKVParams). Quantization groups never span sequences: every block belongs to
/// one sequence (fork shares full blocks, which are never written again, and copies a partial
/// last block).
///
/// The work is split by job: cache_config.hpp checks the config and the calibration and fixes
/// each stream's layout; sequence_table.hpp keeps the sequences, their exact rows and the
/// accounting; stream_writer.hpp moves appended tokens through a stream's transform into its
/// blocks; stream_view.hpp is what attention reads.
///
/// Thread safety: const member functions may run concurrently; append, add_sequence, fork, free
/// and restore need exclusive access.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kvq/cache/block_pool.hpp"
#include "kvq/cache/cache_config.hpp"
#include "kvq/cache/paged_export.hpp"
#include "kvq/cache/sequence_table.hpp"
#include "kvq/cache/stream_view.hpp"
#include "kvq/cache/stream_writer.hpp"
#include "kvq/cache/window_schedule.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/float_types.hpp"
#include "kvq/core/view.hpp"
#include "kvq/layout/stream_layout.hpp"
#include "kvq/policy/policy_traits.hpp"
#include "kvq/transform/rope.hpp"

namespace kvq {

/// Where a cache's bytes are (memory_usage()).
struct MemoryUsage {
  std::size_t key_block_bytes = 0;    ///< key blocks in use
  std::size_t value_block_bytes = 0;  ///< value blocks in use
  std::size_t exact_bytes = 0;        ///< sinks and windows of live sequences
  std::size_t total() const noexcept { return key_block_bytes + value_block_bytes + exact_bytes; }
};

/// Where QuantizedKVCache::restore's fill writes a cache's bytes: both pools whole (block b at
/// b * block_bytes, the layouts of key_layout() / value_layout()) and the exact rows of every
/// slot (the layout of SequenceTable::exact_data()).
struct CacheBytes {
  std::uint8_t* key_pool = nullptr;
  std::size_t key_pool_bytes = 0;
  std::uint8_t* value_pool = nullptr;
  std::size_t value_pool_bytes = 0;
  std::uint8_t* exact = nullptr;
  std::size_t exact_bytes = 0;
};

namespace detail {

template <class T>
inline float exact_limit() noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return std::numeric_limits<float>::max();
  } else {
    return T::max().to_float();
  }
}

template <class T>
const char* exact_label() noexcept {
  return std::is_same_v<T, float> ? "fp32" : std::is_same_v<T, Float16> ? "fp16" : "bf16";
}

/// Streams whose per-token groups can overflow their metadata on append: quantized per token
/// with FP8 scales, rows stored without a projection (StreamWriter::check_quantizable).
template <class Stream>
constexpr bool checks_groups_on_append() noexcept {
  if constexpr (Stream::quantized) {
    return Stream::axis == GroupAxis::kChannels && Stream::meta == MetaFormat::kFp8E4M3 &&
           Stream::transform::kind != TransformKind::kLatentProjection;
  } else {
    return false;
  }
}

/// The exact rows a sequence of Policy keeps per layer (sinks and window rings of both streams),
/// rows of `width` numbers: the layout of QuantizedKVCache's exact storage and of the device
/// cache's exact-row pool.
template <class Policy>
ExactRows policy_exact_rows(index_t width) noexcept {
  ExactRows rows;
  rows.key_sinks = Policy::KeyWindow::sinks;
  rows.key_ring = Policy::KeyWindow::window_capacity;
  rows.value_sinks = Policy::ValueWindow::sinks;
  rows.value_ring = Policy::ValueWindow::window_capacity;
  rows.width = width;
  return rows;
}

}  // namespace detail

/// The KV cache. See the file comment.
/// @tparam Policy  KiviPolicy, SkvqPolicy, CskvPolicy, Fp16Policy, PerTokenPolicy or any type
///                 that satisfies policy_traits
template <class Policy>
class QuantizedKVCache {
  using Traits = policy_traits<Policy>;

 public:
  using policy_type = Policy;
  using exact_type = typename Traits::exact_type;
  using KeyStream = typename Traits::KeyStream;
  using ValueStream = typename Traits::ValueStream;
  static constexpr index_t block_tokens = Policy::block_tokens;
  /// Tokens per attention tile (the longest run of rows decoded at once).
  static constexpr index_t tile_tokens = 64;

  /// A cache of the given shape, with the per-layer data of `calibration` (CacheCalibration:
  /// SKVQ channel groups and clip ratios, CSKV factors). Throws kvq::Error naming the argument.
  explicit QuantizedKVCache(const CacheConfig& config, CacheCalibration calibration = {}) : config_(config) {
    constexpr const char* where = "kvq::QuantizedKVCache";
    detail::check_config(where, config);
    width_ = config.num_kv_heads * config.head_dim;
    keys_ = detail::make_stream_setup<KeyStream>(config, block_tokens, std::move(calibration.keys), true, Policy::name());
    values_ = detail::make_stream_setup<ValueStream>(config, block_tokens, std::move(calibration.values), false,
                                                     Policy::name());
    key_pool_ = BlockPool(keys_.layout.block_bytes, config.num_blocks);
    value_pool_ = BlockPool(values_.layout.block_bytes, config.num_blocks);
    rope_ = RopeRotator(config.head_dim, config.rope, tile_tokens);
    sequences_ = SequenceTable<exact_type>(config.num_layers, detail::policy_exact_rows<Policy>(width_));
    const index_t staging_rows = std::max<index_t>(std::max<index_t>(key_rule_.chunk, value_rule_.chunk), tile_tokens);
    writer_ = StreamWriter<exact_type>(width_, staging_rows, std::max(key_rank(), value_rank()));
  }

  // ---- sequences -------------------------------------------------------------------------

  /// Starts an empty sequence and returns its id. Allocates its sinks and windows.
  SequenceId add_sequence() { return sequences_.add(); }

  /// A new sequence with the contents of `source`: full blocks are shared, a partial last block
  /// and the exact storage are copied. Throws kOutOfCapacity (cache unchanged) when the pools
  /// cannot hold the copied partial blocks.
  SequenceId fork(SequenceId source) {
    constexpr const char* where = "kvq::QuantizedKVCache::fork";
    check_sequence(where, "source", source);
    index_t key_partial = 0;
    index_t value_partial = 0;
    sequences_.partial_blocks(source, block_tokens, &key_partial, &value_partial);
    check_capacity(where, "source", key_partial, value_partial, "copies of partially filled blocks");
    return sequences_.fork(source, block_tokens, key_pool_, value_pool_);
  }

  /// Ends a sequence: its blocks return to the pools (when no fork shares them) and its exact
  /// storage is released.
  void free(SequenceId seq) {
    check_sequence("kvq::QuantizedKVCache::free", "seq", seq);
    sequences_.free(seq, key_pool_, value_pool_);
  }

  bool is_live(SequenceId seq) const noexcept { return sequences_.is_live(seq); }

  // ---- append ----------------------------------------------------------------------------

  /// Appends n tokens of one layer: k and v [n, num_kv_heads, head_dim] of float, Float16 or
  /// BFloat16 (any strides). n == 1 is a decode step, n > 1 a prefill chunk (they differ only
  /// for kAfterAttention flushes). Keys are post-RoPE, or pre-RoPE when Policy::pre_rope.
  /// Values are rounded to exact_type on entry. Throws kvq::Error, leaving the cache unchanged,
  /// for a bad sequence, layer or shape, non-finite values or values beyond exact_type's range
  /// (kNonFiniteInput), a full pool (kOutOfCapacity) or group metadata beyond its format's range
  /// (kMetadataOverflow).
  template <class T>
  void append(SequenceId seq, index_t layer, StridedView<const T, 3> k, StridedView<const T, 3> v) {
    static_assert(is_storage_float_v<T>, "kvq: append takes float, Float16 or BFloat16 rows");
    constexpr const char* where = "kvq::QuantizedKVCache::append";
    check_sequence(where, "seq", seq);
    check_layer(where, layer);
    check_view(where, "k", k, {-1, config_.num_kv_heads, config_.head_dim});
    check_view(where, "v", v, {k.extent(0), config_.num_kv_heads, config_.head_dim});
    check_values(where, "k", k);
    check_values(where, "v", v);
    const index_t n = k.extent(0);
    const AppendContext key_ctx{where, "k", layer};
    const AppendContext value_ctx{where, "v", layer};
    const StreamView<exact_type> key_before = stream_view(seq, layer, true);
    const StreamView<exact_type> value_before = stream_view(seq, layer, false);
    if constexpr (detail::checks_groups_on_append<KeyStream>()) writer_.check_quantizable(key_ctx, key_before, k);
    if constexpr (detail::checks_groups_on_append<ValueStream>()) writer_.check_quantizable(value_ctx, value_before, v);

    LayerState& ls = sequences_.layer(seq, layer);
    const StreamCounts key_after = key_rule_.after_append(ls.key.counts, n);
    const StreamCounts value_after = value_rule_.after_append(ls.value.counts, n);
    const index_t key_new = blocks_for(key_after.quantized) - static_cast<index_t>(ls.key.blocks.size());
    const index_t value_new = blocks_for(value_after.quantized) - static_cast<index_t>(ls.value.blocks.size());
    check_capacity(where, key_new > key_pool_.free_blocks() ? "k" : "v", key_new, value_new,
                   detail::concat("an append of ", n, " tokens"));

    for (index_t i = 0; i < key_new; ++i) ls.key.blocks.push_back(key_pool_.allocate());
    for (index_t i = 0; i < value_new; ++i) ls.value.blocks.push_back(value_pool_.allocate());
    try {
      // The views see the new block tables (the vectors may have moved); counts are unchanged.
      writer_.flush(key_ctx, stream_view(seq, layer, true), key_pool_, key_after, k);
      writer_.flush(value_ctx, stream_view(seq, layer, false), value_pool_, value_after, v);
    } catch (...) {
      for (index_t i = 0; i < key_new; ++i) { key_pool_.release(ls.key.blocks.back()); ls.key.blocks.pop_back(); }
      for (index_t i = 0; i < value_new; ++i) { value_pool_.release(ls.value.blocks.back()); ls.value.blocks.pop_back(); }
      throw;
    }
    StreamWriter<exact_type>::store_exact(key_rule_, ls.key.counts, key_after, sequences_.exact(seq, layer, true, false),
                                          sequences_.exact(seq, layer, true, true),
                                          sequences_.exact_rows().ring_capacity(true), k);
    StreamWriter<exact_type>::store_exact(value_rule_, ls.value.counts, value_after,
                                          sequences_.exact(seq, layer, false, false),
                                          sequences_.exact(seq, layer, false, true),
                                          sequences_.exact_rows().ring_capacity(false), v);
    ls.key.counts = key_after;
    ls.value.counts = value_after;
  }

  /// append for contiguous rows: k and v point to [n, num_kv_heads, head_dim].
  template <class T>
  void append(SequenceId seq, index_t layer, const T* k, const T* v, index_t n) {
    const index_t shape[3] = {n, config_.num_kv_heads, config_.head_dim};
    append(seq, layer, StridedView<const T, 3>(k, shape), StridedView<const T, 3>(v, shape));
  }

  // ---- reading -----------------------------------------------------------------------------

  /// Tokens appended to a layer of a sequence.
  index_t length(SequenceId seq, index_t layer = 0) const {
    check_sequence("kvq::QuantizedKVCache::length", "seq", seq);
    check_layer("kvq::QuantizedKVCache::length", layer);
    return sequences_.layer(seq, layer).key.counts.length;
  }
  /// Key / value token counts of a layer (see StreamCounts; sinks are min(length, sinks)).
  StreamCounts key_counts(SequenceId seq, index_t layer) const {
    check_sequence("kvq::QuantizedKVCache::key_counts", "seq", seq);
    check_layer("kvq::QuantizedKVCache::key_counts", layer);
    return sequences_.layer(seq, layer).key.counts;
  }
  StreamCounts value_counts(SequenceId seq, index_t layer) const {
    check_sequence("kvq::QuantizedKVCache::value_counts", "seq", seq);
    check_layer("kvq::QuantizedKVCache::value_counts", layer);
    return sequences_.layer(seq, layer).value.counts;
  }
  const WindowRule& key_rule() const noexcept { return key_rule_; }
  const WindowRule& value_rule() const noexcept { return value_rule_; }

  /// What attention reads of a layer's keys / values: blocks, exact rows, the layer's transform
  /// (and RoPE for keys stored before it).
  StreamView<exact_type> key_view(SequenceId seq, index_t layer) const {
    check_sequence("kvq::QuantizedKVCache::key_view", "seq", seq);
    check_layer("kvq::QuantizedKVCache::key_view", layer);
    return stream_view(seq, layer, true);
  }
  StreamView<exact_type> value_view(SequenceId seq, index_t layer) const {
    check_sequence("kvq::QuantizedKVCache::value_view", "seq", seq);
    check_layer("kvq::QuantizedKVCache::value_view", layer);
    return stream_view(seq, layer, false);
  }

  /// One layer as PagedKVParams (layout/paged_params.hpp): the returned tables own the flat block
  /// tables, counts and lengths of every slot; tables.params() points into them, the pools and
  /// the exact rows (cache/paged_export.hpp: valid until the cache is modified; for reading).
  HostPagedTables paged(index_t layer) const {
    check_layer("kvq::QuantizedKVCache::paged", layer);
    return export_paged(sequences_, layer, keys_.layout, values_.layout, key_pool_, value_pool_, key_rule_, value_rule_,
                        config_.num_kv_heads, config_.head_dim);
  }

  /// The keys as attention sees them before RoPE is applied, out [length, num_kv_heads,
  /// head_dim] row-major: exact rows as stored, quantized rows dequantized (reconstructed from
  /// the latent for CSKV). Pre-RoPE policies return un-rotated keys.
  void read_keys(SequenceId seq, index_t layer, float* out) const { read_stream(seq, layer, true, out); }
  /// The values as attention sees them, out [length, num_kv_heads, head_dim].
  void read_values(SequenceId seq, index_t layer, float* out) const { read_stream(seq, layer, false, out); }

  // ---- raw state ---------------------------------------------------------------------------

  /// Replaces everything the cache holds by raw state from elsewhere (kvq::cuda::DeviceKVCache::
  /// download passes its host mirror and copies the device's bytes): `sequences` gives the
  /// slots, live or free, their counts and block tables (a table of config().num_layers layers;
  /// its exact storage, if any, is not read), `key_ids` / `value_ids` the pools' reference counts
  /// and free lists (config().num_blocks ids each). Then fill(const CacheBytes&) writes the bytes
  /// into newly allocated storage: both pools whole and the exact rows of sequences.slots()
  /// slots. A live sequence that holds no token gets zeroed exact rows afterwards (as
  /// add_sequence leaves them). Calibration, transforms and layouts stay the cache's.
  ///
  /// Checks the bookkeeping first: matching layers and pool sizes, per live sequence and layer
  /// keys and values of one length, counts the window rules allow (at most the window ring
  /// exact), one block per block_tokens quantized tokens, block ids in range, and reference
  /// counts equal to the block tables' uses. Throws kvq::Error(kInvalidArgument) naming the
  /// argument, the value and the expectation; whatever fill throws propagates. Either way the
  /// cache is unchanged (the new storage is discarded). Needs exclusive access; allocates new
  /// pools (the old ones are freed on success, so both exist for a moment).
  template <class Fill>
  void restore(const SequenceTable<exact_type>& sequences, const BlockIdAllocator& key_ids,
               const BlockIdAllocator& value_ids, Fill&& fill) {
    constexpr const char* where = "kvq::QuantizedKVCache::restore";
    if (sequences.num_layers() != config_.num_layers) {
      detail::throw_argument_error(where, "sequences", detail::concat("a table of ", sequences.num_layers(), " layers"),
                                   detail::concat("config().num_layers = ", config_.num_layers, " layers"));
    }
    for (const BlockIdAllocator* ids : {&key_ids, &value_ids}) {
      if (ids->num_blocks() != config_.num_blocks) {
        detail::throw_argument_error(where, ids == &key_ids ? "key_ids" : "value_ids",
                                     detail::concat("ids of ", ids->num_blocks(), " blocks"),
                                     detail::concat("config().num_blocks = ", config_.num_blocks, " blocks"));
      }
    }
    check_bookkeeping(where, sequences, key_ids, value_ids);

    SequenceTable<exact_type> next = sequences.with_exact(sequences_.exact_rows());
    BlockPool key_pool(keys_.layout.block_bytes, key_ids);
    BlockPool value_pool(values_.layout.block_bytes, value_ids);
    CacheBytes bytes;
    bytes.key_pool = key_pool.data();
    bytes.key_pool_bytes = key_pool.reserved_bytes();
    bytes.value_pool = value_pool.data();
    bytes.value_pool_bytes = value_pool.reserved_bytes();
    bytes.exact = reinterpret_cast<std::uint8_t*>(next.exact_data());
    bytes.exact_bytes = static_cast<std::size_t>(next.slots() * next.slot_stride()) * sizeof(exact_type);
    fill(static_cast<const CacheBytes&>(bytes));
    const auto stride = static_cast<std::size_t>(next.slot_stride());
    for (SequenceId s = 0; s < next.slots(); ++s) {
      bool empty = next.is_live(s);
      for (index_t l = 0; empty && l < config_.num_layers; ++l) empty = next.layer(s, l).key.counts.length == 0;
      if (empty) std::fill_n(next.exact_data() + static_cast<std::size_t>(s) * stride, stride, exact_type{});
    }
    // Nothing can fail from here on.
    sequences_ = std::move(next);
    key_pool_ = std::move(key_pool);
    value_pool_ = std::move(value_pool);
  }

  // ---- accounting ------------------------------------------------------------------------

  /// Bytes held for live sequences: key and value blocks in use (a block shared by forks counts
  /// once, padding included) plus the sinks and windows of live sequences.
  std::size_t memory_bytes() const noexcept { return memory_usage().total(); }
  MemoryUsage memory_usage() const noexcept {
    MemoryUsage u;
    u.key_block_bytes = key_pool_.used_bytes();
    u.value_block_bytes = value_pool_.used_bytes();
    u.exact_bytes = sequences_.exact_bytes();
    return u;
  }
  /// Bytes of both pools, whether in use or not.
  std::size_t reserved_bytes() const noexcept { return key_pool_.reserved_bytes() + value_pool_.reserved_bytes(); }
  /// Key and value elements stored: sum over live sequences and layers of 2 * length * W.
  double stored_elements() const noexcept { return sequences_.stored_tokens() * static_cast<double>(width_); }
  /// memory_bytes() * 8 / stored_elements(); 0 for an empty cache.
  double bits_per_element() const noexcept {
    const double n = stored_elements();
    return n > 0 ? 8.0 * static_cast<double>(memory_bytes()) / n : 0.0;
  }

  /// Blocks per pool that hold `tokens` tokens of every layer for `sequences` sequences
  /// (each sequence's last block may be partial).
  static index_t blocks_for_tokens(index_t num_layers, index_t tokens, index_t sequences = 1) {
    return num_layers * (ceil_div<index_t>(tokens, block_tokens) + sequences);
  }

  const CacheConfig& config() const noexcept { return config_; }
  index_t width() const noexcept { return width_; }
  /// Numbers of a stored key / value row: the latent rank for CSKV, else width().
  index_t key_rank() const noexcept { return keys_.layout.width; }
  index_t value_rank() const noexcept { return values_.layout.width; }
  const StreamLayout& key_layout() const noexcept { return keys_.layout; }
  const StreamLayout& value_layout() const noexcept { return values_.layout; }
  const BlockPool& key_pool() const noexcept { return key_pool_; }
  const BlockPool& value_pool() const noexcept { return value_pool_; }
  /// The sequences: counts, block tables and the exact rows of every slot (one contiguous array).
  const SequenceTable<exact_type>& sequences() const noexcept { return sequences_; }
  /// The layer's key / value transform (channel groups, factors, clip ratio).
  StreamTransform key_transform(index_t layer) const {
    check_layer("kvq::QuantizedKVCache::key_transform", layer);
    return keys_.transform(layer);
  }
  StreamTransform value_transform(index_t layer) const {
    check_layer("kvq::QuantizedKVCache::value_transform", layer);
    return values_.transform(layer);
  }
  /// What attention needs of a layer besides paged(layer): both transforms and, for keys stored
  /// before RoPE, the cache's rotator (views into the cache: valid while it lives).
  LayerTransforms transforms(index_t layer) const {
    check_layer("kvq::QuantizedKVCache::transforms", layer);
    return {keys_.transform(layer), values_.transform(layer), Policy::pre_rope ? &rope_ : nullptr};
  }

 private:
  void check_sequence(const char* where, const char* arg, SequenceId seq) const {
    if (!is_live(seq)) {
      detail::throw_argument_error(where, arg, seq, "the id of a live sequence (add_sequence/fork, not freed)");
    }
  }
  void check_layer(const char* where, index_t layer) const {
    if (layer < 0 || layer >= config_.num_layers) {
      detail::throw_argument_error(where, "layer", layer, detail::concat("a layer in 0..", config_.num_layers - 1));
    }
  }
  template <class T>
  void check_values(const char* where, const char* arg, const StridedView<const T, 3>& x) const {
    const float limit = detail::exact_limit<exact_type>();
    for (index_t t = 0; t < x.extent(0); ++t) {
      for (index_t h = 0; h < x.extent(1); ++h) {
        for (index_t c = 0; c < x.extent(2); ++c) {
          const float value = to_float(x(t, h, c));
          if (!(value >= -limit && value <= limit)) {
            detail::throw_argument_error(where, arg, detail::concat(arg, "[", t, ", ", h, ", ", c, "] = ", value),
                                         detail::concat("finite values within +-", limit, " (the range of the cache's ",
                                                        detail::exact_label<exact_type>(), " exact storage)"),
                                         Status::kNonFiniteInput);
          }
        }
      }
    }
  }

  void check_capacity(const char* where, const char* arg, index_t key_new, index_t value_new, const std::string& what) const {
    if (key_new > key_pool_.free_blocks() || value_new > value_pool_.free_blocks()) {
      detail::throw_argument_error(
          where, arg, what,
          detail::concat("at most the free blocks of the pools: ", what, " needs ", key_new, " key and ", value_new,
                         " value blocks of ", block_tokens, " tokens; ", key_pool_.free_blocks(), " key and ",
                         value_pool_.free_blocks(), " value blocks are free of ", config_.num_blocks,
                         " (raise CacheConfig::num_blocks or free sequences)"),
          Status::kOutOfCapacity);
    }
  }

  index_t blocks_for(index_t quantized) const noexcept { return ceil_div<index_t>(quantized, block_tokens); }

  /// restore's checks of the live sequences against the window rules and the pools' ids.
  void check_bookkeeping(const char* where, const SequenceTable<exact_type>& sequences, const BlockIdAllocator& key_ids,
                         const BlockIdAllocator& value_ids) const {
    std::vector<std::int32_t> key_uses(static_cast<std::size_t>(config_.num_blocks), 0);
    std::vector<std::int32_t> value_uses(key_uses.size(), 0);
    for (SequenceId s = 0; s < sequences.slots(); ++s) {
      if (!sequences.is_live(s)) continue;
      for (index_t l = 0; l < config_.num_layers; ++l) {
        const LayerState& ls = sequences.layer(s, l);
        if (ls.key.counts.length != ls.value.counts.length) {
          detail::throw_argument_error(where, "sequences",
                                       detail::concat("sequence ", s, " layer ", l, ": ", ls.key.counts.length, " key and ",
                                                      ls.value.counts.length, " value tokens"),
                                       "keys and values of one length");
        }
        for (int stream = 0; stream < 2; ++stream) {
          const bool key = stream == 0;
          const StreamState& st = ls.stream(key);
          const WindowRule& rule = key ? key_rule_ : value_rule_;
          const index_t ring = sequences_.exact_rows().ring_capacity(key);
          const std::string what = detail::concat("sequence ", s, " layer ", l, " ", key ? "keys" : "values", ": ");
          if (st.counts.quantized < 0 || st.counts.quantized > st.counts.length - rule.sink_count(st.counts) ||
              rule.window_count(st.counts) > ring) {
            detail::throw_argument_error(where, "sequences",
                                         detail::concat(what, st.counts.length, " tokens, ", st.counts.quantized, " quantized"),
                                         detail::concat("counts of the policy's window rule (", rule.sinks, " sinks, at most ",
                                                        ring, " window tokens)"));
          }
          if (static_cast<index_t>(st.blocks.size()) != blocks_for(st.counts.quantized)) {
            detail::throw_argument_error(where, "sequences", detail::concat(what, st.blocks.size(), " blocks"),
                                         detail::concat(blocks_for(st.counts.quantized), " blocks of ", block_tokens,
                                                        " tokens for ", st.counts.quantized, " quantized tokens"));
          }
          std::vector<std::int32_t>& uses = key ? key_uses : value_uses;
          for (std::int32_t b : st.blocks) {
            if (b < 0 || b >= config_.num_blocks) {
              detail::throw_argument_error(where, "sequences", detail::concat(what, "block id ", b),
                                           detail::concat("block ids in 0..", config_.num_blocks - 1));
            }
            ++uses[static_cast<std::size_t>(b)];
          }
        }
      }
    }
    for (int stream = 0; stream < 2; ++stream) {
      const BlockIdAllocator& ids = stream == 0 ? key_ids : value_ids;
      const std::vector<std::int32_t>& uses = stream == 0 ? key_uses : value_uses;
      for (index_t b = 0; b < config_.num_blocks; ++b) {
        if (ids.refs(static_cast<std::int32_t>(b)) != uses[static_cast<std::size_t>(b)]) {
          detail::throw_argument_error(where, stream == 0 ? "key_ids" : "value_ids",
                                       detail::concat("block ", b, " with ", ids.refs(static_cast<std::int32_t>(b)),
                                                      " references"),
                                       detail::concat("the ", uses[static_cast<std::size_t>(b)],
                                                      " uses of the live sequences' block tables"));
        }
      }
    }
  }

  StreamView<exact_type> stream_view(SequenceId seq, index_t layer, bool is_key) const {
    const StreamState& st = sequences_.layer(seq, layer).stream(is_key);
    const detail::StreamSetup& setup = is_key ? keys_ : values_;
    StreamView<exact_type> v;
    v.layout = &setup.layout;
    v.codec = setup.codec;
    v.transform = setup.transform(layer);
    v.rope = is_key && Policy::pre_rope ? &rope_ : nullptr;
    v.heads = config_.num_kv_heads;
    v.rule = is_key ? key_rule_ : value_rule_;
    v.counts = st.counts;
    v.blocks = st.blocks.data();
    v.pool = is_key ? &key_pool_ : &value_pool_;
    v.sinks = sequences_.exact(seq, layer, is_key, false);
    v.ring = sequences_.exact(seq, layer, is_key, true);
    v.ring_capacity = sequences_.exact_rows().ring_capacity(is_key);
    v.exact_width = width_;
    return v;
  }

  void read_stream(SequenceId seq, index_t layer, bool is_key, float* out) const {
    check_sequence("kvq::QuantizedKVCache::read", "seq", seq);
    check_layer("kvq::QuantizedKVCache::read", layer);
    const StreamView<exact_type> v = stream_view(seq, layer, is_key);
    std::vector<float> latent(static_cast<std::size_t>(tile_tokens * v.layout->width));
    for (index_t p = 0; p < v.length();) {
      const index_t n = v.run(p, tile_tokens);
      v.read_rows(p, n, out + p * width_, width_, latent.data(), nullptr, false);
      p += n;
    }
  }

  CacheConfig config_;
  index_t width_ = 0;
  WindowRule key_rule_ = WindowRule::of<typename Policy::KeyWindow>();
  WindowRule value_rule_ = WindowRule::of<typename Policy::ValueWindow>();
  detail::StreamSetup keys_;
  detail::StreamSetup values_;
  BlockPool key_pool_;
  BlockPool value_pool_;
  RopeRotator rope_;
  SequenceTable<exact_type> sequences_;
  StreamWriter<exact_type> writer_;
};

}  // namespace kvq
