// SPDX-License-Identifier: Apache-2.0
// kvq generate [--model PATH] [--tokenizer PATH] --prompt TEXT [--policy NAME] [-n N] [--threads N]
//
// Greedy decoding on a cache of the chosen policy: the prompt (after BOS when the model uses
// one) runs as decode steps, then each next token is the argmax of the logits and is printed on
// stdout as soon as it is chosen. Stops after N tokens, at EOS, or at the model's context. The
// speed and the cache's measured size go to stderr.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "commands.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/thread_pool.hpp"
#include "kvq/policy/registry.hpp"
#include "llm/load.hpp"
#include "kvq/cache/calibration_io.hpp"
#include "llm/any_session.hpp"
#include "llm/model_defaults.hpp"

namespace kvq_tool {
namespace {

struct GenerateOptions {
  std::string model;
  std::string tokenizer;
  std::string prompt;
  std::string policy = "fp16";
  std::string calib;
  int steps = 128;
  int threads = 0;
};

int generate(const kvq::llm::LoadedModel& loaded, const GenerateOptions& o, kvq::ThreadPool& pool,
             const kvq::CacheCalibration* calibration) {
  const kvq::llm::Model& model = loaded.model;
  const kvq::llm::Tokenizer& tok = *loaded.tokenizer;
  std::vector<int> prompt;
  if (tok.add_bos() && tok.bos() >= 0) prompt.push_back(tok.bos());
  const std::vector<int> text = tok.encode(o.prompt);
  prompt.insert(prompt.end(), text.begin(), text.end());
  if (prompt.empty()) {
    kvq::detail::throw_argument_error("kvq generate", "--prompt", o.prompt,
                                      "a non-empty prompt (this model has no BOS token to start from)");
  }
  const int context = model.config.max_context;
  if (static_cast<int>(prompt.size()) >= context) {
    kvq::detail::throw_argument_error("kvq generate", "--prompt", fmt::format("{} tokens", prompt.size()),
                                      fmt::format("fewer than the model's context of {} tokens", context));
  }
  const int total = std::min<int>(context, static_cast<int>(prompt.size()) + o.steps);
  const std::unique_ptr<kvq::llm::AnySession> session = kvq::llm::make_session(o.policy, model, total, &pool, calibration);
  std::vector<float> logits(static_cast<std::size_t>(model.config.vocab_size));

  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  session->forward(prompt.data(), static_cast<int>(prompt.size()), logits.data(), false);
  const auto t1 = clock::now();
  // Echo the prompt as the tokenizer decodes it (after BOS, if any, which prints as nothing).
  int previous = -1;
  for (const int token : prompt) {
    fmt::print("{}", tok.decode(previous, token));
    previous = token;
  }
  std::fflush(stdout);
  int generated = 0;
  while (session->position() < total) {
    const int next = static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    ++generated;
    if (next == tok.eos()) break;
    fmt::print("{}", tok.decode(previous, next));
    std::fflush(stdout);
    previous = next;
    session->forward(&next, 1, logits.data(), false);
  }
  const auto t2 = clock::now();
  fmt::print("\n");
  std::fflush(stdout);
  const double prefill = std::chrono::duration<double>(t1 - t0).count();
  const double decode = std::chrono::duration<double>(t2 - t1).count();
  fmt::print(stderr, "[{}: prompt {} tokens in {:.2f} s, {} generated in {:.2f} s ({:.1f} tok/s); cache {} bytes for {} "
             "tokens = {:.3f} bits/element]\n",
             o.policy, prompt.size(), prefill, generated, decode, decode > 0 ? generated / decode : 0.0,
             session->cache_bytes(), session->position(), session->bits_per_element());
  return 0;
}

int run_generate(GenerateOptions o) {
  if (o.model.empty()) o.model = kvq::llm::default_model_path();
  if (o.steps < 1) kvq::detail::throw_argument_error("kvq generate", "-n", o.steps, "a positive token count");
  if (o.threads < 0) kvq::detail::throw_argument_error("kvq generate", "--threads", o.threads, "0 (all cores) or more");
  const int threads = o.threads > 0 ? o.threads : std::max(1u, std::thread::hardware_concurrency());
  kvq::CacheCalibration calibration;
  kvq::CalibrationInfo info;
  if (!o.calib.empty()) {
    calibration = kvq::load_cache_calibration(o.calib, &info);
    o.policy = info.policy;
  }
  // Check the policy name before the (slow) model load.
  kvq::dispatch_policy(o.policy, [](auto) {});
  const kvq::llm::LoadedModel loaded = kvq::llm::load_model(o.model, o.tokenizer);
  if (!o.calib.empty()) {
    kvq::CacheConfig shape;
    shape.num_layers = loaded.model.config.num_layers;
    shape.num_kv_heads = loaded.model.config.num_kv_heads;
    shape.head_dim = loaded.model.config.head_dim;
    kvq::check_calibration_fits(info, o.calib, o.policy, shape);
  }
  kvq::ThreadPool pool(threads);
  return generate(loaded, o, pool, o.calib.empty() ? nullptr : &calibration);
}

}  // namespace

Command add_generate(CLI::App& app) {
  auto o = std::make_shared<GenerateOptions>();
  CLI::App* sub = app.add_subcommand("generate", "Greedy text generation on a quantized cache, streamed to stdout");
  sub->add_option("--model", o->model, "GGUF or llama2.c checkpoint (default: " + kvq::llm::default_model_path() + ")");
  sub->add_option("--tokenizer", o->tokenizer, "tokenizer.bin of a llama2.c model (default: found beside it)");
  sub->add_option("--prompt", o->prompt, "text to continue (may be empty for a model with BOS)")->required();
  sub->add_option("--policy", o->policy, "cache policy (default fp16; see `kvq policies`)");
  sub->add_option("--calib", o->calib, "a calibration file of kvq calibrate (sets the policy to the file's)");
  sub->add_option("-n,--tokens", o->steps, "tokens to generate (default 128)");
  sub->add_option("--threads", o->threads, "threads (default 0: all cores)");
  return [o] { return run_generate(*o); };
}

}  // namespace kvq_tool
