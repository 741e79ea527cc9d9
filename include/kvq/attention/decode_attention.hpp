// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief CPU decode attention over a QuantizedKVCache, fused with dequantization.
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
#include <limits>
#include <vector>

#include "kvq/attention/cpu_kernels.hpp"
#include "kvq/attention/softmax_math.hpp"
#include "kvq/cache/quantized_kv_cache.hpp"
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

template <class Policy>
class DecodeAttention {
  using Cache = QuantizedKVCache<Policy>;
  using E = typename Cache::exact_type;
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
  DecodeAttention(const Cache& cache, SequenceId seq, index_t layer, const float* query)
      : keys_(cache.key_view(seq, layer)),
        values_(cache.value_view(seq, layer)),
        heads_(cache.config().num_kv_heads),
        dim_(cache.config().head_dim),
        width_(cache.width()),
        query_(query) {}

  void set_query_heads(index_t query_heads) noexcept {
    query_heads_ = query_heads;
    group_ = query_heads / heads_;
  }
  index_t length() const noexcept { return keys_.length(); }
  index_t value_rank() const noexcept { return absorbs_values ? values_.layout->width : 0; }

  /// Folds tokens [begin, end) into state (which the caller has reset).
  void run(index_t begin, index_t end, AttentionWorkspace& w, SoftmaxState& state) const {
    AttentionWorkspace::fit(w.keys, tile * width_);
    AttentionWorkspace::fit(w.values, tile * width_);
    AttentionWorkspace::fit(w.latent, tile * std::max(keys_.layout->width, values_.layout->width));
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
          const index_t rank = values_.layout->width;
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
          const index_t rank = values_.layout->width;
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
        const index_t rank = values_.layout->width;
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

  StreamView<E> keys_;
  StreamView<E> values_;
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

}  // namespace detail

/// Decode attention of one sequence and layer.
/// @param q    [num_query_heads, head_dim] float; query head h uses kv head h / (Hq / Hkv).
///             Already RoPE'd at the query's position (for every policy).
/// @param out  [num_query_heads, head_dim] float (may not alias q)
/// Throws kvq::Error for a bad sequence, layer or shape, or an empty sequence.
template <class Policy>
void attend(const QuantizedKVCache<Policy>& cache, SequenceId seq, index_t layer, StridedView<const float, 2> q,
            StridedView<float, 2> out, const AttentionOptions& options = {}) {
  constexpr const char* where = "kvq::attend";
  const CacheConfig& cfg = cache.config();
  if (!cache.is_live(seq)) detail::throw_argument_error(where, "seq", seq, "the id of a live sequence");
  if (layer < 0 || layer >= cfg.num_layers) {
    detail::throw_argument_error(where, "layer", layer, detail::concat("a layer in 0..", cfg.num_layers - 1));
  }
  check_view(where, "q", q, {-1, cfg.head_dim});
  const index_t query_heads = q.extent(0);
  if (query_heads < 1 || query_heads % cfg.num_kv_heads != 0) {
    detail::throw_argument_error(where, "q", detail::shape_string(q),
                                 detail::concat("[a positive multiple of num_kv_heads (", cfg.num_kv_heads, "), ",
                                                cfg.head_dim, "]"));
  }
  check_view(where, "out", out, {query_heads, cfg.head_dim});
  if (!(options.scale >= 0.0f) || !std::isfinite(options.scale)) {
    detail::throw_argument_error(where, "options.scale", options.scale, "a finite scale >= 0 (0: 1/sqrt(head_dim))");
  }

  detail::AttentionWorkspace& w = detail::AttentionWorkspace::local();
  const float scale = options.scale > 0.0f ? options.scale : 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
  detail::AttentionWorkspace::fit(w.query, query_heads * cfg.head_dim);
  for (index_t h = 0; h < query_heads; ++h) {
    for (index_t c = 0; c < cfg.head_dim; ++c) {
      const float x = q(h, c);
      if (!std::isfinite(x)) {
        detail::throw_argument_error(where, "q", detail::concat("q[", h, ", ", c, "] = ", x), "finite values",
                                     Status::kNonFiniteInput);
      }
      w.query[static_cast<std::size_t>(h * cfg.head_dim + c)] = x * scale;
    }
  }
  detail::DecodeAttention<Policy> run(cache, seq, layer, w.query.data());
  run.set_query_heads(query_heads);
  const index_t length = run.length();
  if (length == 0) {
    detail::throw_argument_error(where, "seq", seq, "a sequence with at least one token in this layer (append first)");
  }
  const index_t latent = run.value_rank();
  const int threads = options.pool ? options.pool->size() : 1;
  const index_t splits = std::max<index_t>(1, std::min<index_t>(threads, length / std::max<index_t>(1, options.min_split_tokens)));
  w.state.reset(query_heads, cfg.head_dim, latent);
  if (splits == 1) {
    run.run(0, length, w, w.state);
  } else {
    // Split points on tile multiples so that every piece decodes whole tiles.
    const index_t tile = QuantizedKVCache<Policy>::tile_tokens;
    const index_t per = ceil_div(ceil_div(length, splits), tile) * tile;
    std::vector<detail::SoftmaxState> parts(static_cast<std::size_t>(splits));
    options.pool->parallel_for(splits, [&](index_t i) {
      detail::AttentionWorkspace& local = detail::AttentionWorkspace::local();
      detail::SoftmaxState& st = parts[static_cast<std::size_t>(i)];
      st.reset(query_heads, cfg.head_dim, latent);
      const index_t begin = std::min(length, i * per);
      const index_t end = std::min(length, begin + per);
      run.run(begin, end, local, st);
    });
    for (const detail::SoftmaxState& st : parts) detail::merge_softmax(w.state, st, query_heads, cfg.head_dim, latent);
  }
  run.finish(w.state, out);
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
  if (q.extent(1) < 1 || q.extent(1) % cache.config().num_kv_heads != 0) {
    detail::throw_argument_error(where, "q", detail::shape_string(q),
                                 detail::concat("[B, a positive multiple of num_kv_heads (", cache.config().num_kv_heads,
                                                "), ", cache.config().head_dim, "]"));
  }
  for (index_t b = 0; b < batch; ++b) {
    for (index_t h = 0; h < q.extent(1); ++h) {
      for (index_t c = 0; c < q.extent(2); ++c) {
        if (!std::isfinite(q(b, h, c))) {
          detail::throw_argument_error(where, "q", detail::concat("q[", b, ", ", h, ", ", c, "] = ", q(b, h, c)),
                                       "finite values", Status::kNonFiniteInput);
        }
      }
    }
  }
  if (!(options.scale >= 0.0f) || !std::isfinite(options.scale)) {
    detail::throw_argument_error(where, "options.scale", options.scale, "a finite scale >= 0 (0: 1/sqrt(head_dim))");
  }
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
