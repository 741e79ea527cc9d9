// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief CSKV low-rank factors of one stream and layer, and random orthonormal factors.
///
/// A layer's key (or value) row x [width] (width = num_kv_heads * head_dim) is stored as the
/// latent c = x · A [rank] and reconstructed as x^ = c · B (transform/stream_transform.hpp,
/// kLatentProjection). kvq/calib/latent_factors.hpp computes A and B from the model's projection
/// weights (SVD, ASVD) or from calibration activations (the activation-aware refit). Random
/// orthonormal factors (B with orthonormal rows, A = B^T) project onto a random subspace: a
/// baseline and a test fixture.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "kvq/core/bits.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/random.hpp"

namespace kvq {

/// The factors of one stream and layer; both matrices row-major float.
struct LowRankFactor {
  index_t width = 0;
  index_t rank = 0;
  std::vector<float> down;  ///< A [width, rank]
  std::vector<float> up;    ///< B [rank, width]

  bool empty() const noexcept { return down.empty() && up.empty(); }
};

namespace detail {

/// Rows [rank, width] with orthonormal rows (Gram–Schmidt, in double, of Gaussian rows).
inline std::vector<float> random_orthonormal_rows(index_t rank, index_t width, Rng& rng) {
  std::vector<double> rows(static_cast<std::size_t>(rank * width));
  for (index_t r = 0; r < rank; ++r) {
    double* row = rows.data() + r * width;
    for (int attempt = 0;; ++attempt) {
      for (index_t c = 0; c < width; ++c) row[c] = rng.normal();
      for (int pass = 0; pass < 2; ++pass) {  // twice: re-orthogonalization for stability
        for (index_t p = 0; p < r; ++p) {
          const double* prev = rows.data() + p * width;
          double dot = 0;
          for (index_t c = 0; c < width; ++c) dot += row[c] * prev[c];
          for (index_t c = 0; c < width; ++c) row[c] -= dot * prev[c];
        }
      }
      double norm = 0;
      for (index_t c = 0; c < width; ++c) norm += row[c] * row[c];
      norm = std::sqrt(norm);
      if (norm > 1e-6 || attempt > 8) {
        for (index_t c = 0; c < width; ++c) row[c] /= norm;
        break;
      }
    }
  }
  return std::vector<float>(rows.begin(), rows.end());
}

inline std::vector<float> transpose(const std::vector<float>& m, index_t rows, index_t cols) {
  std::vector<float> t(m.size());
  for (index_t r = 0; r < rows; ++r) {
    for (index_t c = 0; c < cols; ++c) t[static_cast<std::size_t>(c * rows + r)] = m[static_cast<std::size_t>(r * cols + c)];
  }
  return t;
}

}  // namespace detail

/// Random orthonormal factors of one stream: B with orthonormal rows, A = B^T (seeded,
/// reproducible).
inline LowRankFactor random_orthonormal_factor(index_t width, index_t rank, std::uint64_t seed) {
  constexpr const char* where = "kvq::random_orthonormal_factor";
  if (width <= 0) detail::throw_argument_error(where, "width", width, "width > 0");
  if (rank <= 0 || rank > width) {
    detail::throw_argument_error(where, "rank", rank, detail::concat("a rank in 1..", width));
  }
  Rng rng(seed);
  LowRankFactor f;
  f.width = width;
  f.rank = rank;
  f.up = detail::random_orthonormal_rows(rank, width, rng);
  f.down = detail::transpose(f.up, rank, width);
  return f;
}

}  // namespace kvq
