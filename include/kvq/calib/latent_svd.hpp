// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief CSKV latent factors from a truncated SVD of the key and value projection weights
///        (ALGORITHMS.md §3.1, plain SVD init). Host only; needs Eigen.
#pragma once

#include <Eigen/Dense>
#include <Eigen/SVD>

#include <cmath>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/transform/latent.hpp"

namespace kvq {

namespace detail {

/// Down [width, rank] and up [rank, width] factors of W [hidden, width] (row-major):
/// W = U S V^T, down = V_r S_r^(-1/2), up = S_r^(1/2) V_r^T.
inline void svd_factors(const float* weight, index_t hidden, index_t width, index_t rank,
                        std::vector<float>& down, std::vector<float>& up) {
  using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Matrix w(hidden, width);
  for (index_t r = 0; r < hidden; ++r) {
    for (index_t c = 0; c < width; ++c) w(r, c) = weight[r * width + c];
  }
  Eigen::BDCSVD<Matrix> svd(w, Eigen::ComputeThinV);
  const auto& s = svd.singularValues();
  const auto& v = svd.matrixV();  // [width, min(hidden, width)]
  down.assign(static_cast<std::size_t>(width * rank), 0.0f);
  up.assign(static_cast<std::size_t>(rank * width), 0.0f);
  const double floor = s(0) * 1e-6;  // rank beyond the weight's numerical rank: zero factors
  for (index_t i = 0; i < rank; ++i) {
    const double si = i < s.size() ? s(i) : 0.0;
    if (si <= floor) continue;
    const double root = std::sqrt(si);
    for (index_t c = 0; c < width; ++c) {
      down[static_cast<std::size_t>(c * rank + i)] = static_cast<float>(v(c, i) / root);
      up[static_cast<std::size_t>(i * width + c)] = static_cast<float>(v(c, i) * root);
    }
  }
}

}  // namespace detail

/// Factors of one layer from its projection weights: key_weight and value_weight
/// [hidden, width] row-major (k = x · key_weight). c = k · A_K then equals CSKV's x · A.
inline LatentFactors latent_factors_from_weights(const float* key_weight, const float* value_weight,
                                                 index_t hidden, index_t width, index_t key_rank,
                                                 index_t value_rank) {
  constexpr const char* where = "kvq::latent_factors_from_weights";
  if (hidden <= 0) detail::throw_argument_error(where, "hidden", hidden, "hidden > 0");
  if (width <= 0) detail::throw_argument_error(where, "width", width, "width > 0");
  for (auto [name, rank] : {std::pair<const char*, index_t>{"key_rank", key_rank}, {"value_rank", value_rank}}) {
    if (rank <= 0 || rank > width) {
      detail::throw_argument_error(where, name, rank, detail::concat("a rank in 1..", width));
    }
  }
  for (index_t i = 0; i < hidden * width; ++i) {
    if (!std::isfinite(key_weight[i]) || !std::isfinite(value_weight[i])) {
      detail::throw_argument_error(where, std::isfinite(key_weight[i]) ? "value_weight" : "key_weight",
                                   detail::concat("entry ", i, " not finite"), "finite weights",
                                   Status::kNonFiniteInput);
    }
  }
  LatentFactors f;
  f.width = width;
  f.key_rank = key_rank;
  f.value_rank = value_rank;
  detail::svd_factors(key_weight, hidden, width, key_rank, f.key_down, f.key_up);
  detail::svd_factors(value_weight, hidden, width, value_rank, f.value_down, f.value_up);
  return f;
}

}  // namespace kvq
