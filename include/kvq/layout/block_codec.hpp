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

#include "kvq/core/float_types.hpp"
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
/// `groups` are the layer's SKVQ channel groups (empty: uniform groups of spec.group_size).
/// Returns kOk, or the quantizer's status with the failing position in *failure.
inline Status encode_rows(const StreamLayout& l, const ChannelGroups& groups, std::uint8_t* block,
                          index_t row0, const float* rows, index_t stride, index_t n,
                          EncodeFailure* failure) {
  MatrixQuantSpec spec = l.spec;
  spec.channel_groups = groups;
  const MatrixLayout& m = l.matrix;
  std::uint8_t* codes = block;
  std::uint8_t* scales = block + l.scales_offset;
  std::uint8_t* zeros = block + l.zeros_offset;
  return detail::dispatch_stream(l, [&](auto bits, auto meta) {
    constexpr Bits B = decltype(bits)::value;
    using Meta = decltype(meta);
    if (spec.axis == GroupAxis::kChannels) {
      for (index_t r = 0; r < n; ++r) {
        const index_t line = row0 + r;
        const float* row = rows + r * stride;
        for (index_t g = 0; g < m.groups_per_line; ++g) {
          const detail::GroupSpan span = detail::group_span(spec, g);
          GroupParams<Meta> p{};
          std::uint8_t* stream = codes + static_cast<std::size_t>(line) * m.line_bytes;
          const auto first = static_cast<std::size_t>(span.start);
          const Status s =
              groups.empty()
                  ? quantize_group<B>(ContiguousLoader<float>{row + span.start}, span.length,
                                      spec.clip, stream, first, &p)
                  : quantize_group<B>(
                        GatherLoader<float>{row, groups.permutation.data() + span.start, 1},
                        span.length, spec.clip, stream, first, &p);
          if (s != Status::kOk) {
            *failure = {line, span.start};
            return s;
          }
          detail::store_params(scales, zeros,
                               static_cast<std::size_t>(line * m.groups_per_line + g), p);
        }
      }
    } else {
      const index_t gs = spec.group_size;
      for (index_t c = 0; c < l.width; ++c) {
        std::uint8_t* stream = codes + static_cast<std::size_t>(c) * m.line_bytes;
        for (index_t r = 0; r < n; r += gs) {
          const index_t g = (row0 + r) / gs;
          GroupParams<Meta> p{};
          const Status s = quantize_group<B>(StridedLoader<float>{rows + r * stride + c, stride},
                                             gs, spec.clip, stream,
                                             static_cast<std::size_t>(row0 + r), &p);
          if (s != Status::kOk) {
            *failure = {row0 + r, c};
            return s;
          }
          detail::store_params(scales, zeros,
                               static_cast<std::size_t>(c * m.groups_per_line + g), p);
        }
      }
    }
    return Status::kOk;
  });
}

/// Dequantizes rows [row0, row0 + n) of a quantized block into out [n, width] (row stride
/// `stride`, channels in their original order).
inline void decode_rows(const StreamLayout& l, const ChannelGroups& groups,
                        const std::uint8_t* block, index_t row0, index_t n, float* out,
                        index_t stride) {
  MatrixQuantSpec spec = l.spec;
  spec.channel_groups = groups;
  const MatrixLayout& m = l.matrix;
  const std::uint8_t* codes = block;
  const std::uint8_t* scales = block + l.scales_offset;
  const std::uint8_t* zeros = block + l.zeros_offset;
  detail::dispatch_stream(l, [&](auto bits, auto meta) {
    constexpr Bits B = decltype(bits)::value;
    using Meta = decltype(meta);
    float buffer[kCodeChunk];
    if (spec.axis == GroupAxis::kChannels) {
      for (index_t r = 0; r < n; ++r) {
        const index_t line = row0 + r;
        const std::uint8_t* stream = codes + static_cast<std::size_t>(line) * m.line_bytes;
        float* row = out + r * stride;
        for (index_t g = 0; g < m.groups_per_line; ++g) {
          const detail::GroupSpan span = detail::group_span(spec, g);
          const auto p = detail::load_params<Meta>(
              scales, zeros, static_cast<std::size_t>(line * m.groups_per_line + g));
          const float scale = meta_to_float(p.scale);
          const float zero = meta_to_float(p.zero);
          if (groups.empty()) {
            decode_affine<B>(stream, static_cast<std::size_t>(span.start), span.length, scale,
                             zero, row + span.start);
            continue;
          }
          const std::int32_t* perm = groups.permutation.data() + span.start;
          for (index_t i0 = 0; i0 < span.length; i0 += kCodeChunk) {
            const index_t len = std::min(kCodeChunk, span.length - i0);
            decode_affine<B>(stream, static_cast<std::size_t>(span.start + i0), len, scale, zero,
                             buffer);
            for (index_t i = 0; i < len; ++i) row[perm[i0 + i]] = buffer[i];
          }
        }
      }
    } else {
      const index_t gs = spec.group_size;
      for (index_t c = 0; c < l.width; ++c) {
        const std::uint8_t* stream = codes + static_cast<std::size_t>(c) * m.line_bytes;
        for (index_t t = row0; t < row0 + n;) {
          const index_t g = t / gs;
          const index_t end = std::min({(g + 1) * gs, row0 + n, t + kCodeChunk});
          const auto p = detail::load_params<Meta>(
              scales, zeros, static_cast<std::size_t>(c * m.groups_per_line + g));
          decode_affine<B>(stream, static_cast<std::size_t>(t), end - t, meta_to_float(p.scale),
                           meta_to_float(p.zero), buffer);
          for (index_t i = 0; i < end - t; ++i) out[(t - row0 + i) * stride + c] = buffer[i];
          t = end;
        }
      }
    }
  });
}

/// Per-channel (groups along tokens) blocks only: dequantizes rows [row0, row0 + n) into the
/// transposed out [width, n] (channel c's run at out + c * stride): contiguous per channel.
inline void decode_rows_transposed(const StreamLayout& l, const std::uint8_t* block, index_t row0,
                                   index_t n, float* out, index_t stride) {
  const MatrixLayout& m = l.matrix;
  const std::uint8_t* scales = block + l.scales_offset;
  const std::uint8_t* zeros = block + l.zeros_offset;
  const index_t gs = l.spec.group_size;
  detail::dispatch_stream(l, [&](auto bits, auto meta) {
    constexpr Bits B = decltype(bits)::value;
    using Meta = decltype(meta);
    for (index_t c = 0; c < l.width; ++c) {
      const std::uint8_t* stream = block + static_cast<std::size_t>(c) * m.line_bytes;
      for (index_t t = row0; t < row0 + n;) {
        const index_t g = t / gs;
        const index_t end = std::min((g + 1) * gs, row0 + n);
        const auto p = detail::load_params<Meta>(
            scales, zeros, static_cast<std::size_t>(c * m.groups_per_line + g));
        decode_affine<B>(stream, static_cast<std::size_t>(t), end - t, meta_to_float(p.scale),
                         meta_to_float(p.zero), out + c * stride + (t - row0));
        t = end;
      }
    }
  });
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
    return;
  }
  for (index_t r = 0; r < n; ++r) {
    for (index_t c = 0; c < l.width; ++c) out[r * stride + c] = to_float(src[r * l.width + c]);
  }
}

}  // namespace kvq
