// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Write token rows into a stream block and read them back (layout/stream_layout.hpp).
///
/// Rows are float [n, width] with a row stride; the block is the stream's byte record. Writing
/// touches only the codes and metadata of rows [row0, row0 + n) (packed neighbours are
/// preserved), so rows past a stream's end can be written and discarded without affecting it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kvq/core/float_types.hpp"
#include "kvq/core/view.hpp"
#include "kvq/core/status.hpp"
#include "kvq/layout/stream_layout.hpp"
#include "kvq/quant/decode_affine.hpp"
#include "kvq/quant/group.hpp"
#include "kvq/quant/matrix.hpp"

namespace kvq {

/// Where a block write failed: the block row and the group within the row's line.
struct EncodeFailure {
  index_t row = -1;
  index_t channel = -1;  ///< per-channel streams: the channel; per-token: the group's first slot
};

namespace detail {

template <class F>
decltype(auto) dispatch_stream(const StreamLayout& l, F&& f) {
  return dispatch_bits(l.spec.bits, [&](auto bits) -> decltype(auto) {
    return dispatch_meta(l.spec.meta, [&](auto meta) -> decltype(auto) {
      return f(bits, meta);
    });
  });
}

}  // namespace detail

/// Quantizes rows [n, width] (float, row stride `stride`) into rows [row0, row0 + n) of a
/// quantized block. Per-channel streams need row0 and n to be multiples of the group size.
/// `groups` are the layer's SKVQ channel groups (empty: uniform groups of spec.group_size) and
/// `clip` its clip ratio. Returns kOk, or the quantizer's status with the failing position in
/// *failure.
template <Bits B, class Meta>
Status encode_rows_as(const StreamLayout& l, const ChannelGroups& groups, float clip, std::uint8_t* block,
                      index_t row0, const float* rows, index_t stride, index_t n, EncodeFailure* failure) {
  MatrixQuantSpec spec = l.spec;
  spec.channel_groups = groups;
  spec.clip = clip;
  const BlockLayout& b = l.block;
  std::uint8_t* scales = b.scales(block);
  std::uint8_t* zeros = b.zeros(block);
  if (spec.axis == GroupAxis::kChannels) {
    const StridedView<const float, 2> x(rows, {n, l.width}, {stride, 1});
    for (index_t r = 0; r < n; ++r) {
      const index_t line = row0 + r;
      index_t g = 0;
      const Status s = detail::quantize_token_line<B, Meta>(x, r, spec, b.groups_per_line, b.line_codes(block, line),
                                                            scales, zeros, b.meta_index(line, 0), b.meta_group_stride, &g);
      if (s != Status::kOk) {
        *failure = {line, detail::group_span(spec, g).start};
        return s;
      }
    }
  } else {
    const index_t gs = spec.group_size;
    for (index_t c = 0; c < l.width; ++c) {
      std::uint8_t* stream = b.line_codes(block, c);
      for (index_t r = 0; r < n; r += gs) {
        const index_t g = b.token_group(row0 + r);
        GroupParams<Meta> p{};
        const Status s = quantize_group<B>(StridedLoader<float>{rows + r * stride + c, stride},
                                           gs, spec.clip, stream,
                                           static_cast<std::size_t>(row0 + r), &p);
        if (s != Status::kOk) {
          *failure = {row0 + r, c};
          return s;
        }
        detail::store_params(scales, zeros, b.meta_index(c, g), p);
      }
    }
  }
  return Status::kOk;
}

/// Plans (validates, writes nothing) the per-token groups of rows [n, width] as encode_rows_as
/// would quantize them (per-token streams only). Returns kOk or the first failure (row index within `rows`).
template <Bits B, class Meta>
Status plan_token_rows_as(const StreamLayout& l, const ChannelGroups& groups, float clip, const float* rows,
                          index_t stride, index_t n, EncodeFailure* failure) {
  MatrixQuantSpec spec = l.spec;
  spec.channel_groups = groups;
  spec.clip = clip;
  const StridedView<const float, 2> x(rows, {n, l.width}, {stride, 1});
  for (index_t r = 0; r < n; ++r) {
    index_t g = 0;
    const Status s = detail::quantize_token_line<B, Meta>(x, r, spec, l.block.groups_per_line, nullptr, nullptr,
                                                          nullptr, 0, 0, &g);
    if (s != Status::kOk) {
      *failure = {r, detail::group_span(spec, g).start};
      return s;
    }
  }
  return Status::kOk;
}

/// Dequantizes rows [row0, row0 + n) of a quantized block into out [n, width] (row stride
/// `stride`, channels in their original order).
template <Bits B, class Meta>
void decode_rows_as(const StreamLayout& l, const ChannelGroups& groups, const std::uint8_t* block, index_t row0,
                    index_t n, float* out, index_t stride) {
  MatrixQuantSpec spec = l.spec;
  spec.channel_groups = groups;
  const BlockLayout& b = l.block;
  const std::uint8_t* scales = b.scales(block);
  const std::uint8_t* zeros = b.zeros(block);
  float buffer[kCodeChunk];
  if (spec.axis == GroupAxis::kChannels && groups.empty()) {
    for (index_t r = 0; r < n; ++r) {
      const index_t line = row0 + r;
      const std::uint8_t* stream = b.line_codes(block, line);
      float* row = out + r * stride;
      for (index_t g = 0; g < b.groups_per_line; ++g) {
        const detail::GroupSpan span = detail::group_span(spec, g);
        const auto p = detail::load_params<Meta>(scales, zeros, b.meta_index(line, g));
        decode_affine<B>(stream, static_cast<std::size_t>(span.start), span.length, meta_to_float(p.scale),
                         meta_to_float(p.zero), row + span.start);
      }
    }
  } else if (spec.axis == GroupAxis::kChannels) {
    // Channel groups of variable sizes over a permuted row: each row's slots are decoded as
    // bare codes in one pass (code * 1 + 0 is the code), one fused multiply-add per slot with
    // its group's scale and zero gives dequantize_value's value, and each channel then reads its
    // slot through the inverse permutation (sequential stores, no scatter). The per-thread
    // buffers grow to the widest row seen and are reused.
    thread_local std::vector<float> slots;
    thread_local std::vector<std::int32_t> inverse;
    const auto width = static_cast<std::size_t>(l.width);
    if (slots.size() < width) slots.resize(width);
    if (inverse.size() < width) inverse.resize(width);
    const std::int32_t* perm = groups.permutation.data();
    const std::int32_t* bounds = groups.boundaries.data();
    for (std::size_t p = 0; p < width; ++p) inverse[static_cast<std::size_t>(perm[p])] = static_cast<std::int32_t>(p);
    float* value = slots.data();
    const std::int32_t* slot_of = inverse.data();
    for (index_t r = 0; r < n; ++r) {
      const index_t line = row0 + r;
      decode_affine<B>(b.line_codes(block, line), 0, l.width, 1.0f, 0.0f, value);
      for (index_t g = 0; g < b.groups_per_line; ++g) {
        const auto p = detail::load_params<Meta>(scales, zeros, b.meta_index(line, g));
        detail::affine_codes(value + bounds[g], bounds[g + 1] - bounds[g], meta_to_float(p.scale), meta_to_float(p.zero));
      }
      float* row = out + r * stride;
      for (index_t c = 0; c < l.width; ++c) row[c] = value[slot_of[c]];
    }
  } else {
    const index_t gs = spec.group_size;
    for (index_t c = 0; c < l.width; ++c) {
      const std::uint8_t* stream = b.line_codes(block, c);
      for (index_t t = row0; t < row0 + n;) {
        const index_t g = b.token_group(t);
        const index_t end = std::min({(g + 1) * gs, row0 + n, t + kCodeChunk});
        const auto p = detail::load_params<Meta>(scales, zeros, b.meta_index(c, g));
        decode_affine<B>(stream, static_cast<std::size_t>(t), end - t, meta_to_float(p.scale),
                         meta_to_float(p.zero), buffer);
        for (index_t i = 0; i < end - t; ++i) out[(t - row0 + i) * stride + c] = buffer[i];
        t = end;
      }
    }
  }
}

/// Per-channel (groups along tokens) blocks only: dequantizes rows [row0, row0 + n) into the
/// transposed out [width, n] (channel c's run at out + c * stride): contiguous per channel.
template <Bits B, class Meta>
void decode_rows_transposed_as(const StreamLayout& l, const std::uint8_t* block, index_t row0, index_t n,
                               float* out, index_t stride) {
  const BlockLayout& b = l.block;
  const std::uint8_t* scales = b.scales(block);
  const std::uint8_t* zeros = b.zeros(block);
  const index_t gs = b.group_size;
  for (index_t c = 0; c < l.width; ++c) {
    const std::uint8_t* stream = b.line_codes(block, c);
    for (index_t t = row0; t < row0 + n;) {
      const index_t g = b.token_group(t);
      const index_t end = std::min((g + 1) * gs, row0 + n);
      const auto p = detail::load_params<Meta>(scales, zeros, b.meta_index(c, g));
      decode_affine<B>(stream, static_cast<std::size_t>(t), end - t, meta_to_float(p.scale),
                       meta_to_float(p.zero), out + c * stride + (t - row0));
      t = end;
    }
  }
}

/// The four codec functions of one code width and metadata format. A cache takes the table of
/// its streams' formats (known at compile time), so a translation unit compiles only the codecs
/// its policies use; the run-time dispatching functions below compile all of them.
struct BlockCodec {
  Status (*encode)(const StreamLayout&, const ChannelGroups&, float, std::uint8_t*, index_t, const float*, index_t,
                   index_t, EncodeFailure*);
  Status (*plan)(const StreamLayout&, const ChannelGroups&, float, const float*, index_t, index_t, EncodeFailure*);
  void (*decode)(const StreamLayout&, const ChannelGroups&, const std::uint8_t*, index_t, index_t, float*, index_t);
  void (*decode_transposed)(const StreamLayout&, const std::uint8_t*, index_t, index_t, float*, index_t);
};

template <Bits B, class Meta>
inline constexpr BlockCodec kBlockCodec = {&encode_rows_as<B, Meta>, &plan_token_rows_as<B, Meta>,
                                           &decode_rows_as<B, Meta>, &decode_rows_transposed_as<B, Meta>};

/// The codec of a layout's code width and metadata format, chosen at run time.
inline const BlockCodec& block_codec(const StreamLayout& l) {
  return detail::dispatch_stream(l, [](auto bits, auto meta) -> const BlockCodec& {
    return kBlockCodec<decltype(bits)::value, decltype(meta)>;
  });
}

/// encode_rows_as for the layout's format chosen at run time.
inline Status encode_rows(const StreamLayout& l, const ChannelGroups& groups, float clip, std::uint8_t* block,
                          index_t row0, const float* rows, index_t stride, index_t n, EncodeFailure* failure) {
  return block_codec(l).encode(l, groups, clip, block, row0, rows, stride, n, failure);
}
/// plan_token_rows_as for the layout's format chosen at run time.
inline Status plan_token_rows(const StreamLayout& l, const ChannelGroups& groups, float clip, const float* rows,
                              index_t stride, index_t n, EncodeFailure* failure) {
  return block_codec(l).plan(l, groups, clip, rows, stride, n, failure);
}
/// decode_rows_as for the layout's format chosen at run time.
inline void decode_rows(const StreamLayout& l, const ChannelGroups& groups, const std::uint8_t* block, index_t row0,
                        index_t n, float* out, index_t stride) {
  block_codec(l).decode(l, groups, block, row0, n, out, stride);
}
/// decode_rows_transposed_as for the layout's format chosen at run time.
inline void decode_rows_transposed(const StreamLayout& l, const std::uint8_t* block, index_t row0, index_t n,
                                   float* out, index_t stride) {
  block_codec(l).decode_transposed(l, block, row0, n, out, stride);
}

/// Copies rows [n, width] of float into rows [row0, row0 + n) of an exact block of T.
template <class T>
void encode_exact_rows(const StreamLayout& l, std::uint8_t* block, index_t row0, const float* rows,
                       index_t stride, index_t n) {
  T* dst = reinterpret_cast<T*>(block) + row0 * l.width;
  for (index_t r = 0; r < n; ++r) {
    for (index_t c = 0; c < l.width; ++c) dst[r * l.width + c] = from_float<T>(rows[r * stride + c]);
  }
}

/// Converts rows [row0, row0 + n) of an exact block of T into float out [n, width].
template <class T>
void decode_exact_rows(const StreamLayout& l, const std::uint8_t* block, index_t row0, index_t n,
                       float* out, index_t stride) {
  const T* src = reinterpret_cast<const T*>(block) + row0 * l.width;
  if constexpr (std::is_same_v<T, Float16>) {
    for (index_t r = 0; r < n; ++r) {
      half_to_float(reinterpret_cast<const std::uint16_t*>(src + r * l.width), l.width, out + r * stride);
    }
  } else {
    for (index_t r = 0; r < n; ++r) {
      for (index_t c = 0; c < l.width; ++c) out[r * stride + c] = to_float(src[r * l.width + c]);
    }
  }
}

}  // namespace kvq
