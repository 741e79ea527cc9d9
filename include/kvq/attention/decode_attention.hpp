// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief CPU decode attention over a paged layer (PagedKVParams) or a QuantizedKVCache, fused
///        with dequantization.
///
/// There is one implementation: it reads one slot of a PagedKVParams (layout/paged_params.hpp)
/// through PagedStreamView (cache/stream_view.hpp), every block address from
/// PagedStream::block_of and every exact row from PagedStream::exact_row, with the layer's
/// LayerTransforms (SKVQ channel groups, CSKV factors, the RoPE rotator of pre-RoPE keys).
/// attend(cache, seq, layer, ...) is a wrapper: it describes that one sequence as a one-slot
/// PagedKVParams in O(1) without allocating (export_sequence_paged) and runs the same code, so
/// both overloads give the same bits. attend<Policy>(kv, slot, transforms, ...) takes any host
/// PagedKVParams, e.g. QuantizedKVCache::paged(layer).params() with cache.transforms(layer),
/// and checks it against Policy before reading it.
///
/// out[h] = softmax(scale * q[h] · K^T) · V for every query head h of one sequence and layer,
/// K and V as the cache holds them (sinks, quantized blocks, window). One online-softmax pass
/// runs over tiles of at most tile_tokens tokens: each tile's keys and values are dequantized
/// into a small per-thread buffer (never the whole sequence), RoPE'd by position for pre-RoPE
/// policies, and used by all query heads of each GQA group at once. CSKV values are absorbed:
/// sum_t p_t (c_t · B_V) = (sum_t p_t c_t) · B_V. With a ThreadPool the sequence is split
/// across threads (split-KV) and the partial softmax states are merged exactly.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "kvq/attention/cpu_kernels.hpp"
#include "kvq/attention/softmax_math.hpp"
#include "kvq/cache/paged_export.hpp"
#include "kvq/cache/quantized_kv_cache.hpp"
#include "kvq/cache/stream_view.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/thread_pool.hpp"
#include "kvq/core/view.hpp"

namespace kvq {

/// Options of attend().
struct AttentionOptions {
  /// Score scale; 0 means 1 / sqrt(head_dim).
  float scale = 0.0f;
  /// Split the sequence across this pool's threads (nullptr: the calling thread only).
  ThreadPool* pool = nullptr;
  /// Shortest piece of a sequence worth a thread of its own.
  index_t min_split_tokens = 1024;
};

namespace detail {

/// Running softmax state of every query head over a range of tokens.
struct SoftmaxState {
  std::vector<float> max;         // [Hq]
  std::vector<float> sum;         // [Hq]
  std::vector<float> acc;         // [Hq, head_dim]
  std::vector<float> acc_latent;  // [Hq, value_rank] (CSKV)

  void reset(index_t heads, index_t dim, index_t latent) {
    max.assign(static_cast<std::size_t>(heads), -std::numeric_limits<float>::infinity());
    sum.assign(static_cast<std::size_t>(heads), 0.0f);
    acc.assign(static_cast<std::size_t>(heads * dim), 0.0f);
    acc_latent.assign(static_cast<std::size_t>(heads * latent), 0.0f);
  }
};

/// Per-thread tile buffers; they grow to the largest shape seen and are then reused.
struct AttentionWorkspace {
  std::vector<float> query;    // [Hq, head_dim], pre-scaled
  std::vector<float> keys;     // [tile, W]
  std::vector<float> values;   // [tile, W]
  std::vector<float> latent;   // [tile, rank]
  std::vector<float> scores;   // [Hq, tile]
  std::vector<double> rope;    // [head_dim]
  SoftmaxState state;

  static AttentionWorkspace& local() {
    thread_local AttentionWorkspace w;
    return w;
  }
  static void fit(std::vector<float>& v, index_t n) {
    if (v.size() < static_cast<std::size_t>(n)) v.resize(static_cast<std::size_t>(n));
  }
};

/// Attention of one slot of a PagedKVParams (checked by the caller) with the layer's transforms.
template <class Policy>
class DecodeAttention {
  using Cache = QuantizedKVCache<Policy>;
  using E = typename Cache::exact_type;
  using KeyView = PagedStreamView<typename Policy::KeyStream, E>;
  using ValueView = PagedStreamView<typename Policy::ValueStream, E>;
  static constexpr index_t tile = Cache::tile_tokens;
  /// Values stored as latents: accumulated in latent space, taken through B_V once at the end.
  static constexpr bool absorbs_values =
      policy_traits<Policy>::ValueTransform::kind == TransformKind::kLatentProjection;
  /// Per-channel quantized keys stored as they come, after RoPE: scored straight from
  /// channel-major tiles.
  static constexpr bool columns_path = [] {
    if constexpr (policy_traits<Policy>::key_quantized) {
      return Policy::KeyStream::axis == GroupAxis::kTokens &&
             policy_traits<Policy>::KeyTransform::kind == TransformKind::kIdentity && !Policy::pre_rope;
    } else {
      return false;
    }
  }();

 public:
  DecodeAttention(const PagedKVParams& kv, std::int32_t slot, const LayerTransforms& t, const float* query)
      : keys_(kv.keys, slot, kv.lengths[slot], kv.num_kv_heads, kv.head_dim, t.keys, Policy::pre_rope ? t.rope : nullptr),
        values_(kv.values, slot, kv.lengths[slot], kv.num_kv_heads, kv.head_dim, t.values, nullptr),
        heads_(kv.num_kv_heads),
        dim_(kv.head_dim),
        width_(kv.width()),
        query_(query) {}

  void set_query_heads(index_t query_heads) noexcept {
    query_heads_ = query_heads;
    group_ = query_heads / heads_;
  }
  index_t length() const noexcept { return keys_.length(); }
  index_t value_rank() const noexcept { return absorbs_values ? values_.layout.width : 0; }

  /// Folds tokens [begin, end) into state (which the caller has reset).
  void run(index_t begin, index_t end, AttentionWorkspace& w, SoftmaxState& state) const {
    AttentionWorkspace::fit(w.keys, tile * width_);
    AttentionWorkspace::fit(w.values, tile * width_);
    AttentionWorkspace::fit(w.latent, tile * std::max(keys_.layout.width, values_.layout.width));
    AttentionWorkspace::fit(w.scores, query_heads_ * tile);
    if (w.rope.size() < static_cast<std::size_t>(dim_)) w.rope.resize(static_cast<std::size_t>(dim_));
    for (index_t p = begin; p < end;) {
      const index_t n = values_.run(p, keys_.run(p, std::min(tile, end - p)));
      score(p, n, w);
      update_softmax(n, w, state);
      accumulate_values(p, n, w, state);
      p += n;
    }
  }

  /// out[h] = (acc[h] + acc_latent[h] · B_V[:, head slice]) / sum[h].
  void finish(const SoftmaxState& state, StridedView<float, 2> out) const {
    for (index_t qh = 0; qh < query_heads_; ++qh) {
      const index_t h = qh / group_;
      const float inv = 1.0f / state.sum[static_cast<std::size_t>(qh)];
      const float* acc = state.acc.data() + qh * dim_;
      for (index_t c = 0; c < dim_; ++c) {
        float v = acc[c];
        if constexpr (absorbs_values) {
          const index_t rank = values_.layout.width;
          const float* a = state.acc_latent.data() + qh * rank;
          const float* up = values_.transform.up + h * dim_ + c;
          for (index_t i = 0; i < rank; ++i) v += a[i] * up[i * width_];
        }
        out(qh, c) = v * inv;
      }
    }
  }

 private:
  /// Scores of the tile's n tokens for every query head: w.scores [Hq, tile].
  void score(index_t p, index_t n, AttentionWorkspace& w) const {
    float* k = w.keys.data();
    const bool quantized = keys_.segment(p) == Segment::kQuantized;
    if constexpr (columns_path) {
      if (quantized) {
        // Per-channel codes run along tokens: dequantize channel-major and score column-wise.
        keys_.decode_stored_transposed(p, n, k, tile);
        for (index_t h = 0; h < heads_; ++h) {
          scores_columns(query_ + h * group_ * dim_, group_, k + h * dim_ * tile, tile, n, dim_,
                         w.scores.data() + h * group_ * tile, tile);
        }
        return;
      }
    }
    keys_.read_rows(p, n, k, width_, w.latent.data(), w.rope.data(), true);
    for (index_t h = 0; h < heads_; ++h) {
      scores_rows(query_ + h * group_ * dim_, group_, k + h * dim_, width_, n, dim_,
                  w.scores.data() + h * group_ * tile, tile);
    }
  }

  /// Turns the tile's scores into weights exp(s - max) and rescales the state to the new max.
  void update_softmax(index_t n, AttentionWorkspace& w, SoftmaxState& state) const {
    for (index_t qh = 0; qh < query_heads_; ++qh) {
      float* s = w.scores.data() + qh * tile;
      const float m = state.max[static_cast<std::size_t>(qh)];
      const float tile_max = max_of(s, n);
      const float new_max = tile_max > m ? tile_max : m;
      exp_shifted(s, n, new_max);
      const float total = sum_of(s, n);
      if (new_max != m) {
        const float alpha = m == -std::numeric_limits<float>::infinity() ? 0.0f : exp_nonpositive(m - new_max);
        float* acc = state.acc.data() + qh * dim_;
        for (index_t c = 0; c < dim_; ++c) acc[c] *= alpha;
        if constexpr (absorbs_values) {
          const index_t rank = values_.layout.width;
          float* a = state.acc_latent.data() + qh * rank;
          for (index_t i = 0; i < rank; ++i) a[i] *= alpha;
        }
        state.sum[static_cast<std::size_t>(qh)] *= alpha;
        state.max[static_cast<std::size_t>(qh)] = new_max;
      }
      state.sum[static_cast<std::size_t>(qh)] += total;
    }
  }

  void accumulate_values(index_t p, index_t n, AttentionWorkspace& w, SoftmaxState& state) const {
    const bool quantized = values_.segment(p) == Segment::kQuantized;
    if constexpr (absorbs_values) {
      if (quantized) {
        const index_t rank = values_.layout.width;
        values_.decode_stored(p, n, w.latent.data(), rank);
        accumulate_rows(w.scores.data(), query_heads_, tile, w.latent.data(), rank, n, rank,
                        state.acc_latent.data(), rank);
        return;
      }
    }
    float* v = w.values.data();
    values_.read_rows(p, n, v, width_, w.latent.data(), nullptr, false);
    for (index_t h = 0; h < heads_; ++h) {
      accumulate_rows(w.scores.data() + h * group_ * tile, group_, tile, v + h * dim_, width_, n,
                      dim_, state.acc.data() + h * group_ * dim_, dim_);
    }
  }

  KeyView keys_;
  ValueView values_;
  index_t heads_;
  index_t dim_;
  index_t width_;
  const float* query_;
  index_t query_heads_ = 0;
  index_t group_ = 1;
};

/// Merges b into a: the softmax state of the union of their token ranges.
inline void merge_softmax(SoftmaxState& a, const SoftmaxState& b, index_t heads, index_t dim, index_t latent) {
  for (index_t h = 0; h < heads; ++h) {
    const float ma = a.max[static_cast<std::size_t>(h)];
    const float mb = b.max[static_cast<std::size_t>(h)];
    const float m = ma > mb ? ma : mb;
    if (m == -std::numeric_limits<float>::infinity()) continue;
    const float wa = ma == -std::numeric_limits<float>::infinity() ? 0.0f : exp_nonpositive(ma - m);
    const float wb = mb == -std::numeric_limits<float>::infinity() ? 0.0f : exp_nonpositive(mb - m);
    a.sum[static_cast<std::size_t>(h)] = a.sum[static_cast<std::size_t>(h)] * wa + b.sum[static_cast<std::size_t>(h)] * wb;
    a.max[static_cast<std::size_t>(h)] = m;
    for (index_t c = 0; c < dim; ++c) {
      a.acc[static_cast<std::size_t>(h * dim + c)] = a.acc[static_cast<std::size_t>(h * dim + c)] * wa + b.acc[static_cast<std::size_t>(h * dim + c)] * wb;
    }
    for (index_t i = 0; i < latent; ++i) {
      a.acc_latent[static_cast<std::size_t>(h * latent + i)] =
          a.acc_latent[static_cast<std::size_t>(h * latent + i)] * wa + b.acc_latent[static_cast<std::size_t>(h * latent + i)] * wb;
    }
  }
}

/// Checks q, out and the scale of one call (Hkv kv heads of head_dim) and writes q * scale to
/// w.query. Returns the number of query heads.
inline index_t prepare_query(const char* where, index_t kv_heads, index_t head_dim, StridedView<const float, 2> q,
                             StridedView<float, 2> out, const AttentionOptions& options, AttentionWorkspace& w) {
  check_view(where, "q", q, {-1, head_dim});
  const index_t query_heads = q.extent(0);
  if (query_heads < 1 || query_heads % kv_heads != 0) {
    throw_argument_error(where, "q", shape_string(q),
                         concat("[a positive multiple of num_kv_heads (", kv_heads, "), ", head_dim, "]"));
  }
  check_view(where, "out", out, {query_heads, head_dim});
  if (!(options.scale >= 0.0f) || !std::isfinite(options.scale)) {
    throw_argument_error(where, "options.scale", options.scale, "a finite scale >= 0 (0: 1/sqrt(head_dim))");
  }
  const float scale = options.scale > 0.0f ? options.scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
  AttentionWorkspace::fit(w.query, query_heads * head_dim);
  for (index_t h = 0; h < query_heads; ++h) {
    for (index_t c = 0; c < head_dim; ++c) {
      const float x = q(h, c);
      if (!std::isfinite(x)) {
        throw_argument_error(where, "q", concat("q[", h, ", ", c, "] = ", x), "finite values", Status::kNonFiniteInput);
      }
      w.query[static_cast<std::size_t>(h * head_dim + c)] = x * scale;
    }
  }
  return query_heads;
}

/// Checks the query heads, the values of a batch's queries q [B, Hq, head_dim] (shape checked by
/// the caller) and the scale, before any task runs.
inline void check_batch_query(const char* where, index_t kv_heads, index_t head_dim, StridedView<const float, 3> q,
                              const AttentionOptions& options) {
  if (q.extent(1) < 1 || q.extent(1) % kv_heads != 0) {
    throw_argument_error(where, "q", shape_string(q),
                         concat("[B, a positive multiple of num_kv_heads (", kv_heads, "), ", head_dim, "]"));
  }
  for (index_t b = 0; b < q.extent(0); ++b) {
    for (index_t h = 0; h < q.extent(1); ++h) {
      for (index_t c = 0; c < q.extent(2); ++c) {
        if (!std::isfinite(q(b, h, c))) {
          throw_argument_error(where, "q", concat("q[", b, ", ", h, ", ", c, "] = ", q(b, h, c)), "finite values",
                               Status::kNonFiniteInput);
        }
      }
    }
  }
  if (!(options.scale >= 0.0f) || !std::isfinite(options.scale)) {
    throw_argument_error(where, "options.scale", options.scale, "a finite scale >= 0 (0: 1/sqrt(head_dim))");
  }
}

/// The one attention body: slot `slot` of kv (checked, at least one token) with the query
/// prepared in w.query.
template <class Policy>
void attend_slot(const PagedKVParams& kv, std::int32_t slot, const LayerTransforms& transforms, index_t query_heads,
                 StridedView<float, 2> out, const AttentionOptions& options, AttentionWorkspace& w) {
  const index_t dim = kv.head_dim;
  DecodeAttention<Policy> run(kv, slot, transforms, w.query.data());
  run.set_query_heads(query_heads);
  const index_t length = run.length();
  const index_t latent = run.value_rank();
  const int threads = options.pool ? options.pool->size() : 1;
  const index_t splits = std::max<index_t>(1, std::min<index_t>(threads, length / std::max<index_t>(1, options.min_split_tokens)));
  w.state.reset(query_heads, dim, latent);
  if (splits == 1) {
    run.run(0, length, w, w.state);
  } else {
    // Split points on tile multiples so that every piece decodes whole tiles.
    const index_t tile = QuantizedKVCache<Policy>::tile_tokens;
    const index_t per = ceil_div(ceil_div(length, splits), tile) * tile;
    std::vector<SoftmaxState> parts(static_cast<std::size_t>(splits));
    options.pool->parallel_for(splits, [&](index_t i) {
      AttentionWorkspace& local = AttentionWorkspace::local();
      SoftmaxState& st = parts[static_cast<std::size_t>(i)];
      st.reset(query_heads, dim, latent);
      const index_t begin = std::min(length, i * per);
      const index_t end = std::min(length, begin + per);
      run.run(begin, end, local, st);
    });
    for (const SoftmaxState& st : parts) merge_softmax(w.state, st, query_heads, dim, latent);
  }
  run.finish(w.state, out);
}

inline const char* bool_label(bool b) noexcept { return b ? "true" : "false"; }
inline const char* grouping_label(GroupAxis a) noexcept {
  return a == GroupAxis::kTokens ? "per-channel (groups along tokens)" : "per-token (groups along channels)";
}

/// Checks one stream of a PagedKVParams (`arg`: "kv.keys" / "kv.values") and its transform
/// (`targ`) against Policy's stream S and window Window.
template <class Policy, class S, class Window>
void check_paged_stream(const char* where, const std::string& arg, const PagedStream& s, const PagedKVParams& kv,
                        const std::string& targ, const StreamTransform& t) {
  using E = typename policy_traits<Policy>::exact_type;
  const std::string policy = Policy::name();
  const index_t stored = static_cast<index_t>(kv.num_kv_heads) * stored_head_width<S>(kv.head_dim);
  auto field = [&](const char* f) { return arg + "." + f; };
  if (s.quantized != S::quantized) {
    throw_argument_error(where, field("quantized").c_str(), bool_label(s.quantized),
                         concat(bool_label(S::quantized), " (the stream of ", policy, ")"));
  }
  if (s.block_tokens != Policy::block_tokens) {
    throw_argument_error(where, field("block_tokens").c_str(), s.block_tokens,
                         concat(Policy::block_tokens, " (the block of ", policy, ")"));
  }
  if (s.width != stored) {
    throw_argument_error(where, field("width").c_str(), s.width,
                         concat(stored, " (numbers of a stored row of ", policy, " for num_kv_heads ", kv.num_kv_heads,
                                ", head_dim ", kv.head_dim, ")"));
  }
  if constexpr (S::quantized) {
    const BlockLayout& b = s.block;
    if (b.bits != S::bits || b.meta != S::meta || b.axis != S::axis || b.block_tokens != s.block_tokens ||
        b.width != stored || b.groups_per_line < 1) {
      throw_argument_error(where, field("block").c_str(),
                           concat(bits_label(b.bits), "-bit ", meta_label(b.meta), " ", grouping_label(b.axis), ", ",
                                  b.block_tokens, " x ", b.width, ", ", b.groups_per_line, " groups a line"),
                           concat("the block layout of ", policy, ": ", bits_label(S::bits), "-bit ", meta_label(S::meta),
                                  " ", grouping_label(S::axis), ", ", s.block_tokens, " x ", stored));
    }
    if (s.block_bytes < b.block_bytes) {
      throw_argument_error(where, field("block_bytes").c_str(), s.block_bytes,
                           concat("at least block.block_bytes (", b.block_bytes, ")"));
    }
  } else {
    const auto need = static_cast<std::uint64_t>(s.block_tokens) * static_cast<std::uint64_t>(stored) * sizeof(E);
    if (s.block_bytes < need) {
      throw_argument_error(where, field("block_bytes").c_str(), s.block_bytes,
                           concat("at least ", need, " (", s.block_tokens, " exact rows of ", stored, " numbers)"));
    }
  }
  if (s.quantized_tokens == nullptr) {
    throw_argument_error(where, field("quantized_tokens").c_str(), "nullptr", "an array of one count per slot");
  }
  if (s.sinks != Window::sinks) {
    throw_argument_error(where, field("sinks").c_str(), s.sinks, concat(Window::sinks, " (the sinks of ", policy, ")"));
  }
  if (s.ring_capacity < 0) {
    throw_argument_error(where, field("ring_capacity").c_str(), s.ring_capacity, "a ring of at least 0 rows");
  }
  // The transform.
  using Transform = typename S::transform;
  if (t.kind != Transform::kind || t.width != kv.width() || t.stored_width != stored) {
    throw_argument_error(where, targ.c_str(),
                         concat(transform_label(t.kind), " transform of width ", t.width, " -> ", t.stored_width),
                         concat(transform_label(Transform::kind), " transform of width ", kv.width(), " -> ", stored,
                                " (the stream of ", policy, ")"));
  }
  if (t.kind == TransformKind::kLatentProjection && (t.down == nullptr || t.up == nullptr)) {
    throw_argument_error(where, targ.c_str(), "latent factors nullptr", "both factors A (down) and B (up)");
  }
  if constexpr (S::quantized) {
    const bool reorder = t.kind == TransformKind::kChannelReorder;
    if (!t.groups.empty() &&
        (!reorder || t.groups.permutation.size() != static_cast<std::size_t>(stored) ||
         t.groups.boundaries.size() != static_cast<std::size_t>(s.block.groups_per_line + 1))) {
      throw_argument_error(where, (targ + ".groups").c_str(),
                           concat(t.groups.permutation.size(), " permuted channels, ", t.groups.boundaries.size(),
                                  " boundaries"),
                           reorder ? concat("none (uniform groups) or ", stored, " channels and ",
                                            s.block.groups_per_line + 1, " boundaries")
                                   : std::string("no channel groups (the stream does not reorder channels)"));
    }
  }
}

/// Checks a PagedKVParams and its transforms against Policy (the layer-wide fields).
template <class Policy>
void check_paged(const char* where, const PagedKVParams& kv, const LayerTransforms& t) {
  using E = typename policy_traits<Policy>::exact_type;
  if (kv.num_kv_heads < 1) throw_argument_error(where, "kv.num_kv_heads", kv.num_kv_heads, "at least one kv head");
  if (kv.head_dim < 1) throw_argument_error(where, "kv.head_dim", kv.head_dim, "a positive head_dim");
  if (kv.exact_bytes != static_cast<std::int32_t>(sizeof(E))) {
    throw_argument_error(where, "kv.exact_bytes", kv.exact_bytes,
                         concat(sizeof(E), " (the exact type of ", Policy::name(), ")"));
  }
  if (kv.slots < 1) throw_argument_error(where, "kv.slots", kv.slots, "the number of slots of the tables (at least 1)");
  if (kv.lengths == nullptr) throw_argument_error(where, "kv.lengths", "nullptr", "an array of one length per slot");
  check_paged_stream<Policy, typename Policy::KeyStream, typename Policy::KeyWindow>(where, "kv.keys", kv.keys, kv,
                                                                                    "transforms.keys", t.keys);
  check_paged_stream<Policy, typename Policy::ValueStream, typename Policy::ValueWindow>(where, "kv.values", kv.values, kv,
                                                                                        "transforms.values", t.values);
  if constexpr (Policy::pre_rope) {
    if (t.rope == nullptr || t.rope->head_dim() != kv.head_dim ||
        t.rope->tile_tokens() < QuantizedKVCache<Policy>::tile_tokens) {
      throw_argument_error(where, "transforms.rope",
                           t.rope == nullptr ? std::string("nullptr")
                                             : concat("a rotator of head_dim ", t.rope->head_dim(), " for runs of ",
                                                      t.rope->tile_tokens(), " tokens"),
                           concat("the RoPE rotator of the layer's keys (", Policy::name(),
                                  " stores them before RoPE): head_dim ", kv.head_dim, ", runs of at least ",
                                  QuantizedKVCache<Policy>::tile_tokens, " tokens"));
    }
  } else if (t.rope != nullptr) {
    throw_argument_error(where, "transforms.rope", "a rotator",
                         concat("nullptr (", Policy::name(), " stores keys after RoPE)"));
  }
}

/// Checks one slot's counts and tables (arg and label name it in errors: "slot" / "slots[b] = s").
template <class Policy>
void check_paged_slot(const char* where, const char* arg, const std::string& label, const PagedKVParams& kv,
                      std::int32_t slot) {
  if (slot < 0 || slot >= kv.slots) {
    throw_argument_error(where, arg, label, concat("a slot in 0..", kv.slots - 1, " (kv.slots = ", kv.slots, ")"));
  }
  const std::int32_t length = kv.lengths[slot];
  if (length < 1) {
    throw_argument_error(where, arg, concat(label, " of length ", length), "a slot with at least one token (append first)");
  }
  for (int k = 0; k < 2; ++k) {
    const PagedStream& s = k == 0 ? kv.keys : kv.values;
    const char* name = k == 0 ? "kv.keys" : "kv.values";
    const std::int32_t q = s.quantized_tokens[slot];
    const std::int32_t sinks = std::min(length, s.sinks);
    const std::int32_t window = length - sinks - q;
    if (q < 0 || window < 0 || window > s.ring_capacity) {
      throw_argument_error(where, concat(name, ".quantized_tokens").c_str(),
                           concat("quantized_tokens[", slot, "] = ", q, " of length ", length),
                           concat("a count in ", std::max(0, length - sinks - s.ring_capacity), "..", length - sinks,
                                  " (", sinks, " sinks, a window ring of ", s.ring_capacity, " rows)"));
    }
    if (length - q > 0 && s.exact == nullptr) {
      throw_argument_error(where, concat(name, ".exact").c_str(), "nullptr", concat("the exact rows of slot ", slot));
    }
    if (q == 0) continue;
    const std::int32_t blocks = (q + s.block_tokens - 1) / s.block_tokens;
    if (s.pool == nullptr || s.block_table == nullptr || s.max_blocks < blocks) {
      throw_argument_error(where, concat(name, ".block_table").c_str(),
                           concat(s.block_table == nullptr ? "nullptr" : "a table", " of ", s.max_blocks,
                                  " blocks a slot, pool ", s.pool == nullptr ? "nullptr" : "set"),
                           concat("a pool and a table row of at least ", blocks, " blocks for the ", q,
                                  " quantized rows of slot ", slot));
    }
    const std::int32_t* row = s.block_table + static_cast<std::size_t>(slot) * static_cast<std::size_t>(s.max_blocks);
    for (std::int32_t b = 0; b < blocks; ++b) {
      if (row[b] < 0) {
        throw_argument_error(where, concat(name, ".block_table").c_str(),
                             concat("block_table[", slot, "][", b, "] = ", row[b]),
                             concat("block ids >= 0 for the ", blocks, " blocks of slot ", slot));
      }
    }
  }
}

}  // namespace detail

/// Decode attention of one slot of a paged layer: the one implementation (see the file comment).
/// @tparam Policy     the policy of the cache kv describes (not deduced: kvq::attend<Policy>(...))
/// @param kv          one layer in host memory: QuantizedKVCache<Policy>::paged(layer).params(),
///                    or any PagedKVParams of the same layout (kv.slots set)
/// @param slot        the slot (sequence id of a host export) in 0..kv.slots - 1, with >= 1 token
/// @param transforms  the layer's transforms (QuantizedKVCache<Policy>::transforms(layer))
/// @param q, out      as attend() on a cache
/// Throws kvq::Error naming the argument (kv's fields, slot, transforms, q, out, options.scale)
/// when kv or the transforms do not match Policy, for a bad slot or shape, or an empty slot.
/// Checking kv costs O(blocks of the slot); attend() on a cache skips it.
template <class Policy>
void attend(const PagedKVParams& kv, std::int32_t slot, const LayerTransforms& transforms, StridedView<const float, 2> q,
            StridedView<float, 2> out, const AttentionOptions& options = {}) {
  constexpr const char* where = "kvq::attend";
  detail::check_paged<Policy>(where, kv, transforms);
  if (slot < 0 || slot >= kv.slots) {
    detail::throw_argument_error(where, "slot", slot, detail::concat("a slot in 0..", kv.slots - 1, " (kv.slots = ", kv.slots, ")"));
  }
  detail::check_paged_slot<Policy>(where, "slot", detail::concat(slot), kv, slot);
  detail::AttentionWorkspace& w = detail::AttentionWorkspace::local();
  const index_t query_heads = detail::prepare_query(where, kv.num_kv_heads, kv.head_dim, q, out, options, w);
  detail::attend_slot<Policy>(kv, slot, transforms, query_heads, out, options, w);
}

/// Decode attention of one sequence and layer.
/// @param q    [num_query_heads, head_dim] float; query head h uses kv head h / (Hq / Hkv).
///             Already RoPE'd at the query's position (for every policy).
/// @param out  [num_query_heads, head_dim] float (may not alias q)
/// Throws kvq::Error for a bad sequence, layer or shape, or an empty sequence.
/// The sequence is read as a one-slot PagedKVParams (O(1), no allocation), by the code of the
/// PagedKVParams overload.
template <class Policy>
void attend(const QuantizedKVCache<Policy>& cache, SequenceId seq, index_t layer, StridedView<const float, 2> q,
            StridedView<float, 2> out, const AttentionOptions& options = {}) {
  constexpr const char* where = "kvq::attend";
  const CacheConfig& cfg = cache.config();
  if (!cache.is_live(seq)) detail::throw_argument_error(where, "seq", seq, "the id of a live sequence");
  if (layer < 0 || layer >= cfg.num_layers) {
    detail::throw_argument_error(where, "layer", layer, detail::concat("a layer in 0..", cfg.num_layers - 1));
  }
  detail::AttentionWorkspace& w = detail::AttentionWorkspace::local();
  const index_t query_heads = detail::prepare_query(where, cfg.num_kv_heads, cfg.head_dim, q, out, options, w);
  PagedSlotCounts counts;
  const PagedKVParams kv = export_sequence_paged(cache.sequences(), seq, layer, cache.key_layout(), cache.value_layout(),
                                                 cache.key_pool(), cache.value_pool(), cache.key_rule(),
                                                 cache.value_rule(), cfg.num_kv_heads, cfg.head_dim, counts);
  if (counts.length == 0) {
    detail::throw_argument_error(where, "seq", seq, "a sequence with at least one token in this layer (append first)");
  }
  detail::attend_slot<Policy>(kv, 0, cache.transforms(layer), query_heads, out, options, w);
}

/// Decode attention of a batch of slots of a paged layer (ragged lengths), one slot per task on
/// the options' pool; the PagedKVParams counterpart of attend_batch on a cache.
/// @param slots  [B] slots of kv
/// @param q      [B, num_query_heads, head_dim] float
/// @param out    [B, num_query_heads, head_dim] float
/// kv, the transforms and every slot are validated before any output is written.
template <class Policy>
void attend_batch(const PagedKVParams& kv, Span<const std::int32_t> slots, const LayerTransforms& transforms,
                  StridedView<const float, 3> q, StridedView<float, 3> out, const AttentionOptions& options = {}) {
  constexpr const char* where = "kvq::attend_batch";
  detail::check_paged<Policy>(where, kv, transforms);
  const auto batch = static_cast<index_t>(slots.size());
  check_view(where, "q", q, {batch, -1, kv.head_dim});
  check_view(where, "out", out, {batch, q.extent(1), kv.head_dim});
  for (index_t b = 0; b < batch; ++b) {
    const std::int32_t slot = slots[static_cast<std::size_t>(b)];
    detail::check_paged_slot<Policy>(where, "slots", detail::concat("slots[", b, "] = ", slot), kv, slot);
  }
  detail::check_batch_query(where, kv.num_kv_heads, kv.head_dim, q, options);
  // Everything is checked above, so the tasks cannot throw.
  AttentionOptions single = options;
  single.pool = nullptr;
  auto one = [&](index_t b) {
    detail::AttentionWorkspace& w = detail::AttentionWorkspace::local();
    const index_t query_heads = detail::prepare_query(where, kv.num_kv_heads, kv.head_dim, q.slice(b), out.slice(b), single, w);
    detail::attend_slot<Policy>(kv, slots[static_cast<std::size_t>(b)], transforms, query_heads, out.slice(b), single, w);
  };
  if (options.pool == nullptr) {
    for (index_t b = 0; b < batch; ++b) one(b);
  } else {
    options.pool->parallel_for(batch, one);
  }
}

/// Decode attention of a batch of sequences of one layer (ragged lengths), one sequence per
/// task on the options' pool (each sequence on one thread).
/// @param seqs  [B] sequence ids
/// @param q     [B, num_query_heads, head_dim] float
/// @param out   [B, num_query_heads, head_dim] float
/// Every sequence is validated before any output is written.
template <class Policy>
void attend_batch(const QuantizedKVCache<Policy>& cache, Span<const SequenceId> seqs, index_t layer,
                  StridedView<const float, 3> q, StridedView<float, 3> out, const AttentionOptions& options = {}) {
  constexpr const char* where = "kvq::attend_batch";
  const auto batch = static_cast<index_t>(seqs.size());
  check_view(where, "q", q, {batch, -1, cache.config().head_dim});
  check_view(where, "out", out, {batch, q.extent(1), cache.config().head_dim});
  for (index_t b = 0; b < batch; ++b) {
    const SequenceId seq = seqs[static_cast<std::size_t>(b)];
    if (!cache.is_live(seq)) {
      detail::throw_argument_error(where, "seqs", detail::concat("seqs[", b, "] = ", seq), "ids of live sequences");
    }
    if (layer >= 0 && layer < cache.config().num_layers && cache.length(seq, layer) == 0) {
      detail::throw_argument_error(where, "seqs", detail::concat("seqs[", b, "] = ", seq, " with no token in layer ", layer),
                                   "sequences with at least one token (append first)");
    }
  }
  if (layer < 0 || layer >= cache.config().num_layers) {
    detail::throw_argument_error(where, "layer", layer, detail::concat("a layer in 0..", cache.config().num_layers - 1));
  }
  detail::check_batch_query(where, cache.config().num_kv_heads, cache.config().head_dim, q, options);
  // Everything attend checks is checked above, so the tasks cannot throw.
  AttentionOptions single = options;
  single.pool = nullptr;
  auto one = [&](index_t b) {
    attend(cache, seqs[static_cast<std::size_t>(b)], layer, q.slice(b), out.slice(b), single);
  };
  if (options.pool == nullptr) {
    for (index_t b = 0; b < batch; ++b) one(b);
  } else {
    options.pool->parallel_for(batch, one);
  }
}

}  // namespace kvq
