// SPDX-License-Identifier: Apache-2.0
// SmolLM2-135M-Instruct (GGUF, Q4_1) end to end, when scripts/fetch_model.sh has cached it:
// the loaded shape, GGUF's RoPE row order against the un-permuted one, chunked evaluation
// against one-token steps, a greedy continuation and a short perplexity with 2-bit caches.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kvq/policy/registry.hpp"
#include "kvq_catch.hpp"
#include "llm/evaluate.hpp"
#include "llm/gguf_model.hpp"
#include "llm/model_defaults.hpp"
#include "llm/session.hpp"

namespace {

const kvq::llm::LoadedGguf& smollm2() {
  static const kvq::llm::LoadedGguf m = kvq::llm::load_gguf_model(kvq::llm::default_model_path());
  return m;
}

/// About 240 tokens of English: more than KIVI's residual of 128 plus a group of 32 and SKVQ's
/// 5 sinks plus a window of 128, so that every policy quantizes part of it.
std::vector<int> sample_tokens() {
  const std::vector<int> ids = smollm2().tokenizer->encode(
      "The river town woke slowly on market days. Before the sun had cleared the hills, the baker had already "
      "sold his first loaves to the ferrymen, who ate them standing on the wet stones of the quay. By seven "
      "o'clock the square was full of carts: apples and pears from the orchards to the north, cheeses wrapped "
      "in cloth, cages of hens that complained about everything, and a man who sold knives and sharpened them "
      "while you waited. Children ran between the stalls with errands they had already forgotten. The mayor, a "
      "careful woman who had kept the town's accounts for twenty-three years, walked from one end of the square "
      "to the other and wrote down the price of everything in a small green notebook. Nobody knew what she did "
      "with the numbers. Some said she compared them with the prices in the city, two days away by road; others "
      "said she simply liked to know. In 1887, when the bridge was built, the market moved to the other bank for "
      "a whole summer, and the old people still talked about it as if it had been a war. At noon the bells rang, "
      "the carts began to leave, and by one o'clock the square belonged again to the pigeons and to the "
      "sleeping dogs, who had waited all morning for exactly this.");
  REQUIRE(ids.size() > 200);
  return ids;
}

template <class Policy>
std::vector<float> logits_of(const kvq::llm::Model& model, const std::vector<int>& tokens, int chunk,
                             kvq::ThreadPool* pool) {
  const int n = static_cast<int>(tokens.size());
  const auto vocab = static_cast<std::size_t>(model.config.vocab_size);
  kvq::llm::Session<Policy> session(model, n, pool);
  std::vector<float> logits(static_cast<std::size_t>(n) * vocab);
  for (int at = 0; at < n; at += chunk) {
    session.forward(&tokens[static_cast<std::size_t>(at)], std::min(chunk, n - at),
                    logits.data() + static_cast<std::size_t>(at) * vocab);
  }
  return logits;
}

}  // namespace

TEST_CASE("SmolLM2: the GGUF loads as a 30-layer GQA Llama with its tokenizer", "[llm][smollm2]") {
  const auto& [model, tok] = smollm2();
  const kvq::llm::ModelConfig& c = model.config;
  REQUIRE(c.num_layers == 30);
  REQUIRE(c.dim == 576);
  REQUIRE(c.hidden_dim == 1536);
  REQUIRE(c.num_heads == 9);
  REQUIRE(c.num_kv_heads == 3);
  REQUIRE(c.head_dim == 64);
  REQUIRE(c.vocab_size == 49152);
  REQUIRE(c.rope.theta == 100000.0);
  REQUIRE(c.rope.style == kvq::RopeStyle::kHalfSplit);
  REQUIRE(c.max_context == 8192);
  REQUIRE(model.output.data.empty());  // tied classifier
  REQUIRE(tok->vocab_size() == 49152);
  REQUIRE(tok->bos() == 1);
  REQUIRE(tok->eos() == 2);
  REQUIRE_FALSE(tok->add_bos());
  REQUIRE(tok->decode(-1, 2).empty());  // <|im_end|> is a control token
}

TEST_CASE("SmolLM2: the tokenizer gives the ids of Hugging Face tokenizers", "[llm][smollm2]") {
  const kvq::llm::Tokenizer& t = *smollm2().tokenizer;
  // From: python3 tools/llm/reference_tokenize.py SmolLM2-135M-Instruct.Q4_1.gguf "<text>" ...
  const std::vector<std::pair<std::string, std::vector<int>>> expected{
      {"Hello, world! How are you today?", {19556, 28, 905, 17, 1073, 359, 346, 1834, 47}},
      {"The year 2024 had 365 days; π ≈ 3.14159.",
       {504, 713,   216,   34,  32,  34, 36, 761, 216, 35, 38, 37, 2009,
        43,  25143, 21004, 226, 216, 35, 30, 33,  36,  33, 37, 41, 30}},
      {"don't we'll I'm they're it's", {12420, 982, 392, 3060, 339, 5248, 502, 2316, 357, 506}},
      {"  leading spaces\n\n\ttabs\r\nand CRLF  ",
       {216, 2899, 5600, 1116, 197, 100, 7366, 201, 198, 397, 340, 9483, 54, 256}},
      {"<|im_start|>user\nWhat is 2+2?<|im_end|>",
       {44,  108, 306, 79, 3738,  108, 46,  4093, 198, 1780, 314,
        216, 34,  27,  34, 15137, 108, 306, 79,   486, 108,  46}},
      {"Café naïve façade — 日本語のテキスト 🙂",
       {51,  1939, 2756,  15486, 46494, 40852, 1841, 17097, 241, 115,   40993, 179,
        120, 248,  26453, 11100, 224,   10391, 251,  10391, 134, 11100, 226,   47526}},
      {"x=  y\n\n\n z", {104, 45, 216, 329, 16506, 1892}},
  };
  for (const auto& [text, ids] : expected) {
    CAPTURE(text);
    REQUIRE(t.encode(text) == ids);
    std::string back;
    int previous = -1;
    for (const int id : ids) {
      back += t.decode(previous, id);
      previous = id;
    }
    REQUIRE(back == text);
  }
}

TEST_CASE("SmolLM2: GGUF's adjacent-pair row order gives the logits of the un-permuted model", "[llm][smollm2]") {
  const kvq::llm::LoadedGguf gguf_order =
      kvq::llm::load_gguf_model(kvq::llm::default_model_path(), kvq::llm::GgufLoadOptions{false});
  REQUIRE(gguf_order.model.config.rope.style == kvq::RopeStyle::kAdjacentPairs);
  const std::vector<int> tokens = sample_tokens();
  kvq::ThreadPool pool(2);
  const std::vector<float> a = logits_of<kvq::Fp16Policy<float>>(smollm2().model, tokens, 64, &pool);
  const std::vector<float> b = logits_of<kvq::Fp16Policy<float>>(gguf_order.model, tokens, 64, &pool);
  float worst = 0.0f;
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(a[i] - b[i]));
  INFO("max |logit difference| " << worst);
  REQUIRE(worst < 2e-3f);
}

TEST_CASE("SmolLM2: chunks equal one-token decode steps bit for bit", "[llm][smollm2]") {
  const std::vector<int> tokens = sample_tokens();
  kvq::ThreadPool pool(2);
  const auto& model = smollm2().model;
  auto check = [&](auto tag) {
    using P = typename decltype(tag)::type;
    INFO("policy " << P::name());
    const std::vector<float> steps = logits_of<P>(model, tokens, 1, nullptr);
    const std::vector<float> chunked = logits_of<P>(model, tokens, 16, &pool);
    REQUIRE(std::memcmp(steps.data(), chunked.data(), steps.size() * sizeof(float)) == 0);
  };
  check(kvq::PolicyTag<kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 128>>{});
  check(kvq::PolicyTag<kvq::SkvqPolicy<kvq::Bits::k2, kvq::Bits::kTernary, 128, 128, 5>>{});
}

TEST_CASE("SmolLM2: greedy continuation and a short perplexity", "[llm][smollm2]") {
  const auto& [model, tok] = smollm2();
  kvq::ThreadPool pool(2);
  std::vector<int> prompt = tok->encode("The capital of France is");
  kvq::llm::Session<kvq::Fp16Policy<kvq::Float16>> session(model, 64, &pool);
  std::vector<float> logits(static_cast<std::size_t>(model.config.vocab_size));
  session.forward(prompt.data(), static_cast<int>(prompt.size()), logits.data(), false);
  std::string text;
  int previous = prompt.back();
  for (int i = 0; i < 6; ++i) {
    const int next = static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    text += tok->decode(previous, next);
    previous = next;
    session.forward(&next, 1, logits.data(), false);
  }
  INFO("continuation: '" << text << "'");
  CHECK(text.find("Paris") != std::string::npos);

  const std::vector<int> tokens = sample_tokens();
  const kvq::llm::EvalPlan plan = kvq::llm::make_plan(tokens, static_cast<int>(tokens.size()),
                                                      static_cast<int>(tokens.size()), tok->bos(), false);
  const auto fp16 = kvq::llm::evaluate<kvq::Fp16Policy<kvq::Float16>>(model, plan, 64, &pool);
  const auto kivi2 = kvq::llm::evaluate<kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 128>>(model, plan, 64, &pool);
  INFO("fp16 PPL " << fp16.perplexity() << ", KIVI-2 PPL " << kivi2.perplexity());
  CHECK(fp16.perplexity() > 1.0);
  CHECK(fp16.perplexity() < 60.0);
  // KIVI's 2-bit cache costs little perplexity; its bits are measured on the cache.
  CHECK(kivi2.perplexity() < 1.25 * fp16.perplexity());
  CHECK(kivi2.bits_per_element < fp16.bits_per_element);
}
