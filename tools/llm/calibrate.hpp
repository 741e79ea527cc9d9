// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Calibration of SKVQ and CSKV caches on a real model (ALGORITHMS.md §2.2–2.4, §3.1):
///        one pass of the model over calibration text collects streaming statistics, from
///        which each policy's per-layer data (kvq::CacheCalibration) is computed and written
///        as a calibration file with its provenance.
///
/// Statistics, per layer (bounded memory, independent of the token count except the sample):
///   keys (before RoPE) and values: per-channel min and max            -> SKVQ reordering
///   the input hidden state x of the k/v projections: mean |x| and X^T X -> CSKV ASVD and refit
///   the first `sample_tokens` tokens: q (after RoPE), k (before RoPE), v -> SKVQ clip search
/// The pass runs the model with the fp32 cache, so every layer sees un-degraded inputs
/// (teacher-forced, as CSKV's layer-wise training and SKVQ's calibration do).
#pragma once

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "kvq/cache/cache_config.hpp"
#include "kvq/calib/channel_reorder.hpp"
#include "kvq/calib/clip_search.hpp"
#include "kvq/calib/latent_factors.hpp"
#include "kvq/core/thread_pool.hpp"
#include "kvq/io/calibration_file.hpp"
#include "kvq/policy/registry.hpp"
#include "llm/model.hpp"

namespace kvq::llm {

/// One stream of a policy, as calibration needs it (from the policy type; see describe()).
struct StreamDescription {
  bool quantized = false;
  kvq::Bits bits = kvq::Bits::k2;
  kvq::GroupAxis axis = kvq::GroupAxis::kChannels;
  int group_size = 0;  ///< kvq::kGroupPerHead for CSKV value latents
  kvq::MetaFormat meta = kvq::MetaFormat::kFp16;
  float clip = 1.0f;  ///< the policy's default
  kvq::TransformKind transform = kvq::TransformKind::kIdentity;
  int percent = 100;  ///< latent rank as a share of each head's channels
};

/// A registered policy, as calibration needs it.
struct PolicyDescription {
  std::string name;
  StreamDescription keys;
  StreamDescription values;
  int sinks = 0;          ///< exact first tokens (SKVQ)
  bool pre_rope = false;  ///< keys stored before RoPE

  /// "skvq" (channel reordering), "cskv" (latent projection) or "" (nothing to calibrate).
  std::string method() const;
};

/// The description of stream S.
template <class S>
StreamDescription describe_stream() {
  StreamDescription d;
  d.quantized = S::quantized;
  d.transform = S::transform::kind;
  d.percent = S::transform::percent;
  if constexpr (S::quantized) {
    d.bits = S::bits;
    d.axis = S::axis;
    d.group_size = S::group_size;
    d.meta = S::meta;
    d.clip = S::clip;
  }
  return d;
}

/// The description of policy P.
template <class P>
PolicyDescription describe() {
  PolicyDescription d;
  d.name = P::name();
  d.keys = describe_stream<typename P::KeyStream>();
  d.values = describe_stream<typename P::ValueStream>();
  d.sinks = P::KeyWindow::sinks;
  d.pre_rope = P::pre_rope;
  return d;
}

/// The description of the registered policy `name` (kvq::Error for an unknown name).
PolicyDescription describe_policy(const std::string& name);

/// What one pass over calibration text collects; see the file comment.
struct CalibrationData {
  int tokens = 0;                                            ///< tokens fed (BOS included)
  std::vector<std::vector<float>> key_min, key_max;          ///< [layers][kv_dim], keys before RoPE
  std::vector<std::vector<float>> value_min, value_max;      ///< [layers][kv_dim]
  std::vector<kvq::calib::ActivationStats> inputs;           ///< [layers] over the model dim
  std::vector<kvq::calib::AttentionSample> samples;          ///< [layers], k before RoPE, no rope set
};

/// Progress of a long step: (done, total) units.
using CalibrationProgress = std::function<void(int done, int total)>;

/// Runs the model over `tokens` (cut into windows of at most the model's context, each from
/// BOS when bos >= 0) and collects the statistics. sample_tokens: the clip-search sample (the
/// first tokens of the first window). X^T X costs O(dim^2) per token and layer, in blocks of 64
/// tokens through Eigen's rank update.
CalibrationData collect_calibration_data(const Model& model, const std::vector<int>& tokens, int bos, int sample_tokens,
                                         kvq::ThreadPool* pool, const CalibrationProgress& progress = {});

/// How the SKVQ clip ratio is chosen.
enum class ClipMode { kFixed, kSearch };

struct SkvqOptions {
  kvq::calib::ReorderScope reorder = kvq::calib::ReorderScope::kCrossHead;
  ClipMode clip_mode = ClipMode::kSearch;
  float clip = 0.92f;  ///< the fixed ratio (kFixed)
  kvq::calib::ClipSearchOptions search{};
  kvq::calib::KMeansOptions kmeans{};
  /// "cross-head, clip search" / "within-head, clip 0.96" / ...
  std::string label() const;
};

struct CskvOptions {
  kvq::calib::FactorMethod method = kvq::calib::FactorMethod::kRefit;
  double asvd_alpha = 0.5;
  std::string label() const;
};

/// Per-layer facts of a calibration, for tables and the file's report arrays.
struct LayerReport {
  // SKVQ: groups, range cost of identity order vs. the reorder, clip ratios and the attention
  // output error (relative, keys or values quantized alone) at alpha 1 and at the chosen alpha.
  int key_groups = 0, value_groups = 0;
  double key_cost_identity = 0, key_cost = 0, value_cost_identity = 0, value_cost = 0;
  float key_clip = 0, value_clip = 0;
  double key_error_unclipped = 0, key_error = 0, value_error_unclipped = 0, value_error = 0;
  // CSKV: reconstruction errors of the three factorisations, [svd, asvd, refit].
  kvq::calib::FactorError key_factor[3]{}, value_factor[3]{};
};

/// The calibration of one policy and its report.
struct PolicyCalibration {
  kvq::CacheCalibration calibration;
  std::vector<LayerReport> layers;
  std::string label;  ///< what was done, e.g. "cross-head reorder, clip search"
  kvq::calib::FactorMethod factors = kvq::calib::FactorMethod::kRefit;  ///< CSKV: the method of the factors held
};

/// SKVQ: channel groups per layer (k-means of the channel ranges) and clip ratios (fixed or
/// searched on the sample). The policy's streams must use the ChannelReorder transform.
PolicyCalibration calibrate_skvq(const CalibrationData& data, const ModelConfig& config, const PolicyDescription& policy,
                                 const SkvqOptions& options, kvq::ThreadPool* pool);

/// CSKV: per layer the factors of W_k and W_v by options.method (SVD, ASVD or refit), and the
/// errors of all three. The policy's streams must use the LatentProjection transform.
PolicyCalibration calibrate_cskv(const Model& model, const CalibrationData& data, const PolicyDescription& policy,
                                 const CskvOptions& options, kvq::ThreadPool* pool);

/// The calibration file of a calibration: metadata (policy, method, shape) plus `provenance`,
/// and the report as arrays report.* ([layers] each).
kvq::CalibrationFile calibration_file(const PolicyCalibration& c, const ModelConfig& config,
                                      const PolicyDescription& policy,
                                      std::vector<std::pair<std::string, std::string>> provenance);

namespace calibrate_detail {
/// f(layer) for every layer, on the pool's threads when there is one.
inline void parallel_layers(kvq::ThreadPool* pool, int layers, const std::function<void(int)>& f) {
  if (pool == nullptr) {
    for (int l = 0; l < layers; ++l) f(l);
  } else {
    pool->parallel_for(layers, [&](kvq::index_t l) { f(static_cast<int>(l)); });
  }
}
}  // namespace calibrate_detail

/// sha256 of a file as 64 lowercase hex digits (kvq::Error naming the path when unreadable).
std::string file_sha256(const std::string& path);

}  // namespace kvq::llm
