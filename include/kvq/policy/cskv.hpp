// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief CskvPolicy: low-rank latent cache plus a full-precision window (ALGORITHMS.md §3).
#pragma once

#include <string>

#include "kvq/core/float_types.hpp"
#include "kvq/policy/spec.hpp"

namespace kvq {

namespace detail {

/// What both CSKV policies share: the last (length mod Window) tokens stay exact, a full chunk
/// of Window tokens leaves the window before the step's attention, keys are stored pre-RoPE.
template <int Window>
struct CskvWindowing {
  static_assert(Window > 0, "kvq: CSKV: Window must be positive");
  using KeyWindow = WindowSpec<0, Window - 1, Window, FlushTiming::kBeforeAttention>;
  using ValueWindow = KeyWindow;
  using exact_type = Float16;
  static constexpr int block_tokens = Window * (Window >= 64 ? 1 : 64 / Window);
  static constexpr bool pre_rope = true;
  static constexpr int window_tokens = Window;
};

}  // namespace detail

/// CSKV (Wang et al., 2024). Per layer, the cache stores latent rows c_K = k·A_K and
/// c_V = v·A_V (k, v: the layer's row of num_kv_heads * head_dim numbers; ranks KeyPercent% and
/// ValuePercent% of it, rounded per head: the LatentProjection transform) and reconstructs
/// K = c_K·B_K, V = c_V·B_V inside attention. The factors come from a calibration
/// (kvq/calib/latent_factors.hpp: SVD, ASVD or the activation-aware refit). The `--use_window`
/// grouping: key latents per channel over groups of Window tokens, value latents per token with
/// one group per head's latent slice. The last (length mod Window) tokens stay exact; a full
/// chunk of Window tokens leaves the window before the step's attention. Keys are stored before
/// RoPE, as published.
template <Bits KeyBits, Bits ValueBits, int KeyPercent = 50, int ValuePercent = 50,
          int Window = 32>
struct CskvPolicy : detail::CskvWindowing<Window> {
  using KeyStream = QuantizedStream<KeyBits, GroupAxis::kTokens, Window, MetaFormat::kFp16, 1000,
                                    LatentProjection<KeyPercent>>;
  using ValueStream = QuantizedStream<ValueBits, GroupAxis::kChannels, kGroupPerHead, MetaFormat::kFp16, 1000,
                                      LatentProjection<ValuePercent>>;

  static std::string name() {
    return "cskv-k" + bits_label(KeyBits) + "v" + bits_label(ValueBits) + "-r" +
           std::to_string(KeyPercent) + "-" + std::to_string(ValuePercent) + "-w" +
           std::to_string(Window);
  }
};

/// CSKV with full-precision (fp16) latents: channel shrinking alone, the same window and
/// factors as CskvPolicy (the paper's "without quantization" rows).
template <int KeyPercent = 50, int ValuePercent = 50, int Window = 32>
struct CskvFp16Policy : detail::CskvWindowing<Window> {
  using KeyStream = ExactStream<Float16, LatentProjection<KeyPercent>>;
  using ValueStream = ExactStream<Float16, LatentProjection<ValuePercent>>;

  static std::string name() {
    return "cskv-fp16-r" + std::to_string(KeyPercent) + "-" + std::to_string(ValuePercent) + "-w" +
           std::to_string(Window);
  }
};

}  // namespace kvq
