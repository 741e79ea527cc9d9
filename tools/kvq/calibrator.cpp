// SPDX-License-Identifier: Apache-2.0
#include "calibrator.hpp"

#include <fmt/core.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <filesystem>

#include "kvq/core/error.hpp"
#include "progress.hpp"

namespace kvq_tool {

namespace {

std::uint64_t fnv1a(const std::string& s) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (const char c : s) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  return h;
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

}  // namespace

std::string default_calibration_dir() {
  if (const char* c = std::getenv("KVQ_MODEL_CACHE"); c != nullptr && *c != '\0') return std::string(c) + "/calib";
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x != nullptr && *x != '\0') return std::string(x) + "/kvq/calib";
  if (const char* h = std::getenv("HOME"); h != nullptr && *h != '\0') return std::string(h) + "/.cache/kvq/calib";
  return ".cache/kvq/calib";
}

Calibrator::Calibrator(const kvq::llm::LoadedModel& model, std::string model_path, CalibrationText text,
                       CalibrationSettings settings, kvq::ThreadPool* pool, bool progress)
    : model_(model),
      model_path_(std::move(model_path)),
      text_(std::move(text)),
      settings_(std::move(settings)),
      pool_(pool),
      progress_(progress) {
  if (text_.tokens < 2) kvq::detail::throw_argument_error("kvq calibrate", "--tokens", text_.tokens, "at least 2 tokens");
  if (settings_.sample_tokens < 2) {
    kvq::detail::throw_argument_error("kvq calibrate", "--clip-tokens", settings_.sample_tokens, "at least 2 tokens");
  }
}

void Calibrator::set_method_options(const kvq::llm::SkvqOptions& skvq, const kvq::llm::CskvOptions& cskv) {
  settings_.skvq = skvq;
  settings_.cskv = cskv;
}

std::string Calibrator::text_label() const {
  return fmt::format("{} of {}, {} tokens", kvq::llm::text_part_label(text_.part), text_.path, text_.tokens);
}

const kvq::llm::CalibrationData& Calibrator::data() {
  if (!data_) {
    const kvq::llm::Tokenizer& tok = *model_.tokenizer;
    std::vector<int> tokens = kvq::llm::leading_tokens(tok, text_.path, text_.tokens, text_.part);
    if (static_cast<int>(tokens.size()) < text_.tokens) {
      kvq::detail::throw_argument_error(
          "kvq calibrate", "--tokens", text_.tokens,
          fmt::format("at most the {} tokens of the {} of {}", tokens.size(), kvq::llm::text_part_label(text_.part), text_.path));
    }
    tokens.resize(static_cast<std::size_t>(text_.tokens));
    const int bos = tok.add_bos() ? tok.bos() : -1;
    ProgressBar bar("calibration data", progress_);
    data_ = kvq::llm::collect_calibration_data(model_.model, tokens, bos, settings_.sample_tokens, pool_,
                                               [&](int done, int total) { bar.update(done, total); });
    fed_tokens_ = data_->tokens;
  }
  return *data_;
}

std::string Calibrator::cache_key(const std::string& policy) const {
  if (model_sha256_.empty()) model_sha256_ = kvq::llm::file_sha256(model_path_);
  if (text_sha256_.empty()) text_sha256_ = kvq::llm::file_sha256(text_.path);
  const kvq::llm::PolicyDescription d = kvq::llm::describe_policy(policy);
  const std::string options = d.method() == "skvq" ? settings_.skvq.label() : settings_.cskv.label();
  return fmt::format("{}|{}|{}|{}|{}|{}|kmeans seed {} restarts {}|sample {}|clip grid {}:{}:{} queries {}|kvq {}", policy,
                     model_sha256_, text_sha256_, kvq::llm::text_part_label(text_.part), text_.tokens, options,
                     settings_.skvq.kmeans.seed, settings_.skvq.kmeans.restarts, settings_.sample_tokens,
                     settings_.skvq.search.lo, settings_.skvq.search.step, settings_.skvq.search.hi,
                     settings_.skvq.search.queries, kvq::detail::kvq_version_string());
}

std::vector<std::pair<std::string, std::string>> Calibrator::provenance(const std::string& policy) const {
  const kvq::llm::Model& m = model_.model;
  return {{"model", model_path_},
          {"model_name", m.name},
          {"model_sha256", model_sha256_.empty() ? kvq::llm::file_sha256(model_path_) : model_sha256_},
          {"text", text_.path},
          {"text_sha256", text_sha256_.empty() ? kvq::llm::file_sha256(text_.path) : text_sha256_},
          {"text_part", kvq::llm::text_part_label(text_.part)},
          {"text_tokens", std::to_string(text_.tokens)},
          {"fed_tokens", std::to_string(fed_tokens_)},
          {"clip_sample_tokens", std::to_string(settings_.sample_tokens)},
          {"created", utc_now()},
          {"cache_key", cache_key(policy)}};
}

CalibrationRun Calibrator::compute(const std::string& policy) {
  const kvq::llm::PolicyDescription d = kvq::llm::describe_policy(policy);
  const std::string method = d.method();
  if (method.empty()) {
    kvq::detail::throw_argument_error("kvq calibrate", "--policy", policy,
                                      "an SKVQ or CSKV policy (the others need no calibration)");
  }
  const kvq::llm::CalibrationData& cd = data();
  const auto t0 = std::chrono::steady_clock::now();
  kvq::llm::PolicyCalibration c = method == "skvq"
                                      ? kvq::llm::calibrate_skvq(cd, model_.model.config, d, settings_.skvq, pool_)
                                      : kvq::llm::calibrate_cskv(model_.model, cd, d, settings_.cskv, pool_);
  if (progress_) {
    fmt::print(stderr, "calibrated {} ({}) in {:.1f} s\n", policy, c.label,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  CalibrationRun run;
  run.policy = policy;
  run.label = c.label;
  run.factors = c.factors;
  run.layers = c.layers;
  run.calibration = std::move(c.calibration);
  run.info.policy = policy;
  run.info.method = method;
  run.info.num_layers = model_.model.config.num_layers;
  run.info.num_kv_heads = model_.model.config.num_kv_heads;
  run.info.head_dim = model_.model.config.head_dim;
  run.info.provenance = provenance(policy);
  run.info.provenance.emplace_back("calibration", run.label);
  return run;
}

kvq::CalibrationFile Calibrator::file_of(const CalibrationRun& run) const {
  kvq::llm::PolicyCalibration c;
  c.calibration = run.calibration;
  c.layers = run.layers;
  c.label = run.label;
  c.factors = run.factors;
  std::vector<std::pair<std::string, std::string>> prov = run.info.provenance;
  prov.erase(std::remove_if(prov.begin(), prov.end(), [](const auto& kv) { return kv.first == "calibration"; }), prov.end());
  return kvq::llm::calibration_file(c, model_.model.config, kvq::llm::describe_policy(run.policy), std::move(prov));
}

CalibrationRun Calibrator::get(const std::string& policy, const std::string& cache_dir) {
  const std::string key = cache_key(policy);
  if (cache_dir.empty()) return compute(policy);
  const std::string path = fmt::format("{}/{}.{:016x}.kvqc", cache_dir, policy, fnv1a(key));
  if (std::filesystem::exists(path)) {
    try {
      CalibrationRun run;
      run.calibration = kvq::load_cache_calibration(path, &run.info);
      if (run.info.get("cache_key") == key && run.info.policy == policy) {
        run.policy = policy;
        run.file = path;
        run.cached = true;
        run.label = run.info.get("calibration");
        return run;
      }
    } catch (const kvq::Error& e) {
      fmt::print(stderr, "kvq: the cached calibration {} is unusable ({}); computing it again\n", path, e.what());
    }
  }
  CalibrationRun run = compute(policy);
  std::error_code ec;
  std::filesystem::create_directories(cache_dir, ec);
  if (ec) {
    throw kvq::Error(kvq::Status::kIoError, fmt::format("kvq: cannot create the calibration cache {}: {}", cache_dir, ec.message()));
  }
  kvq::write_calibration_file(path, file_of(run));
  run.file = path;
  return run;
}

}  // namespace kvq_tool
