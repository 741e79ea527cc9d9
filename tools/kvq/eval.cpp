// SPDX-License-Identifier: Apache-2.0
// kvq eval [--model PATH] [--tokenizer PATH] [--text PATH] [--tokens N] [--window N]
//          [--policies LIST] [--json PATH] [--per-token PATH] [--chunk N] [--threads N] [--quiet]
//
// Perplexity of a real model with each cache policy, with decode semantics (DESIGN.md §7):
// every scored token is predicted by a decode step whose attention sees exactly what the
// policy's cache holds at that point (sinks, quantized history, window). Chunks of tokens share
// their matrix products but append and attend one token at a time, which gives bit for bit the
// logits of one-token steps (tools/llm/session.hpp; tests/llm/test_runtime.cpp checks it).
//
// Columns: bits/elem = cache bytes * 8 / stored K/V elements and bytes/token = cache bytes /
// tokens (all layers, keys and values), both measured on the cache at the end of the longest
// window; PPL = exp(mean -log p) over scored tokens; dPPL against the reference policy (fp32
// when evaluated, else fp16, else the first); tok/s = tokens fed / seconds of forward passes.
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <fmt/os.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "commands.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/thread_pool.hpp"
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
  int tokens = 2048;
  int window = 0;
  std::string policies;
  std::string json;
  std::string per_token;
  int chunk = 64;
  int threads = 0;
  bool quiet = false;
};

std::vector<std::string> split_policies(const std::string& list) {
  if (list.empty()) return kvq::main_policy_names();
  if (list == "all") return kvq::policy_names();
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
      kvq::detail::throw_argument_error("kvq eval", "--policies", name, "'all' or names among " + all);
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

const kvq::llm::PolicyResult& reference_of(const std::vector<kvq::llm::PolicyResult>& results) {
  for (const char* name : {"fp32", "fp16"}) {
    for (const auto& r : results) {
      if (r.policy == name) return r;
    }
  }
  return results.front();
}

int run_eval(EvalOptions o) {
  if (o.model.empty()) o.model = kvq::llm::default_model_path();
  const std::vector<std::string> policies = split_policies(o.policies);
  if (o.threads < 0) kvq::detail::throw_argument_error("kvq eval", "--threads", o.threads, "0 (all cores) or more");
  const int threads = o.threads > 0 ? o.threads : std::max(1u, std::thread::hardware_concurrency());
  if (o.tokens < 2) kvq::detail::throw_argument_error("kvq eval", "--tokens", o.tokens, "at least 2 tokens");
  if (o.chunk < 1) kvq::detail::throw_argument_error("kvq eval", "--chunk", o.chunk, "a positive token count");

  const auto load0 = std::chrono::steady_clock::now();
  const kvq::llm::LoadedModel loaded = kvq::llm::load_model(o.model, o.tokenizer);
  const kvq::llm::Model& model = loaded.model;
  const kvq::llm::Tokenizer& tok = *loaded.tokenizer;
  const std::vector<int> text_tokens = kvq::llm::leading_tokens(tok, o.text, o.tokens);
  const double load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - load0).count();
  const bool bos = tok.add_bos() && tok.bos() >= 0;
  if (o.window == 0) o.window = std::min(model.config.max_context, o.tokens + (bos ? 1 : 0));
  if (o.window > model.config.max_context) {
    kvq::detail::throw_argument_error("kvq eval", "--window", o.window,
                                      fmt::format("at most the model's context of {} tokens", model.config.max_context));
  }
  const kvq::llm::EvalPlan plan = kvq::llm::make_plan(text_tokens, o.tokens, o.window, tok.bos(), bos);

  const kvq::llm::ModelConfig& c = model.config;
  fmt::print("model   {} ({}: {} layers, {} query / {} kv heads, head_dim {}, vocab {})\n", model.name, o.model,
             c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size);
  fmt::print("text    {}: {} tokens in {} window(s) of <= {} positions{}, {} scored\n", o.text, plan.text_tokens,
             plan.windows.size(), o.window, bos ? " from BOS" : "", plan.scored_tokens());
  fmt::print("run     {} thread(s), chunks of {} tokens, loaded in {:.1f} s\n\n", threads, o.chunk, load_seconds);
  std::fflush(stdout);

  kvq::ThreadPool pool(threads);
  std::vector<kvq::llm::PolicyResult> results;
  for (const std::string& name : policies) {
    kvq::dispatch_policy(name, [&](auto tag) {
      using P = typename decltype(tag)::type;
      ProgressBar bar(name, !o.quiet);
      results.push_back(kvq::llm::evaluate<P>(model, plan, o.chunk, &pool,
                                              [&](int done, int total) { bar.update(done, total); }));
    });
  }

  const kvq::llm::PolicyResult& ref = reference_of(results);
  const int fed = plan.fed_tokens();
  fmt::print("{:<26} {:>9} {:>12} {:>10} {:>9} {:>8} {:>8}\n", "policy", "bits/elem", "bytes/token", "PPL",
             "dPPL", "dPPL%", "tok/s");
  for (const auto& r : results) {
    const double d = r.perplexity() - ref.perplexity();
    fmt::print("{:<26} {:>9.3f} {:>12.0f} {:>10.4f} {:>+9.4f} {:>+8.2f} {:>8.1f}\n", r.policy, r.bits_per_element,
               r.bytes_per_token, r.perplexity(), d, 100.0 * d / ref.perplexity(), r.tokens_per_second(fed));
  }
  fmt::print("\n(dPPL against {}; bits and bytes measured on the cache after {} tokens)\n", ref.policy,
             results.front().cache_tokens);

  if (!o.json.empty()) {
    std::string j = "{\n";
    j += fmt::format("  \"model\": {},\n  \"model_path\": {},\n  \"text\": {},\n", json_string(model.name),
                     json_string(o.model), json_string(o.text));
    j += fmt::format("  \"text_tokens\": {},\n  \"scored_tokens\": {},\n  \"windows\": {},\n  \"window\": {},\n",
                     plan.text_tokens, plan.scored_tokens(), plan.windows.size(), o.window);
    j += fmt::format("  \"threads\": {},\n  \"chunk\": {},\n  \"reference\": {},\n  \"results\": [\n", threads,
                     o.chunk, json_string(ref.policy));
    for (std::size_t i = 0; i < results.size(); ++i) {
      const auto& r = results[i];
      const double d = r.perplexity() - ref.perplexity();
      j += fmt::format(
          "    {{\"policy\": {}, \"bits_per_element\": {}, \"bytes_per_token\": {}, \"cache_bytes\": {}, "
          "\"cache_tokens\": {}, \"perplexity\": {}, \"delta_perplexity\": {}, \"delta_perplexity_percent\": {}, "
          "\"mean_nll\": {}, \"scored_tokens\": {}, \"tokens_per_second\": {}, \"forward_seconds\": {}, "
          "\"calibration_seconds\": {}}}{}\n",
          json_string(r.policy), json_number(r.bits_per_element), json_number(r.bytes_per_token),
          json_number(r.cache_bytes), r.cache_tokens, json_number(r.perplexity()), json_number(d),
          json_number(100.0 * d / ref.perplexity()), json_number(r.nll / std::max(1, r.scored)), r.scored,
          json_number(r.tokens_per_second(fed)), json_number(r.seconds), json_number(r.calibration_seconds),
          i + 1 < results.size() ? "," : "");
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
    out << "policy\twindow\tposition\ttoken\tlogprob\n";
    for (const auto& r : results) {
      std::size_t k = 0;
      for (std::size_t w = 0; w < plan.windows.size(); ++w) {
        for (std::size_t p = 0; p < plan.windows[w].size(); ++p, ++k) {
          const double lp = r.logprobs[k];
          out << r.policy << '\t' << w << '\t' << p << '\t' << plan.windows[w][p] << '\t'
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
              "per element, cache bytes per token and tokens/s");
  sub->add_option("--model", o->model,
                  "GGUF or llama2.c checkpoint (default: SmolLM2-135M-Instruct from scripts/fetch_model.sh, " +
                      kvq::llm::default_model_path() + ")");
  sub->add_option("--tokenizer", o->tokenizer,
                  "tokenizer.bin of a llama2.c model (default: tok<vocab>.bin or tokenizer.bin beside it)");
  sub->add_option("--text", o->text, fmt::format("UTF-8 text to score (default {})", kvq::llm::kDefaultTextPath));
  sub->add_option("--tokens", o->tokens, "text tokens to evaluate (default 2048)");
  sub->add_option("--window", o->window,
                  "positions per window, each on a fresh cache (default: all tokens, at most the model's context)");
  sub->add_option("--policies", o->policies,
                  "comma-separated policy names, or 'all' (default: the main policies; see `kvq policies`)");
  sub->add_option("--json", o->json, "also write the results as JSON to this file");
  sub->add_option("--per-token", o->per_token,
                  "also write a TSV of policy, window, position, token and log-probability ('-' where unscored)");
  sub->add_option("--chunk", o->chunk, "tokens per forward call (default 64; results do not depend on it)");
  sub->add_option("--threads", o->threads, "threads (default 0: all cores)");
  sub->add_flag("--quiet", o->quiet, "no progress bar on stderr");
  return [o] { return run_eval(*o); };
}

}  // namespace kvq_tool
