// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief SKVQ clip-ratio calibration (ALGORITHMS.md §2.4): for one layer, the clip ratio alpha
///        of the keys and of the values that minimises the error of the attention-module output
///        when that stream is quantized. Host only; needs Eigen.
///
/// The paper calibrates alpha by minimising the attention output error before/after
/// quantization; the released code skipped this and hard-codes 0.92 (LongBench) / 0.96
/// (perplexity). Here, per layer:
///   error(spec) = sum over scored queries t and query heads of ||o_t - o^_t||^2
///                 / sum over the same of ||o_t||^2,
/// where o_t is causal softmax attention of q_t over tokens 0..t with the exact keys and values
/// (scale 1/sqrt(head_dim)) and o^_t the same with every non-sink token's key (and/or value)
/// replaced by its quantize -> dequantize round trip (kvq::quantize_matrix /
/// kvq::dequantize_matrix over the [tokens - sinks, kv_heads * head_dim] rows, per-token groups).
/// Keys quantized before RoPE are rotated by their position after the round trip, as a pre-RoPE
/// cache does in attention.
///
/// Cost: the exact outputs are computed once per sample (AttentionErrorModel); each candidate
/// spec costs one quantize/dequantize of the stream and, per kv head, matrix products over all
/// scored queries of the head's query-head group at once, causally blocked (a block of query
/// positions multiplies only the key rows it can see). A value candidate reuses the exact softmax
/// weights P and computes only P * (V^ - V); a key candidate recomputes the softmax and computes
/// (P^ - P) * V. Arithmetic is in double; the result is deterministic.
#pragma once

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kvq/core/bits.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/status.hpp"
#include "kvq/core/view.hpp"
#include "kvq/quant/matrix.hpp"
#include "kvq/transform/rope.hpp"

namespace kvq::calib {

/// Calibration tokens of one layer as attention sees them.
/// q [tokens, query_heads, head_dim] (after RoPE); k and v [tokens, kv_heads * head_dim], all
/// row-major. k is as the cache stores it: before RoPE when `rope` is set (attention then
/// rotates key t by position t), after RoPE otherwise. Query head h uses kv head
/// h / (query_heads / kv_heads) (GQA). The first `sinks` tokens stay exact (never quantized),
/// like SKVQ's attention sinks. Invariants (checked by every function that takes a sample):
/// all extents > 0, query_heads % kv_heads == 0, vector sizes match the extents, values finite,
/// 0 <= sinks < tokens - 1 (at least one query position after the sinks to score), and `rope`,
/// when set, built for this head_dim.
struct AttentionSample {
  index_t tokens = 0;       ///< calibration positions 0 .. tokens - 1
  index_t query_heads = 0;  ///< query heads of the layer
  index_t kv_heads = 0;     ///< key/value heads of the layer (divides query_heads)
  index_t head_dim = 0;     ///< channels per head
  std::vector<float> q;     ///< [tokens, query_heads, head_dim], after RoPE
  std::vector<float> k;     ///< [tokens, kv_heads * head_dim], as cached (see above)
  std::vector<float> v;     ///< [tokens, kv_heads * head_dim]
  /// Pre-RoPE keys: the rotator attention applies to key t (position t); nullptr: keys are
  /// stored after RoPE. Read only while a function or AttentionErrorModel's constructor runs.
  const RopeRotator* rope = nullptr;
  index_t sinks = 0;        ///< leading tokens kept exact
};

/// The alpha grid and the query positions of a clip search.
struct ClipSearchOptions {
  /// Grid lo, lo + step, ..., hi (inclusive), each value lo + i * step computed in double and
  /// rounded to a multiple of 1e-6 (no accumulated drift; 0.80/1.00/0.01 gives 0.80, 0.81, ...,
  /// 1.00 exactly as the float literals 0.80f ... 1.00f). Requires 0 < lo <= hi <= 1 and
  /// 1e-6 <= step (the grid's resolution).
  float lo = 0.80f;
  float hi = 1.00f;
  float step = 0.01f;
  /// Query positions scored (> 0): evenly spaced over [sinks + 1, tokens), both ends included;
  /// every position of that range when it holds no more than `queries`.
  index_t queries = 64;
};

namespace clip_detail {

/// Throws kvq::Error naming `where` unless 0 < lo <= hi <= 1, step >= 1e-6 and queries > 0.
inline void check_options(const char* where, const ClipSearchOptions& o) {
  if (!(o.lo > 0.0f && o.lo <= 1.0f)) {
    kvq::detail::throw_argument_error(where, "options.lo", o.lo, "a grid start in (0, 1]");
  }
  if (!(o.hi >= o.lo && o.hi <= 1.0f)) {
    kvq::detail::throw_argument_error(where, "options.hi", o.hi,
                                      kvq::detail::concat("a grid end in [lo = ", o.lo, ", 1]"));
  }
  if (!(o.step >= 1e-6f) || !std::isfinite(o.step)) {
    kvq::detail::throw_argument_error(where, "options.step", o.step,
                                      "a finite grid step >= 1e-6 (the grid's resolution)");
  }
  if (o.queries <= 0) {
    kvq::detail::throw_argument_error(where, "options.queries", o.queries,
                                      "at least 1 scored query position");
  }
}

/// Throws kvq::Error (kNonFiniteInput) at the first NaN or Inf of x, rows of row_length.
inline void check_finite(const char* where, const char* argument, const std::vector<float>& x,
                         index_t row_length, const char* row_name) {
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (!std::isfinite(x[i])) {
      const auto n = static_cast<std::size_t>(row_length);
      kvq::detail::throw_argument_error(
          where, argument,
          kvq::detail::concat(x[i], " at [token ", i / n, ", ", row_name, " ", i % n, "]"),
          "finite values (NaN and Inf cannot be calibrated)", Status::kNonFiniteInput);
    }
  }
}

/// Throws kvq::Error naming `where` unless s satisfies AttentionSample's invariants (the rope's
/// head_dim is checked by AttentionErrorModel).
inline void check_sample(const char* where, const AttentionSample& s) {
  const std::pair<const char*, index_t> extents[] = {{"s.tokens", s.tokens},
                                                     {"s.query_heads", s.query_heads},
                                                     {"s.kv_heads", s.kv_heads},
                                                     {"s.head_dim", s.head_dim}};
  for (const auto& [name, value] : extents) {
    if (value <= 0) kvq::detail::throw_argument_error(where, name, value, "a positive extent");
  }
  if (s.query_heads % s.kv_heads != 0) {
    kvq::detail::throw_argument_error(
        where, "s.query_heads", s.query_heads,
        kvq::detail::concat("a multiple of kv_heads = ", s.kv_heads, " (grouped-query attention)"));
  }
  const auto q_size = static_cast<std::size_t>(s.tokens * s.query_heads * s.head_dim);
  const auto kv_size = static_cast<std::size_t>(s.tokens * s.kv_heads * s.head_dim);
  if (s.q.size() != q_size) {
    kvq::detail::throw_argument_error(
        where, "s.q", kvq::detail::concat(s.q.size(), " floats"),
        kvq::detail::concat(q_size, " floats ([tokens ", s.tokens, ", query_heads ", s.query_heads,
                            ", head_dim ", s.head_dim, "])"));
  }
  for (const auto& [name, x] : {std::pair<const char*, const std::vector<float>*>{"s.k", &s.k},
                                {"s.v", &s.v}}) {
    if (x->size() != kv_size) {
      kvq::detail::throw_argument_error(
          where, name, kvq::detail::concat(x->size(), " floats"),
          kvq::detail::concat(kv_size, " floats ([tokens ", s.tokens, ", kv_heads ", s.kv_heads,
                              " * head_dim ", s.head_dim, "])"));
    }
  }
  if (s.sinks < 0 || s.sinks >= s.tokens - 1) {
    kvq::detail::throw_argument_error(
        where, "s.sinks", s.sinks,
        kvq::detail::concat("0 <= sinks < tokens - 1 = ", s.tokens - 1,
                            " (at least one query position after the sinks to score)"));
  }
  check_finite(where, "s.q", s.q, s.query_heads * s.head_dim, "channel");
  check_finite(where, "s.k", s.k, s.kv_heads * s.head_dim, "channel");
  check_finite(where, "s.v", s.v, s.kv_heads * s.head_dim, "channel");
}

}  // namespace clip_detail

/// The alpha grid of `options` (ascending; see ClipSearchOptions::lo). Throws kvq::Error for
/// invalid options.
inline std::vector<float> clip_grid(const ClipSearchOptions& options) {
  clip_detail::check_options("kvq::calib::clip_grid", options);
  const double lo = options.lo;
  const double hi = options.hi;
  const double step = options.step;
  // The tolerance absorbs the float representation of lo, hi and step (0.8f, 1.0f, 0.01f give
  // 19.9999993 steps): a grid point within 1e-3 steps of hi is kept.
  const auto n = static_cast<index_t>(std::floor((hi - lo) / step + 1e-3)) + 1;
  std::vector<float> grid;
  grid.reserve(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) {
    const double a = std::round((lo + static_cast<double>(i) * step) * 1e6) / 1e6;
    grid.push_back(std::min(static_cast<float>(a), options.hi));
  }
  return grid;
}

/// The query positions a sample of `tokens` tokens with `sinks` sinks is scored at: `queries`
/// positions evenly spaced over [sinks + 1, tokens) with both ends included (position
/// first + floor(j * (n - 1) / (queries - 1)) for n candidates; the last position alone when
/// queries == 1), or every position of the range when it holds no more than `queries`.
/// Ascending and distinct. Requires 0 <= sinks < tokens - 1 and queries > 0.
inline std::vector<index_t> scored_query_positions(index_t tokens, index_t sinks, index_t queries) {
  constexpr const char* where = "kvq::calib::scored_query_positions";
  if (sinks < 0 || sinks >= tokens - 1) {
    kvq::detail::throw_argument_error(where, "sinks", sinks,
                                      kvq::detail::concat("0 <= sinks < tokens - 1 = ", tokens - 1));
  }
  if (queries <= 0) kvq::detail::throw_argument_error(where, "queries", queries, "queries > 0");
  const index_t first = sinks + 1;
  const index_t n = tokens - first;
  std::vector<index_t> positions;
  if (n <= queries) {
    for (index_t t = first; t < tokens; ++t) positions.push_back(t);
  } else if (queries == 1) {
    positions.push_back(tokens - 1);
  } else {
    for (index_t j = 0; j < queries; ++j) positions.push_back(first + j * (n - 1) / (queries - 1));
  }
  return positions;
}

/// The exact attention outputs of one sample, computed once, and the error of quantizing its
/// keys and/or values with a given spec (see the file comment). Owns copies of what it needs:
/// the sample may be destroyed after construction. Memory: per kv head, the exact softmax
/// weights [query_heads / kv_heads * scored positions, tokens] and the keys, values and scaled
/// queries in double. error() reuses internal scratch: one model must not be used from two
/// threads at once.
class AttentionErrorModel {
 public:
  /// Validates the sample and options (kvq::Error naming `caller`, the argument, the value and
  /// the expectation) and computes the exact attention outputs at the scored query positions.
  explicit AttentionErrorModel(const AttentionSample& s, const ClipSearchOptions& options = {},
                               const char* caller = "kvq::calib::AttentionErrorModel")
      : caller_(caller) {
    clip_detail::check_sample(caller, s);
    clip_detail::check_options(caller, options);
    tokens_ = s.tokens;
    kv_heads_ = s.kv_heads;
    head_dim_ = s.head_dim;
    group_ = s.query_heads / s.kv_heads;
    channels_ = s.kv_heads * s.head_dim;
    sinks_ = s.sinks;
    positions_ = scored_query_positions(s.tokens, s.sinks, options.queries);
    rows_ = group_ * static_cast<index_t>(positions_.size());
    k_ = s.k;
    v_ = s.v;
    if (s.rope != nullptr) init_rope(*s.rope);
    plan_chunks();

    const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
    const auto d = static_cast<std::size_t>(head_dim_);
    const index_t nq = static_cast<index_t>(positions_.size());
    q_.resize(static_cast<std::size_t>(kv_heads_));
    keys_.resize(q_.size());
    values_.resize(q_.size());
    probs_.resize(q_.size());
    out_.resize(rows_, head_dim_);
    denominator_ = 0.0;
    for (index_t h = 0; h < kv_heads_; ++h) {
      const auto hs = static_cast<std::size_t>(h);
      Matrix& q = q_[hs];
      q.resize(rows_, head_dim_);
      for (index_t i = 0; i < nq; ++i) {
        const index_t pos = positions_[static_cast<std::size_t>(i)];
        for (index_t j = 0; j < group_; ++j) {
          const float* src =
              s.q.data() + static_cast<std::size_t>((pos * s.query_heads + h * group_ + j) * head_dim_);
          double* dst = q.data() + static_cast<std::size_t>((i * group_ + j) * head_dim_);
          for (std::size_t c = 0; c < d; ++c) dst[c] = static_cast<double>(src[c]) * scale;
        }
      }
      keys_[hs].resize(tokens_, head_dim_);
      load_keys(k_.data(), h, 0, tokens_, keys_[hs]);
      Matrix& v = values_[hs];
      v.resize(tokens_, head_dim_);
      for (index_t t = 0; t < tokens_; ++t) {
        const float* src = v_.data() + static_cast<std::size_t>(t * channels_ + h * head_dim_);
        double* dst = v.data() + static_cast<std::size_t>(t * head_dim_);
        for (std::size_t c = 0; c < d; ++c) dst[c] = static_cast<double>(src[c]);
      }
      Matrix& p = probs_[hs];
      p = Matrix::Zero(rows_, tokens_);
      for (const Chunk& ch : chunks_) {
        p.block(ch.row, 0, ch.rows, ch.cols).noalias() =
            q.middleRows(ch.row, ch.rows) * keys_[hs].topRows(ch.cols).transpose();
        softmax_rows(p, ch);
        out_.middleRows(ch.row, ch.rows).noalias() =
            p.block(ch.row, 0, ch.rows, ch.cols) * v.topRows(ch.cols);
      }
      denominator_ += out_.squaredNorm();
    }
  }

  /// The scored query positions (ascending).
  const std::vector<index_t>& positions() const noexcept { return positions_; }

  /// Sum over scored queries and query heads of ||o||^2 with exact keys and values.
  double exact_output_energy() const noexcept { return denominator_; }

  /// Relative attention-output error with the keys quantized by *key_spec and the values by
  /// *value_spec (nullptr: that stream exact; both null: 0). Each spec must have axis
  /// GroupAxis::kChannels (per-token groups over the kv_heads * head_dim channels of a token;
  /// channel_groups honoured) and is otherwise checked by kvq::plan_matrix for
  /// [tokens - sinks, kv_heads * head_dim]. kvq::Error from quantize_matrix (e.g. FP8 metadata
  /// overflow) propagates. When the exact outputs are all zero the result is 0 if the quantized
  /// outputs are too, +infinity otherwise.
  double error(const MatrixQuantSpec* key_spec, const MatrixQuantSpec* value_spec) {
    if (key_spec != nullptr) check_spec("key_spec", *key_spec);
    if (value_spec != nullptr) check_spec("value_spec", *value_spec);
    if (key_spec == nullptr && value_spec == nullptr) return 0.0;
    if (key_spec != nullptr) round_trip(k_, *key_spec, key_rt_);
    if (value_spec != nullptr) round_trip(v_, *value_spec, value_rt_);
    const bool keys = key_spec != nullptr;
    const bool values = value_spec != nullptr;
    const index_t quantized = tokens_ - sinks_;
    const auto d = static_cast<std::size_t>(head_dim_);
    if (keys) {
      key_hat_.resize(tokens_, head_dim_);
      scores_.resize(rows_, tokens_);
    }
    if (values) delta_v_.resize(quantized, head_dim_);
    double numerator = 0.0;
    for (index_t h = 0; h < kv_heads_; ++h) {
      const auto hs = static_cast<std::size_t>(h);
      if (keys) {
        key_hat_.topRows(sinks_) = keys_[hs].topRows(sinks_);
        load_keys(key_rt_.data(), h, sinks_, quantized, key_hat_);
      }
      if (values) {
        for (index_t t = 0; t < quantized; ++t) {
          const std::size_t off = static_cast<std::size_t>(t * channels_ + h * head_dim_);
          const float* hat = value_rt_.data() + off;
          const float* exact = v_.data() + off + static_cast<std::size_t>(sinks_ * channels_);
          double* dst = delta_v_.data() + static_cast<std::size_t>(t * head_dim_);
          for (std::size_t c = 0; c < d; ++c) {
            dst[c] = static_cast<double>(hat[c]) - static_cast<double>(exact[c]);
          }
        }
      }
      const Matrix& p = probs_[hs];
      const Matrix& v = values_[hs];
      for (const Chunk& ch : chunks_) {
        auto out = out_.middleRows(ch.row, ch.rows);
        const index_t tail = ch.cols - sinks_;  // quantized tokens this chunk sees (>= 1)
        if (keys) {
          // o^ - o = P^ (V^ - V) + (P^ - P) V, with P^ the softmax over the dequantized keys.
          auto sc = scores_.block(ch.row, 0, ch.rows, ch.cols);
          sc.noalias() = q_[hs].middleRows(ch.row, ch.rows) * key_hat_.topRows(ch.cols).transpose();
          softmax_rows(scores_, ch);
          if (values) {
            out.noalias() = scores_.block(ch.row, sinks_, ch.rows, tail) * delta_v_.topRows(tail);
          }
          sc -= p.block(ch.row, 0, ch.rows, ch.cols);
          if (values) {
            out.noalias() += sc * v.topRows(ch.cols);
          } else {
            out.noalias() = sc * v.topRows(ch.cols);
          }
        } else {
          // o^ - o = P (V^ - V): the exact softmax weights are reused.
          out.noalias() = p.block(ch.row, sinks_, ch.rows, tail) * delta_v_.topRows(tail);
        }
        numerator += out.squaredNorm();
      }
    }
    if (denominator_ > 0.0) return numerator / denominator_;
    return numerator == 0.0 ? 0.0 : std::numeric_limits<double>::infinity();
  }

 private:
  using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  /// Rows [row, row + rows) of the scored-query matrices (query positions in a run, each with
  /// its group_ query heads) see key rows [0, cols).
  struct Chunk {
    index_t row;
    index_t rows;
    index_t cols;
  };

  /// Rows per causal block: small enough to skip most masked products, large enough for
  /// efficient matrix products.
  static constexpr index_t kChunkRows = 32;

  void plan_chunks() {
    const index_t nq = static_cast<index_t>(positions_.size());
    const index_t per_chunk = std::max<index_t>(1, kChunkRows / group_);
    chunks_.clear();
    for (index_t a = 0; a < nq; a += per_chunk) {
      const index_t b = std::min(nq, a + per_chunk);
      chunks_.push_back({a * group_, (b - a) * group_, positions_[static_cast<std::size_t>(b - 1)] + 1});
    }
  }

  /// Causal softmax in place of rows ch of m over columns [0, ch.cols): row r (query position
  /// t) keeps columns 0..t, the rest become 0.
  void softmax_rows(Matrix& m, const Chunk& ch) const {
    for (index_t r = ch.row; r < ch.row + ch.rows; ++r) {
      const index_t len = positions_[static_cast<std::size_t>(r / group_)] + 1;
      auto row = m.row(r).head(len);
      const double mx = row.maxCoeff();
      row = (row.array() - mx).exp().matrix();
      row /= row.sum();
      if (len < ch.cols) m.row(r).segment(len, ch.cols - len).setZero();
    }
  }

  /// Rows [first, first + n) of dst [tokens, head_dim] from kv head h of the rows src
  /// [n, kv_heads * head_dim] (row i is token first + i), rotated by position when pre-RoPE.
  void load_keys(const float* src_rows, index_t h, index_t first, index_t n, Matrix& dst) const {
    const auto d = static_cast<std::size_t>(head_dim_);
    const auto half = d / 2;
    for (index_t i = 0; i < n; ++i) {
      const index_t t = first + i;
      const float* src = src_rows + static_cast<std::size_t>(i * channels_ + h * head_dim_);
      double* out = dst.data() + static_cast<std::size_t>(t) * d;
      if (rope_cos_.empty()) {
        for (std::size_t c = 0; c < d; ++c) out[c] = static_cast<double>(src[c]);
        continue;
      }
      const double* cs = rope_cos_.data() + static_cast<std::size_t>(t) * half;
      const double* sn = rope_sin_.data() + static_cast<std::size_t>(t) * half;
      for (std::size_t j = 0; j < half; ++j) {
        const std::size_t a = rope_a_[j];
        const std::size_t b = rope_b_[j];
        const double x0 = static_cast<double>(src[a]);
        const double x1 = static_cast<double>(src[b]);
        out[a] = x0 * cs[j] - x1 * sn[j];
        out[b] = x0 * sn[j] + x1 * cs[j];
      }
    }
  }

  /// Finds the rotator's channel pairs by probing rotate_exact (RopeRotator exposes neither its
  /// head_dim nor its style), checks it was built for head_dim_, and tabulates cos and sin of
  /// every (position, pair) exactly as rotate_exact evaluates them.
  void init_rope(const RopeRotator& rope) {
    constexpr index_t kProbe = 2 * RopeRotator::kMaxHalf;  // the largest head_dim a rotator has
    const index_t d = head_dim_;
    const auto mismatch = [&](const std::string& found) {
      kvq::detail::throw_argument_error(
          caller_, "s.rope", found,
          kvq::detail::concat("a RopeRotator built with head_dim = s.head_dim = ", d));
    };
    if (d % 2 != 0 || d > kProbe) {
      kvq::detail::throw_argument_error(caller_, "s.head_dim", d,
                                        "an even head_dim <= 1024 with pre-RoPE keys (s.rope set)");
    }
    std::vector<double> probe(static_cast<std::size_t>(kProbe), 0.0);
    probe[0] = 1.0;
    rope.rotate_exact(probe.data(), 1);  // pair 0 turns by 1 radian: its partner becomes sin 1
    index_t partner = -1;
    for (index_t c = 1; c < kProbe && partner < 0; ++c) {
      if (probe[static_cast<std::size_t>(c)] != 0.0) partner = c;
    }
    if (partner < 0) mismatch("a rotator that rotates nothing (default-constructed?)");
    const bool half_split = partner == d / 2;
    if (!half_split && partner != 1) {
      mismatch(kvq::detail::concat("a rotator for head_dim ", 2 * partner));
    }
    // Every channel below head_dim turns, none above (angles >= 1 / theta radian).
    std::fill(probe.begin(), probe.end(), 1.0);
    rope.rotate_exact(probe.data(), 1);
    index_t turned = 0;
    while (turned < kProbe && probe[static_cast<std::size_t>(turned)] != 1.0) ++turned;
    if (turned != d) mismatch(kvq::detail::concat("a rotator for head_dim ", turned));

    const auto half = static_cast<std::size_t>(d / 2);
    rope_a_.resize(half);
    rope_b_.resize(half);
    for (std::size_t j = 0; j < half; ++j) {
      rope_a_[j] = half_split ? j : 2 * j;
      rope_b_[j] = half_split ? j + half : 2 * j + 1;
    }
    rope_cos_.resize(static_cast<std::size_t>(tokens_) * half);
    rope_sin_.resize(rope_cos_.size());
    std::vector<double> x(static_cast<std::size_t>(d));
    for (index_t t = 0; t < tokens_; ++t) {
      std::fill(x.begin(), x.end(), 0.0);
      for (std::size_t j = 0; j < half; ++j) x[rope_a_[j]] = 1.0;
      rope.rotate_exact(x.data(), t);  // (1, 0) -> (cos, sin) of each pair, exactly
      for (std::size_t j = 0; j < half; ++j) {
        rope_cos_[static_cast<std::size_t>(t) * half + j] = x[rope_a_[j]];
        rope_sin_[static_cast<std::size_t>(t) * half + j] = x[rope_b_[j]];
      }
    }
  }

  void check_spec(const char* argument, const MatrixQuantSpec& spec) const {
    if (spec.axis != GroupAxis::kChannels) {
      kvq::detail::throw_argument_error(
          caller_, argument, kvq::detail::concat("a spec with axis '", axis_label(spec.axis), "'"),
          "axis 'channel' (GroupAxis::kChannels: per-token groups, as SKVQ quantizes keys and "
          "values)");
    }
  }

  /// out [tokens - sinks, channels] = dequantize(quantize(rows sinks.. of x)).
  void round_trip(const std::vector<float>& x, const MatrixQuantSpec& spec, std::vector<float>& out) {
    const index_t n = tokens_ - sinks_;
    const MatrixLayout layout = plan_matrix(n, channels_, spec);
    codes_.resize(layout.code_bytes);
    scales_.resize(layout.meta_bytes);
    zeros_.resize(layout.meta_bytes);
    out.resize(static_cast<std::size_t>(n * channels_));
    const StridedView<const float, 2> in(x.data() + static_cast<std::size_t>(sinks_ * channels_),
                                         {n, channels_});
    quantize_matrix<float>(in, spec,
                           {{codes_.data(), codes_.size()},
                            {scales_.data(), scales_.size()},
                            {zeros_.data(), zeros_.size()}});
    dequantize_matrix<float>({{codes_.data(), codes_.size()},
                              {scales_.data(), scales_.size()},
                              {zeros_.data(), zeros_.size()}},
                             spec, StridedView<float, 2>(out.data(), {n, channels_}));
  }

  const char* caller_;
  index_t tokens_ = 0;
  index_t kv_heads_ = 0;
  index_t head_dim_ = 0;
  index_t group_ = 1;     ///< query heads per kv head
  index_t channels_ = 0;  ///< kv_heads * head_dim
  index_t sinks_ = 0;
  index_t rows_ = 0;      ///< group_ * scored positions
  std::vector<index_t> positions_;
  std::vector<Chunk> chunks_;
  std::vector<float> k_, v_;                 ///< the sample's keys and values
  std::vector<std::size_t> rope_a_, rope_b_;  ///< channel pairs; empty: keys after RoPE
  std::vector<double> rope_cos_, rope_sin_;   ///< [tokens, head_dim / 2]
  // Per kv head, rows ordered (position, query head of the group):
  std::vector<Matrix> q_;       ///< [rows, head_dim], scaled by 1 / sqrt(head_dim)
  std::vector<Matrix> keys_;    ///< [tokens, head_dim] exact (rotated) keys
  std::vector<Matrix> values_;  ///< [tokens, head_dim] exact values
  std::vector<Matrix> probs_;   ///< [rows, tokens] exact causal softmax weights
  double denominator_ = 0.0;
  // Scratch of error():
  Matrix out_, scores_, key_hat_, delta_v_;
  std::vector<float> key_rt_, value_rt_;
  std::vector<std::uint8_t> codes_, scales_, zeros_;
};

/// Relative attention-output error of quantizing the sample's keys with key_spec and/or its
/// values with value_spec (nullptr: that stream exact): sum over scored queries q_t and query
/// heads of ||o - o^||^2 / sum of ||o||^2 (see the file comment and
/// AttentionErrorModel::error for the spec requirements). Both null: 0.
inline double attention_output_error(const AttentionSample& s, const MatrixQuantSpec* key_spec,
                                     const MatrixQuantSpec* value_spec,
                                     const ClipSearchOptions& options = {}) {
  AttentionErrorModel model(s, options, "kvq::calib::attention_output_error");
  return model.error(key_spec, value_spec);
}

/// Outcome of search_clip.
struct ClipSearchResult {
  std::vector<float> grid;          ///< alphas tried, ascending (clip_grid of the options)
  std::vector<double> key_error;    ///< [grid] values exact, keys quantized with clip = grid[i]
  std::vector<double> value_error;  ///< [grid] keys exact, values quantized with clip = grid[i]
  /// argmin of key_error / value_error; ties go to the larger alpha (1.0 when clipping cannot
  /// help and 1.0 is on the grid).
  float key_clip = 1.0f;
  float value_clip = 1.0f;

  /// key_error at grid value alpha (matched to within 5e-7, half the grid's resolution);
  /// throws kvq::Error when alpha is not on the grid.
  double key_error_at(float alpha) const {
    return key_error[index_of("kvq::calib::ClipSearchResult::key_error_at", alpha)];
  }
  /// value_error at grid value alpha, as key_error_at.
  double value_error_at(float alpha) const {
    return value_error[index_of("kvq::calib::ClipSearchResult::value_error_at", alpha)];
  }

 private:
  std::size_t index_of(const char* where, float alpha) const {
    for (std::size_t i = 0; i < grid.size(); ++i) {
      if (std::fabs(static_cast<double>(grid[i]) - static_cast<double>(alpha)) <= 5e-7) return i;
    }
    kvq::detail::throw_argument_error(
        where, "alpha", alpha,
        grid.empty() ? std::string("a grid value (the grid is empty)")
                     : kvq::detail::concat("one of the ", grid.size(), " grid values ",
                                           std::round(static_cast<double>(grid.front()) * 1e6) / 1e6,
                                           " .. ",
                                           std::round(static_cast<double>(grid.back()) * 1e6) / 1e6));
  }
};

/// Searches the clip ratio of the keys and of the values separately (the other stream exact):
/// for every alpha of clip_grid(options), the error of key_spec (then value_spec) with its clip
/// replaced by alpha. Specs as AttentionErrorModel::error requires (their clip is ignored);
/// kvq::Error from quantization propagates.
inline ClipSearchResult search_clip(const AttentionSample& s, const MatrixQuantSpec& key_spec,
                                    const MatrixQuantSpec& value_spec,
                                    const ClipSearchOptions& options = {}) {
  AttentionErrorModel model(s, options, "kvq::calib::search_clip");
  ClipSearchResult r;
  r.grid = clip_grid(options);
  MatrixQuantSpec key = key_spec;
  MatrixQuantSpec value = value_spec;
  double best_key = std::numeric_limits<double>::infinity();
  double best_value = best_key;
  for (const float alpha : r.grid) {
    key.clip = alpha;
    value.clip = alpha;
    r.key_error.push_back(model.error(&key, nullptr));
    r.value_error.push_back(model.error(nullptr, &value));
    // <= : a tie goes to the later, larger alpha.
    if (r.key_error.back() <= best_key) {
      best_key = r.key_error.back();
      r.key_clip = alpha;
    }
    if (r.value_error.back() <= best_value) {
      best_value = r.value_error.back();
      r.value_clip = alpha;
    }
  }
  return r;
}

}  // namespace kvq::calib
