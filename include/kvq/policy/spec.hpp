// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Building blocks of a cache policy: how a stream (keys or values) is stored, and how its
///        tokens move from the full-precision window into the quantized store.
///
/// A policy stores keys and values as two independent *streams*. Per sequence and layer a stream
/// holds, oldest first: sinks (the first `sinks` tokens, exact), the quantized store (blocks of
/// `block_tokens` tokens) and the window (the most recent tokens, exact). Every token of a stream
/// is a row of `width` numbers: num_kv_heads * head_dim, or the latent rank for CSKV.
#pragma once

#include <cstdint>

#include "kvq/core/float_types.hpp"
#include "kvq/quant/bits.hpp"
#include "kvq/quant/matrix.hpp"
#include "kvq/quant/meta_format.hpp"

namespace kvq {

/// Group length marker: one group per kv head's slice of a row (CSKV value latents: the group is
/// the per-head latent slice, width / num_kv_heads channels). Resolved when the cache is built.
inline constexpr int kGroupPerHead = 0;

/// A stream quantized with the asymmetric min/max group quantizer of quant/.
/// @tparam B            code width
/// @tparam Axis         GroupAxis::kTokens (per-channel: groups of Group tokens of one channel)
///                      or GroupAxis::kChannels (per-token: groups of Group channels of one token)
/// @tparam Group        group length, or kGroupPerHead (kChannels only)
/// @tparam Meta         storage format of scales and zero-points
/// @tparam ClipPermille clip ratio alpha in thousandths (1000 = plain min/max)
/// @tparam Reorderable  accepts SKVQ channel groups (a permutation and variable boundaries)
template <Bits B, GroupAxis Axis, int Group, MetaFormat Meta = MetaFormat::kFp16,
          int ClipPermille = 1000, bool Reorderable = false>
struct QuantizedStream {
  static_assert(is_supported(B), "kvq: QuantizedStream: unsupported code width");
  static_assert(Group > 0 || (Group == kGroupPerHead && Axis == GroupAxis::kChannels),
                "kvq: QuantizedStream: Group must be positive (kGroupPerHead only for groups along "
                "channels)");
  static_assert(ClipPermille > 0 && ClipPermille <= 1000,
                "kvq: QuantizedStream: ClipPermille must be in 1..1000 (clip ratio in (0, 1])");
  static_assert(!Reorderable || Axis == GroupAxis::kChannels,
                "kvq: QuantizedStream: channel reordering needs groups along channels (per-token)");
  static constexpr bool quantized = true;
  static constexpr Bits bits = B;
  static constexpr GroupAxis axis = Axis;
  static constexpr int group_size = Group;
  static constexpr MetaFormat meta = Meta;
  static constexpr float clip = static_cast<float>(ClipPermille) / 1000.0f;
  static constexpr bool reorderable = Reorderable;
};

/// A stream stored without quantization, as T (Float16, BFloat16 or float).
template <class T>
struct ExactStream {
  static_assert(std::is_same_v<T, Float16> || std::is_same_v<T, BFloat16> ||
                    std::is_same_v<T, float>,
                "kvq: ExactStream stores Float16, BFloat16 or float");
  static constexpr bool quantized = false;
  using value_type = T;
};

/// When tokens that leave the window are quantized, relative to the attention of the step that
/// appended the token making the window overflow.
enum class FlushTiming : std::uint8_t {
  kBeforeAttention,  ///< at the end of append (SKVQ, CSKV, baselines)
  kAfterAttention,   ///< at the start of the next append (KIVI: the step's attention still sees
                     ///< the full window; ALGORITHMS.md §1.4 steps 3 and 6)
};

/// How a stream's tokens settle. After an append settles, the window holds at most MaxWindow
/// tokens; tokens leave it oldest first, in chunks of Chunk tokens. With kAfterAttention a
/// single-token append (a decode step) leaves the window one token over (MaxWindow + 1) until
/// the next append; a multi-token append (prefill) settles at once.
///   KIVI keys:   <0, R - 1, R, kAfterAttention>   window = length mod R, chunks of R
///   KIVI values: <0, R, 1, kAfterAttention>       window = min(length, R), one token at a time
///   SKVQ:        <S, W, 1, kBeforeAttention>      sinks S, window W, one token at a time
///   CSKV:        <0, M - 1, M, kBeforeAttention>  window = length mod M, chunks of M
template <int Sinks, int MaxWindow, int Chunk, FlushTiming Timing>
struct WindowSpec {
  static_assert(Sinks >= 0, "kvq: WindowSpec: Sinks must be >= 0");
  static_assert(Chunk >= 1, "kvq: WindowSpec: Chunk must be >= 1");
  static_assert(MaxWindow >= Chunk - 1,
                "kvq: WindowSpec: MaxWindow must be at least Chunk - 1 (a chunk leaves only when "
                "the window holds a whole chunk)");
  static constexpr int sinks = Sinks;
  static constexpr int max_window = MaxWindow;
  static constexpr int chunk = Chunk;
  static constexpr FlushTiming timing = Timing;
  /// Exact rows a sequence keeps per layer for the window: the most it can hold at any time
  /// (MaxWindow, plus the pending token of an after-attention flush).
  static constexpr int window_capacity = MaxWindow + (Timing == FlushTiming::kAfterAttention ? 1 : 0);
};

/// No latent projection: streams hold keys and values themselves (width num_kv_heads * head_dim).
struct NoLatent {
  static constexpr bool enabled = false;
};

/// CSKV latent projection: streams hold c = k·A_K and c = v·A_V, of rank
/// round(KeyPercent% of num_kv_heads * head_dim) and round(ValuePercent% ...).
template <int KeyPercent, int ValuePercent>
struct LatentSpec {
  static_assert(KeyPercent > 0 && KeyPercent <= 100 && ValuePercent > 0 && ValuePercent <= 100,
                "kvq: LatentSpec: ranks are percentages in 1..100 of num_kv_heads * head_dim");
  static constexpr bool enabled = true;
  static constexpr int key_percent = KeyPercent;
  static constexpr int value_percent = ValuePercent;
};

}  // namespace kvq
