// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief One sequence of a Llama model decoding on a kvq::QuantizedKVCache<Policy>.
///
/// Every token is a decode step, whether it arrives alone or in a chunk: for each layer the
/// chunk's projections are one matrix product (llm/linear.hpp), then token by token its key and
/// value rows are appended to the cache (one-token appends, so window flushes happen exactly as in
/// decoding) and its query attends over the cache as it stands after that append. A chunk of n
/// tokens therefore produces bit for bit the logits of n single-token calls (the linear kernel sums
/// in a fixed order), which is what makes the chunked evaluator an exact decode-semantics evaluator.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "kvq/attention/decode_attention.hpp"
#include "kvq/cache/quantized_kv_cache.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/thread_pool.hpp"
#include "kvq/policy/policy_traits.hpp"
#include "kvq/transform/rope.hpp"
#include "llm/calibration.hpp"
#include "llm/linear.hpp"
#include "llm/model.hpp"

namespace kvq::llm {

/// What attention of one layer receives for one token, before the append (for tests and tools
/// that study the cache's inputs, and calibration): x [dim] the normalized hidden state that the
/// q/k/v projections take, q [num_heads * head_dim] after RoPE, k [kv_dim] before RoPE, v [kv_dim].
struct AttentionInputs {
  int layer = 0;
  int position = 0;
  const float* x = nullptr;
  const float* q = nullptr;
  const float* k_pre_rope = nullptr;
  const float* v = nullptr;
};
using AttentionObserver = std::function<void(const AttentionInputs&)>;

template <class Policy>
class Session {
 public:
  using Cache = kvq::QuantizedKVCache<Policy>;

  /// A cache with room for `max_tokens` tokens of one sequence, with `calibration` (SKVQ channel
  /// groups and clip ratios, CSKV factors: kvq calibrate), or without one what the policy can
  /// use without calibration data (llm/calibration.hpp: CSKV factors from an SVD of the
  /// weights). `pool` (may be null) runs the matrix products and split-KV attention.
  Session(const Model& model, int max_tokens, kvq::ThreadPool* pool, const kvq::CacheCalibration* calibration = nullptr)
      : model_(model),
        cache_(cache_config(model.config, max_tokens),
               calibration != nullptr ? *calibration : default_calibration<Policy>(model)),
        rope_(model.config.head_dim, model.config.rope, 1),
        pool_(pool),
        max_tokens_(max_tokens) {
    seq_ = cache_.add_sequence();
  }

  static kvq::CacheConfig cache_config(const ModelConfig& c, int max_tokens) {
    if (max_tokens <= 0) {
      kvq::detail::throw_argument_error("kvq::llm::Session", "max_tokens", max_tokens, "a positive token count");
    }
    kvq::CacheConfig cfg;
    cfg.num_layers = c.num_layers;
    cfg.num_kv_heads = c.num_kv_heads;
    cfg.head_dim = c.head_dim;
    cfg.num_blocks = Cache::blocks_for_tokens(c.num_layers, max_tokens);
    cfg.rope = c.rope;
    return cfg;
  }

  const Cache& cache() const noexcept { return cache_; }
  /// Called for every token and layer of the following forward calls (empty: none).
  void set_observer(AttentionObserver observer) { observer_ = std::move(observer); }
  kvq::SequenceId sequence() const noexcept { return seq_; }
  /// Tokens processed so far: the position of the next token.
  int position() const noexcept { return pos_; }

  /// Runs tokens[0..n) at positions position() .. position() + n - 1 as n decode steps.
  /// logits: [n, vocab] when `all_logits`, else [vocab] for the last token only; may be null.
  /// Throws kvq::Error (and changes nothing) for a token outside the vocabulary or past max_tokens.
  void forward(const int* tokens, int n, float* logits, bool all_logits = true) {
    const ModelConfig& c = model_.config;
    if (n <= 0) return;
    if (pos_ + n > max_tokens_) {
      kvq::detail::throw_argument_error("kvq::llm::Session::forward", "n", n,
                                        "at most " + std::to_string(max_tokens_ - pos_) +
                                            " more tokens (the session was made for " + std::to_string(max_tokens_) + ")");
    }
    for (int i = 0; i < n; ++i) {
      if (tokens[i] < 0 || tokens[i] >= c.vocab_size) {
        kvq::detail::throw_argument_error("kvq::llm::Session::forward", "token", tokens[i],
                                          "an id in [0, " + std::to_string(c.vocab_size) + ")");
      }
    }
    reserve(n);
    const int dim = c.dim;
    const int qd = c.q_dim();
    const int kvd = c.kv_dim();
    const int hid = c.hidden_dim;
    for (int i = 0; i < n; ++i) {
      std::copy_n(model_.token_embedding.row(tokens[i]), dim, x_.data() + static_cast<std::size_t>(i) * dim);
    }
    for (int l = 0; l < c.num_layers; ++l) {
      const LayerWeights& w = model_.layers[static_cast<std::size_t>(l)];
      rmsnorm(xn_.data(), x_.data(), w.attn_norm.data(), n, dim);
      linear(w.wq, xn_.data(), n, dim, q_.data(), qd, pool_);
      linear(w.wk, xn_.data(), n, dim, k_.data(), kvd, pool_);
      linear(w.wv, xn_.data(), n, dim, v_.data(), kvd, pool_);
      for (int i = 0; i < n; ++i) {
        const kvq::index_t pos = pos_ + i;
        float* q = q_.data() + static_cast<std::size_t>(i) * qd;
        float* k = k_.data() + static_cast<std::size_t>(i) * kvd;
        rope_.rotate(q, 1, qd, c.num_heads, pos, rope_base_);
        if (observer_) {
          observer_(AttentionInputs{l, static_cast<int>(pos), xn_.data() + static_cast<std::size_t>(i) * dim, q, k,
                                    v_.data() + static_cast<std::size_t>(i) * kvd});
        }
        if constexpr (!Policy::pre_rope) rope_.rotate(k, 1, kvd, c.num_kv_heads, pos, rope_base_);
        cache_.append(seq_, l, k, v_.data() + static_cast<std::size_t>(i) * kvd, 1);
        const kvq::index_t shape[2] = {c.num_heads, c.head_dim};
        kvq::AttentionOptions options;
        options.pool = pool_;
        kvq::attend(cache_, seq_, l, kvq::StridedView<const float, 2>(q, shape),
                    kvq::StridedView<float, 2>(att_.data() + static_cast<std::size_t>(i) * qd, shape), options);
      }
      linear(w.wo, att_.data(), n, qd, y_.data(), dim, pool_);
      add(x_.data(), y_.data(), static_cast<std::size_t>(n) * dim);
      rmsnorm(xn_.data(), x_.data(), w.ffn_norm.data(), n, dim);
      linear(w.w_gate, xn_.data(), n, dim, gate_.data(), hid, pool_);
      linear(w.w_up, xn_.data(), n, dim, up_.data(), hid, pool_);
      for (std::size_t j = 0; j < static_cast<std::size_t>(n) * hid; ++j) {
        const float g = gate_[j];
        gate_[j] = g / (1.0f + std::exp(-g)) * up_[j];  // SiLU(gate) * up
      }
      linear(w.w_down, gate_.data(), n, hid, y_.data(), dim, pool_);
      add(x_.data(), y_.data(), static_cast<std::size_t>(n) * dim);
    }
    pos_ += n;
    if (logits == nullptr) return;
    const int first = all_logits ? 0 : n - 1;
    rmsnorm(xn_.data(), x_.data() + static_cast<std::size_t>(first) * dim, model_.final_norm.data(), n - first, dim);
    const Matrix& cls = model_.classifier();
    linear(cls, xn_.data(), n - first, dim, logits, cls.rows, pool_);
  }

 private:
  void reserve(int n) {
    const ModelConfig& c = model_.config;
    const auto rows = static_cast<std::size_t>(n);
    auto grow = [rows](std::vector<float>& v, int width) {
      if (v.size() < rows * static_cast<std::size_t>(width)) v.resize(rows * static_cast<std::size_t>(width));
    };
    grow(x_, c.dim);
    grow(xn_, c.dim);
    grow(y_, c.dim);
    grow(q_, c.q_dim());
    grow(att_, c.q_dim());
    grow(k_, c.kv_dim());
    grow(v_, c.kv_dim());
    grow(gate_, c.hidden_dim);
    grow(up_, c.hidden_dim);
  }

  /// out[t] = weight ⊙ x[t] / sqrt(mean(x[t]²) + eps) for rows t < n of width `dim`.
  void rmsnorm(float* out, const float* x, const float* weight, int n, int dim) const noexcept {
    for (int t = 0; t < n; ++t) {
      const float* xt = x + static_cast<std::size_t>(t) * dim;
      float* ot = out + static_cast<std::size_t>(t) * dim;
      float ss = 0.0f;
      for (int j = 0; j < dim; ++j) ss += xt[j] * xt[j];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + model_.config.norm_eps);
      for (int j = 0; j < dim; ++j) ot[j] = weight[j] * (inv * xt[j]);
    }
  }

  static void add(float* x, const float* y, std::size_t n) noexcept {
    for (std::size_t j = 0; j < n; ++j) x[j] += y[j];
  }

  const Model& model_;
  Cache cache_;
  kvq::RopeRotator rope_;
  kvq::ThreadPool* pool_;
  int max_tokens_;
  kvq::SequenceId seq_ = 0;
  int pos_ = 0;
  AttentionObserver observer_;
  double rope_base_[2 * kvq::RopeRotator::kMaxHalf] = {};
  // Activations of a chunk, row-major [n, width].
  std::vector<float> x_, xn_, y_, q_, att_, k_, v_, gate_, up_;
};

}  // namespace kvq::llm
