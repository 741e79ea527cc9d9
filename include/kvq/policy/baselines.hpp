// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Baseline policies for comparison: Fp16Policy (no quantization) and PerTokenPolicy
///        (keys and values per token, no window: the layout of HF QuantizedCache and llama.cpp).
#pragma once

#include <string>
#include <type_traits>

#include "kvq/core/float_types.hpp"
#include "kvq/policy/spec.hpp"

namespace kvq {

/// Every token stored exactly as T (Float16, BFloat16, or float for a full-precision reference).
template <class T = Float16>
struct Fp16Policy {
  using KeyStream = ExactStream<T>;
  using ValueStream = ExactStream<T>;
  using KeyWindow = WindowSpec<0, 0, 1, FlushTiming::kBeforeAttention>;
  using ValueWindow = KeyWindow;
  using exact_type = T;
  static constexpr int block_tokens = 16;
  static constexpr bool pre_rope = false;

  static std::string name() {
    return std::is_same_v<T, Float16> ? "fp16" : std::is_same_v<T, BFloat16> ? "bf16" : "fp32";
  }
};

/// Keys and values quantized per token in groups of Group channels, fp16 metadata, no window
/// and no sinks: every token is quantized as it arrives.
template <Bits KeyBits, Bits ValueBits, int Group = 32>
struct PerTokenPolicy {
  using KeyStream = QuantizedStream<KeyBits, GroupAxis::kChannels, Group>;
  using ValueStream = QuantizedStream<ValueBits, GroupAxis::kChannels, Group>;
  using KeyWindow = WindowSpec<0, 0, 1, FlushTiming::kBeforeAttention>;
  using ValueWindow = KeyWindow;
  using exact_type = Float16;
  static constexpr int block_tokens = 64;
  static constexpr bool pre_rope = false;

  static std::string name() {
    return "pertoken-k" + bits_label(KeyBits) + "v" + bits_label(ValueBits) + "-g" +
           std::to_string(Group);
  }
};

}  // namespace kvq
