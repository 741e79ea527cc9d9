// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Human-readable summaries of a registered policy (code widths, grouping, sinks and
///        window) and the latent factors a CSKV cache needs, shared by `kvq policies` and
///        `kvq roundtrip --policy`.
#pragma once

#include <fmt/core.h>

#include <cstdint>
#include <string>

#include "kvq/cache/quantized_kv_cache.hpp"
#include "kvq/cache/window_schedule.hpp"
#include "kvq/policy/policy_traits.hpp"
#include "kvq/transform/latent.hpp"

namespace kvq_tool {

/// "2", "1.5", or "16"/"32" for an exact stream.
template <class S>
std::string stream_bits_label() {
  if constexpr (S::quantized) {
    return kvq::bits_label(S::bits);
  } else {
    return std::to_string(8 * sizeof(typename S::value_type));
  }
}

/// Channels of one kv head in the key (value) stream of policy P: head_dim, or the per-head
/// latent rank of a CSKV policy.
template <class P>
kvq::index_t stream_head_width(kvq::index_t head_dim, bool key) {
  return key ? kvq::stored_head_width<typename P::KeyStream>(head_dim)
             : kvq::stored_head_width<typename P::ValueStream>(head_dim);
}

/// How a stream is grouped: "per-channel g32", "per-token g128", "per-token g64/head"
/// (one group per kv head's `head_width` channels), or "exact".
template <class S>
std::string stream_grouping(kvq::index_t head_width) {
  if constexpr (S::quantized) {
    std::string text = S::axis == kvq::GroupAxis::kTokens ? "per-channel" : "per-token";
    text += S::group_size == kvq::kGroupPerHead ? fmt::format(" g{}/head", head_width)
                                                : fmt::format(" g{}", S::group_size);
    return text;
  } else {
    return "exact";
  }
}

/// Exact tokens of a stream as "sinks + window": "5 + 128" (5 sinks, a window of 128 tokens
/// leaving one at a time), "<128 (by 128)" (the last length mod 128 tokens, leaving in chunks of
/// 128), "none".
inline std::string window_text(const kvq::WindowRule& r) {
  const std::string sinks = r.sinks > 0 ? fmt::format("{} + ", r.sinks) : "";
  if (r.max_window == 0) return r.sinks > 0 ? sinks + "0" : "none";
  if (r.chunk == 1) return sinks + fmt::format("{}", r.max_window);
  return sinks + fmt::format("<{} (by {})", r.chunk, r.chunk);
}

/// Exact tokens of both streams (window_text): one text when they agree, "K ...; V ..."
/// otherwise, "all" when nothing is quantized.
template <class P>
std::string exact_tokens_text() {
  using Traits = kvq::policy_traits<P>;
  if constexpr (!Traits::key_quantized && !Traits::value_quantized) {
    return "all";
  } else {
    const auto k = kvq::WindowRule::of<typename P::KeyWindow>();
    const auto v = kvq::WindowRule::of<typename P::ValueWindow>();
    const std::string kt = window_text(k), vt = window_text(v);
    return kt == vt ? kt : "K " + kt + "; V " + vt;
  }
}

/// Metadata format and clip ratio of a policy's streams: "fp16", "fp8 clip 0.92", "-".
template <class P>
std::string meta_text() {
  using K = typename P::KeyStream;
  using V = typename P::ValueStream;
  auto one = [](auto stream) -> std::string {
    using S = decltype(stream);
    if constexpr (S::quantized) {
      return kvq::meta_label(S::meta) + (S::clip < 1.0f ? fmt::format(" clip {:g}", S::clip) : "");
    } else {
      return "-";
    }
  };
  const std::string k = one(K{}), v = one(V{});
  return k == v ? k : "K " + k + ", V " + v;
}

/// "50%/50%" for a CSKV policy (latent ranks as a share of the kv row), "-" otherwise.
template <class P>
std::string latent_text() {
  if constexpr (kvq::policy_traits<P>::latent) {
    return fmt::format("{}%/{}%", P::KeyStream::transform::percent, P::ValueStream::transform::percent);
  } else {
    return "-";
  }
}

/// The per-layer calibration a cache of policy P needs without a calibration file: random
/// orthonormal latent factors (seeded) for CSKV policies, nothing otherwise.
template <class P>
kvq::CacheCalibration default_calibration(kvq::index_t num_layers, kvq::index_t num_kv_heads,
                                          kvq::index_t head_dim, std::uint64_t seed) {
  kvq::CacheConfig config;
  config.num_layers = num_layers;
  config.num_kv_heads = num_kv_heads;
  config.head_dim = head_dim;
  return kvq::random_latent_calibration<P>(config, seed);
}

}  // namespace kvq_tool
