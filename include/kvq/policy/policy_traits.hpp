// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief policy_traits / is_kv_policy: what QuantizedKVCache requires of a policy type, checked
///        with readable static_asserts (and a concept under C++20).
///
/// A policy is a struct without data members that names:
///   using KeyStream, ValueStream;   QuantizedStream<...> or ExactStream<T>
///   using KeyWindow, ValueWindow;   WindowSpec<...>
///   using Latent;                   NoLatent or LatentSpec<...>
///   using exact_type;               Float16, BFloat16 or float: sinks and windows
///   static constexpr int block_tokens;   tokens per quantized block
///   static constexpr bool pre_rope;      keys stored before RoPE (attention rotates them)
///   static std::string name();
#pragma once

#include <string>
#include <type_traits>

#include "kvq/policy/spec.hpp"

namespace kvq {

namespace detail {

template <class P, class = void>
struct has_policy_members : std::false_type {};

template <class P>
struct has_policy_members<
    P, std::void_t<typename P::KeyStream, typename P::ValueStream, typename P::KeyWindow,
                   typename P::ValueWindow, typename P::Latent, typename P::exact_type,
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
                "kvq: not a KV cache policy; a policy names KeyStream, ValueStream, KeyWindow, "
                "ValueWindow, Latent, exact_type, block_tokens, pre_rope and name() "
                "(see kvq/policy/policy_traits.hpp)");
  using KeyStream = typename P::KeyStream;
  using ValueStream = typename P::ValueStream;
  using KeyWindow = typename P::KeyWindow;
  using ValueWindow = typename P::ValueWindow;
  using Latent = typename P::Latent;
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
  static_assert(!Latent::enabled || (KeyStream::quantized && ValueStream::quantized),
                "kvq: a latent (CSKV) policy quantizes its latent streams");

  static constexpr bool key_quantized = KeyStream::quantized;
  static constexpr bool value_quantized = ValueStream::quantized;
  static constexpr int block_tokens = P::block_tokens;
  static constexpr bool pre_rope = P::pre_rope;
  static constexpr bool latent = Latent::enabled;
};

#if defined(__cpp_concepts) && __cpp_concepts >= 201907L
/// C++20: the same requirement as is_kv_policy_v, usable in requires-clauses.
template <class P>
concept KVPolicy = is_kv_policy_v<P>;
#endif

}  // namespace kvq
