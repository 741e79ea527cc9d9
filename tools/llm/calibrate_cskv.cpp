// SPDX-License-Identifier: Apache-2.0
// CSKV calibration: the factors of W_k and W_v (llm/calibrate.hpp), in a translation unit of
// its own: its Eigen code builds in parallel with the other calibration units.
#include <algorithm>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/transform/latent.hpp"
#include "llm/calibrate.hpp"

namespace kvq::llm {


PolicyCalibration calibrate_cskv(const Model& model, const CalibrationData& data, const PolicyDescription& policy,
                                 const CskvOptions& options, kvq::ThreadPool* pool) {
  constexpr const char* where = "kvq::llm::calibrate_cskv";
  for (const StreamDescription* s : {&policy.keys, &policy.values}) {
    if (s->transform != kvq::TransformKind::kLatentProjection) {
      kvq::detail::throw_argument_error(where, "policy", policy.name, "a CSKV policy (latent projections in both streams)");
    }
  }
  const ModelConfig& c = model.config;
  const int layers = c.num_layers;
  PolicyCalibration out;
  out.label = options.label();
  out.factors = options.method;
  out.calibration.keys.resize(static_cast<std::size_t>(layers));
  out.calibration.values.resize(static_cast<std::size_t>(layers));
  out.layers.resize(static_cast<std::size_t>(layers));
  const kvq::calib::FactorMethod methods[3] = {kvq::calib::FactorMethod::kSvd, kvq::calib::FactorMethod::kAsvd,
                                               kvq::calib::FactorMethod::kRefit};
  calibrate_detail::parallel_layers(pool, layers, [&](int l) {
    const auto u = static_cast<std::size_t>(l);
    const LayerWeights& w = model.layers[u];
    const kvq::calib::ActivationStats& stats = data.inputs[u];
    for (const bool is_key : {true, false}) {
      const StreamDescription& d = is_key ? policy.keys : policy.values;
      const Matrix& projection = is_key ? w.wk : w.wv;  // [out, in]: y = W x; factors take k = x · W
      const std::vector<float> weight = kvq::detail::transpose(projection.data, projection.rows, projection.cols);
      const kvq::index_t rank = c.num_kv_heads * kvq::latent_head_rank(c.head_dim, d.percent);
      kvq::StreamCalibration& s = (is_key ? out.calibration.keys : out.calibration.values)[u];
      for (int m = 0; m < 3; ++m) {
        kvq::LowRankFactor f = kvq::calib::low_rank_factor(weight.data(), c.dim, c.kv_dim(), rank, methods[m], &stats,
                                                           options.asvd_alpha);
        (is_key ? out.layers[u].key_factor : out.layers[u].value_factor)[m] =
            kvq::calib::factor_error(weight.data(), c.dim, c.kv_dim(), f, &stats);
        if (methods[m] == options.method) s.latent = std::move(f);
      }
    }
  });
  return out;
}

}  // namespace kvq::llm
