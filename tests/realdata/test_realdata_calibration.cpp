// SPDX-License-Identifier: Apache-2.0
// Calibration end to end on stories260K (llama2.c, 5 layers, 4 kv heads of 8 channels) and
// TinyStories (tools/llm/calibrate.hpp): the statistics of one pass over calibration text equal
// what the runtime feeds attention, SKVQ reordering and clip search and CSKV factors give caches
// that construct and evaluate, the calibration files round-trip, the searched clip ratios are
// the minima of their error curves, the refit has the smallest activation-weighted error, and
// the calibrated caches score held-out text (the second half of the file) at least as well as
// the uncalibrated ones where the methods promise it.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "kvq/cache/calibration_io.hpp"
#include "kvq/core/thread_pool.hpp"
#include "kvq/policy/registry.hpp"
#include "kvq_catch.hpp"
#include "llm/calibrate.hpp"
#include "llm/evaluate.hpp"
#include "llm/load.hpp"
#include "llm/text.hpp"

namespace {

using kvq::Bits;

std::string data_path(const std::string& relative) { return std::string(KVQ_REALDATA_DIR) + "/" + relative; }
const std::string kText = "tinystories/tinystories_val_head.txt";

const kvq::llm::LoadedModel& stories() {
  static const kvq::llm::LoadedModel m = kvq::llm::load_model(data_path("stories260K/stories260K.bin"));
  return m;
}

/// SKVQ with groups small enough for a 32-channel row to have several (G = 8: 4 groups), a
/// window of 16 and 2 sinks; CSKV at half the channels with 4-bit latents (registered).
using SkvqSmallRow = kvq::SkvqPolicy<Bits::k2, Bits::k2, 8, 16, 2>;
using Cskv = kvq::CskvPolicy<Bits::k4, Bits::k4, 50, 50, 32>;

/// The calibration data of the first half of TinyStories (1024 tokens, 2 windows from BOS).
const kvq::llm::CalibrationData& calibration_data() {
  static const kvq::llm::CalibrationData d = [] {
    const auto& [model, tok] = stories();
    std::vector<int> tokens = kvq::llm::leading_tokens(*tok, data_path(kText), 1024, kvq::llm::TextPart::kFirstHalf);
    tokens.resize(1024);
    kvq::ThreadPool pool(2);
    return kvq::llm::collect_calibration_data(model, tokens, tok->bos(), 256, &pool);
  }();
  return d;
}

/// Perplexity over 1024 tokens of the second half (2 windows of 512 from BOS).
template <class P>
double held_out_perplexity(const kvq::CacheCalibration* calibration) {
  const auto& [model, tok] = stories();
  const std::vector<int> text = kvq::llm::leading_tokens(*tok, data_path(kText), 1024, kvq::llm::TextPart::kSecondHalf);
  const kvq::llm::EvalPlan plan = kvq::llm::make_plan(text, 1024, 512, tok->bos(), true);
  kvq::ThreadPool pool(2);
  return kvq::llm::evaluate<P>(model, plan, 64, &pool, {}, calibration).perplexity();
}

}  // namespace

TEST_CASE("stories260K calibration data: statistics of what attention sees", "[realdata][calibration]") {
  const auto& [model, tok] = stories();
  const kvq::llm::CalibrationData& d = calibration_data();
  const kvq::llm::ModelConfig& c = model.config;
  REQUIRE(d.tokens == 1024 + 3);  // 3 windows of <= 511 text tokens, each from BOS
  REQUIRE(d.key_min.size() == static_cast<std::size_t>(c.num_layers));
  for (int l = 0; l < c.num_layers; ++l) {
    const auto u = static_cast<std::size_t>(l);
    REQUIRE(d.inputs[u].count() == d.tokens);
    REQUIRE(d.inputs[u].dim() == c.dim);
    for (int ch = 0; ch < c.kv_dim(); ++ch) {
      const auto v = static_cast<std::size_t>(ch);
      REQUIRE(d.key_min[u][v] <= d.key_max[u][v]);
      REQUIRE(d.value_min[u][v] <= d.value_max[u][v]);
    }
    const kvq::calib::AttentionSample& s = d.samples[u];
    REQUIRE(s.tokens == 256);
    REQUIRE(s.q.size() == static_cast<std::size_t>(256 * c.q_dim()));
    REQUIRE(s.k.size() == static_cast<std::size_t>(256 * c.kv_dim()));
    // The sample's keys are inside the running ranges (they are among the tokens seen).
    for (std::size_t i = 0; i < s.k.size(); ++i) {
      const std::size_t ch = i % static_cast<std::size_t>(c.kv_dim());
      REQUIRE(s.k[i] >= d.key_min[u][ch]);
      REQUIRE(s.k[i] <= d.key_max[u][ch]);
    }
  }
  // stories260K's keys have outlier channels: the widest key channel of a layer spans several
  // times the median one (what SKVQ's reordering groups together).
  for (int l = 0; l < c.num_layers; ++l) {
    std::vector<float> range;
    for (int ch = 0; ch < c.kv_dim(); ++ch) {
      range.push_back(d.key_max[static_cast<std::size_t>(l)][static_cast<std::size_t>(ch)] -
                      d.key_min[static_cast<std::size_t>(l)][static_cast<std::size_t>(ch)]);
    }
    std::sort(range.begin(), range.end());
    CAPTURE(l, range.front(), range[range.size() / 2], range.back());
    CHECK(range.back() > 2.0f * range[range.size() / 2]);
  }
}

TEST_CASE("stories260K SKVQ calibration: reorder and clip search, cache, file and held-out perplexity",
          "[realdata][calibration][skvq]") {
  const auto& [model, tok] = stories();
  const kvq::llm::ModelConfig& c = model.config;
  const kvq::llm::PolicyDescription policy = kvq::llm::describe<SkvqSmallRow>();
  REQUIRE(policy.method() == "skvq");
  kvq::ThreadPool pool(2);
  const double uncalibrated = held_out_perplexity<SkvqSmallRow>(nullptr);
  std::printf("stories260K, %s, held-out TinyStories PPL: uncalibrated %.4f\n", policy.name.c_str(), uncalibrated);
  for (const auto scope : {kvq::calib::ReorderScope::kNone, kvq::calib::ReorderScope::kCrossHead,
                           kvq::calib::ReorderScope::kWithinHead}) {
    kvq::llm::SkvqOptions options;
    options.reorder = scope;
    const kvq::llm::PolicyCalibration cal = kvq::llm::calibrate_skvq(calibration_data(), c, policy, options, &pool);
    INFO(cal.label);
    REQUIRE(cal.calibration.keys.size() == static_cast<std::size_t>(c.num_layers));
    for (const kvq::llm::LayerReport& r : cal.layers) {
      // The searched ratio is the grid minimum: never worse than no clipping.
      CHECK(r.key_error <= r.key_error_unclipped);
      CHECK(r.value_error <= r.value_error_unclipped);
      CHECK(r.key_clip >= 0.80f);
      CHECK(r.key_clip <= 1.0f);
      CHECK(r.key_groups == (scope == kvq::calib::ReorderScope::kWithinHead ? 4 : 4));
      if (scope == kvq::calib::ReorderScope::kNone) CHECK(r.key_cost == r.key_cost_identity);
    }
    // The file round-trips, and its calibration builds caches that score held-out text.
    const kvq::CalibrationFile file = kvq::llm::calibration_file(cal, c, policy, {{"text", kText}});
    const std::string path = (std::filesystem::temp_directory_path() / "kvq_test_skvq.kvqc").string();
    kvq::write_calibration_file(path, file);
    kvq::CalibrationInfo info;
    const kvq::CacheCalibration loaded = kvq::load_cache_calibration(path, &info);
    std::filesystem::remove(path);
    REQUIRE(info.policy == policy.name);
    REQUIRE(info.get("calibration") == cal.label);
    REQUIRE(loaded.keys.size() == cal.calibration.keys.size());
    for (std::size_t l = 0; l < loaded.keys.size(); ++l) {
      REQUIRE(loaded.keys[l].permutation == cal.calibration.keys[l].permutation);
      REQUIRE(loaded.values[l].boundaries == cal.calibration.values[l].boundaries);
      REQUIRE(loaded.keys[l].clip == cal.calibration.keys[l].clip);
    }
    const double ppl = held_out_perplexity<SkvqSmallRow>(&loaded);
    std::printf("  %-36s PPL %.4f\n", cal.label.c_str(), ppl);
    CHECK(std::isfinite(ppl));
    if (scope == kvq::calib::ReorderScope::kCrossHead) CHECK(ppl < uncalibrated);
  }
}

TEST_CASE("stories260K CSKV calibration: SVD, ASVD and refit factors, errors and held-out perplexity",
          "[realdata][calibration][cskv]") {
  const auto& [model, tok] = stories();
  const kvq::llm::PolicyDescription policy = kvq::llm::describe<Cskv>();
  REQUIRE(policy.method() == "cskv");
  kvq::ThreadPool pool(2);
  double ppl[3] = {};
  const kvq::calib::FactorMethod methods[3] = {kvq::calib::FactorMethod::kSvd, kvq::calib::FactorMethod::kAsvd,
                                               kvq::calib::FactorMethod::kRefit};
  for (int m = 0; m < 3; ++m) {
    kvq::llm::CskvOptions options;
    options.method = methods[m];
    const kvq::llm::PolicyCalibration cal = kvq::llm::calibrate_cskv(model, calibration_data(), policy, options, &pool);
    for (const kvq::llm::LayerReport& r : cal.layers) {
      for (const auto* f : {r.key_factor, r.value_factor}) {
        // The refit minimises the activation-weighted error; SVD the weight error.
        CHECK(f[2].activation_relative <= f[0].activation_relative * (1 + 1e-6) + 1e-9);
        CHECK(f[2].activation_relative <= f[1].activation_relative * (1 + 1e-6) + 1e-9);
        CHECK(f[0].weight_relative <= f[1].weight_relative * (1 + 1e-6) + 1e-9);
        CHECK(f[0].weight_relative <= f[2].weight_relative * (1 + 1e-6) + 1e-9);
      }
    }
    ppl[m] = held_out_perplexity<Cskv>(&cal.calibration);
    std::printf("stories260K, %s, %s: held-out TinyStories PPL %.4f\n", policy.name.c_str(), cal.label.c_str(), ppl[m]);
    CHECK(std::isfinite(ppl[m]));
  }
  // Plain SVD factors are what the cache gets without calibration data.
  CHECK(std::abs(ppl[0] - held_out_perplexity<Cskv>(nullptr)) < 1e-9);
  CHECK(ppl[2] <= ppl[0]);
}
