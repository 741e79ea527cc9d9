// SPDX-License-Identifier: Apache-2.0
// Pins the static_assert of policy_traits that rejects a value stream quantized per channel
// (groups along tokens): KIVI §3.2 (per-channel values destroy accuracy); attention does not
// implement them.
#include <string>

#include "kvq/cache/quantized_kv_cache.hpp"

struct PerChannelValues {
  using KeyStream = kvq::QuantizedStream<kvq::Bits::k2, kvq::GroupAxis::kTokens, 32>;
#ifdef KVQ_SHOULD_FAIL_TO_BUILD
  using ValueStream = kvq::QuantizedStream<kvq::Bits::k2, kvq::GroupAxis::kTokens, 32>;
#else
  using ValueStream = kvq::QuantizedStream<kvq::Bits::k2, kvq::GroupAxis::kChannels, 32>;
#endif
  using KeyWindow = kvq::WindowSpec<0, 127, 128, kvq::FlushTiming::kAfterAttention>;
  using ValueWindow = kvq::WindowSpec<0, 127, 128, kvq::FlushTiming::kAfterAttention>;
  using exact_type = kvq::Float16;
  static constexpr int block_tokens = 128;
  static constexpr bool pre_rope = false;
  static std::string name() { return "per-channel-values"; }
};

int main() { return kvq::QuantizedKVCache<PerChannelValues>::block_tokens == 128 ? 0 : 1; }
