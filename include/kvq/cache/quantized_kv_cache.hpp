// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief QuantizedKVCache<Policy>: a paged, multi-sequence KV cache that stores keys and values
///        as the policy says (sinks, quantized blocks, full-precision window).
///
/// Shapes: a layer's key or value row of one token is [num_kv_heads, head_dim] (width
/// W = num_kv_heads * head_dim). Per sequence and layer the cache keeps two streams (keys,
/// values); see policy/spec.hpp for their segments and cache/window_schedule.hpp for the state
/// machine. Quantized rows live in blocks of Policy::block_tokens tokens of one layer, taken from a
/// key pool and a value pool of CacheConfig::num_blocks blocks each (allocated by the
/// constructor); sinks and windows live in per-sequence exact storage allocated by
/// add_sequence. Quantization groups never span sequences: every block belongs to one sequence
/// (fork shares full blocks, which are never written again, and copies a partial last block).
///
/// Thread safety: const member functions may run concurrently; append, add_sequence, fork and
/// free need exclusive access.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "kvq/cache/block_pool.hpp"
#include "kvq/cache/stream_view.hpp"
#include "kvq/cache/window_schedule.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/float_types.hpp"
#include "kvq/core/view.hpp"
#include "kvq/layout/block_codec.hpp"
#include "kvq/layout/stream_layout.hpp"
#include "kvq/policy/policy_traits.hpp"
#include "kvq/transform/latent.hpp"
#include "kvq/transform/rope.hpp"

namespace kvq {

/// Identifies a sequence of a cache (an index, reused after free).
using SequenceId = std::int32_t;

/// Shape and capacity of a cache.
struct CacheConfig {
  index_t num_layers = 0;
  index_t num_kv_heads = 0;
  index_t head_dim = 0;
  /// Blocks in each of the key and value pools; a block holds Policy::block_tokens tokens of one
  /// layer (all kv heads). blocks_for_tokens() sizes it.
  index_t num_blocks = 0;
  /// RoPE of the model; used only by policies that store keys before RoPE.
  RopeConfig rope{};
};

/// SKVQ channel groups of one layer, owned (see ChannelGroups for the meaning).
struct ChannelGroupsData {
  std::vector<std::int32_t> permutation;
  std::vector<std::int32_t> boundaries;
  bool empty() const noexcept { return permutation.empty() && boundaries.empty(); }
  ChannelGroups view() const noexcept {
    return {{permutation.data(), permutation.size()}, {boundaries.data(), boundaries.size()}};
  }
};

/// Per-layer data a policy may need: SKVQ channel groups (empty vectors: identity order with
/// equal groups) and CSKV latent factors (required by latent policies).
struct CacheCalibration {
  std::vector<ChannelGroupsData> key_groups;    ///< [num_layers] or empty
  std::vector<ChannelGroupsData> value_groups;  ///< [num_layers] or empty
  std::vector<LatentFactors> latent;            ///< [num_layers] or empty
};

/// Where a cache's bytes are (memory_usage()).
struct MemoryUsage {
  std::size_t key_block_bytes = 0;    ///< key blocks in use
  std::size_t value_block_bytes = 0;  ///< value blocks in use
  std::size_t exact_bytes = 0;        ///< sinks and windows of live sequences
  std::size_t total() const noexcept { return key_block_bytes + value_block_bytes + exact_bytes; }
};

namespace detail {

/// Equal groups of about `group` channels over `width`: max(1, round(width / group)) groups,
/// sizes differing by at most one, identity order.
inline ChannelGroupsData equal_channel_groups(index_t width, index_t group) {
  index_t count = (width + group / 2) / group;
  if (count < 1) count = 1;
  ChannelGroupsData d;
  d.permutation.resize(static_cast<std::size_t>(width));
  for (index_t c = 0; c < width; ++c) d.permutation[static_cast<std::size_t>(c)] = static_cast<std::int32_t>(c);
  for (index_t g = 0; g <= count; ++g) {
    d.boundaries.push_back(static_cast<std::int32_t>(g * width / count));
  }
  return d;
}

inline bool is_uniform_identity(const ChannelGroupsData& d, index_t group) {
  for (std::size_t c = 0; c < d.permutation.size(); ++c) {
    if (d.permutation[c] != static_cast<std::int32_t>(c)) return false;
  }
  for (std::size_t g = 0; g < d.boundaries.size(); ++g) {
    if (d.boundaries[g] != static_cast<std::int32_t>(static_cast<index_t>(g) * group)) return false;
  }
  return true;
}

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

  explicit QuantizedKVCache(const CacheConfig& config, CacheCalibration calibration = {})
      : config_(config), calibration_(std::move(calibration)) {
    constexpr const char* where = "kvq::QuantizedKVCache";
    if (config.num_layers <= 0) detail::throw_argument_error(where, "num_layers", config.num_layers, "num_layers > 0");
    if (config.num_kv_heads <= 0) detail::throw_argument_error(where, "num_kv_heads", config.num_kv_heads, "num_kv_heads > 0");
    if (config.head_dim <= 0 || config.head_dim % 2 != 0) {
      detail::throw_argument_error(where, "head_dim", config.head_dim, "a positive even head_dim");
    }
    if (config.num_blocks < 0 || config.num_blocks > std::numeric_limits<std::int32_t>::max()) {
      detail::throw_argument_error(where, "num_blocks", config.num_blocks, "0 <= num_blocks < 2^31");
    }
    width_ = config.num_kv_heads * config.head_dim;
    if constexpr (Traits::latent) {
      using L = typename Policy::Latent;
      key_rank_ = config.num_kv_heads * latent_head_rank(config.head_dim, L::key_percent);
      value_rank_ = config.num_kv_heads * latent_head_rank(config.head_dim, L::value_percent);
      check_latent(where);
    } else {
      key_rank_ = width_;
      value_rank_ = width_;
      if (!calibration_.latent.empty()) {
        detail::throw_argument_error(where, "calibration.latent",
                                     detail::concat(calibration_.latent.size(), " layers of factors"),
                                     "no latent factors: " + Policy::name() + " is not a latent (CSKV) policy");
      }
    }
    key_layout_ = make_layout<KeyStream>(key_rank_, "key", calibration_.key_groups, key_groups_);
    value_layout_ = make_layout<ValueStream>(value_rank_, "value", calibration_.value_groups, value_groups_);
    key_pool_ = BlockPool(key_layout_.block_bytes, config.num_blocks);
    value_pool_ = BlockPool(value_layout_.block_bytes, config.num_blocks);
    rope_ = RopeRotator(config.head_dim, config.rope, tile_tokens);
    const index_t staging_rows = std::max<index_t>(std::max<index_t>(key_rule_.chunk, value_rule_.chunk), tile_tokens);
    staging_.resize(static_cast<std::size_t>(staging_rows * width_));
    latent_staging_.resize(static_cast<std::size_t>(staging_rows * std::max(key_rank_, value_rank_)));
  }

  // ---- sequences -------------------------------------------------------------------------

  /// Starts an empty sequence and returns its id. Allocates its sinks and windows.
  SequenceId add_sequence() {
    SequenceId id = 0;
    while (id < static_cast<SequenceId>(sequences_.size()) && sequences_[static_cast<std::size_t>(id)].live) ++id;
    if (id == static_cast<SequenceId>(sequences_.size())) sequences_.emplace_back();
    Sequence& s = sequences_[static_cast<std::size_t>(id)];
    s.live = true;
    s.layers.assign(static_cast<std::size_t>(config_.num_layers), LayerState{});
    s.exact.assign(static_cast<std::size_t>(config_.num_layers * exact_layer_stride()), exact_type{});
    return id;
  }

  /// A new sequence with the contents of `source`: full blocks are shared, a partial last block
  /// and the exact storage are copied. Throws kOutOfCapacity (cache unchanged) when the pools
  /// cannot hold the copied partial blocks.
  SequenceId fork(SequenceId source) {
    constexpr const char* where = "kvq::QuantizedKVCache::fork";
    check_sequence(where, "source", source);
    index_t key_partial = 0;
    index_t value_partial = 0;
    for (const LayerState& ls : sequences_[static_cast<std::size_t>(source)].layers) {
      key_partial += ls.key.counts.quantized % block_tokens != 0;
      value_partial += ls.value.counts.quantized % block_tokens != 0;
    }
    check_capacity(where, "source", key_partial, value_partial, "copies of partially filled blocks");
    const SequenceId id = add_sequence();
    Sequence& dst = sequences_[static_cast<std::size_t>(id)];
    const Sequence& src = sequences_[static_cast<std::size_t>(source)];
    dst.exact = src.exact;
    for (std::size_t l = 0; l < dst.layers.size(); ++l) {
      fork_stream(src.layers[l].key, dst.layers[l].key, key_pool_);
      fork_stream(src.layers[l].value, dst.layers[l].value, value_pool_);
    }
    return id;
  }

  /// Ends a sequence: its blocks return to the pools (when no fork shares them) and its exact
  /// storage is released.
  void free(SequenceId seq) {
    check_sequence("kvq::QuantizedKVCache::free", "seq", seq);
    Sequence& s = sequences_[static_cast<std::size_t>(seq)];
    for (LayerState& ls : s.layers) {
      for (std::int32_t b : ls.key.blocks) key_pool_.release(b);
      for (std::int32_t b : ls.value.blocks) value_pool_.release(b);
    }
    s = Sequence{};
  }

  bool is_live(SequenceId seq) const noexcept {
    return seq >= 0 && seq < static_cast<SequenceId>(sequences_.size()) && sequences_[static_cast<std::size_t>(seq)].live;
  }

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
    check_quantizable<KeyStream>(where, "k", seq, layer, /*is_key=*/true, k);
    check_quantizable<ValueStream>(where, "v", seq, layer, /*is_key=*/false, v);
    LayerState& ls = sequences_[static_cast<std::size_t>(seq)].layers[static_cast<std::size_t>(layer)];
    const StreamCounts key_after = key_rule_.after_append(ls.key.counts, n);
    const StreamCounts value_after = value_rule_.after_append(ls.value.counts, n);
    const index_t key_new = blocks_for(key_after.quantized) - static_cast<index_t>(ls.key.blocks.size());
    const index_t value_new = blocks_for(value_after.quantized) - static_cast<index_t>(ls.value.blocks.size());
    check_capacity(where, key_new > key_pool_.free_blocks() ? "k" : "v", key_new, value_new,
                   detail::concat("an append of ", n, " tokens"));

    for (index_t i = 0; i < key_new; ++i) ls.key.blocks.push_back(key_pool_.allocate());
    for (index_t i = 0; i < value_new; ++i) ls.value.blocks.push_back(value_pool_.allocate());
    try {
      flush<KeyStream>(where, "k", seq, layer, /*is_key=*/true, ls.key, key_after, k);
      flush<ValueStream>(where, "v", seq, layer, /*is_key=*/false, ls.value, value_after, v);
    } catch (...) {
      for (index_t i = 0; i < key_new; ++i) { key_pool_.release(ls.key.blocks.back()); ls.key.blocks.pop_back(); }
      for (index_t i = 0; i < value_new; ++i) { value_pool_.release(ls.value.blocks.back()); ls.value.blocks.pop_back(); }
      throw;
    }
    store_exact(seq, layer, true, ls.key.counts, key_after, k);
    store_exact(seq, layer, false, ls.value.counts, value_after, v);
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
    return layer_state(seq, layer).key.counts.length;
  }
  /// Key / value token counts of a layer (see StreamCounts; sinks are min(length, sinks)).
  StreamCounts key_counts(SequenceId seq, index_t layer) const {
    check_sequence("kvq::QuantizedKVCache::key_counts", "seq", seq);
    check_layer("kvq::QuantizedKVCache::key_counts", layer);
    return layer_state(seq, layer).key.counts;
  }
  StreamCounts value_counts(SequenceId seq, index_t layer) const {
    check_sequence("kvq::QuantizedKVCache::value_counts", "seq", seq);
    check_layer("kvq::QuantizedKVCache::value_counts", layer);
    return layer_state(seq, layer).value.counts;
  }
  const WindowRule& key_rule() const noexcept { return key_rule_; }
  const WindowRule& value_rule() const noexcept { return value_rule_; }

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

  /// The keys as attention sees them before RoPE is applied, out [length, num_kv_heads,
  /// head_dim] row-major: exact rows as stored, quantized rows dequantized (reconstructed from
  /// the latent for CSKV). Pre-RoPE policies return un-rotated keys.
  void read_keys(SequenceId seq, index_t layer, float* out) const { read_stream(seq, layer, true, out); }
  /// The values as attention sees them, out [length, num_kv_heads, head_dim].
  void read_values(SequenceId seq, index_t layer, float* out) const { read_stream(seq, layer, false, out); }

  // ---- accounting ------------------------------------------------------------------------

  /// Bytes held for live sequences: key and value blocks in use (a block shared by forks counts
  /// once, padding included) plus the sinks and windows of live sequences.
  std::size_t memory_bytes() const noexcept { return memory_usage().total(); }
  MemoryUsage memory_usage() const noexcept {
    MemoryUsage u;
    u.key_block_bytes = key_pool_.used_bytes();
    u.value_block_bytes = value_pool_.used_bytes();
    for (const Sequence& s : sequences_) u.exact_bytes += s.exact.size() * sizeof(exact_type);
    return u;
  }
  /// Bytes of both pools, whether in use or not.
  std::size_t reserved_bytes() const noexcept { return key_pool_.reserved_bytes() + value_pool_.reserved_bytes(); }
  /// Key and value elements stored: sum over live sequences and layers of 2 * length * W.
  double stored_elements() const noexcept {
    double n = 0;
    for (const Sequence& s : sequences_) {
      for (const LayerState& ls : s.layers) n += static_cast<double>(ls.key.counts.length + ls.value.counts.length);
    }
    return n * static_cast<double>(width_);
  }
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
  index_t key_rank() const noexcept { return key_rank_; }
  index_t value_rank() const noexcept { return value_rank_; }
  const StreamLayout& key_layout() const noexcept { return key_layout_; }
  const StreamLayout& value_layout() const noexcept { return value_layout_; }
  const BlockPool& key_pool() const noexcept { return key_pool_; }
  const BlockPool& value_pool() const noexcept { return value_pool_; }
  const RopeRotator& rope() const noexcept { return rope_; }
  /// CSKV factors of a layer (latent policies only).
  const LatentFactors& latent_factors(index_t layer) const { return calibration_.latent[static_cast<std::size_t>(layer)]; }

 private:
  struct StreamState {
    StreamCounts counts{};
    std::vector<std::int32_t> blocks;
  };
  struct LayerState {
    StreamState key;
    StreamState value;
  };
  struct Sequence {
    bool live = false;
    std::vector<LayerState> layers;
    /// Per layer: key sinks [Sk, W], key ring [Ck, W], value sinks [Sv, W], value ring [Cv, W].
    std::vector<exact_type> exact;
  };

  static constexpr index_t key_ring_capacity = Policy::KeyWindow::window_capacity;
  static constexpr index_t value_ring_capacity = Policy::ValueWindow::window_capacity;

  index_t exact_layer_stride() const noexcept {
    return (key_rule_.sinks + key_ring_capacity + value_rule_.sinks + value_ring_capacity) * width_;
  }
  index_t exact_offset(index_t layer, bool is_key, bool ring) const noexcept {
    index_t rows = is_key ? 0 : key_rule_.sinks + key_ring_capacity;
    if (ring) rows += is_key ? key_rule_.sinks : value_rule_.sinks;
    return layer * exact_layer_stride() + rows * width_;
  }

  template <class Stream>
  StreamLayout make_layout(index_t width, const char* which, const std::vector<ChannelGroupsData>& given,
                           std::vector<ChannelGroupsData>& groups) {
    constexpr const char* where = "kvq::QuantizedKVCache";
    if constexpr (!Stream::quantized) {
      if (!given.empty()) {
        detail::throw_argument_error(where, which == std::string("key") ? "calibration.key_groups" : "calibration.value_groups",
                                     detail::concat(given.size(), " layers of channel groups"),
                                     "none: the stream is stored exactly");
      }
      groups.assign(static_cast<std::size_t>(config_.num_layers), ChannelGroupsData{});
      return make_exact_layout(block_tokens, width, sizeof(typename Stream::value_type));
    } else {
      MatrixQuantSpec spec;
      spec.bits = Stream::bits;
      spec.axis = Stream::axis;
      spec.clip = Stream::clip;
      spec.meta = Stream::meta;
      spec.group_size = Stream::group_size == kGroupPerHead ? width / config_.num_kv_heads : Stream::group_size;
      const std::string arg = std::string("calibration.") + which + "_groups";
      if constexpr (Stream::reorderable) {
        if (!given.empty() && given.size() != static_cast<std::size_t>(config_.num_layers)) {
          detail::throw_argument_error(where, arg.c_str(), detail::concat(given.size(), " layers"),
                                       detail::concat("none or one per layer (", config_.num_layers, ")"));
        }
        const ChannelGroupsData equal = detail::equal_channel_groups(width, spec.group_size);
        groups.assign(static_cast<std::size_t>(config_.num_layers), equal);
        for (std::size_t l = 0; l < given.size(); ++l) {
          if (!given[l].empty()) groups[l] = given[l];
          if (groups[l].boundaries.size() != equal.boundaries.size()) {
            detail::throw_argument_error(where, arg.c_str(),
                                         detail::concat("layer ", l, ": ", static_cast<index_t>(groups[l].boundaries.size()) - 1, " groups"),
                                         detail::concat(static_cast<index_t>(equal.boundaries.size()) - 1,
                                                        " groups (round(width / group_size), fixed by the block layout)"));
          }
          MatrixQuantSpec check = spec;
          check.channel_groups = groups[l].view();
          try {
            plan_matrix(1, width, check);  // validates the permutation and boundaries
          } catch (const Error& e) {
            detail::throw_argument_error(where, arg.c_str(), detail::concat("layer ", l, ": ", e.what()),
                                         detail::concat("channel groups of the layer row (", width, " channels)"),
                                         e.status());
          }
        }
        if (std::all_of(groups.begin(), groups.end(), [&](const ChannelGroupsData& g) {
              return width % spec.group_size == 0 && detail::is_uniform_identity(g, spec.group_size);
            })) {
          groups.assign(static_cast<std::size_t>(config_.num_layers), ChannelGroupsData{});
        }
        spec.channel_groups = groups.front().view();
      } else {
        if (!given.empty()) {
          detail::throw_argument_error(where, arg.c_str(), detail::concat(given.size(), " layers of channel groups"),
                                       "none: " + Policy::name() + " does not reorder channels");
        }
        groups.assign(static_cast<std::size_t>(config_.num_layers), ChannelGroupsData{});
        const index_t line = Stream::axis == GroupAxis::kTokens ? block_tokens : width;
        if (spec.group_size <= 0 || line % spec.group_size != 0) {
          detail::throw_argument_error(where, "head_dim", config_.head_dim,
                                       detail::concat("a layer row (num_kv_heads * head_dim = ", width, ") that ",
                                                      which, " groups of ", spec.group_size, " channels divide"));
        }
      }
      return make_quantized_layout(block_tokens, width, spec);
    }
  }

  void check_latent(const char* where) const {
    if (calibration_.latent.size() != static_cast<std::size_t>(config_.num_layers)) {
      detail::throw_argument_error(where, "calibration.latent", detail::concat(calibration_.latent.size(), " layers of factors"),
                                   detail::concat("latent factors for each of the ", config_.num_layers,
                                                  " layers (" + Policy::name() + " stores low-rank latents; see kvq/transform/latent.hpp)"));
    }
    for (std::size_t l = 0; l < calibration_.latent.size(); ++l) {
      const LatentFactors& f = calibration_.latent[l];
      const auto w = static_cast<std::size_t>(width_);
      const bool ok = f.width == width_ && f.key_rank == key_rank_ && f.value_rank == value_rank_ &&
                      f.key_down.size() == w * static_cast<std::size_t>(key_rank_) &&
                      f.key_up.size() == w * static_cast<std::size_t>(key_rank_) &&
                      f.value_down.size() == w * static_cast<std::size_t>(value_rank_) &&
                      f.value_up.size() == w * static_cast<std::size_t>(value_rank_);
      if (!ok) {
        detail::throw_argument_error(where, "calibration.latent",
                                     detail::concat("layer ", l, ": width ", f.width, ", ranks ", f.key_rank, "/", f.value_rank,
                                                    ", matrices of ", f.key_down.size(), "/", f.key_up.size(), "/",
                                                    f.value_down.size(), "/", f.value_up.size(), " floats"),
                                     detail::concat("width ", width_, ", ranks ", key_rank_, "/", value_rank_,
                                                    " and matrices [width, rank] / [rank, width]"));
      }
      for (const auto* m : {&f.key_down, &f.key_up, &f.value_down, &f.value_up}) {
        for (float x : *m) {
          if (!std::isfinite(x)) {
            detail::throw_argument_error(where, "calibration.latent", detail::concat("layer ", l, ": a factor entry ", x),
                                         "finite factors", Status::kNonFiniteInput);
          }
        }
      }
    }
  }

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

  /// FP8 metadata (max 448) cannot hold every group of values in the exact type's range. A
  /// per-token group depends on its own token only, so a token past the sinks whose groups would
  /// overflow is rejected by the append that brings it (kMetadataOverflow), not by a later append
  /// when it leaves the window (which would leave the sequence unable to take any token).
  template <class Stream, class T>
  void check_quantizable(const char* where, const char* arg, SequenceId seq, index_t layer, bool is_key,
                         const StridedView<const T, 3>& x) {
    if constexpr (Stream::quantized && !Traits::latent) {
      if constexpr (Stream::axis == GroupAxis::kChannels && Stream::meta == MetaFormat::kFp8E4M3) {
        const StreamLayout& layout = is_key ? key_layout_ : value_layout_;
        MatrixQuantSpec spec = layout.spec;
        spec.channel_groups = stream_view(seq, layer, is_key).groups;
        float* row = staging_.data();
        const index_t base = layer_state(seq, layer).key.counts.length;
        detail::dispatch_stream(layout, [&](auto bits, auto meta) {
          constexpr Bits B = decltype(bits)::value;
          using Meta = decltype(meta);
          const WindowRule& rule = is_key ? key_rule_ : value_rule_;
          for (index_t t = 0; t < x.extent(0); ++t) {
            if (base + t < rule.sinks) continue;  // sinks stay exact
            load_input_row(x, t, row);
            for (index_t g = 0; g < layout.matrix.groups_per_line; ++g) {
              const detail::GroupSpan span = detail::group_span(spec, g);
              GroupParams<Meta> p{};
              QuantGrid grid{};
              const Status s = spec.channel_groups.empty()
                                   ? plan_group<B>(ContiguousLoader<float>{row + span.start}, span.length, spec.clip, &p, &grid)
                                   : plan_group<B>(GatherLoader<float>{row, spec.channel_groups.permutation.data() + span.start, 1},
                                                   span.length, spec.clip, &p, &grid);
              if (s != Status::kOk) {
                detail::throw_argument_error(
                    where, arg, detail::concat(arg, "[", t, "] (token ", base + t, " of layer ", layer, ")"),
                    detail::concat("values whose group scale and zero-point fit the stream's ", meta_label(spec.meta),
                                   " metadata (the group at channel slot ", span.start, " overflows)"),
                    s);
              }
            }
          }
          return 0;
        });
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

  const LayerState& layer_state(SequenceId seq, index_t layer) const {
    return sequences_[static_cast<std::size_t>(seq)].layers[static_cast<std::size_t>(layer)];
  }

  StreamView<exact_type> stream_view(SequenceId seq, index_t layer, bool is_key) const {
    const Sequence& s = sequences_[static_cast<std::size_t>(seq)];
    const LayerState& ls = s.layers[static_cast<std::size_t>(layer)];
    const StreamState& st = is_key ? ls.key : ls.value;
    StreamView<exact_type> v;
    v.layout = is_key ? &key_layout_ : &value_layout_;
    v.groups = (is_key ? key_groups_ : value_groups_)[static_cast<std::size_t>(layer)].view();
    if (v.groups.permutation.empty()) v.groups = {};
    v.rule = is_key ? key_rule_ : value_rule_;
    v.counts = st.counts;
    v.blocks = st.blocks.data();
    v.pool = is_key ? &key_pool_ : &value_pool_;
    v.sinks = s.exact.data() + exact_offset(layer, is_key, false);
    v.ring = s.exact.data() + exact_offset(layer, is_key, true);
    v.ring_capacity = is_key ? key_ring_capacity : value_ring_capacity;
    v.exact_width = width_;
    return v;
  }

  /// Quantizes positions [sinks + before.quantized, sinks + after.quantized) into the stream's
  /// blocks (already allocated). Reads the window ring and the input; writes only rows past
  /// the stream's current end.
  template <class Stream, class T>
  void flush(const char* where, const char* arg, SequenceId seq, index_t layer, bool is_key, const StreamState& st,
             const StreamCounts& after, const StridedView<const T, 3>& x) {
    const StreamCounts& before = st.counts;
    if (after.quantized == before.quantized) return;
    const StreamView<exact_type> view = stream_view(seq, layer, is_key);
    const WindowRule& rule = is_key ? key_rule_ : value_rule_;
    const StreamLayout& layout = is_key ? key_layout_ : value_layout_;
    BlockPool& pool = is_key ? key_pool_ : value_pool_;
    const index_t staging_rows = static_cast<index_t>(staging_.size()) / width_;
    index_t q = before.quantized;
    while (q < after.quantized) {
      const index_t row = q % block_tokens;
      index_t n = std::min({after.quantized - q, block_tokens - row, staging_rows});
      if constexpr (Stream::quantized) {
        if (Stream::axis == GroupAxis::kTokens) n -= n % layout.spec.group_size;  // whole groups
      }
      for (index_t r = 0; r < n; ++r) {
        const index_t p = rule.sinks + q + r;
        float* dst = staging_.data() + r * width_;
        if (p < before.length) {
          const exact_type* src = view.exact_rows(p);
          for (index_t c = 0; c < width_; ++c) dst[c] = to_float(src[c]);
        } else {
          load_input_row(x, p - before.length, dst);
        }
      }
      std::uint8_t* block = pool.data(st.blocks[static_cast<std::size_t>(q / block_tokens)]);
      if constexpr (!Stream::quantized) {
        encode_exact_rows<typename Stream::value_type>(layout, block, row, staging_.data(), width_, n);
      } else {
        const float* rows = staging_.data();
        index_t stride = width_;
        if constexpr (Traits::latent) {
          const LatentFactors& f = latent_factors(layer);
          stride = is_key ? key_rank_ : value_rank_;
          matmul_rows(staging_.data(), n, width_, width_, is_key ? f.key_down.data() : f.value_down.data(), stride,
                      latent_staging_.data(), stride);
          rows = latent_staging_.data();
        }
        EncodeFailure failure;
        const ChannelGroups groups = view.groups;
        const Status s = encode_rows(layout, groups, block, row, rows, stride, n, &failure);
        if (s != Status::kOk) {
          const index_t p = rule.sinks + q + (failure.row - row);
          detail::throw_argument_error(
              where, arg, detail::concat("token ", p, " of layer ", layer, " (", p < before.length ? "from the window" : "from this append", ")"),
              s == Status::kMetadataOverflow
                  ? detail::concat("values whose group scale and zero-point fit the stream's ", meta_label(layout.spec.meta),
                                   " metadata (group at channel ", failure.channel, " overflows)")
                  : detail::concat("a quantizable group (status ", static_cast<int>(s), ")"),
              s);
        }
      }
      q += n;
    }
  }

  template <class T>
  static void load_input_row(const StridedView<const T, 3>& x, index_t t, float* dst) noexcept {
    const index_t heads = x.extent(1);
    const index_t dim = x.extent(2);
    for (index_t h = 0; h < heads; ++h) {
      for (index_t c = 0; c < dim; ++c) dst[h * dim + c] = to_float(from_float<exact_type>(to_float(x(t, h, c))));
    }
  }

  /// Writes the appended tokens that stay exact (sinks, window) into the sequence's storage.
  template <class T>
  void store_exact(SequenceId seq, index_t layer, bool is_key, const StreamCounts& before, const StreamCounts& after,
                   const StridedView<const T, 3>& x) {
    Sequence& s = sequences_[static_cast<std::size_t>(seq)];
    const WindowRule& rule = is_key ? key_rule_ : value_rule_;
    const index_t capacity = is_key ? key_ring_capacity : value_ring_capacity;
    exact_type* sinks = s.exact.data() + exact_offset(layer, is_key, false);
    exact_type* ring = s.exact.data() + exact_offset(layer, is_key, true);
    for (index_t p = before.length; p < after.length; ++p) {
      exact_type* dst;
      if (p < rule.sinks) {
        dst = sinks + p * width_;
      } else if (p >= rule.sinks + after.quantized) {
        dst = ring + ((p - rule.sinks) % capacity) * width_;
      } else {
        continue;  // quantized by flush
      }
      const index_t t = p - before.length;
      for (index_t h = 0; h < x.extent(1); ++h) {
        for (index_t c = 0; c < x.extent(2); ++c) dst[h * x.extent(2) + c] = from_float<exact_type>(to_float(x(t, h, c)));
      }
    }
  }

  void fork_stream(const StreamState& src, StreamState& dst, BlockPool& pool) {
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

  void read_stream(SequenceId seq, index_t layer, bool is_key, float* out) const {
    check_sequence("kvq::QuantizedKVCache::read", "seq", seq);
    check_layer("kvq::QuantizedKVCache::read", layer);
    const StreamView<exact_type> v = stream_view(seq, layer, is_key);
    const index_t rank = v.layout->width;
    std::vector<float> latent(static_cast<std::size_t>(tile_tokens * rank));
    for (index_t p = 0; p < v.length();) {
      const index_t n = v.run(p, tile_tokens);
      float* dst = out + p * width_;
      if (v.segment(p) != Segment::kQuantized) {
        exact_rows_to_float(v.exact_rows(p), n, width_, dst, width_);
      } else if constexpr (Traits::latent) {
        v.decode_stored(p, n, latent.data(), rank);
        const LatentFactors& f = latent_factors(layer);
        matmul_rows(latent.data(), n, rank, rank, is_key ? f.key_up.data() : f.value_up.data(), width_, dst, width_);
      } else {
        v.decode_stored(p, n, dst, width_);
      }
      p += n;
    }
  }

  CacheConfig config_;
  CacheCalibration calibration_;
  index_t width_ = 0;
  index_t key_rank_ = 0;
  index_t value_rank_ = 0;
  WindowRule key_rule_ = WindowRule::of<typename Policy::KeyWindow>();
  WindowRule value_rule_ = WindowRule::of<typename Policy::ValueWindow>();
  StreamLayout key_layout_;
  StreamLayout value_layout_;
  std::vector<ChannelGroupsData> key_groups_;    // [num_layers]; empty entries: uniform groups
  std::vector<ChannelGroupsData> value_groups_;
  BlockPool key_pool_;
  BlockPool value_pool_;
  RopeRotator rope_;
  std::vector<Sequence> sequences_;
  std::vector<float> staging_;         // [rows, W] rows being quantized
  std::vector<float> latent_staging_;  // [rows, rank] their latents (CSKV)
};

}  // namespace kvq
