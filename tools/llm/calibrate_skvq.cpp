// SPDX-License-Identifier: Apache-2.0
// SKVQ calibration: channel reordering and clip search (llm/calibrate.hpp), in a translation unit of
// its own: its Eigen code builds in parallel with the other calibration units.
#include <algorithm>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/transform/rope.hpp"
#include "llm/calibrate.hpp"

namespace kvq::llm {

namespace {

/// The quantizer spec of a per-token SKVQ stream with a layer's channel groups.
kvq::MatrixQuantSpec stream_spec(const StreamDescription& d, const kvq::StreamCalibration& s) {
  kvq::MatrixQuantSpec spec;
  spec.bits = d.bits;
  spec.axis = d.axis;
  spec.group_size = d.group_size;
  spec.meta = d.meta;
  spec.clip = d.clip;
  spec.channel_groups = s.groups();
  return spec;
}

}  // namespace

PolicyCalibration calibrate_skvq(const CalibrationData& data, const ModelConfig& config, const PolicyDescription& policy,
                                 const SkvqOptions& options, kvq::ThreadPool* pool) {
  constexpr const char* where = "kvq::llm::calibrate_skvq";
  for (const StreamDescription* s : {&policy.keys, &policy.values}) {
    if (s->transform != kvq::TransformKind::kChannelReorder || !s->quantized || s->axis != kvq::GroupAxis::kChannels) {
      kvq::detail::throw_argument_error(where, "policy", policy.name,
                                        "an SKVQ policy (channel-reordered per-token groups in both streams)");
    }
  }
  const int layers = config.num_layers;
  PolicyCalibration out;
  out.label = options.label();
  out.calibration.keys.resize(static_cast<std::size_t>(layers));
  out.calibration.values.resize(static_cast<std::size_t>(layers));
  out.layers.resize(static_cast<std::size_t>(layers));
  const kvq::RopeRotator rope(config.head_dim, config.rope, 64);
  calibrate_detail::parallel_layers(pool, layers, [&](int l) {
    const auto u = static_cast<std::size_t>(l);
    LayerReport& r = out.layers[u];
    for (const bool is_key : {true, false}) {
      const StreamDescription& d = is_key ? policy.keys : policy.values;
      const std::vector<float>& mn = is_key ? data.key_min[u] : data.value_min[u];
      const std::vector<float>& mx = is_key ? data.key_max[u] : data.value_max[u];
      const kvq::calib::ChannelClustering identity = kvq::calib::reorder_channels(
          mn.data(), mx.data(), config.num_kv_heads, config.head_dim, d.group_size, kvq::calib::ReorderScope::kNone);
      const kvq::calib::ChannelClustering groups = kvq::calib::reorder_channels(
          mn.data(), mx.data(), config.num_kv_heads, config.head_dim, d.group_size, options.reorder, options.kmeans);
      kvq::StreamCalibration& s = (is_key ? out.calibration.keys : out.calibration.values)[u];
      s.permutation = groups.permutation;
      s.boundaries = groups.boundaries;
      const double cost_identity = kvq::calib::grouping_range_cost(mn.data(), mx.data(), identity.view());
      const double cost = kvq::calib::grouping_range_cost(mn.data(), mx.data(), groups.view());
      (is_key ? r.key_groups : r.value_groups) = static_cast<int>(groups.groups());
      (is_key ? r.key_cost_identity : r.value_cost_identity) = cost_identity;
      (is_key ? r.key_cost : r.value_cost) = cost;
    }
    kvq::calib::AttentionSample sample = data.samples[u];
    sample.rope = policy.pre_rope ? &rope : nullptr;
    sample.sinks = std::min<kvq::index_t>(policy.sinks, sample.tokens - 2);
    if (!policy.pre_rope) {  // the cache would hold keys after RoPE
      std::vector<double> base(static_cast<std::size_t>(config.head_dim));
      for (kvq::index_t t = 0; t < sample.tokens; t += 64) {
        const kvq::index_t n = std::min<kvq::index_t>(64, sample.tokens - t);
        rope.rotate(sample.k.data() + t * config.kv_dim(), n, config.kv_dim(), config.num_kv_heads, t, base.data());
      }
    }
    kvq::StreamCalibration& ks = out.calibration.keys[u];
    kvq::StreamCalibration& vs = out.calibration.values[u];
    const kvq::MatrixQuantSpec key_spec = stream_spec(policy.keys, ks);
    const kvq::MatrixQuantSpec value_spec = stream_spec(policy.values, vs);
    kvq::calib::ClipSearchOptions search = options.search;
    if (options.clip_mode == ClipMode::kFixed) {
      ks.clip = vs.clip = options.clip;
      search.lo = search.hi = options.clip;  // the errors at the fixed ratio
    }
    if (!(search.hi >= 1.0f)) search.hi = std::max(search.hi, 1.0f);
    const kvq::calib::ClipSearchResult res = kvq::calib::search_clip(sample, key_spec, value_spec, search);
    if (options.clip_mode == ClipMode::kSearch) {
      ks.clip = res.key_clip;
      vs.clip = res.value_clip;
    }
    r.key_clip = ks.clip;
    r.value_clip = vs.clip;
    r.key_error_unclipped = res.key_error_at(1.0f);
    r.value_error_unclipped = res.value_error_at(1.0f);
    r.key_error = res.key_error_at(ks.clip);
    r.value_error = res.value_error_at(vs.clip);
  });
  return out;
}

}  // namespace kvq::llm
