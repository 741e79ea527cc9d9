// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief What a stream does to a layer's rows before storing them, and undoes when they are
///        read: the transform slot of a stream (policy/spec.hpp names its kind at compile time,
///        StreamTransform carries one layer's data at run time).
///
/// A model row has `width` numbers (num_kv_heads * head_dim); a stored row has `stored_width`.
///   kIdentity          stored row = row
///   kChannelReorder    stored row = row, quantized in per-token groups over permuted channels:
///                      group g covers positions [boundaries[g], boundaries[g + 1]) of the
///                      reordered row, position p holds channel permutation[p] (SKVQ). The
///                      quantizer reads and writes through the permutation, so rows enter and
///                      leave in model order; only the group boundaries are variable.
///   kLatentProjection  stored row c = row · A [stored_width], read back as c · B (CSKV; A, B
///                      per layer, stored_width = the latent rank)
/// A later orthogonal rotation (stored = row · R, read back as c · R^T) is one more kind with a
/// [width, width] matrix in `down` / `up`.
///
/// StreamTransform is plain data (views into storage owned by the cache's calibration), the same
/// on the host and the device.
#pragma once

#include <cstdint>

#include "kvq/core/bits.hpp"
#include "kvq/quant/matrix.hpp"
#include "kvq/transform/small_matmul.hpp"

namespace kvq {

/// The kind of a stream's transform.
enum class TransformKind : std::uint8_t { kIdentity, kChannelReorder, kLatentProjection };

/// "identity", "reorder" or "latent".
inline const char* transform_label(TransformKind k) noexcept {
  return k == TransformKind::kIdentity ? "identity" : k == TransformKind::kChannelReorder ? "reorder" : "latent";
}

/// One layer of one stream: its transform and the clip ratio its quantizer uses.
struct StreamTransform {
  TransformKind kind = TransformKind::kIdentity;
  index_t width = 0;         ///< numbers of a model row
  index_t stored_width = 0;  ///< numbers of a stored row (the latent rank for kLatentProjection)
  /// kChannelReorder: the layer's channel groups over the stored row (empty: uniform groups of
  /// the stream's group size). Other kinds: empty.
  ChannelGroups groups{};
  const float* down = nullptr;  ///< kLatentProjection: A [width, stored_width] row-major
  const float* up = nullptr;    ///< kLatentProjection: B [stored_width, width] row-major
  float clip = 1.0f;            ///< clip ratio of the layer's quantized groups, in (0, 1]

  bool projects() const noexcept { return kind == TransformKind::kLatentProjection; }
};

/// Rows to store: rows [n, width] (row stride `stride`) as stored rows. Returns `rows` itself
/// (stride unchanged) unless the transform projects; then the projection is written to
/// `scratch` [n, stored_width] and *out_stride is set to stored_width.
inline const float* to_stored(const StreamTransform& t, const float* rows, index_t n, index_t stride,
                              float* scratch, index_t* out_stride) noexcept {
  if (!t.projects()) {
    *out_stride = stride;
    return rows;
  }
  small_matmul(rows, n, t.width, stride, t.down, t.stored_width, t.stored_width, scratch, t.stored_width);
  *out_stride = t.stored_width;
  return scratch;
}

/// Model rows out [n, width] (row stride out_stride) from stored rows that the quantizer (or the
/// exact decoder) has already put in model channel order: for kLatentProjection, stored
/// [n, stored_width] · B; otherwise a copy (callers that decode straight into `out` skip it).
inline void from_stored(const StreamTransform& t, const float* stored, index_t n, index_t stored_stride,
                        float* out, index_t out_stride) noexcept {
  if (t.projects()) {
    small_matmul(stored, n, t.stored_width, stored_stride, t.up, t.width, t.width, out, out_stride);
    return;
  }
  for (index_t r = 0; r < n; ++r) {
    for (index_t c = 0; c < t.width; ++c) out[r * out_stride + c] = stored[r * stored_stride + c];
  }
}

}  // namespace kvq
