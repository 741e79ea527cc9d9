// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief What a policy needs from the model before its cache can take tokens: CSKV's latent
///        factors from an SVD of each layer's key and value projections. (Data-driven SKVQ
///        channel groups and ASVD factors come with calibration, issue #5; until then SKVQ
///        uses equal channel groups.)
#pragma once

#include <cstddef>
#include <vector>

#include "kvq/cache/quantized_kv_cache.hpp"
#include "kvq/calib/latent_svd.hpp"
#include "kvq/policy/policy_traits.hpp"
#include "llm/model.hpp"

namespace kvq::llm {

/// W [out, in] row-major (y = W x) as [in, out] row-major (y = x · Wᵀ), the layout of
/// kvq::latent_factors_from_weights.
inline std::vector<float> transposed(const Matrix& w) {
  std::vector<float> t(w.data.size());
  for (int o = 0; o < w.rows; ++o) {
    for (int i = 0; i < w.cols; ++i) {
      t[static_cast<std::size_t>(i) * static_cast<std::size_t>(w.rows) + static_cast<std::size_t>(o)] =
          w.data[static_cast<std::size_t>(o) * static_cast<std::size_t>(w.cols) + static_cast<std::size_t>(i)];
    }
  }
  return t;
}

template <class Policy>
kvq::CacheCalibration calibration_for(const Model& model) {
  kvq::CacheCalibration calibration;
  if constexpr (kvq::policy_traits<Policy>::latent) {
    using L = typename Policy::Latent;
    const ModelConfig& c = model.config;
    const kvq::index_t key_rank = c.num_kv_heads * kvq::latent_head_rank(c.head_dim, L::key_percent);
    const kvq::index_t value_rank = c.num_kv_heads * kvq::latent_head_rank(c.head_dim, L::value_percent);
    for (const LayerWeights& w : model.layers) {
      const std::vector<float> wk = transposed(w.wk);
      const std::vector<float> wv = transposed(w.wv);
      calibration.latent.push_back(
          kvq::latent_factors_from_weights(wk.data(), wv.data(), c.dim, c.kv_dim(), key_rank, value_rank));
    }
  }
  return calibration;
}

}  // namespace kvq::llm
