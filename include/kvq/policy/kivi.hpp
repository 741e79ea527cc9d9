// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief KiviPolicy: per-channel keys, per-token values, full-precision residual (ALGORITHMS.md §1).
#pragma once

#include <string>

#include "kvq/core/float_types.hpp"
#include "kvq/policy/spec.hpp"

namespace kvq {

/// KIVI (Liu et al., ICML 2024). Keys are quantized per channel over groups of Group tokens and
/// leave the residual in chunks of Residual tokens after the step's attention; values are
/// quantized per token over groups of Group channels and leave one token at a time, so the value
/// residual is exactly Residual tokens after each step. Scales and zeros in fp16; no clipping;
/// keys stored after RoPE. Paper defaults: Group = 32, Residual = 128.
/// @tparam KeyBits, ValueBits  code widths (KIVI-2: Bits::k2, KIVI-4: Bits::k4)
template <Bits KeyBits, Bits ValueBits, int Group = 32, int Residual = 128>
struct KiviPolicy {
  static_assert(Group > 0 && Residual >= Group && Residual % Group == 0,
                "kvq: KiviPolicy needs Residual to be a positive multiple of Group (KIVI asserts "
                "R % G == 0: keys leave the residual as whole groups of tokens)");
  static_assert(KeyBits != Bits::kTernary && ValueBits != Bits::kTernary,
                "kvq: KiviPolicy uses integer codes of 2, 3, 4 or 8 bits; ternary (1.5-bit) codes "
                "are SKVQ's (use SkvqPolicy)");
  using KeyStream = QuantizedStream<KeyBits, GroupAxis::kTokens, Group>;
  using ValueStream = QuantizedStream<ValueBits, GroupAxis::kChannels, Group>;
  using KeyWindow = WindowSpec<0, Residual - 1, Residual, FlushTiming::kAfterAttention>;
  using ValueWindow = WindowSpec<0, Residual, 1, FlushTiming::kAfterAttention>;
  using exact_type = Float16;
  static constexpr int block_tokens = Residual;
  static constexpr bool pre_rope = false;
  static constexpr int group_size = Group;
  static constexpr int residual_tokens = Residual;

  static std::string name() {
    return "kivi-k" + bits_label(KeyBits) + "v" + bits_label(ValueBits) + "-g" +
           std::to_string(Group) + "-r" + std::to_string(Residual);
  }
};

}  // namespace kvq
