// SPDX-License-Identifier: Apache-2.0
#include "llm/calibrate.hpp"

#include <nettle/sha2.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <memory>

#include "kvq/cache/calibration_io.hpp"
#include "kvq/core/error.hpp"
#include "kvq/transform/rope.hpp"
#include "llm/any_session.hpp"

namespace kvq::llm {


std::string PolicyDescription::method() const {
  if (keys.transform == kvq::TransformKind::kChannelReorder || values.transform == kvq::TransformKind::kChannelReorder) {
    return "skvq";
  }
  if (keys.transform == kvq::TransformKind::kLatentProjection || values.transform == kvq::TransformKind::kLatentProjection) {
    return "cskv";
  }
  return "";
}

PolicyDescription describe_policy(const std::string& name) {
  PolicyDescription d;
  kvq::dispatch_policy(name, [&](auto tag) { d = describe<typename decltype(tag)::type>(); });
  return d;
}

std::string SkvqOptions::label() const {
  const std::string reorder_text =
      reorder == kvq::calib::ReorderScope::kNone ? "no reorder" : kvq::calib::scope_label(reorder) + " reorder";
  char clip_text[32];
  std::snprintf(clip_text, sizeof clip_text, "clip %.2f", static_cast<double>(clip));
  return reorder_text + ", " + (clip_mode == ClipMode::kSearch ? std::string("clip search") : std::string(clip_text));
}

std::string CskvOptions::label() const { return kvq::calib::factor_method_label(method) + " factors"; }

CalibrationData collect_calibration_data(const Model& model, const std::vector<int>& tokens, int bos, int sample_tokens, kvq::ThreadPool* pool, const CalibrationProgress& progress) {
  constexpr const char* where = "kvq::llm::collect_calibration_data";
  const ModelConfig& c = model.config;
  if (tokens.empty()) kvq::detail::throw_argument_error(where, "tokens", 0, "at least one calibration token");
  if (sample_tokens < 2) kvq::detail::throw_argument_error(where, "sample_tokens", sample_tokens, "at least 2");
  const int layers = c.num_layers, kvd = c.kv_dim(), dim = c.dim, qd = c.q_dim();
  CalibrationData d;
  const float inf = std::numeric_limits<float>::infinity();
  d.key_min.assign(static_cast<std::size_t>(layers), std::vector<float>(static_cast<std::size_t>(kvd), inf));
  d.key_max.assign(static_cast<std::size_t>(layers), std::vector<float>(static_cast<std::size_t>(kvd), -inf));
  d.value_min = d.key_min;
  d.value_max = d.key_max;
  d.inputs.assign(static_cast<std::size_t>(layers), kvq::calib::ActivationStats(dim));

  // Windows of at most the model's context, each from BOS when the model has one.
  const int per_window = c.max_context - (bos >= 0 ? 1 : 0);
  std::vector<std::vector<int>> windows;
  for (std::size_t at = 0; at < tokens.size(); at += static_cast<std::size_t>(per_window)) {
    const std::size_t n = std::min<std::size_t>(static_cast<std::size_t>(per_window), tokens.size() - at);
    std::vector<int> w;
    w.reserve(n + 1);
    if (bos >= 0) w.push_back(bos);
    for (std::size_t i = 0; i < n; ++i) w.push_back(tokens[at + i]);
    windows.push_back(std::move(w));
  }
  const int sample = std::min<int>(sample_tokens, static_cast<int>(windows.front().size()));
  d.samples.resize(static_cast<std::size_t>(layers));
  for (auto& s : d.samples) {
    s.tokens = sample;
    s.query_heads = c.num_heads;
    s.kv_heads = c.num_kv_heads;
    s.head_dim = c.head_dim;
    s.q.reserve(static_cast<std::size_t>(sample) * static_cast<std::size_t>(qd));
    s.k.reserve(static_cast<std::size_t>(sample) * static_cast<std::size_t>(kvd));
    s.v.reserve(s.k.capacity());
  }

  // The hidden states of each layer, batched for X^T X (a GEMM per block instead of a rank-1
  // update per token).
  constexpr int kBlock = 64;
  std::vector<std::vector<float>> pending(static_cast<std::size_t>(layers));
  auto flush = [&](int l) {
    std::vector<float>& rows = pending[static_cast<std::size_t>(l)];
    if (rows.empty()) return;
    const auto n = static_cast<kvq::index_t>(rows.size() / static_cast<std::size_t>(dim));
    d.inputs[static_cast<std::size_t>(l)].add_rows(rows.data(), n, dim);
    rows.clear();
  };

  int done = 0;
  const int total = static_cast<int>(tokens.size()) + (bos >= 0 ? static_cast<int>(windows.size()) : 0);
  for (std::size_t w = 0; w < windows.size(); ++w) {
    const std::vector<int>& window = windows[w];
    std::unique_ptr<AnySession> session = make_session("fp32", model, static_cast<int>(window.size()), pool);
    session->set_observer([&](const AttentionInputs& in) {
      const auto l = static_cast<std::size_t>(in.layer);
      for (int i = 0; i < kvd; ++i) {
        const auto u = static_cast<std::size_t>(i);
        d.key_min[l][u] = std::min(d.key_min[l][u], in.k_pre_rope[i]);
        d.key_max[l][u] = std::max(d.key_max[l][u], in.k_pre_rope[i]);
        d.value_min[l][u] = std::min(d.value_min[l][u], in.v[i]);
        d.value_max[l][u] = std::max(d.value_max[l][u], in.v[i]);
      }
      std::vector<float>& rows = pending[l];
      rows.insert(rows.end(), in.x, in.x + dim);
      if (rows.size() >= static_cast<std::size_t>(kBlock) * static_cast<std::size_t>(dim)) flush(in.layer);
      if (w == 0 && in.position < sample) {
        kvq::calib::AttentionSample& s = d.samples[l];
        s.q.insert(s.q.end(), in.q, in.q + qd);
        s.k.insert(s.k.end(), in.k_pre_rope, in.k_pre_rope + kvd);
        s.v.insert(s.v.end(), in.v, in.v + kvd);
      }
    });
    constexpr int kChunk = 64;
    for (std::size_t at = 0; at < window.size(); at += kChunk) {
      const int n = static_cast<int>(std::min<std::size_t>(kChunk, window.size() - at));
      session->forward(window.data() + at, n, nullptr, false);
      done += n;
      if (progress) progress(done, total);
    }
    d.tokens += static_cast<int>(window.size());
  }
  for (int l = 0; l < layers; ++l) flush(l);
  return d;
}

kvq::CalibrationFile calibration_file(const PolicyCalibration& c, const ModelConfig& config, const PolicyDescription& policy,
                                      std::vector<std::pair<std::string, std::string>> provenance) {
  kvq::CalibrationInfo info;
  info.policy = policy.name;
  info.method = policy.method();
  info.num_layers = config.num_layers;
  info.num_kv_heads = config.num_kv_heads;
  info.head_dim = config.head_dim;
  provenance.emplace_back("calibration", c.label);
  info.provenance = std::move(provenance);
  std::vector<kvq::CalibrationArray> report;
  auto add = [&](const std::string& name, const std::function<double(const LayerReport&)>& get) {
    kvq::CalibrationArray a;
    a.name = name;
    a.dtype = kvq::CalibrationDtype::kFloat32;
    a.shape = {static_cast<std::int64_t>(c.layers.size())};
    for (const LayerReport& r : c.layers) a.f32.push_back(static_cast<float>(get(r)));
    report.push_back(std::move(a));
  };
  if (info.method == "skvq") {
    add("key_range_cost_identity", [](const LayerReport& r) { return r.key_cost_identity; });
    add("key_range_cost", [](const LayerReport& r) { return r.key_cost; });
    add("value_range_cost_identity", [](const LayerReport& r) { return r.value_cost_identity; });
    add("value_range_cost", [](const LayerReport& r) { return r.value_cost; });
    add("key_attention_error_unclipped", [](const LayerReport& r) { return r.key_error_unclipped; });
    add("key_attention_error", [](const LayerReport& r) { return r.key_error; });
    add("value_attention_error_unclipped", [](const LayerReport& r) { return r.value_error_unclipped; });
    add("value_attention_error", [](const LayerReport& r) { return r.value_error; });
  } else if (info.method == "cskv") {
    const char* names[3] = {"svd", "asvd", "refit"};
    for (int m = 0; m < 3; ++m) {
      add(std::string("key_activation_error_") + names[m], [m](const LayerReport& r) { return r.key_factor[m].activation_relative; });
      add(std::string("value_activation_error_") + names[m], [m](const LayerReport& r) { return r.value_factor[m].activation_relative; });
      add(std::string("key_weight_error_") + names[m], [m](const LayerReport& r) { return r.key_factor[m].weight_relative; });
      add(std::string("value_weight_error_") + names[m], [m](const LayerReport& r) { return r.value_factor[m].weight_relative; });
    }
    // The errors of the factors the file holds (one of the three above; FactorMethod's values
    // are their indices, as in calibrate_cskv).
    const int held = static_cast<int>(c.factors);
    add("key_activation_error", [held](const LayerReport& r) { return r.key_factor[held].activation_relative; });
    add("value_activation_error", [held](const LayerReport& r) { return r.value_factor[held].activation_relative; });
  }
  return kvq::make_calibration_file(info, c.calibration, std::move(report));
}

std::string file_sha256(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw kvq::Error(kvq::Status::kIoError, "kvq::llm::file_sha256: cannot open '" + path + "'");
  sha256_ctx ctx;
  sha256_init(&ctx);
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    const std::streamsize n = in.gcount();
    if (n > 0) sha256_update(&ctx, static_cast<std::size_t>(n), reinterpret_cast<const std::uint8_t*>(buffer.data()));
  }
  if (in.bad()) throw kvq::Error(kvq::Status::kIoError, "kvq::llm::file_sha256: cannot read '" + path + "'");
  std::uint8_t digest[SHA256_DIGEST_SIZE];
  sha256_digest(&ctx, SHA256_DIGEST_SIZE, digest);
  static const char* hex = "0123456789abcdef";
  std::string s;
  for (std::uint8_t b : digest) {
    s += hex[b >> 4];
    s += hex[b & 15];
  }
  return s;
}

}  // namespace kvq::llm
