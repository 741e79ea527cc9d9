// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief CSKV low-rank latent factors of one layer, and random orthonormal factors.
///
/// A layer's key row k [width] (width = num_kv_heads * head_dim) is stored as the latent
/// c = k · A_K [key_rank] and reconstructed as k^ = c · B_K; values likewise. For factors from
/// an SVD of the projection weight W_k = U S V^T (rank r), A_K = V_r S_r^(-1/2) and
/// B_K = S_r^(1/2) V_r^T, so c = k · A_K equals CSKV's x · (U_r S_r^(1/2)) for k = x · W_k
/// (kvq/calib/latent_svd.hpp computes them). Random orthonormal factors (B with orthonormal rows,
/// A = B^T) project onto a random subspace: the baseline until calibration exists.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "kvq/core/bits.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/random.hpp"

namespace kvq {

/// Factors of one layer; every matrix is row-major float.
struct LatentFactors {
  index_t width = 0;
  index_t key_rank = 0;
  index_t value_rank = 0;
  std::vector<float> key_down;    ///< A_K [width, key_rank]
  std::vector<float> key_up;      ///< B_K [key_rank, width]
  std::vector<float> value_down;  ///< A_V [width, value_rank]
  std::vector<float> value_up;    ///< B_V [value_rank, width]
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

/// Random orthonormal factors: B with orthonormal rows, A = B^T (seeded, reproducible).
inline LatentFactors random_orthonormal_factors(index_t width, index_t key_rank,
                                                index_t value_rank, std::uint64_t seed) {
  constexpr const char* where = "kvq::random_orthonormal_factors";
  if (width <= 0) detail::throw_argument_error(where, "width", width, "width > 0");
  if (key_rank <= 0 || key_rank > width) {
    detail::throw_argument_error(where, "key_rank", key_rank,
                                 detail::concat("a rank in 1..", width));
  }
  if (value_rank <= 0 || value_rank > width) {
    detail::throw_argument_error(where, "value_rank", value_rank,
                                 detail::concat("a rank in 1..", width));
  }
  Rng rng(seed);
  LatentFactors f;
  f.width = width;
  f.key_rank = key_rank;
  f.value_rank = value_rank;
  f.key_up = detail::random_orthonormal_rows(key_rank, width, rng);
  f.key_down = detail::transpose(f.key_up, key_rank, width);
  f.value_up = detail::random_orthonormal_rows(value_rank, width, rng);
  f.value_down = detail::transpose(f.value_up, value_rank, width);
  return f;
}

}  // namespace kvq
