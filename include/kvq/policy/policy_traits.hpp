// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief policy_traits / is_kv_policy: what QuantizedKVCache requires of a policy type, checked
///        with readable static_asserts (and a concept under C++20).
///
/// A policy is a struct without data members that names:
///   using KeyStream, ValueStream;   QuantizedStream<...> or ExactStream<T>
///   using KeyWindow, ValueWindow;   WindowSpec<...>
///   using exact_type;               Float16, BFloat16 or float: sinks and windows
///   static constexpr int block_tokens;   tokens per quantized block
///   static constexpr bool pre_rope;      keys stored before RoPE (attention rotates them)
///   static std::string name();
#pragma once

#include <string>
#include <type_traits>

#include "kvq/core/bits.hpp"
#include "kvq/policy/spec.hpp"

namespace kvq {

namespace detail {

template <class P, class = void>
struct has_policy_members : std::false_type {};

template <class P>
struct has_policy_members<
    P, std::void_t<typename P::KeyStream, typename P::ValueStream, typename P::KeyWindow,
                   typename P::ValueWindow, typename P::KeyStream::transform,
                   typename P::ValueStream::transform, typename P::exact_type,
                   decltype(P::block_tokens), decltype(P::pre_rope), decltype(P::name())>>
    : std::true_type {};

template <class S>
constexpr bool stream_fits_blocks(int block_tokens, int chunk) {
  if constexpr (S::quantized) {
    if (S::axis == GroupAxis::kTokens) {
      return block_tokens % S::group_size == 0 && chunk % S::group_size == 0;
    }
  }
  return true;
}

template <class S>
constexpr bool values_per_token() {
  if constexpr (S::quantized) {
    return S::axis == GroupAxis::kChannels;
  } else {
    return true;
  }
}

}  // namespace detail

/// True when P has every member a policy needs (see the file comment).
template <class P>
inline constexpr bool is_kv_policy_v = detail::has_policy_members<P>::value;

/// Compile-time checks and summaries of a policy. Instantiating it with a type that is not a
/// valid policy fails with a message that says what is wrong.
template <class P>
struct policy_traits {
  static_assert(is_kv_policy_v<P>,
                "kvq: not a KV cache policy; a policy names KeyStream, ValueStream (each with its "
                "transform), KeyWindow, ValueWindow, exact_type, block_tokens, pre_rope and name() "
                "(see kvq/policy/policy_traits.hpp)");
  using KeyStream = typename P::KeyStream;
  using ValueStream = typename P::ValueStream;
  using KeyWindow = typename P::KeyWindow;
  using ValueWindow = typename P::ValueWindow;
  using KeyTransform = typename KeyStream::transform;
  using ValueTransform = typename ValueStream::transform;
  using exact_type = typename P::exact_type;

  static_assert(P::block_tokens > 0, "kvq: policy block_tokens must be positive");
  static_assert(detail::stream_fits_blocks<KeyStream>(P::block_tokens, KeyWindow::chunk),
                "kvq: per-channel key groups (groups along tokens) need block_tokens and the key "
                "flush chunk to be multiples of the group size, or groups would be cut");
  static_assert(detail::stream_fits_blocks<ValueStream>(P::block_tokens, ValueWindow::chunk),
                "kvq: per-channel value groups need block_tokens and the value flush chunk to be "
                "multiples of the group size");
  static_assert(detail::values_per_token<ValueStream>(),
                "kvq: values must be quantized per token (groups along channels); per-channel "
                "values destroy accuracy (KIVI §3.2, Table 2) and attention does not implement "
                "them");

  static constexpr bool key_quantized = KeyStream::quantized;
  static constexpr bool value_quantized = ValueStream::quantized;
  static constexpr int block_tokens = P::block_tokens;
  static constexpr bool pre_rope = P::pre_rope;
  /// Either stream stores a low-rank latent (CSKV).
  static constexpr bool latent = KeyTransform::kind == TransformKind::kLatentProjection ||
                                 ValueTransform::kind == TransformKind::kLatentProjection;
};

namespace detail {

/// fraction * (code_bits + 2 * meta_bits / group) of one stream (see nominal_bits_per_element).
template <class S>
constexpr double nominal_stream_bits(index_t head_dim) noexcept {
  const index_t stored = stored_head_width<S>(head_dim);
  const double fraction = static_cast<double>(stored) / static_cast<double>(head_dim);
  if constexpr (S::quantized) {
    const double code =
        S::bits == Bits::kTernary ? 1.5 : static_cast<double>(static_cast<int>(S::bits));
    const double group = S::group_size == kGroupPerHead ? static_cast<double>(stored)
                                                        : static_cast<double>(S::group_size);
    return fraction * (code + 2.0 * 8.0 * static_cast<double>(meta_bytes(S::meta)) / group);
  } else {
    return fraction * 8.0 * static_cast<double>(sizeof(typename S::value_type));
  }
}

}  // namespace detail

/// Nominal bits per key/value element of policy P, the figure papers quote: the mean over the
/// key and the value stream of
///   fraction * (code_bits + 2 * meta_bits / group_size)
/// code_bits as labelled (1.5 for ternary, which the dense packing stores in 1.6), one scale and
/// one zero-point of meta_bits (16 for fp16/bf16, 8 for fp8) per group, fraction = latent rank /
/// head_dim for CSKV (1 otherwise); exact streams count fraction * 16 (fp16/bf16) or 32 (fp32).
/// Sinks, windows and block padding are left out: QuantizedKVCache::bits_per_element() (measured
/// from allocations) exceeds it by their share, which shrinks as sequences grow.
/// @param head_dim  channels per kv head (CSKV ranks and per-head value groups depend on it)
template <class P>
constexpr double nominal_bits_per_element(index_t head_dim) noexcept {
  return 0.5 * (detail::nominal_stream_bits<typename P::KeyStream>(head_dim) +
                detail::nominal_stream_bits<typename P::ValueStream>(head_dim));
}

#if defined(__cpp_concepts) && __cpp_concepts >= 201907L
/// C++20: the same requirement as is_kv_policy_v, usable in requires-clauses.
template <class P>
concept KVPolicy = is_kv_policy_v<P>;
#endif

}  // namespace kvq
