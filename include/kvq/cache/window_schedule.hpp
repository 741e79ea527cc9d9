// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The sink / quantized / window state machine of one stream, as pure functions of token
///        counts (ALGORITHMS.md §1.4, §2.6, §3.2; WindowSpec in policy/spec.hpp).
#pragma once

#include "kvq/core/bits.hpp"
#include "kvq/policy/spec.hpp"

namespace kvq {

/// Token counts of one stream of one sequence and layer. Positions [0, sinks) are sinks,
/// [sinks, sinks + quantized) are quantized, [sinks + quantized, length) are the window.
struct StreamCounts {
  index_t length = 0;
  index_t quantized = 0;
};

/// Runtime copy of a WindowSpec.
struct WindowRule {
  index_t sinks = 0;
  index_t max_window = 0;
  index_t chunk = 1;
  FlushTiming timing = FlushTiming::kBeforeAttention;

  template <class Spec>
  static constexpr WindowRule of() noexcept {
    return {Spec::sinks, Spec::max_window, Spec::chunk, Spec::timing};
  }

  index_t sink_count(const StreamCounts& c) const noexcept {
    return c.length < sinks ? c.length : sinks;
  }
  index_t window_count(const StreamCounts& c) const noexcept {
    return c.length - sink_count(c) - c.quantized;
  }
  /// Quantizes whole chunks, oldest first, until the window holds at most max_window tokens.
  StreamCounts settle(StreamCounts c) const noexcept {
    const index_t excess = window_count(c) - max_window;
    if (excess > 0) c.quantized += ceil_div(excess, chunk) * chunk;
    return c;
  }
  /// Counts after appending n tokens: a pending (after-attention) flush happens first; a decode
  /// step (n == 1) under kAfterAttention leaves its own flush pending until the next append.
  StreamCounts after_append(StreamCounts c, index_t n) const noexcept {
    if (n == 0) return c;
    c = settle(c);
    c.length += n;
    if (timing == FlushTiming::kBeforeAttention || n > 1) c = settle(c);
    return c;
  }
};

}  // namespace kvq
