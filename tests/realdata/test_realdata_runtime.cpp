// SPDX-License-Identifier: Apache-2.0
// The Llama runtime of the kvq tool (tools/llm) on stories260K (llama2.c, 5 layers, 4 kv heads of
// 8 channels) and TinyStories: the harness that test_realdata_policies.cpp relies on. The loader
// reads llama2.c's header and its tokenizer, the tokenizer round-trips the text, greedy decoding
// reproduces llama2.c's own output byte for byte, the chunked evaluator equals one-token decode
// steps bit for bit for every policy, the fp32 perplexity is the data README's, and malformed
// files raise clear errors.
//
// Data: KVQ_REALDATA_DIR (tests/realdata/CMakeLists.txt); the executable skips (exit 77) when
// the folder is absent.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/core/thread_pool.hpp"
#include "kvq/policy/registry.hpp"
#include "kvq_catch.hpp"
#include "llm/any_session.hpp"
#include "llm/evaluate.hpp"
#include "llm/llama2c.hpp"
#include "llm/load.hpp"
#include "llm/read_file.hpp"
#include "llm/session.hpp"
#include "llm/text.hpp"

namespace {

std::string data_path(const std::string& relative) { return std::string(KVQ_REALDATA_DIR) + "/" + relative; }

const std::string kText = "tinystories/tinystories_val_head.txt";

/// stories260K.bin with the tok512.bin that load_model finds beside it, loaded once.
const kvq::llm::LoadedModel& stories() {
  static const kvq::llm::LoadedModel m = kvq::llm::load_model(data_path("stories260K/stories260K.bin"));
  return m;
}

std::string read_text(const std::string& path) { return kvq::llm::read_file(path, "test data"); }

/// What llama2.c's run.c prints for `steps` greedy steps from BOS: each step prints
/// decode(token, next) (leading space dropped after BOS, <0x0A> printed as a newline).
template <class Policy>
std::string greedy(int steps) {
  const auto& [model, tok] = stories();
  kvq::llm::Session<Policy> session(model, steps, nullptr);
  std::vector<float> logits(static_cast<std::size_t>(model.config.vocab_size));
  int token = tok->bos();
  std::string out;
  for (int i = 0; i < steps; ++i) {
    session.forward(&token, 1, logits.data(), false);
    const int next = static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    out += tok->decode(token, next);
    token = next;
  }
  CHECK(session.position() == steps);
  return out;
}

}  // namespace

TEST_CASE("stories260K: the loader reads llama2.c's header and finds tok512.bin", "[realdata][llm]") {
  const auto& [model, tok] = stories();
  const kvq::llm::ModelConfig& c = model.config;
  REQUIRE(c.dim == 64);
  REQUIRE(c.hidden_dim == 172);
  REQUIRE(c.num_layers == 5);
  REQUIRE(c.num_heads == 8);
  REQUIRE(c.num_kv_heads == 4);
  REQUIRE(c.head_dim == 8);
  REQUIRE(c.vocab_size == 512);
  REQUIRE(c.max_context == 512);
  REQUIRE(model.output.data.empty());  // tied classifier
  REQUIRE(tok->vocab_size() == 512);
  REQUIRE(tok->add_bos());
  REQUIRE(tok->bos() == kvq::llm::Llama2cTokenizer::kBos);
}

TEST_CASE("stories260K: the tokenizer round-trips TinyStories text", "[realdata][llm]") {
  const auto& [model, tok] = stories();
  const std::string all = read_text(data_path(kText));
  const std::string text = all.substr(0, all.find('\n', 3000) + 1);
  std::vector<int> tokens{tok->bos()};
  const std::vector<int> body = tok->encode(text);
  tokens.insert(tokens.end(), body.begin(), body.end());
  REQUIRE(tokens.size() > 2);
  CHECK(tokens.size() < text.size() * 2 / 3);  // merges happened (about 2 characters per token)
  std::string back;
  for (std::size_t i = 1; i < tokens.size(); ++i) back += tok->decode(tokens[i - 1], tokens[i]);
  CHECK(back == text);
  // The evaluation windows are the same encoding: leading_tokens of the whole file (which
  // encodes a prefix only) equals this shorter prefix's tokens as far as they go.
  const std::vector<int> leading = kvq::llm::leading_tokens(*tok, data_path(kText), 512);
  REQUIRE(leading.size() >= 512);
  REQUIRE(body.size() > 512);
  CHECK(std::equal(leading.begin(), leading.begin() + 512, body.begin()));
}

TEST_CASE("stories260K: greedy decoding from BOS for 200 steps reproduces llama2.c's expected output "
          "byte for byte, fp32 and fp16 caches",
          "[realdata][llm]") {
  // llama2.c's stdout of `run stories260K.bin -z tok512.bin -t 0 -n 200` without the final "\n"
  // run.c appends: 200 forward steps from BOS at positions 0..199.
  const std::string expected = read_text(data_path("stories260K/expected_greedy_200.txt"));
  REQUIRE(expected.size() > 100);
  const std::string fp32 = greedy<kvq::Fp16Policy<float>>(200);
  const std::string fp16 = greedy<kvq::Fp16Policy<kvq::Float16>>(200);
  INFO("fp32 cache printed:\n" << fp32 << "\nfp16 cache printed:\n" << fp16);
  CHECK(fp32.size() == expected.size());
  CHECK(fp32 == expected);
  CHECK(fp16 == expected);
}

TEST_CASE("stories260K: chunks equal one-token decode steps bit for bit, every policy", "[realdata][llm]") {
  const auto& [model, tok] = stories();
  const std::vector<int> text = kvq::llm::leading_tokens(*tok, data_path(kText), 300);
  std::vector<int> tokens{tok->bos()};
  tokens.insert(tokens.end(), text.begin(), text.begin() + 299);
  const int n = static_cast<int>(tokens.size());
  const int vocab = model.config.vocab_size;
  kvq::ThreadPool pool(2);
  for (const std::string& name : kvq::policy_names()) {
    INFO("policy " << name);
    // Sessions from the runtime's registry (llm/any_session.hpp), as kvq eval runs them.
    const auto steps = kvq::llm::make_session(name, model, n, nullptr);
    std::vector<float> step_logits(static_cast<std::size_t>(n) * vocab);
    for (int i = 0; i < n; ++i) {
      steps->forward(&tokens[static_cast<std::size_t>(i)], 1, step_logits.data() + static_cast<std::size_t>(i) * vocab);
    }
    for (const int chunk : {7, 64, n}) {
      INFO("chunks of " << chunk << " tokens, 2 threads");
      const auto chunked = kvq::llm::make_session(name, model, n, &pool);
      std::vector<float> logits(step_logits.size());
      for (int at = 0; at < n; at += chunk) {
        const int m = std::min(chunk, n - at);
        chunked->forward(&tokens[static_cast<std::size_t>(at)], m, logits.data() + static_cast<std::size_t>(at) * vocab);
      }
      REQUIRE(std::memcmp(logits.data(), step_logits.data(), logits.size() * sizeof(float)) == 0);
      REQUIRE(chunked->cache_bytes() == steps->cache_bytes());
      const std::size_t row = static_cast<std::size_t>(model.config.kv_dim());
      std::vector<float> a(static_cast<std::size_t>(n) * row), b(a.size());
      for (int l = 0; l < model.config.num_layers; ++l) {
        chunked->read_keys(l, a.data());
        steps->read_keys(l, b.data());
        REQUIRE(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
        chunked->read_values(l, a.data());
        steps->read_values(l, b.data());
        REQUIRE(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE("stories260K: fp32-cache perplexity of TinyStories matches the reference", "[realdata][llm]") {
  const auto& [model, tok] = stories();
  const std::vector<int> text = kvq::llm::leading_tokens(*tok, data_path(kText), 512);
  // The data README: "about 4.06 on the first 512 tokens (2 windows of 256 from BOS)": each
  // window is BOS followed by 256 text tokens, all 256 of them predicted (512 predictions).
  const kvq::llm::EvalPlan plan = kvq::llm::make_plan(text, 512, 257, tok->bos(), true);
  REQUIRE(plan.windows.size() == 2);
  REQUIRE(plan.scored_tokens() == 512);
  const kvq::llm::PolicyResult fp32 = kvq::llm::evaluate<kvq::Fp16Policy<float>>(model, plan, 64, nullptr);
  REQUIRE(fp32.scored == 512);
  REQUIRE(fp32.logprobs.size() == static_cast<std::size_t>(plan.fed_tokens()));
  REQUIRE(std::isnan(fp32.logprobs[0]));
  std::printf("stories260K fp32 cache: perplexity %.4f over 512 TinyStories tokens (2 windows of 256 from BOS)\n",
              fp32.perplexity());
  CHECK(fp32.perplexity() > 4.04);
  CHECK(fp32.perplexity() < 4.08);
  CHECK(std::abs(fp32.perplexity() - 4.0649) < 5e-4);  // this runtime's value, to catch drift
}

TEST_CASE("stories260K: malformed checkpoints and tokenizers raise clear errors", "[realdata][llm]") {
  const std::string good = read_text(data_path("stories260K/stories260K.bin"));
  const std::filesystem::path dir = std::filesystem::temp_directory_path();
  const std::string bad = (dir / "kvq_test_realdata_truncated.bin").string();
  auto write = [&](const std::string& bytes) {
    std::ofstream out(bad, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  };
  auto expect_error = [&](auto&& load, kvq::Status status, const std::string& needle) {
    std::string m = "(no error)";
    kvq::Status got = kvq::Status::kOk;
    try {
      load();
    } catch (const kvq::Error& e) {
      m = e.what();
      got = e.status();
    }
    INFO("message: " << m);
    CHECK(m.find(needle) != std::string::npos);
    CHECK(got == status);
  };
  using kvq::llm::load_llama2c;
  using kvq::llm::Llama2cTokenizer;
  const kvq::Status format = kvq::Status::kFormatError;
  write(good.substr(0, good.size() - 4));
  expect_error([&] { load_llama2c(bad); }, format, "needs exactly 1056540");
  write(good.substr(0, 10));
  expect_error([&] { load_llama2c(bad); }, format, "shorter than the 28-byte header");
  std::string zero_heads = good;
  std::fill(zero_heads.begin() + 12, zero_heads.begin() + 16, '\0');  // n_heads = 0
  write(zero_heads);
  expect_error([&] { load_llama2c(bad); }, format, "does not start with a llama2.c legacy header");
  expect_error([&] { Llama2cTokenizer::load(data_path("stories260K/tok512.bin"), 500); }, format,
               "bytes after the last of 500 tokens");
  expect_error([&] { Llama2cTokenizer::load(bad, 512); }, format, "has length");  // a checkpoint is no tokenizer
  expect_error([&] { load_llama2c(bad + ".missing"); }, kvq::Status::kIoError, "cannot open");
  std::filesystem::remove(bad);
}
