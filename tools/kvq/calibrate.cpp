// SPDX-License-Identifier: Apache-2.0
// kvq calibrate --model PATH --text PATH --method skvq|cskv [--policy NAME] [--tokens N]
//               [--part all|first|second] [--reorder none|cross-head|within-head[,...]]
//               [--clip search|ALPHA[,...]] [--clip-tokens N] [--factors svd|asvd|refit[,...]]
//               [--k-density D --v-density D] [--threads N] [--quiet] --out FILE
//
// Runs the model over calibration text once (fp32 cache), computes the per-layer data of an SKVQ
// policy (k-means channel reordering, clip ratios) or a CSKV policy (low-rank factors of W_k and
// W_v), prints a per-layer report and writes a calibration file (cache/calibration_io.hpp) that
// `kvq eval --calib FILE` uses. Lists (--policy a,b --reorder none,cross-head ...) sweep every
// combination over one data pass and write one file each into the --out directory.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "calibrator.hpp"
#include "commands.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/thread_pool.hpp"
#include "kvq/policy/registry.hpp"
#include "llm/load.hpp"
#include "llm/model_defaults.hpp"

namespace kvq_tool {
namespace {

struct CalibrateOptions {
  std::string model;
  std::string tokenizer;
  std::string text = kvq::llm::kDefaultTextPath;
  std::string part = "first";
  std::string method;
  std::vector<std::string> policies;  ///< --policy, comma-separated or repeated
  int tokens = 2048;
  std::vector<std::string> reorders{"cross-head"};
  std::vector<std::string> clips{"search"};
  int clip_tokens = 512;
  std::vector<std::string> factors{"refit"};
  double k_density = 0;
  double v_density = 0;
  int threads = 0;
  bool quiet = false;
  std::string out;
};

/// The registered policies of --method / --policy / --k-density / --v-density.
std::vector<std::string> choose_policies(const CalibrateOptions& o) {
  if (o.method != "skvq" && o.method != "cskv") {
    kvq::detail::throw_argument_error("kvq calibrate", "--method", o.method, "'skvq' or 'cskv'");
  }
  std::vector<std::string> candidates;
  for (const std::string& name : kvq::policy_names()) {
    if (kvq::llm::describe_policy(name).method() == o.method) candidates.push_back(name);
  }
  std::string all;
  for (const std::string& n : candidates) all += (all.empty() ? "" : ", ") + n;
  if (!o.policies.empty()) {
    for (const std::string& p : o.policies) {
      if (std::find(candidates.begin(), candidates.end(), p) == candidates.end()) {
        kvq::detail::throw_argument_error("kvq calibrate", "--policy", p, "a " + o.method + " policy: " + all);
      }
    }
    return o.policies;
  }
  if (o.method == "skvq") return {"skvq-k2v2-g32-w128-s5"};
  if (o.k_density == 0 && o.v_density == 0) return {"cskv-k4v4-r25-75-w32"};
  const int kp = static_cast<int>(std::lround(100 * o.k_density)), vp = static_cast<int>(std::lround(100 * o.v_density));
  const std::string want = fmt::format("cskv-k4v4-r{}-{}-w32", kp, vp);
  if (std::find(candidates.begin(), candidates.end(), want) == candidates.end()) {
    kvq::detail::throw_argument_error("kvq calibrate", "--k-density", fmt::format("{} with --v-density {}", o.k_density, o.v_density),
                                      "the densities of a registered CSKV policy (" + all + "), or --policy");
  }
  return {want};
}

kvq::llm::SkvqOptions skvq_options(const std::string& reorder, const std::string& clip) {
  kvq::llm::SkvqOptions s;
  s.reorder = kvq::calib::parse_reorder_scope(reorder, "--reorder");
  if (clip == "search") {
    s.clip_mode = kvq::llm::ClipMode::kSearch;
  } else {
    char* end = nullptr;
    const double a = std::strtod(clip.c_str(), &end);
    if (end == clip.c_str() || *end != '\0' || !(a > 0.0 && a <= 1.0)) {
      kvq::detail::throw_argument_error("kvq calibrate", "--clip", clip, "'search' or a clip ratio in (0, 1]");
    }
    s.clip_mode = kvq::llm::ClipMode::kFixed;
    s.clip = static_cast<float>(a);
  }
  return s;
}

/// One calibration of a sweep: a policy with one choice of each option, and its file name in
/// the output directory.
struct Variant {
  std::string policy;
  kvq::llm::SkvqOptions skvq;
  kvq::llm::CskvOptions cskv;
  std::string file_name;
};

/// Every combination of --policy × --reorder × --clip (SKVQ) or --policy × --factors (CSKV),
/// all options checked before any work.
std::vector<Variant> variants_of(const CalibrateOptions& o) {
  std::vector<Variant> out;
  for (const std::string& policy : choose_policies(o)) {
    if (o.method == "skvq") {
      for (const std::string& reorder : o.reorders) {
        for (const std::string& clip : o.clips) {
          Variant v;
          v.policy = policy;
          v.skvq = skvq_options(reorder, clip);
          v.file_name = policy + "." + reorder + ".clip-" + clip + ".kvqc";
          out.push_back(v);
        }
      }
    } else {
      for (const std::string& f : o.factors) {
        Variant v;
        v.policy = policy;
        v.cskv.method = kvq::calib::parse_factor_method(f, "--factors");
        v.file_name = policy + "." + f + ".kvqc";
        out.push_back(v);
      }
    }
  }
  return out;
}

void print_report(const CalibrationRun& run, const std::string& method) {
  if (method == "skvq") {
    fmt::print("{:>5} {:>7} {:>12} {:>7} {:>12} {:>7} {:>7} {:>11} {:>11} {:>11} {:>11}\n", "layer", "K grps", "K range x",
               "V grps", "V range x", "K clip", "V clip", "K err a=1", "K err", "V err a=1", "V err");
    for (std::size_t l = 0; l < run.layers.size(); ++l) {
      const auto& r = run.layers[l];
      fmt::print("{:>5} {:>7} {:>12.3f} {:>7} {:>12.3f} {:>7.2f} {:>7.2f} {:>11.3e} {:>11.3e} {:>11.3e} {:>11.3e}\n", l,
                 r.key_groups, r.key_cost / r.key_cost_identity, r.value_groups, r.value_cost / r.value_cost_identity,
                 r.key_clip, r.value_clip, r.key_error_unclipped, r.key_error, r.value_error_unclipped, r.value_error);
    }
    fmt::print("(range x: total group range of the reorder / of identity order with equal groups; err: relative "
               "attention-output error on the sample, keys or values quantized alone)\n");
  } else {
    fmt::print("{:>5} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}   (activation-weighted relative error |XW - XWAB| / |XW|)\n",
               "layer", "K svd", "K asvd", "K refit", "V svd", "V asvd", "V refit");
    for (std::size_t l = 0; l < run.layers.size(); ++l) {
      const auto& r = run.layers[l];
      fmt::print("{:>5} {:>10.4f} {:>10.4f} {:>10.4f} {:>10.4f} {:>10.4f} {:>10.4f}\n", l, r.key_factor[0].activation_relative,
                 r.key_factor[1].activation_relative, r.key_factor[2].activation_relative,
                 r.value_factor[0].activation_relative, r.value_factor[1].activation_relative,
                 r.value_factor[2].activation_relative);
    }
  }
}

int run_calibrate(CalibrateOptions o) {
  if (o.model.empty()) o.model = kvq::llm::default_model_path();
  if (o.out.empty()) kvq::detail::throw_argument_error("kvq calibrate", "--out", "''", "the calibration file to write");
  if (o.threads < 0) kvq::detail::throw_argument_error("kvq calibrate", "--threads", o.threads, "0 (all cores) or more");
  const std::vector<Variant> variants = variants_of(o);
  const bool sweep = variants.size() > 1;
  CalibrationSettings settings;
  settings.sample_tokens = o.clip_tokens;
  CalibrationText text;
  text.path = o.text;
  text.part = kvq::llm::parse_text_part(o.part, "--part");
  text.tokens = o.tokens;
  const int threads = o.threads > 0 ? o.threads : std::max(1u, std::thread::hardware_concurrency());

  const kvq::llm::LoadedModel loaded = kvq::llm::load_model(o.model, o.tokenizer);
  kvq::ThreadPool pool(threads);
  Calibrator calibrator(loaded, o.model, text, settings, &pool, !o.quiet);
  const kvq::llm::ModelConfig& c = loaded.model.config;
  if (sweep) {
    std::error_code ec;
    std::filesystem::create_directories(o.out, ec);
    if (ec || !std::filesystem::is_directory(o.out)) {
      kvq::detail::throw_argument_error("kvq calibrate", "--out", o.out,
                                        "a directory for the " + std::to_string(variants.size()) + " calibration files of the sweep");
    }
  }
  std::vector<std::string> written;
  for (const Variant& v : variants) {
    calibrator.set_method_options(v.skvq, v.cskv);
    const CalibrationRun run = calibrator.compute(v.policy);
    const std::string path = sweep ? (std::filesystem::path(o.out) / v.file_name).string() : o.out;
    kvq::write_calibration_file(path, calibrator.file_of(run));
    fmt::print("policy  {} ({})\nmodel   {} ({}: {} layers, {} kv heads, head_dim {})\ntext    {}\n\n", v.policy, run.label,
               loaded.model.name, o.model, c.num_layers, c.num_kv_heads, c.head_dim, calibrator.text_label());
    print_report(run, run.info.method);
    fmt::print("\nwrote {}\n\n", path);
    written.push_back(path);
  }
  if (sweep) {
    fmt::print("{} calibration files (one data pass):\n", written.size());
    for (const std::string& w : written) fmt::print("  {}\n", w);
  }
  return 0;
}

}  // namespace

Command add_calibrate(CLI::App& app) {
  auto o = std::make_shared<CalibrateOptions>();
  CLI::App* sub = app.add_subcommand(
      "calibrate", "Calibrate an SKVQ policy (channel reordering, clip ratios) or a CSKV policy (low-rank factors) "
                   "on a real model and text; writes a calibration file for kvq eval --calib");
  sub->add_option("--model", o->model, "GGUF or llama2.c checkpoint (default: " + kvq::llm::default_model_path() + ")");
  sub->add_option("--tokenizer", o->tokenizer, "tokenizer.bin of a llama2.c model (default: found beside it)");
  sub->add_option("--text", o->text, fmt::format("calibration text (default {})", kvq::llm::kDefaultTextPath));
  sub->add_option("--part", o->part, "all, first or second half of the text (default first; kvq eval scores the second)");
  sub->add_option("--method", o->method, "skvq or cskv")->required();
  sub->add_option("--policy", o->policies,
                  "registered policies to calibrate, comma-separated (default: skvq-k2v2-g32-w128-s5, cskv-k4v4-r25-75-w32)")
      ->delimiter(',');
  sub->add_option("--tokens", o->tokens, "calibration tokens (default 2048)");
  sub->add_option("--reorder", o->reorders, "SKVQ: none, cross-head (default, as published) or within-head; a list sweeps")
      ->delimiter(',');
  sub->add_option("--clip", o->clips,
                  "SKVQ: 'search' (default: alpha per layer minimising the attention error) or a ratio; a list sweeps")
      ->delimiter(',');
  sub->add_option("--clip-tokens", o->clip_tokens, "SKVQ: tokens of the clip-search sample (default 512)");
  sub->add_option("--factors", o->factors, "CSKV: svd, asvd or refit (default: the activation-aware refit); a list sweeps")
      ->delimiter(',');
  sub->add_option("--k-density", o->k_density, "CSKV: share of the key channels kept (with --v-density; picks the policy)");
  sub->add_option("--v-density", o->v_density, "CSKV: share of the value channels kept");
  sub->add_option("--threads", o->threads, "threads (default 0: all cores)");
  sub->add_flag("--quiet", o->quiet, "no progress on stderr");
  sub->add_option("--out", o->out,
                  "the calibration file to write; with several policies or options, a directory that gets one file each")
      ->required();
  return [o] { return run_calibrate(*o); };
}

}  // namespace kvq_tool
