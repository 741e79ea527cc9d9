// SPDX-License-Identifier: Apache-2.0
// Pins the static_assert of policy_traits that rejects per-channel key groups that a block (or
// the flush chunk) would cut: block_tokens 48 with groups of 32 tokens.
#include <string>

#include "kvq/cache/quantized_kv_cache.hpp"

struct CutGroups {
  using KeyStream = kvq::QuantizedStream<kvq::Bits::k4, kvq::GroupAxis::kTokens, 32>;
  using ValueStream = kvq::QuantizedStream<kvq::Bits::k4, kvq::GroupAxis::kChannels, 32>;
  using KeyWindow = kvq::WindowSpec<0, 31, 32, kvq::FlushTiming::kBeforeAttention>;
  using ValueWindow = KeyWindow;
  using exact_type = kvq::Float16;
#ifdef KVQ_SHOULD_FAIL_TO_BUILD
  static constexpr int block_tokens = 48;
#else
  static constexpr int block_tokens = 64;
#endif
  static constexpr bool pre_rope = false;
  static std::string name() { return "cut-groups"; }
};

int main() { return kvq::policy_traits<CutGroups>::block_tokens > 0 ? 0 : 1; }
