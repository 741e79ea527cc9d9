// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief A Session of a policy chosen by name at run time (policy/registry.hpp), so that the
///        tool's commands compile each policy's cache, attention and forward pass once: the
///        sessions of each policy family are instantiated in a translation unit of their own
///        (sessions_<family>.cpp), which builds them in parallel.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "kvq/cache/cache_config.hpp"
#include "kvq/core/thread_pool.hpp"
#include "kvq/policy/registry.hpp"
#include "llm/model.hpp"
#include "llm/session.hpp"

namespace kvq::llm {

/// One sequence decoding on a cache of some registered policy.
class AnySession {
 public:
  virtual ~AnySession() = default;
  /// Session::forward: tokens[0..n) as n decode steps; logits [n, vocab] or [vocab].
  virtual void forward(const int* tokens, int n, float* logits, bool all_logits = true) = 0;
  virtual int position() const noexcept = 0;
  virtual void set_observer(AttentionObserver observer) = 0;
  virtual std::size_t cache_bytes() const noexcept = 0;
  virtual double bits_per_element() const noexcept = 0;
  /// The cache's keys (before RoPE for pre-RoPE policies) / values of a layer, out
  /// [position(), kv_dim] (QuantizedKVCache::read_keys / read_values).
  virtual void read_keys(int layer, float* out) const = 0;
  virtual void read_values(int layer, float* out) const = 0;
};

/// The session of policy P behind AnySession.
template <class P>
class PolicySession final : public AnySession {
 public:
  PolicySession(const Model& model, int max_tokens, kvq::ThreadPool* pool, const kvq::CacheCalibration* calibration)
      : session_(model, max_tokens, pool, calibration) {}
  void forward(const int* tokens, int n, float* logits, bool all_logits) override {
    session_.forward(tokens, n, logits, all_logits);
  }
  int position() const noexcept override { return session_.position(); }
  void set_observer(AttentionObserver observer) override { session_.set_observer(std::move(observer)); }
  std::size_t cache_bytes() const noexcept override { return session_.cache().memory_bytes(); }
  double bits_per_element() const noexcept override { return session_.cache().bits_per_element(); }
  void read_keys(int layer, float* out) const override {
    session_.cache().read_keys(session_.sequence(), layer, out);
  }
  void read_values(int layer, float* out) const override {
    session_.cache().read_values(session_.sequence(), layer, out);
  }
  const Session<P>& session() const noexcept { return session_; }

 private:
  Session<P> session_;
};

/// The policy families, one translation unit each.
enum class PolicyFamily { kBaseline, kKivi, kSkvq, kCskv };

template <class P>
struct policy_family {
  static constexpr PolicyFamily value = PolicyFamily::kBaseline;
};
template <Bits K, Bits V, int G, int R>
struct policy_family<KiviPolicy<K, V, G, R>> {
  static constexpr PolicyFamily value = PolicyFamily::kKivi;
};
template <Bits K, Bits V, int G, int W, int S, int C, MetaFormat M, bool R>
struct policy_family<SkvqPolicy<K, V, G, W, S, C, M, R>> {
  static constexpr PolicyFamily value = PolicyFamily::kSkvq;
};
template <Bits K, Bits V, int KP, int VP, int W>
struct policy_family<CskvPolicy<K, V, KP, VP, W>> {
  static constexpr PolicyFamily value = PolicyFamily::kCskv;
};
template <int KP, int VP, int W>
struct policy_family<CskvFp16Policy<KP, VP, W>> {
  static constexpr PolicyFamily value = PolicyFamily::kCskv;
};

/// The session of the registered policy `name` if it belongs to family F, else null.
template <PolicyFamily F>
std::unique_ptr<AnySession> make_family_session(const std::string& name, const Model& model, int max_tokens,
                                                kvq::ThreadPool* pool, const kvq::CacheCalibration* calibration) {
  std::unique_ptr<AnySession> s;
  kvq::for_each_policy([&](auto tag) {
    using P = typename decltype(tag)::type;
    if constexpr (policy_family<P>::value == F) {
      if (!s && P::name() == name) s = std::make_unique<PolicySession<P>>(model, max_tokens, pool, calibration);
    }
  });
  return s;
}

extern template std::unique_ptr<AnySession> make_family_session<PolicyFamily::kBaseline>(
    const std::string&, const Model&, int, kvq::ThreadPool*, const kvq::CacheCalibration*);
extern template std::unique_ptr<AnySession> make_family_session<PolicyFamily::kKivi>(
    const std::string&, const Model&, int, kvq::ThreadPool*, const kvq::CacheCalibration*);
extern template std::unique_ptr<AnySession> make_family_session<PolicyFamily::kSkvq>(
    const std::string&, const Model&, int, kvq::ThreadPool*, const kvq::CacheCalibration*);
extern template std::unique_ptr<AnySession> make_family_session<PolicyFamily::kCskv>(
    const std::string&, const Model&, int, kvq::ThreadPool*, const kvq::CacheCalibration*);

/// A session of the registered policy `name` with room for max_tokens tokens. calibration:
/// the cache's per-layer data (null: llm/calibration.hpp's default_calibration). Throws
/// kvq::Error naming the known policies for an unknown name.
inline std::unique_ptr<AnySession> make_session(const std::string& name, const Model& model, int max_tokens,
                                                kvq::ThreadPool* pool, const kvq::CacheCalibration* calibration = nullptr) {
  for (auto* make : {&make_family_session<PolicyFamily::kBaseline>, &make_family_session<PolicyFamily::kKivi>,
                     &make_family_session<PolicyFamily::kSkvq>, &make_family_session<PolicyFamily::kCskv>}) {
    if (std::unique_ptr<AnySession> s = make(name, model, max_tokens, pool, calibration)) return s;
  }
  kvq::dispatch_policy(name, [](auto) {});  // throws the registry's error for an unknown name
  kvq::detail::throw_argument_error("kvq::llm::make_session", "policy", name, "a policy with a session family");
}

/// Makes a fresh session for a window of `max_tokens` tokens.
using SessionFactory = std::function<std::unique_ptr<AnySession>(int max_tokens)>;

}  // namespace kvq::llm
