// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief What a policy's cache can be given without calibration data: CSKV's latent factors
///        from a plain SVD of each layer's key and value projections (ALGORITHMS.md §3.1), and
///        nothing for the other policies (SKVQ then uses equal channel groups in identity order
///        and its policy's clip ratio). kvq calibrate (llm/calibrate.hpp) computes the real ones.
#pragma once

#include <cstddef>
#include <vector>

#include "kvq/cache/quantized_kv_cache.hpp"
#include "kvq/calib/latent_factors.hpp"
#include "kvq/policy/policy_traits.hpp"
#include "kvq/transform/latent.hpp"
#include "llm/model.hpp"

namespace kvq::llm {

template <class Policy>
kvq::CacheCalibration default_calibration(const Model& model) {
  kvq::CacheCalibration calibration;
  const ModelConfig& c = model.config;
  auto fill = [&](auto stream, bool is_key, std::vector<kvq::StreamCalibration>& layers) {
    using S = decltype(stream);
    if constexpr (S::transform::kind == kvq::TransformKind::kLatentProjection) {
      const kvq::index_t rank = c.num_kv_heads * kvq::stored_head_width<S>(c.head_dim);
      for (const LayerWeights& w : model.layers) {
        const Matrix& m = is_key ? w.wk : w.wv;
        // W [out, in] (y = W x) as [in, out] (y = x · Wᵀ), the layout low_rank_factor takes.
        const std::vector<float> wt = kvq::detail::transpose(m.data, m.rows, m.cols);
        layers.emplace_back();
        layers.back().latent =
            kvq::calib::low_rank_factor(wt.data(), c.dim, c.kv_dim(), rank, kvq::calib::FactorMethod::kSvd, nullptr);
      }
    }
  };
  fill(typename Policy::KeyStream{}, true, calibration.keys);
  fill(typename Policy::ValueStream{}, false, calibration.values);
  return calibration;
}

}  // namespace kvq::llm
