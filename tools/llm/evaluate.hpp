// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Perplexity with decode semantics (DESIGN.md §7): every token is scored by the logits
///        of a decode step whose attention sees exactly what the policy's cache holds then.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/core/thread_pool.hpp"
#include "llm/model.hpp"
#include "llm/any_session.hpp"
#include "llm/session.hpp"
#include "llm/tokenizer.hpp"

namespace kvq::llm {

/// The token windows of an evaluation. Each window runs on a fresh cache; position i of a
/// window predicts position i + 1, so a window of n tokens scores n - 1 of them.
struct EvalPlan {
  std::vector<std::vector<int>> windows;
  int text_tokens = 0;  ///< tokens of the text used (BOS not counted)

  int scored_tokens() const noexcept {
    int n = 0;
    for (const auto& w : windows) n += std::max<int>(0, static_cast<int>(w.size()) - 1);
    return n;
  }
  int fed_tokens() const noexcept {
    int n = 0;
    for (const auto& w : windows) n += static_cast<int>(w.size());
    return n;
  }
};

/// The first `tokens` tokens of `text_tokens` cut into windows of at most `window` positions.
/// With BOS (add_bos) each window is BOS + window - 1 text tokens and every text token is
/// scored; without, a window is `window` text tokens and its first is context only.
inline EvalPlan make_plan(const std::vector<int>& text_tokens, int tokens, int window, int bos, bool add_bos) {
  if (tokens < 2) kvq::detail::throw_argument_error("kvq eval", "--tokens", tokens, "at least 2 tokens");
  if (window < 2) kvq::detail::throw_argument_error("kvq eval", "--window", window, "at least 2 positions");
  if (static_cast<int>(text_tokens.size()) < tokens) {
    kvq::detail::throw_argument_error("kvq eval", "--tokens", tokens,
                                      "at most the " + std::to_string(text_tokens.size()) + " tokens of the text");
  }
  EvalPlan plan;
  plan.text_tokens = tokens;
  const int per_window = add_bos ? window - 1 : window;
  for (int at = 0; at < tokens; at += per_window) {
    std::vector<int> w;
    if (add_bos) w.push_back(bos);
    const int n = std::min(per_window, tokens - at);
    w.insert(w.end(), text_tokens.begin() + at, text_tokens.begin() + at + n);
    if (w.size() >= 2) plan.windows.push_back(std::move(w));
  }
  return plan;
}

/// log softmax(logits)[token], in double.
inline double log_prob(const float* logits, int vocab, int token) {
  const float mx = *std::max_element(logits, logits + vocab);
  double sum = 0.0;
  for (int i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i]) - mx);
  return static_cast<double>(logits[token]) - mx - std::log(sum);
}

/// What one policy measured.
struct PolicyResult {
  std::string policy;
  double nll = 0.0;           ///< sum of -log p over scored tokens
  int scored = 0;             ///< tokens scored
  double bits_per_element = 0.0;    ///< cache bytes * 8 / stored K/V elements, end of the longest window
  double bytes_per_token = 0.0;     ///< cache bytes / tokens (all layers, K and V), same moment
  double cache_bytes = 0.0;         ///< cache bytes at that moment
  int cache_tokens = 0;             ///< tokens in the cache at that moment
  double seconds = 0.0;             ///< forward passes only (calibration excluded)
  double calibration_seconds = 0.0; ///< building the cache, CSKV factors included
  std::vector<double> logprobs;     ///< per fed token: log p(token | before), NaN where unscored

  double perplexity() const { return std::exp(nll / std::max(1, scored)); }
  double tokens_per_second(int fed) const { return seconds > 0 ? fed / seconds : 0.0; }
};

/// Called after each chunk with (tokens done, tokens in all).
using Progress = std::function<void(int done, int total)>;

/// Runs the plan on fresh sessions from `make` (one per window), `chunk` tokens per forward call.
/// `label` names the result.
inline PolicyResult evaluate(const SessionFactory& make, const std::string& label, const Model& model,
                             const EvalPlan& plan, int chunk, const Progress& progress = {}) {
  if (chunk < 1) kvq::detail::throw_argument_error("kvq eval", "--chunk", chunk, "a positive token count");
  using clock = std::chrono::steady_clock;
  PolicyResult r;
  r.policy = label;
  const int vocab = model.config.vocab_size;
  const int total = plan.fed_tokens();
  std::vector<float> logits(static_cast<std::size_t>(chunk) * static_cast<std::size_t>(vocab));
  int done = 0;
  std::size_t longest = 0;
  for (const std::vector<int>& w : plan.windows) {
    const auto t0 = clock::now();
    const std::unique_ptr<AnySession> session = make(static_cast<int>(w.size()));
    const auto t1 = clock::now();
    r.calibration_seconds += std::chrono::duration<double>(t1 - t0).count();
    r.logprobs.push_back(std::nan(""));
    for (std::size_t at = 0; at < w.size(); at += static_cast<std::size_t>(chunk)) {
      const int n = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(chunk), w.size() - at));
      const auto f0 = clock::now();
      session->forward(w.data() + at, n, logits.data(), true);
      r.seconds += std::chrono::duration<double>(clock::now() - f0).count();
      for (int i = 0; i < n; ++i) {
        const std::size_t target = at + static_cast<std::size_t>(i) + 1;
        if (target >= w.size()) break;
        const double lp = log_prob(logits.data() + static_cast<std::size_t>(i) * vocab, vocab, w[target]);
        r.logprobs.push_back(lp);
        r.nll -= lp;
        ++r.scored;
      }
      done += n;
      if (progress) progress(done, total);
    }
    if (w.size() > longest) {
      longest = w.size();
      r.bits_per_element = session->bits_per_element();
      r.cache_bytes = static_cast<double>(session->cache_bytes());
      r.cache_tokens = static_cast<int>(w.size());
      r.bytes_per_token = r.cache_bytes / static_cast<double>(w.size());
    }
  }
  return r;
}

/// evaluate() on fresh caches of Policy with `calibration` (null: default_calibration).
template <class Policy>
PolicyResult evaluate(const Model& model, const EvalPlan& plan, int chunk, kvq::ThreadPool* pool,
                      const Progress& progress = {}, const kvq::CacheCalibration* calibration = nullptr) {
  const SessionFactory make = [&](int max_tokens) -> std::unique_ptr<AnySession> {
    return std::make_unique<PolicySession<Policy>>(model, max_tokens, pool, calibration);
  };
  return evaluate(make, Policy::name(), model, plan, chunk, progress);
}

}  // namespace kvq::llm
