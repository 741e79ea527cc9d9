// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Writing an append's tokens into one stream: the append-time checks of per-token groups,
///        the flush loop (window or input rows -> the stream's transform -> block encoder), and
///        the exact rows that stay in the sinks and the window ring.
///
/// Every write goes past the stream's current end (rows [before.quantized, after.quantized) of
/// blocks the caller has just allocated, ring slots the window does not hold yet), so a failed
/// append leaves what a reader sees unchanged.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kvq/cache/block_pool.hpp"
#include "kvq/cache/stream_view.hpp"
#include "kvq/cache/window_schedule.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/float_types.hpp"
#include "kvq/core/view.hpp"
#include "kvq/layout/block_codec.hpp"
#include "kvq/quant/meta_format.hpp"
#include "kvq/transform/stream_transform.hpp"

namespace kvq {

/// Names a stream in the errors of an append.
struct AppendContext {
  const char* where = "";
  const char* arg = "";  ///< "k" or "v"
  index_t layer = 0;
};

/// Staging buffers and the write paths of appends to a cache with exact rows of type E.
template <class E>
class StreamWriter {
 public:
  StreamWriter() = default;
  /// width: model row; rows: the most rows flushed at once; stored_width: widest stored row.
  StreamWriter(index_t width, index_t rows, index_t stored_width)
      : width_(width), rows_(rows), staging_(static_cast<std::size_t>(rows * width)),
        projected_(static_cast<std::size_t>(rows * stored_width)) {}

  /// Input row t of x [n, heads, head_dim] as the cache stores it (rounded to E) into dst.
  template <class T>
  static void load_input_row(const StridedView<const T, 3>& x, index_t t, float* dst) noexcept {
    const index_t heads = x.extent(1);
    const index_t dim = x.extent(2);
    for (index_t h = 0; h < heads; ++h) {
      for (index_t c = 0; c < dim; ++c) dst[h * dim + c] = to_float(from_float<E>(to_float(x(t, h, c))));
    }
  }

  /// FP8 metadata (max 448) cannot hold every group of values in the exact type's range. A
  /// per-token group depends on its own token only, so a token past the sinks whose groups
  /// would overflow is rejected by the append that brings it (kMetadataOverflow), not by a later
  /// append when it leaves the window (which would leave the sequence unable to take any token).
  /// Only per-token streams without a projection have such groups.
  template <class T>
  void check_quantizable(const AppendContext& ctx, const StreamView<E>& view, const StridedView<const T, 3>& x) {
    const StreamLayout& layout = *view.layout;
    float* row = staging_.data();
    const index_t base = view.counts.length;
    for (index_t t = 0; t < x.extent(0); ++t) {
      if (base + t < view.rule.sinks) continue;  // sinks stay exact
      load_input_row(x, t, row);
      EncodeFailure failure;
      const Status s = view.codec->plan(layout, view.transform.groups, view.transform.clip, row, width_, 1, &failure);
      if (s != Status::kOk) {
        detail::throw_argument_error(
            ctx.where, ctx.arg, detail::concat(ctx.arg, "[", t, "] (token ", base + t, " of layer ", ctx.layer, ")"),
            detail::concat("values whose group scale and zero-point fit the stream's ", meta_label(layout.spec.meta),
                           " metadata (the group at channel slot ", failure.channel, " overflows)"),
            s);
      }
    }
  }

  /// Quantizes (or stores exactly) positions [sinks + before.quantized, sinks + after.quantized)
  /// into the stream's blocks (allocated by the caller), before = view.counts. Rows come from
  /// the window ring or from the input x; they go through the layer's transform.
  template <class T>
  void flush(const AppendContext& ctx, const StreamView<E>& view, BlockPool& pool, const StreamCounts& after,
             const StridedView<const T, 3>& x) {
    const StreamCounts& before = view.counts;
    const StreamLayout& layout = *view.layout;
    const index_t block_tokens = layout.block_tokens;
    index_t q = before.quantized;
    while (q < after.quantized) {
      const index_t row = q % block_tokens;
      index_t n = std::min({after.quantized - q, block_tokens - row, rows_});
      if (layout.quantized && layout.spec.axis == GroupAxis::kTokens) n -= n % layout.spec.group_size;  // whole groups
      for (index_t r = 0; r < n; ++r) {
        const index_t p = view.rule.sinks + q + r;
        float* dst = staging_.data() + r * width_;
        if (p < before.length) {
          exact_rows_to_float(view.exact_rows(p), 1, width_, dst, width_);
        } else {
          load_input_row(x, p - before.length, dst);
        }
      }
      index_t stride = 0;
      const float* rows = to_stored(view.transform, staging_.data(), n, width_, projected_.data(), &stride);
      std::uint8_t* block = pool.data(view.blocks[static_cast<std::size_t>(q / block_tokens)]);
      if (!layout.quantized) {
        encode_exact_rows<E>(layout, block, row, rows, stride, n);
      } else {
        EncodeFailure failure;
        const Status s =
            view.codec->encode(layout, view.transform.groups, view.transform.clip, block, row, rows, stride, n, &failure);
        if (s != Status::kOk) {
          const index_t p = view.rule.sinks + q + (failure.row - row);
          detail::throw_argument_error(
              ctx.where, ctx.arg,
              detail::concat("token ", p, " of layer ", ctx.layer, " (", p < before.length ? "from the window" : "from this append", ")"),
              s == Status::kMetadataOverflow
                  ? detail::concat("values whose group scale and zero-point fit the stream's ", meta_label(layout.spec.meta),
                                   " metadata (group at channel ", failure.channel, " overflows)")
                  : detail::concat("a quantizable group (status ", static_cast<int>(s), ")"),
              s);
        }
      }
      q += n;
    }
  }

  /// Writes the appended tokens that stay exact (sinks, window) into the stream's sinks
  /// [rule.sinks, width] and ring [ring_capacity, width].
  template <class T>
  static void store_exact(const WindowRule& rule, const StreamCounts& before, const StreamCounts& after, E* sinks,
                          E* ring, index_t ring_capacity, const StridedView<const T, 3>& x) {
    const index_t width = x.extent(1) * x.extent(2);
    for (index_t p = before.length; p < after.length; ++p) {
      E* dst;
      if (p < rule.sinks) {
        dst = sinks + p * width;
      } else if (p >= rule.sinks + after.quantized) {
        dst = ring + ((p - rule.sinks) % ring_capacity) * width;
      } else {
        continue;  // quantized by flush
      }
      const index_t t = p - before.length;
      for (index_t h = 0; h < x.extent(1); ++h) {
        for (index_t c = 0; c < x.extent(2); ++c) dst[h * x.extent(2) + c] = from_float<E>(to_float(x(t, h, c)));
      }
    }
  }

 private:
  index_t width_ = 0;
  index_t rows_ = 0;
  std::vector<float> staging_;    // [rows, width] rows being stored
  std::vector<float> projected_;  // [rows, stored_width] their projections (latent streams)
};

}  // namespace kvq
