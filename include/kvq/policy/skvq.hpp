// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief SkvqPolicy: reordered clipped per-token groups, sliding window, attention sinks
///        (ALGORITHMS.md §2).
#pragma once

#include <string>

#include "kvq/core/float_types.hpp"
#include "kvq/policy/spec.hpp"

namespace kvq {

/// SKVQ (Duanmu et al., COLM 2024). Keys and values are both quantized per token, in groups of
/// channels of the whole layer row (num_kv_heads * head_dim channels, SKVQ groups across heads)
/// after a channel permutation with variable group boundaries (the ChannelReorder transform:
/// identity order with round(width / Group) equal groups until a calibration provides them;
/// kvq::calib computes them). Scales and zeros in FP8 E4M3 by default, clip ratio ClipPermille /
/// 1000 (0.92: the authors' LongBench setting) unless the calibration sets one per layer. The first Sinks tokens
/// stay exact; the last Window tokens stay exact and the oldest leaves one token at a time,
/// quantized before the step's attention. Ternary values (Bits::kTernary) use the dense 5-codes-
/// per-byte packing.
/// @tparam PreRope  store keys before RoPE (as published); attention rotates them
template <Bits KeyBits, Bits ValueBits, int Group = 128, int Window = 128, int Sinks = 5,
          int ClipPermille = 920, MetaFormat Meta = MetaFormat::kFp8E4M3, bool PreRope = true>
struct SkvqPolicy {
  static_assert(Window >= 0 && Sinks >= 0, "kvq: SkvqPolicy: Window and Sinks must be >= 0");
  using KeyStream = QuantizedStream<KeyBits, GroupAxis::kChannels, Group, Meta, ClipPermille, ChannelReorder>;
  using ValueStream =
      QuantizedStream<ValueBits, GroupAxis::kChannels, Group, Meta, ClipPermille, ChannelReorder>;
  using KeyWindow = WindowSpec<Sinks, Window, 1, FlushTiming::kBeforeAttention>;
  using ValueWindow = KeyWindow;
  using exact_type = Float16;
  static constexpr int block_tokens = 64;
  static constexpr bool pre_rope = PreRope;
  static constexpr int group_size = Group;
  static constexpr int window_tokens = Window;
  static constexpr int sink_tokens = Sinks;

  static std::string name() {
    std::string n = "skvq-k" + bits_label(KeyBits) + "v" + bits_label(ValueBits) + "-g" +
                    std::to_string(Group) + "-w" + std::to_string(Window) + "-s" +
                    std::to_string(Sinks);
    if (ClipPermille != 920) n += "-c" + std::to_string(ClipPermille);
    if (Meta != MetaFormat::kFp8E4M3) n += "-" + meta_label(Meta);
    if (!PreRope) n += "-postrope";
    return n;
  }
};

}  // namespace kvq
