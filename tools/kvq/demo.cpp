// SPDX-License-Identifier: Apache-2.0
// kvq demo: the round-trip table on a generated K-like tensor with outlier channels.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "commands.hpp"
#include "kvq/core/random.hpp"
#include "kvq/io/npy.hpp"
#include "kvq/quant/matrix.hpp"
#include "roundtrip_stats.hpp"

namespace kvq_tool {
namespace {

struct DemoOptions {
  kvq::index_t tokens = 4096;
  kvq::index_t channels = 128;
  int outliers = 4;
  std::uint64_t seed = 1;
  std::string save;
};

// Keys of real models have a few channels with large, persistent offsets (KIVI §3.2, Fig. 2):
// K[t, c] = mu_c + sigma_c * z, mu_c ~ N(0, 0.5^2), sigma_c ~ U(0.5, 1.5), and `outliers`
// evenly spread channels with |mu_c| in [8, 15] and sigma_c = 2.
std::vector<float> k_like(const DemoOptions& o) {
  kvq::Rng rng(o.seed);
  const auto channels = static_cast<std::size_t>(o.channels);
  std::vector<float> mu(channels), sigma(channels);
  for (std::size_t c = 0; c < channels; ++c) {
    mu[c] = 0.5f * rng.normal();
    sigma[c] = rng.uniform(0.5f, 1.5f);
  }
  for (int k = 0; k < o.outliers; ++k) {
    const std::size_t c = (static_cast<std::size_t>(k) * 2 + 1) * channels / (2 * static_cast<std::size_t>(o.outliers));
    mu[c] = (rng.below(2) == 0 ? -1.0f : 1.0f) * rng.uniform(8.0f, 15.0f);
    sigma[c] = 2.0f;
  }
  std::vector<float> k(static_cast<std::size_t>(o.tokens) * channels);
  for (std::size_t t = 0; t < static_cast<std::size_t>(o.tokens); ++t) {
    for (std::size_t c = 0; c < channels; ++c) k[t * channels + c] = mu[c] + sigma[c] * rng.normal();
  }
  return k;
}

int run_demo(const DemoOptions& o) {
  if (o.tokens < 128 || o.tokens % 128 != 0) {
    kvq::detail::throw_argument_error("kvq demo", "--tokens", o.tokens, "a positive multiple of 128");
  }
  if (o.channels < 128 || o.channels % 128 != 0) {
    kvq::detail::throw_argument_error("kvq demo", "--channels", o.channels, "a positive multiple of 128");
  }
  if (o.outliers < 0 || o.outliers > o.channels) {
    kvq::detail::throw_argument_error("kvq demo", "--outliers", o.outliers,
                                      fmt::format("0 .. {} outlier channels", o.channels));
  }
  const std::vector<float> k = k_like(o);
  if (!o.save.empty()) kvq::write_npy(o.save, k.data(), {o.tokens, o.channels});

  fmt::print("kvq demo: K-like tensor [{} tokens, {} channels], {} outlier channels, seed {}{}\n\n",
             o.tokens, o.channels, o.outliers, o.seed, o.save.empty() ? "" : ", saved to " + o.save);
  fmt::print("{:>4}  {:<26}  {:>5}  {:>4}  {:>4}  {:>10}  {:>10}  {:>9}  {:>9}\n", "bits",
             "groups along (quantized)", "group", "clip", "meta", "max |err|", "mean |err|",
             "rel. err", "bits/elem");
  struct Row {
    kvq::Bits bits;
    kvq::GroupAxis axis;
    kvq::index_t group;
    float clip;
    kvq::MetaFormat meta;
  };
  std::vector<Row> rows;
  for (kvq::Bits b : {kvq::Bits::k8, kvq::Bits::k4, kvq::Bits::k3, kvq::Bits::k2, kvq::Bits::kTernary}) {
    for (kvq::GroupAxis a : {kvq::GroupAxis::kTokens, kvq::GroupAxis::kChannels}) {
      for (kvq::index_t g : {32, 128}) rows.push_back({b, a, g, 1.0f, kvq::MetaFormat::kFp16});
    }
  }
  // SKVQ's configuration: per-token groups of 128, clip 0.92, FP8 metadata.
  rows.push_back({kvq::Bits::k2, kvq::GroupAxis::kChannels, 128, 0.92f, kvq::MetaFormat::kFp8E4M3});
  rows.push_back({kvq::Bits::kTernary, kvq::GroupAxis::kChannels, 128, 0.92f, kvq::MetaFormat::kFp8E4M3});
  for (const Row& row : rows) {
    kvq::MatrixQuantSpec spec;
    spec.bits = row.bits;
    spec.axis = row.axis;
    spec.group_size = row.group;
    spec.clip = row.clip;
    spec.meta = row.meta;
    const RoundTrip r = round_trip(k, o.tokens, o.channels, spec);
    const std::string along = row.axis == kvq::GroupAxis::kTokens ? "tokens (per-channel)" : "channels (per-token)";
    fmt::print("{:>4}  {:<26}  {:>5}  {:>4}  {:>4}  {:>10.4g}  {:>10.4g}  {:>9.4g}  {:>9.4f}\n",
               kvq::bits_label(row.bits), along, row.group, row.clip, kvq::meta_label(row.meta),
               r.max_abs_error, r.mean_abs_error, r.relative_frobenius, r.layout.bits_per_element());
  }
  fmt::print("\nrel. err = ||K - K'||_F / ||K||_F; bits/elem counts codes, scales and zero-points as stored.\n");
  return 0;
}

}  // namespace

Command add_demo(CLI::App& app) {
  auto o = std::make_shared<DemoOptions>();
  CLI::App* sub = app.add_subcommand(
      "demo", "Round-trip table for a generated K-like tensor with outlier channels");
  sub->add_option("--tokens", o->tokens, "tokens (multiple of 128); default 4096");
  sub->add_option("--channels", o->channels, "channels (multiple of 128); default 128");
  sub->add_option("--outliers", o->outliers, "outlier channels; default 4");
  sub->add_option("--seed", o->seed, "random seed; default 1");
  sub->add_option("--save", o->save, "also write the tensor to this .npy file");
  return [o] { return run_demo(*o); };
}

}  // namespace kvq_tool
