// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief One number of a paged cache, wherever it lives: PagedKVParams (layout/paged_params.hpp)
///        read element by element, as a float, on the host or the device (KVQ_HOST_DEVICE).
///
/// paged_key<Policy>(kv, slot, p, c) and paged_value<Policy>(...) give channel c of position p of a
/// slot (c in [0, num_kv_heads * head_dim), the row's channel, kv head c / head_dim): a sink or
/// window row is read as the exact type, a stored row from its block (an exact block's row, or a
/// quantized block's code, scale and zero-point dequantized with dequantize_value, as every CPU
/// reader of a block does). This is the slow, obviously correct path that reference kernels and
/// tests use (cuda/reference_decode.cuh); fast kernels read whole tiles.
///
/// Policies: streams stored as they come (identity transform: no SKVQ channel reordering, no CSKV
/// latents) with groups of a fixed size, and keys after RoPE (pre_rope == false): Fp16Policy and
/// KiviPolicy, and PerTokenPolicy. Others fail to compile with a static_assert.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvq/config.hpp"
#include "kvq/core/float_types.hpp"
#include "kvq/layout/block_layout.hpp"
#include "kvq/layout/paged_params.hpp"
#include "kvq/policy/spec.hpp"
#include "kvq/quant/meta_format.hpp"
#include "kvq/quant/pack.hpp"
#include "kvq/quant/params.hpp"

namespace kvq {

namespace detail {

template <class S>
constexpr bool paged_readable_stream() {
  if constexpr (S::quantized) {
    return S::transform::kind == TransformKind::kIdentity && S::group_size > 0;
  } else {
    return S::transform::kind == TransformKind::kIdentity;
  }
}

}  // namespace detail

/// True when paged_key / paged_value read Policy's streams (see the file comment).
template <class Policy>
inline constexpr bool is_paged_readable_v = !Policy::pre_rope && detail::paged_readable_stream<typename Policy::KeyStream>() &&
                                            detail::paged_readable_stream<typename Policy::ValueStream>();

/// Channel c of position p of `slot` in stream s (of stream type S, exact rows of type E, exact
/// rows row_bytes bytes long). p < lengths[slot] and the slot's tables must be valid.
template <class S, class E>
KVQ_HOST_DEVICE float paged_element(const PagedStream& s, std::int32_t slot, std::int32_t p, std::int32_t c,
                                    std::size_t row_bytes) noexcept {
  const std::int32_t i = p - s.sinks;
  if (i < 0 || i >= s.quantized_tokens[slot]) {
    return to_float(reinterpret_cast<const E*>(s.exact_row(slot, p, row_bytes))[c]);
  }
  const std::uint8_t* block = s.block_of(slot, i);
  const std::int32_t r = i % s.block_tokens;
  if constexpr (!S::quantized) {
    using T = typename S::value_type;
    return to_float(reinterpret_cast<const T*>(block)[static_cast<std::size_t>(r) * static_cast<std::size_t>(s.width) +
                                                      static_cast<std::size_t>(c)]);
  } else {
    using Meta = meta_type_t<S::meta>;
    const BlockLayout& l = s.block;
    std::uint32_t code = 0;
    GroupParams<Meta> g{};
    if constexpr (S::axis == GroupAxis::kTokens) {  // lines are channels, groups run along tokens
      code = code_at<S::bits>(l.line_codes(block, c), static_cast<std::size_t>(r));
      g = l.load_group<Meta>(block, c, l.token_group(r));
    } else {  // lines are token rows, groups run along channels
      code = code_at<S::bits>(l.line_codes(block, r), static_cast<std::size_t>(c));
      g = l.load_group<Meta>(block, r, c / static_cast<std::int32_t>(l.group_size));
    }
    return dequantize_value(code, to_float(g.scale), to_float(g.zero));
  }
}

/// The key of channel c (of the whole row) at position p of `slot`.
template <class Policy>
KVQ_HOST_DEVICE float paged_key(const PagedKVParams& kv, std::int32_t slot, std::int32_t p, std::int32_t c) noexcept {
  static_assert(is_paged_readable_v<Policy>,
                "kvq: paged_key reads streams stored as they come (no channel reordering or latents, fixed "
                "groups) with keys after RoPE");
  return paged_element<typename Policy::KeyStream, typename Policy::exact_type>(kv.keys, slot, p, c, kv.exact_row_bytes());
}

/// The value of channel c (of the whole row) at position p of `slot`.
template <class Policy>
KVQ_HOST_DEVICE float paged_value(const PagedKVParams& kv, std::int32_t slot, std::int32_t p, std::int32_t c) noexcept {
  static_assert(is_paged_readable_v<Policy>,
                "kvq: paged_value reads streams stored as they come (no channel reordering or latents, fixed "
                "groups) with keys after RoPE");
  return paged_element<typename Policy::ValueStream, typename Policy::exact_type>(kv.values, slot, p, c,
                                                                                   kv.exact_row_bytes());
}

}  // namespace kvq
