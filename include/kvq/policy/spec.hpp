// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Building blocks of a cache policy: how a stream (keys or values) is stored, and how its
///        tokens move from the full-precision window into the quantized store.
///
/// A policy stores keys and values as two independent *streams*. Per sequence and layer a stream
/// holds, oldest first: sinks (the first `sinks` tokens, exact), the quantized store (blocks of
/// `block_tokens` tokens) and the window (the most recent tokens, exact). Every token of a stream
/// is a row of `width` numbers: num_kv_heads * head_dim, or the latent rank for CSKV. Each stream
/// names its transform (the slot of what it does to rows before storing them).
#pragma once

#include <cstdint>
#include <type_traits>

#include "kvq/core/float_types.hpp"
#include "kvq/quant/bits.hpp"
#include "kvq/quant/matrix.hpp"
#include "kvq/quant/meta_format.hpp"
#include "kvq/transform/stream_transform.hpp"

namespace kvq {

/// Group length marker: one group per kv head's slice of a row (CSKV value latents: the group is
/// the per-head latent slice, width / num_kv_heads channels). Resolved when the cache is built.
inline constexpr int kGroupPerHead = 0;

// ---- transforms: the slot of a stream (transform/stream_transform.hpp has the run-time data) ----

/// Rows are stored as they come.
struct IdentityTransform {
  static constexpr TransformKind kind = TransformKind::kIdentity;
  static constexpr int percent = 100;
};

/// SKVQ channel reordering: per layer, a permutation of the row's channels with variable
/// per-token group boundaries (from calibration; identity order with equal groups until then).
/// Needs groups along channels.
struct ChannelReorder {
  static constexpr TransformKind kind = TransformKind::kChannelReorder;
  static constexpr int percent = 100;
};

/// CSKV low-rank projection: per layer, rows are stored as c = row · A of rank
/// num_kv_heads * round(Percent% of head_dim) and read back as c · B (A, B from calibration).
template <int Percent>
struct LatentProjection {
  static_assert(Percent > 0 && Percent <= 100,
                "kvq: LatentProjection: the rank is a percentage in 1..100 of each kv head's channels");
  static constexpr TransformKind kind = TransformKind::kLatentProjection;
  static constexpr int percent = Percent;
};

/// A stream quantized with the asymmetric min/max group quantizer of quant/.
/// @tparam B            code width
/// @tparam Axis         GroupAxis::kTokens (per-channel: groups of Group tokens of one channel)
///                      or GroupAxis::kChannels (per-token: groups of Group channels of one token)
/// @tparam Group        group length, or kGroupPerHead (kChannels only)
/// @tparam Meta         storage format of scales and zero-points
/// @tparam ClipPermille default clip ratio alpha in thousandths (1000 = plain min/max); a
///                      calibration may set one per layer
/// @tparam Transform    IdentityTransform, ChannelReorder or LatentProjection<P>
template <Bits B, GroupAxis Axis, int Group, MetaFormat Meta = MetaFormat::kFp16,
          int ClipPermille = 1000, class Transform = IdentityTransform>
struct QuantizedStream {
  static_assert(is_supported(B), "kvq: QuantizedStream: unsupported code width");
  static_assert(Group > 0 || (Group == kGroupPerHead && Axis == GroupAxis::kChannels),
                "kvq: QuantizedStream: Group must be positive (kGroupPerHead only for groups along "
                "channels)");
  static_assert(ClipPermille > 0 && ClipPermille <= 1000,
                "kvq: QuantizedStream: ClipPermille must be in 1..1000 (clip ratio in (0, 1])");
  static_assert(Transform::kind != TransformKind::kChannelReorder || Axis == GroupAxis::kChannels,
                "kvq: QuantizedStream: channel reordering needs groups along channels (per-token)");
  static constexpr bool quantized = true;
  static constexpr Bits bits = B;
  static constexpr GroupAxis axis = Axis;
  static constexpr int group_size = Group;
  static constexpr MetaFormat meta = Meta;
  static constexpr float clip = static_cast<float>(ClipPermille) / 1000.0f;
  using transform = Transform;
};

/// A stream stored without quantization, as T (Float16, BFloat16 or float), after its transform
/// (CSKV with full-precision latents: LatentProjection<P>).
template <class T, class Transform = IdentityTransform>
struct ExactStream {
  static_assert(std::is_same_v<T, Float16> || std::is_same_v<T, BFloat16> ||
                    std::is_same_v<T, float>,
                "kvq: ExactStream stores Float16, BFloat16 or float");
  static_assert(Transform::kind != TransformKind::kChannelReorder,
                "kvq: ExactStream: channel reordering only changes quantization groups; an exact "
                "stream has none");
  static constexpr bool quantized = false;
  using value_type = T;
  using transform = Transform;
};

/// Latent rank per kv head of a CSKV stream that keeps `percent`% of the head's channels:
/// max(1, round(head_dim * percent / 100)); a layer row has num_kv_heads times as many.
constexpr index_t latent_head_rank(index_t head_dim, int percent) noexcept {
  const index_t r = (head_dim * percent + 50) / 100;
  return r < 1 ? 1 : r;
}

/// Numbers per kv head that a stored row of stream S holds: head_dim, or for a latent
/// projection latent_head_rank(head_dim, percent).
template <class S>
constexpr index_t stored_head_width(index_t head_dim) noexcept {
  if constexpr (S::transform::kind == TransformKind::kLatentProjection) {
    return latent_head_rank(head_dim, S::transform::percent);
  } else {
    return head_dim;
  }
}

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

}  // namespace kvq
