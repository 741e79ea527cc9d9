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
#include "kvq/transform/latent.hpp"
#include "llm/model.hpp"

namespace kvq::llm {

template <class Policy>
kvq::CacheCalibration calibration_for(const Model& model) {
  kvq::CacheCalibration calibration;
  if constexpr (kvq::policy_traits<Policy>::latent) {
    using L = typename Policy::Latent;
    const ModelConfig& c = model.config;
    const kvq::index_t key_rank = c.num_kv_heads * kvq::latent_head_rank(c.head_dim, L::key_percent);
    const kvq::index_t value_rank = c.num_kv_heads * kvq::latent_head_rank(c.head_dim, L::value_percent);
    for (const LayerWeights& w : model.layers) {
      // W [out, in] (y = W x) as [in, out] (y = x · Wᵀ), the layout latent_factors_from_weights takes.
      const std::vector<float> wk = kvq::detail::transpose(w.wk.data, w.wk.rows, w.wk.cols);
      const std::vector<float> wv = kvq::detail::transpose(w.wv.data, w.wv.rows, w.wv.cols);
      calibration.latent.push_back(
          kvq::latent_factors_from_weights(wk.data(), wv.data(), c.dim, c.kv_dim(), key_rank, value_rank));
    }
  }
  return calibration;
}

}  // namespace kvq::llm
