// SPDX-License-Identifier: Apache-2.0
// kvq eval [--model PATH] [--tokenizer PATH] [--text PATH] [--part auto|all|first|second]
//          [--tokens N] [--window N] [--policies LIST|all|none] [--calib FILE]... [--no-calibrate]
//          [--calib-text PATH] [--calib-part P] [--calib-tokens N] [--calib-dir DIR]
//          [--json PATH] [--per-token PATH] [--chunk N] [--threads N] [--quiet]
//
// Perplexity of a real model with each cache policy, with decode semantics (DESIGN.md §7):
// every scored token is predicted by a decode step whose attention sees exactly what the
// policy's cache holds at that point (sinks, quantized history, window). Chunks of tokens share
// their matrix products but append and attend one token at a time, which gives bit for bit the
// logits of one-token steps (tools/llm/session.hpp; tests/llm and tests/realdata check it).
//
// Policies that need calibration data (SKVQ, CSKV) are calibrated on the first half of the
// calibration text (default: the same Dasher text, whose second half is then scored) unless
// --no-calibrate; the calibration files are cached in --calib-dir. --calib FILE adds a row for the
// policy and calibration of a file written by kvq calibrate.
//
// Columns: calib = what the row's cache was calibrated with; bits/elem = cache bytes * 8 /
// stored K/V elements and bytes/token = cache bytes / tokens (all layers, keys and values), both
// measured on the cache at the end of the longest window; PPL = exp(mean -log p) over scored
// tokens; dPPL against the reference policy (fp32 when evaluated, else fp16, else the first);
// tok/s = tokens fed / seconds of forward passes, per row (rows run in parallel, one thread each
// when there are more rows than threads).
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <fmt/os.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <filesystem>
#include <mutex>
#include <chrono>
#include <cmath>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "calibrator.hpp"
#include "commands.hpp"
#include "kvq/cache/calibration_io.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/thread_pool.hpp"
#include "kvq/io/calibration_file.hpp"
#include "kvq/policy/registry.hpp"
#include "llm/evaluate.hpp"
#include "llm/load.hpp"
#include "llm/text.hpp"
#include "llm/model_defaults.hpp"
#include "progress.hpp"

namespace kvq_tool {
namespace {

struct EvalOptions {
  std::string model;
  std::string tokenizer;
  std::string text = kvq::llm::kDefaultTextPath;
  std::string part = "auto";
  int tokens = 2048;
  int window = 0;
  std::string policies;
  std::vector<std::string> calib;
  bool no_calibrate = false;
  std::string calib_text = kvq::llm::kDefaultTextPath;
  std::string calib_part = "first";
  int calib_tokens = 2048;
  std::string calib_dir;
  std::string json;
  std::string per_token;
  int chunk = 64;
  int threads = 0;
  bool quiet = false;
};

std::vector<std::string> split_policies(const std::string& list) {
  if (list.empty()) return kvq::main_policy_names();
  if (list == "all") return kvq::policy_names();
  if (list == "none") return {};
  const std::vector<std::string> known = kvq::policy_names();
  std::vector<std::string> names;
  std::stringstream in(list);
  std::string name;
  while (std::getline(in, name, ',')) {
    if (name.empty()) {
      kvq::detail::throw_argument_error("kvq eval", "--policies", list, "a comma-separated list of policy names");
    }
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      std::string all;
      for (const std::string& k : known) all += (all.empty() ? "" : ", ") + k;
      kvq::detail::throw_argument_error("kvq eval", "--policies", name, "'all', 'none' or names among " + all);
    }
    names.push_back(name);
  }
  return names;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (c < 0x20) {
      out += fmt::format("\\u{:04x}", c);
    } else {
      out += ch;
    }
  }
  return out + "\"";
}

/// A finite number, or null (JSON has no NaN).
std::string json_number(double x) { return std::isfinite(x) ? fmt::format("{:.10g}", x) : "null"; }

/// One row of the table: a policy and what its cache is calibrated with.
struct Row {
  std::string policy;
  std::string calib = "-";   ///< what the row's cache got: "-", or the calibration's label
  std::string calib_file;    ///< the calibration file (empty: none)
  std::string calib_text;    ///< what it was computed on
  bool has_calibration = false;
  kvq::CacheCalibration calibration;
  kvq::llm::PolicyResult result;
};

/// "0.163 mean, 0.288 max" of a per-layer report array of a calibration file, or "" when the
/// file has no such array (files written by other tools need no report).
std::string layer_summary(const kvq::CalibrationFile& file, const std::string& name) {
  const kvq::CalibrationArray* a = file.find_array("report." + name);
  if (a == nullptr || a->f32.empty()) return "";
  double sum = 0, max = 0;
  for (float x : a->f32) {
    sum += x;
    max = std::max(max, static_cast<double>(x));
  }
  return fmt::format("{:.3f} mean, {:.3f} max", sum / static_cast<double>(a->f32.size()), max);
}

/// What each calibrated row's file reports about its layers: how much of the attention output
/// the quantized keys or values alone change (SKVQ), or how much of the projection output the
/// factors' rank loses before any quantization (CSKV). The reason a calibrated row is far from
/// the reference, or not.
std::vector<std::string> calibration_error_lines(const std::vector<Row>& rows) {
  std::vector<std::string> lines, seen;
  for (const Row& row : rows) {
    if (row.calib_file.empty() || std::find(seen.begin(), seen.end(), row.calib_file) != seen.end()) continue;
    seen.push_back(row.calib_file);
    const kvq::CalibrationFile file = kvq::read_calibration_file(row.calib_file);
    const std::string* method = file.find_metadata("method");
    std::string text;
    if (method != nullptr && *method == "skvq") {
      const std::string k = layer_summary(file, "key_attention_error"), v = layer_summary(file, "value_attention_error");
      if (!k.empty() && !v.empty()) text = "attention-output error, keys alone " + k + "; values alone " + v;
    } else if (method != nullptr && *method == "cskv") {
      const std::string k = layer_summary(file, "key_activation_error");
      const std::string v = layer_summary(file, "value_activation_error");
      if (!k.empty() && !v.empty()) text = "|XW - XWAB| / |XW| lost by the rank, keys " + k + "; values " + v;
    }
    if (!text.empty()) lines.push_back(fmt::format("  {:<26} {:<32} {}", row.policy, row.calib, text));
  }
  return lines;
}

const Row& reference_of(const std::vector<Row>& rows) {
  for (const char* name : {"fp32", "fp16"}) {
    for (const auto& r : rows) {
      if (r.policy == name && !r.has_calibration) return r;
    }
  }
  return rows.front();
}

bool same_file(const std::string& a, const std::string& b) {
  std::error_code ea, eb;
  const auto ca = std::filesystem::weakly_canonical(a, ea), cb = std::filesystem::weakly_canonical(b, eb);
  return !ea && !eb ? ca == cb : a == b;
}

/// Tokens done over all rows, for one progress bar shared by the threads that run them.
class SharedProgress {
 public:
  SharedProgress(int rows, int per_row, bool enabled) : bar_("eval", enabled), total_(rows * per_row) {}
  void add(int tokens) {
    std::lock_guard<std::mutex> lock(mutex_);
    done_ += tokens;
    bar_.update(done_, total_);
  }

 private:
  std::mutex mutex_;
  ProgressBar bar_;
  int total_;
  int done_ = 0;
};

/// Evaluates every row: rows run in parallel on up to `threads` threads (a row per thread; a
/// row gets a pool of several threads only when there are fewer rows than threads).
void evaluate_rows(std::vector<Row>& rows, const kvq::llm::Model& model, const kvq::llm::EvalPlan& plan, int chunk,
                   int threads, bool progress) {
  if (rows.empty()) return;
  const int workers = std::max(1, std::min<int>(threads, static_cast<int>(rows.size())));
  const int per_worker = std::max(1, threads / workers);
  SharedProgress shared(static_cast<int>(rows.size()), plan.fed_tokens(), progress);
  std::atomic<std::size_t> next{0};
  std::mutex failure_mutex;
  std::exception_ptr failure;
  auto work = [&] {
    std::unique_ptr<kvq::ThreadPool> pool = per_worker > 1 ? std::make_unique<kvq::ThreadPool>(per_worker) : nullptr;
    for (std::size_t i = next++; i < rows.size(); i = next++) {
      Row& row = rows[i];
      try {
        const kvq::CacheCalibration* cal = row.has_calibration ? &row.calibration : nullptr;
        const kvq::llm::SessionFactory make = [&](int max_tokens) {
          return kvq::llm::make_session(row.policy, model, max_tokens, pool.get(), cal);
        };
        int reported = 0;
        row.result = kvq::llm::evaluate(make, row.policy, model, plan, chunk, [&](int done, int) {
          shared.add(done - reported);
          reported = done;
        });
      } catch (...) {
        std::lock_guard<std::mutex> lock(failure_mutex);
        if (!failure) failure = std::current_exception();
        next = rows.size();
      }
    }
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  if (failure) std::rethrow_exception(failure);
}

int run_eval(EvalOptions o) {
  if (o.model.empty()) o.model = kvq::llm::default_model_path();
  if (o.calib_dir.empty()) o.calib_dir = default_calibration_dir();
  const std::vector<std::string> policies = split_policies(o.policies);
  if (policies.empty() && o.calib.empty()) {
    kvq::detail::throw_argument_error("kvq eval", "--policies", o.policies, "at least one policy or a --calib file");
  }
  if (o.threads < 0) kvq::detail::throw_argument_error("kvq eval", "--threads", o.threads, "0 (all cores) or more");
  const int threads = o.threads > 0 ? o.threads : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  if (o.tokens < 2) kvq::detail::throw_argument_error("kvq eval", "--tokens", o.tokens, "at least 2 tokens");
  if (o.chunk < 1) kvq::detail::throw_argument_error("kvq eval", "--chunk", o.chunk, "a positive token count");
  // The scored text: the second half of the calibration text when the two are one file.
  const kvq::llm::TextPart part = o.part == "auto" ? (same_file(o.text, o.calib_text) ? kvq::llm::TextPart::kSecondHalf
                                                                                       : kvq::llm::TextPart::kAll)
                                                   : kvq::llm::parse_text_part(o.part, "--part");
  CalibrationText calib_text;
  calib_text.path = o.calib_text;
  calib_text.part = kvq::llm::parse_text_part(o.calib_part, "--calib-part");
  calib_text.tokens = o.calib_tokens;
  if (same_file(o.text, o.calib_text) &&
      (part == calib_text.part || part == kvq::llm::TextPart::kAll || calib_text.part == kvq::llm::TextPart::kAll)) {
    fmt::print(stderr, "kvq eval: warning: the scored text ({} of {}) overlaps the calibration text ({})\n",
               kvq::llm::text_part_label(part), o.text, kvq::llm::text_part_label(calib_text.part));
  }

  const auto load0 = std::chrono::steady_clock::now();
  const kvq::llm::LoadedModel loaded = kvq::llm::load_model(o.model, o.tokenizer);
  const kvq::llm::Model& model = loaded.model;
  const kvq::llm::Tokenizer& tok = *loaded.tokenizer;
  std::vector<int> text_tokens = kvq::llm::leading_tokens(tok, o.text, o.tokens, part);
  const double load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - load0).count();
  const bool bos = tok.add_bos() && tok.bos() >= 0;
  if (o.window == 0) o.window = std::min(model.config.max_context, o.tokens + (bos ? 1 : 0));
  if (o.window > model.config.max_context) {
    kvq::detail::throw_argument_error("kvq eval", "--window", o.window,
                                      fmt::format("at most the model's context of {} tokens", model.config.max_context));
  }
  const kvq::llm::EvalPlan plan = kvq::llm::make_plan(text_tokens, o.tokens, o.window, tok.bos(), bos);

  // The rows: registered policies (calibrated automatically where they need it), then files.
  const kvq::llm::ModelConfig& c = model.config;
  kvq::CacheConfig shape;
  shape.num_layers = c.num_layers;
  shape.num_kv_heads = c.num_kv_heads;
  shape.head_dim = c.head_dim;
  std::vector<Row> rows;
  for (const std::string& name : policies) {
    Row row;
    row.policy = name;
    const std::string method = kvq::llm::describe_policy(name).method();
    if (o.no_calibrate && method == "skvq") row.calib = "none (equal groups)";
    if (o.no_calibrate && method == "cskv") row.calib = "svd of W (no data)";
    if (!o.no_calibrate && !method.empty()) row.calib = "auto";
    rows.push_back(std::move(row));
  }
  for (const std::string& path : o.calib) {
    Row row;
    kvq::CalibrationInfo info;
    row.calibration = kvq::load_cache_calibration(path, &info);
    kvq::check_calibration_fits(info, path, info.policy, shape);
    row.policy = info.policy;
    row.has_calibration = true;
    row.calib = info.get("calibration", info.method);
    row.calib_file = path;
    row.calib_text = fmt::format("{} of {}, {} tokens", info.get("text_part", "?"), info.get("text", "?"),
                                 info.get("text_tokens", "?"));
    rows.push_back(std::move(row));
  }

  fmt::print("model   {} ({}: {} layers, {} query / {} kv heads, head_dim {}, vocab {})\n", model.name, o.model,
             c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size);
  fmt::print("text    {} of {}: {} tokens in {} window(s) of <= {} positions{}, {} scored\n", kvq::llm::text_part_label(part),
             o.text, plan.text_tokens, plan.windows.size(), o.window, bos ? " from BOS" : "", plan.scored_tokens());
  fmt::print("run     {} thread(s), chunks of {} tokens, loaded in {:.1f} s\n", threads, o.chunk, load_seconds);
  std::fflush(stdout);

  kvq::ThreadPool pool(threads);
  Calibrator calibrator(loaded, o.model, calib_text, CalibrationSettings{}, &pool, !o.quiet);
  for (Row& row : rows) {
    if (row.calib != "auto") continue;
    const CalibrationRun run = calibrator.get(row.policy, o.calib_dir);
    row.calibration = run.calibration;
    row.has_calibration = true;
    row.calib = run.label;
    row.calib_file = run.file;
    row.calib_text = calibrator.text_label();
  }
  fmt::print("\n");
  evaluate_rows(rows, model, plan, o.chunk, threads, !o.quiet);

  const Row& ref = reference_of(rows);
  const double ref_ppl = ref.result.perplexity();
  const int fed = plan.fed_tokens();
  fmt::print("{:<26} {:<32} {:>9} {:>12} {:>10} {:>9} {:>8} {:>8}\n", "policy", "calib", "bits/elem", "bytes/token", "PPL",
             "dPPL", "dPPL%", "tok/s");
  for (const Row& row : rows) {
    const auto& r = row.result;
    const double d = r.perplexity() - ref_ppl;
    fmt::print("{:<26} {:<32} {:>9.3f} {:>12.0f} {:>10.4f} {:>+9.4f} {:>+8.2f} {:>8.1f}\n", row.policy, row.calib,
               r.bits_per_element, r.bytes_per_token, r.perplexity(), d, 100.0 * d / ref_ppl, r.tokens_per_second(fed));
  }
  fmt::print("\n(dPPL against {}; bits and bytes measured on the cache after {} tokens)\n", ref.policy,
             rows.front().result.cache_tokens);
  std::vector<std::string> sources;
  for (const Row& row : rows) {
    if (row.calib_file.empty()) continue;
    const std::string line = fmt::format("  {}: {} ({})", row.calib_file, row.calib, row.calib_text);
    if (std::find(sources.begin(), sources.end(), line) == sources.end()) sources.push_back(line);
  }
  if (!sources.empty()) {
    fmt::print("calibrated rows ({}):\n", o.calib.empty() ? "computed or cached in " + o.calib_dir : "files");
    for (const std::string& line : sources) fmt::print("{}\n", line);
  }
  const std::vector<std::string> errors = calibration_error_lines(rows);
  if (!errors.empty()) {
    fmt::print("calibration errors per layer, on the calibration text (docs/results.md shows what they mean for PPL):\n");
    for (const std::string& line : errors) fmt::print("{}\n", line);
  }

  if (!o.json.empty()) {
    std::string j = "{\n";
    j += fmt::format("  \"model\": {},\n  \"model_path\": {},\n  \"text\": {},\n  \"text_part\": {},\n",
                     json_string(model.name), json_string(o.model), json_string(o.text),
                     json_string(kvq::llm::text_part_label(part)));
    j += fmt::format("  \"text_tokens\": {},\n  \"scored_tokens\": {},\n  \"windows\": {},\n  \"window\": {},\n",
                     plan.text_tokens, plan.scored_tokens(), plan.windows.size(), o.window);
    j += fmt::format("  \"threads\": {},\n  \"chunk\": {},\n  \"reference\": {},\n  \"results\": [\n", threads,
                     o.chunk, json_string(ref.policy));
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const auto& r = rows[i].result;
      const double d = r.perplexity() - ref_ppl;
      j += fmt::format(
          "    {{\"policy\": {}, \"calibration\": {}, \"calibration_file\": {}, \"calibration_text\": {}, "
          "\"bits_per_element\": {}, \"bytes_per_token\": {}, \"cache_bytes\": {}, "
          "\"cache_tokens\": {}, \"perplexity\": {}, \"delta_perplexity\": {}, \"delta_perplexity_percent\": {}, "
          "\"mean_nll\": {}, \"scored_tokens\": {}, \"tokens_per_second\": {}, \"forward_seconds\": {}, "
          "\"cache_setup_seconds\": {}}}{}\n",
          json_string(rows[i].policy), json_string(rows[i].calib), json_string(rows[i].calib_file),
          json_string(rows[i].calib_text), json_number(r.bits_per_element), json_number(r.bytes_per_token),
          json_number(r.cache_bytes), r.cache_tokens, json_number(r.perplexity()), json_number(d),
          json_number(100.0 * d / ref_ppl), json_number(r.nll / std::max(1, r.scored)), r.scored,
          json_number(r.tokens_per_second(fed)), json_number(r.seconds), json_number(r.calibration_seconds),
          i + 1 < rows.size() ? "," : "");
    }
    j += "  ]\n}\n";
    std::ofstream out(o.json, std::ios::binary);
    if (!out || !(out << j) || !out.flush()) {
      throw kvq::Error(kvq::Status::kIoError, "argument '--json' = '" + o.json + "': cannot write the file");
    }
  }
  if (!o.per_token.empty()) {
    std::ofstream out(o.per_token, std::ios::binary);
    if (!out) throw kvq::Error(kvq::Status::kIoError, "argument '--per-token' = '" + o.per_token + "': cannot write");
    out << "policy\tcalibration\twindow\tposition\ttoken\tlogprob\n";
    for (const Row& row : rows) {
      std::size_t k = 0;
      for (std::size_t w = 0; w < plan.windows.size(); ++w) {
        for (std::size_t p = 0; p < plan.windows[w].size(); ++p, ++k) {
          const double lp = row.result.logprobs[k];
          out << row.policy << '\t' << row.calib << '\t' << w << '\t' << p << '\t' << plan.windows[w][p] << '\t'
              << (std::isnan(lp) ? std::string("-") : fmt::format("{:.9g}", lp)) << '\n';
        }
      }
    }
    if (!out.flush()) throw kvq::Error(kvq::Status::kIoError, "argument '--per-token' = '" + o.per_token + "': cannot write");
  }
  return 0;
}

}  // namespace

Command add_eval(CLI::App& app) {
  auto o = std::make_shared<EvalOptions>();
  CLI::App* sub = app.add_subcommand(
      "eval", "Perplexity of a real model on a text with each cache policy (decode semantics), with measured bits "
              "per element, cache bytes per token and tokens/s; SKVQ and CSKV calibrated on other text");
  sub->add_option("--model", o->model,
                  "GGUF or llama2.c checkpoint (default: SmolLM2-135M-Instruct from scripts/fetch_model.sh, " +
                      kvq::llm::default_model_path() + ")");
  sub->add_option("--tokenizer", o->tokenizer,
                  "tokenizer.bin of a llama2.c model (default: tok<vocab>.bin or tokenizer.bin beside it)");
  sub->add_option("--text", o->text, fmt::format("UTF-8 text to score (default {})", kvq::llm::kDefaultTextPath));
  sub->add_option("--part", o->part,
                  "auto (default: the second half when --text is the calibration text, else all), all, first or second");
  sub->add_option("--tokens", o->tokens, "text tokens to evaluate (default 2048)");
  sub->add_option("--window", o->window,
                  "positions per window, each on a fresh cache (default: all tokens, at most the model's context)");
  sub->add_option("--policies", o->policies,
                  "comma-separated policy names, 'all' or 'none' (default: the main policies; see `kvq policies`)");
  sub->add_option("--calib", o->calib, "a calibration file of kvq calibrate: adds a row for its policy (repeatable)");
  sub->add_flag("--no-calibrate", o->no_calibrate,
                "run SKVQ and CSKV rows without calibration data (equal SKVQ groups; CSKV factors from an SVD of W)");
  sub->add_option("--calib-text", o->calib_text,
                  fmt::format("text the automatic calibrations read (default {})", kvq::llm::kDefaultTextPath));
  sub->add_option("--calib-part", o->calib_part, "all, first (default) or second half of --calib-text");
  sub->add_option("--calib-tokens", o->calib_tokens, "tokens of the automatic calibrations (default 2048)");
  sub->add_option("--calib-dir", o->calib_dir, "where automatic calibrations are cached (default " +
                                                    default_calibration_dir() + ")");
  sub->add_option("--json", o->json, "also write the results as JSON to this file");
  sub->add_option("--per-token", o->per_token,
                  "also write a TSV of policy, calibration, window, position, token and log-probability ('-' where unscored)");
  sub->add_option("--chunk", o->chunk, "tokens per forward call (default 64; results do not depend on it)");
  sub->add_option("--threads", o->threads, "threads (default 0: all cores)");
  sub->add_flag("--quiet", o->quiet, "no progress bar on stderr");
  return [o] { return run_eval(*o); };
}

}  // namespace kvq_tool
