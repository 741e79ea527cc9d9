// SPDX-License-Identifier: Apache-2.0
// Pins the static_assert of policy_traits when QuantizedKVCache is given a type that is not a
// policy.
#include "kvq/cache/quantized_kv_cache.hpp"
#include "kvq/policy/kivi.hpp"

struct NotAPolicy {
  static constexpr int block_tokens = 64;
};

#ifdef KVQ_SHOULD_FAIL_TO_BUILD
using Cache = kvq::QuantizedKVCache<NotAPolicy>;
#else
using Cache = kvq::QuantizedKVCache<kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2>>;
#endif

static_assert(!kvq::is_kv_policy_v<NotAPolicy>, "NotAPolicy lacks the policy members");

int main() { return Cache::block_tokens > 0 ? 0 : 1; }
