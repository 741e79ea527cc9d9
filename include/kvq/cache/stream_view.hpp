// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Read-only views of one stream (keys or values) of one sequence and layer, and reading
///        its rows back as float: StreamView (the cache's own view: its writer and read_keys) and
///        PagedStreamView (one slot of a PagedKVParams and the layer's LayerTransforms: what
///        attention reads).
#pragma once

#include <cstdint>
#include <type_traits>

#include "kvq/cache/block_pool.hpp"
#include "kvq/cache/window_schedule.hpp"
#include "kvq/core/bits.hpp"
#include "kvq/core/float_types.hpp"
#include "kvq/layout/block_codec.hpp"
#include "kvq/layout/paged_params.hpp"
#include "kvq/layout/stream_layout.hpp"
#include "kvq/policy/spec.hpp"
#include "kvq/quant/decode_affine.hpp"
#include "kvq/quant/meta_format.hpp"
#include "kvq/transform/rope.hpp"
#include "kvq/transform/stream_transform.hpp"

namespace kvq {

/// Which part of a stream holds a position.
enum class Segment : std::uint8_t { kSink, kQuantized, kWindow };

/// Converts n exact rows of width w to float.
template <class E>
void exact_rows_to_float(const E* rows, index_t n, index_t w, float* out, index_t stride) noexcept {
  if constexpr (std::is_same_v<E, Float16>) {
    static_assert(sizeof(Float16) == sizeof(std::uint16_t), "Float16 is its 16-bit pattern");
    for (index_t r = 0; r < n; ++r) {
      half_to_float(reinterpret_cast<const std::uint16_t*>(rows + r * w), w, out + r * stride);
    }
  } else {
    for (index_t r = 0; r < n; ++r) {
      for (index_t c = 0; c < w; ++c) out[r * stride + c] = to_float(rows[r * w + c]);
    }
  }
}

/// One stream of one sequence and layer. Exact rows (sinks, window) have exact_width numbers of
/// type E (num_kv_heads * head_dim); stored rows have layout->width numbers (the latent rank for
/// CSKV). Window position p lives in ring slot (p - sinks) mod ring_capacity. `transform` is the
/// layer's transform (channel groups, latent factors, clip ratio); `rope` is set for keys that
/// are stored before RoPE and rotated when read for attention.
template <class E>
struct StreamView {
  const StreamLayout* layout = nullptr;
  const BlockCodec* codec = nullptr;  ///< quantized streams: the codec of the layout's format
  StreamTransform transform{};
  const RopeRotator* rope = nullptr;
  index_t heads = 0;  ///< kv heads of an exact row (exact_width / head_dim)
  WindowRule rule{};
  StreamCounts counts{};
  const std::int32_t* blocks = nullptr;  ///< block table: quantized rows [b * T, (b + 1) * T)
  const BlockPool* pool = nullptr;
  const E* sinks = nullptr;  ///< [rule.sinks, exact_width]
  const E* ring = nullptr;   ///< [ring_capacity, exact_width]
  index_t ring_capacity = 0;
  index_t exact_width = 0;

  index_t length() const noexcept { return counts.length; }
  index_t sink_count() const noexcept { return rule.sink_count(counts); }

  Segment segment(index_t p) const noexcept {
    const index_t s = sink_count();
    if (p < s) return Segment::kSink;
    return p < s + counts.quantized ? Segment::kQuantized : Segment::kWindow;
  }

  /// Tokens from p on (at most max_n) that lie in one segment, block and unwrapped ring run.
  index_t run(index_t p, index_t max_n) const noexcept {
    const index_t s = sink_count();
    index_t end;
    switch (segment(p)) {
      case Segment::kSink: end = s; break;
      case Segment::kQuantized: {
        const index_t t = layout->block_tokens;
        const index_t block_end = s + ((p - s) / t + 1) * t;
        end = block_end < s + counts.quantized ? block_end : s + counts.quantized;
        break;
      }
      default: {
        const index_t slot = (p - s) % ring_capacity;
        end = p + (ring_capacity - slot);
        if (end > counts.length) end = counts.length;
      }
    }
    return end - p < max_n ? end - p : max_n;
  }

  /// Exact rows of a run in the sinks or window (segment(p) != kQuantized).
  const E* exact_rows(index_t p) const noexcept {
    const index_t s = sink_count();
    if (p < s) return sinks + p * exact_width;
    return ring + ((p - s) % ring_capacity) * exact_width;
  }

  /// Stored rows [n, layout->width] of a run in the quantized store, as float.
  void decode_stored(index_t p, index_t n, float* out, index_t stride) const {
    const index_t q = p - sink_count();
    const index_t t = layout->block_tokens;
    const std::uint8_t* block = pool->data(blocks[q / t]);
    if (layout->quantized) {
      codec->decode(*layout, transform.groups, block, q % t, n, out, stride);
    } else {
      decode_exact_rows<E>(*layout, block, q % t, n, out, stride);
    }
  }

  /// Per-channel quantized streams: rows of a quantized run transposed, out [width, n] with
  /// channel c at out + c * stride.
  void decode_stored_transposed(index_t p, index_t n, float* out, index_t stride) const {
    const index_t q = p - sink_count();
    const index_t t = layout->block_tokens;
    codec->decode_transposed(*layout, pool->data(blocks[q / t]), q % t, n, out, stride);
  }

  /// Rows of a run in model space, out [n, exact_width] (row stride `stride`): exact rows
  /// converted, stored rows dequantized and taken back through the transform (latent rows go
  /// through `scratch` [n, layout->width]); keys stored before RoPE are rotated by position when
  /// `rotate` (attention), left as stored otherwise (read_keys). `rope_scratch`: head_dim
  /// doubles when rotating.
  void read_rows(index_t p, index_t n, float* out, index_t stride, float* scratch, double* rope_scratch,
                 bool rotate) const {
    if (segment(p) != Segment::kQuantized) {
      exact_rows_to_float(exact_rows(p), n, exact_width, out, stride);
    } else if (transform.projects()) {
      decode_stored(p, n, scratch, layout->width);
      from_stored(transform, scratch, n, layout->width, out, stride);
    } else {
      decode_stored(p, n, out, stride);
    }
    if (rotate && rope != nullptr) rope->rotate(out, n, stride, heads, p, rope_scratch);
  }
};

/// What attention needs of one layer besides its paged storage (PagedKVParams): each stream's
/// transform (SKVQ channel groups, CSKV latent factors, clip ratio; identity for other policies)
/// and, for policies that store keys before RoPE, the rotator. Plain data of views: the cache's
/// calibration and rotator own what it points to (QuantizedKVCache::transforms(layer)).
struct LayerTransforms {
  StreamTransform keys{};
  StreamTransform values{};
  /// Policy::pre_rope: rotates keys by position (head_dim of the layer, tile_tokens() at least
  /// the attention tile, QuantizedKVCache::tile_tokens); nullptr for keys stored after RoPE.
  const RopeRotator* rope = nullptr;
};

/// One stream of one slot of a PagedKVParams as attention reads it: StreamView's reading, with
/// every block address from PagedStream::block_of and every exact-row address from
/// PagedStream::exact_row. Stream is the policy's stream type (its bits, group size and metadata
/// format fix the codec at compile time), E the cache's exact type. Built per call from plain
/// data (no allocation); the caller has checked the params (attend does).
template <class Stream, class E>
struct PagedStreamView {
  PagedStream stream{};
  std::int32_t slot = 0;
  StreamLayout layout{};              ///< the stream's block layout as the codec takes it
  const BlockCodec* codec = nullptr;  ///< quantized streams: the codec of Stream's format
  StreamTransform transform{};
  const RopeRotator* rope = nullptr;  ///< keys stored before RoPE: rotated when read for attention
  index_t heads = 0;                  ///< kv heads of an exact row
  index_t exact_width = 0;            ///< numbers of an exact row (num_kv_heads * head_dim)
  std::size_t row_bytes = 0;          ///< bytes of an exact row
  StreamCounts counts{};
  index_t sinks = 0;                  ///< sink rows held: min(length, stream.sinks)

  PagedStreamView(const PagedStream& s, std::int32_t slot_index, index_t length, index_t num_kv_heads, index_t head_dim,
                  const StreamTransform& t, const RopeRotator* rotator) noexcept
      : stream(s), slot(slot_index), transform(t), rope(rotator), heads(num_kv_heads), exact_width(num_kv_heads * head_dim),
        row_bytes(static_cast<std::size_t>(num_kv_heads * head_dim) * sizeof(E)) {
    layout.quantized = Stream::quantized;
    layout.block_tokens = s.block_tokens;
    layout.width = s.width;
    layout.block_bytes = static_cast<std::size_t>(s.block_bytes);
    if constexpr (Stream::quantized) {
      // The spec make_stream_setup gives the stream (the codec reads bits, axis and group size).
      layout.spec.bits = Stream::bits;
      layout.spec.axis = Stream::axis;
      layout.spec.clip = Stream::clip;
      layout.spec.meta = Stream::meta;
      layout.spec.group_size = Stream::group_size == kGroupPerHead ? s.width / num_kv_heads : Stream::group_size;
      layout.block = s.block;
      codec = &kBlockCodec<Stream::bits, meta_type_t<Stream::meta>>;
    } else {
      layout.exact_value_bytes = sizeof(typename Stream::value_type);
    }
    counts.length = length;
    counts.quantized = s.quantized_tokens[slot_index];
    sinks = length < s.sinks ? length : s.sinks;
  }

  index_t length() const noexcept { return counts.length; }
  index_t sink_count() const noexcept { return sinks; }

  Segment segment(index_t p) const noexcept {
    if (p < sinks) return Segment::kSink;
    return p < sinks + counts.quantized ? Segment::kQuantized : Segment::kWindow;
  }

  /// Tokens from p on (at most max_n) that lie in one segment, block and unwrapped ring run.
  index_t run(index_t p, index_t max_n) const noexcept {
    const index_t s = sinks;
    index_t end;
    switch (segment(p)) {
      case Segment::kSink: end = s; break;
      case Segment::kQuantized: {
        const index_t t = layout.block_tokens;
        const index_t block_end = s + ((p - s) / t + 1) * t;
        end = block_end < s + counts.quantized ? block_end : s + counts.quantized;
        break;
      }
      default: {
        const index_t cap = stream.ring_capacity;
        const index_t at = (p - s) % cap;
        end = p + (cap - at);
        if (end > counts.length) end = counts.length;
      }
    }
    return end - p < max_n ? end - p : max_n;
  }

  /// Exact rows of a run in the sinks or window (segment(p) != kQuantized).
  const E* exact_rows(index_t p) const noexcept {
    return reinterpret_cast<const E*>(stream.exact_row(slot, static_cast<std::int32_t>(p), row_bytes));
  }

  /// Stored rows [n, layout.width] of a run in the quantized store, as float.
  void decode_stored(index_t p, index_t n, float* out, index_t stride) const {
    const index_t q = p - sinks;
    const std::uint8_t* block = stream.block_of(slot, static_cast<std::int32_t>(q));
    if constexpr (Stream::quantized) {
      codec->decode(layout, transform.groups, block, q % layout.block_tokens, n, out, stride);
    } else {
      decode_exact_rows<E>(layout, block, q % layout.block_tokens, n, out, stride);
    }
  }

  /// Per-channel quantized streams: rows of a quantized run transposed, out [width, n] with
  /// channel c at out + c * stride.
  void decode_stored_transposed(index_t p, index_t n, float* out, index_t stride) const {
    const index_t q = p - sinks;
    codec->decode_transposed(layout, stream.block_of(slot, static_cast<std::int32_t>(q)), q % layout.block_tokens, n, out,
                             stride);
  }

  /// Rows of a run in model space, out [n, exact_width]: as StreamView::read_rows.
  void read_rows(index_t p, index_t n, float* out, index_t stride, float* scratch, double* rope_scratch,
                 bool rotate) const {
    if (segment(p) != Segment::kQuantized) {
      exact_rows_to_float(exact_rows(p), n, exact_width, out, stride);
    } else if (transform.projects()) {
      decode_stored(p, n, scratch, layout.width);
      from_stored(transform, scratch, n, layout.width, out, stride);
    } else {
      decode_stored(p, n, out, stride);
    }
    if (rotate && rope != nullptr) rope->rotate(out, n, stride, heads, p, rope_scratch);
  }
};

}  // namespace kvq
