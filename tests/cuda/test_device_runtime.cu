// SPDX-License-Identifier: Apache-2.0
// The Llama runtime on the device cache (tools/llm/device_session.cuh) with stories260K (5 layers,
// 4 kv heads of 8 channels, GQA 2): greedy decoding from BOS for 200 steps on a GPU fp16 cache
// (DeviceKVCache<Fp16Policy<Float16>>, rows appended by the device kernels, attention on the GPU)
// must print llama2.c's expected_greedy_200.txt byte for byte. head_dim 8 is below what the
// fused kernels take (64 or 128), so the session runs the reference kernel
// (cuda/reference_decode.cuh) on the device cache's bytes.
//
// At every token and layer a CPU QuantizedKVCache fed the same rows is the witness: the GPU's
// attention output must equal kvq::attend on it within 1e-4 relative (L2 per query head row, the
// metric of test_decode_attention.cu; fp32 on both sides), and at the end the device cache's
// pools, exact rows and tables must equal it byte for byte. The same runs on KIVI device caches
// (2- and 4-bit, g32 r128), whose greedy tokens are compared with the CPU runtime's on the
// same policy and reported, not required (a different summation order may flip a near tie).
// A random 2-layer model of head_dim 64 runs the session's fused-kernel path too (the fused
// kernels take that shape): its attention must equal the witness's within 2e-3 (the CPU given
// the 16-bit queries the fused kernels read) at every step, and its logits are compared with
// the CPU runtime's, loosely (see the case).
//
// Data: the real-data folder (KVQ_REALDATA_DIR, compiled in from tests/realdata's cache variable;
// the environment variable KVQ_REALDATA_DIR overrides it, as on the GPU machine where
// ../shared/realdata is not carried); the executable exits 77 (Skipped) when it is absent.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include "kvq/cuda/device_cache.cuh"
#include "kvq/kvq.hpp"
#include "device_cache_testing.hpp"
#include "device_runtime_cpu.hpp"
#include "gpu_testing.hpp"
#include "kvq_catch.hpp"
#include "llm/device_session.cuh"
#include "llm/load.hpp"
#include "llm/read_file.hpp"
#include "seeds.hpp"
#include "test_data_dir.hpp"

namespace {

using kvq::index_t;

std::string data_path(const std::string& relative) { return kvq_test::test_data_dir() + "/" + relative; }

const kvq::llm::LoadedModel& stories() {
  static const kvq::llm::LoadedModel m = kvq::llm::load_model(data_path("stories260K/stories260K.bin"));
  return m;
}

/// What llama2.c's run.c prints for these tokens (tokens[0] = BOS).
std::string text_of(const std::vector<int>& tokens) {
  std::string out;
  for (std::size_t i = 1; i < tokens.size(); ++i) out += stories().tokenizer->decode(tokens[i - 1], tokens[i]);
  return out;
}

struct DeviceRun {
  std::vector<int> tokens;  ///< BOS, then the steps' argmaxes
  std::string text;
  kvq::llm::DeviceAttention attention = kvq::llm::DeviceAttention::kAuto;
  std::string fused_why;
  double worst_row = 0.0;   ///< max over tokens, layers and query heads of ||gpu - cpu|| / ||cpu||
  std::string cache_diff;   ///< compare_with_cpu at the end ("" when byte-identical)
};

/// The CPU witness of a DeviceSession (see the file comment): a QuantizedKVCache fed the rows the
/// session appends; at every step and layer kvq::attend on it is compared with the GPU's output.
template <class P>
struct AttentionWitness {
  kvq::QuantizedKVCache<P> cache;
  kvq::SequenceId seq;
  double worst_row = 0.0;  ///< max over steps, layers and query heads of ||gpu - cpu|| / ||cpu||

  /// `heads`: the model's query heads.
  AttentionWitness(kvq::llm::DeviceSession<P>& session, index_t heads)
      : cache(session.cache().config()), seq(cache.add_sequence()) {
    REQUIRE(seq == session.sequence());
    const index_t dim = session.cache().config().head_dim;
    // The fused kernels take 16-bit queries: the CPU gets the query they read.
    using Q = typename kvq::llm::DeviceSession<P>::FusedHostQuery;
    const bool fused = session.attention() == kvq::llm::DeviceAttention::kFused;
    const auto n = static_cast<std::size_t>(heads * dim);
    session.set_observer([this, heads, dim, fused, n, ref = std::vector<float>(n), q = std::vector<float>(n)](
                             const typename kvq::llm::DeviceSession<P>::Step& st) mutable {
      for (std::size_t i = 0; i < n; ++i) q[i] = fused ? kvq::to_float(kvq::from_float<Q>(st.q[i])) : st.q[i];
      cache.append(seq, st.layer, st.k, st.v, 1);
      kvq::attend(cache, seq, st.layer, kvq::StridedView<const float, 2>(q.data(), {heads, dim}),
                  kvq::StridedView<float, 2>(ref.data(), {heads, dim}));
      worst_row = std::max(worst_row, kvq_test::max_row_error(st.out, ref.data(), heads, dim));
    });
  }
};

/// Greedy decoding from BOS on DeviceSession<P>, with the CPU witness cache (see the file comment).
template <class P>
DeviceRun device_greedy(int steps) {
  const kvq::llm::Model& model = stories().model;
  const kvq::llm::ModelConfig& c = model.config;
  kvq::llm::DeviceSession<P> session(model, steps, nullptr);
  AttentionWitness<P> witness(session, c.num_heads);
  DeviceRun run;
  run.attention = session.attention();
  run.fused_why = session.fused_unsupported_reason();
  std::vector<float> logits(static_cast<std::size_t>(c.vocab_size));
  run.tokens.push_back(stories().tokenizer->bos());
  for (int i = 0; i < steps; ++i) {
    session.forward(&run.tokens.back(), 1, logits.data(), false);
    run.tokens.push_back(static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin()));
  }
  CHECK(session.position() == steps);
  session.check_status();
  run.cache_diff = kvq_test::compare_with_cpu(session.cache().contents(), session.cache().planner(), witness.cache);
  run.worst_row = witness.worst_row;
  run.text = text_of(run.tokens);
  return run;
}

/// A random Llama model of a shape the fused kernels take (head_dim 64, GQA 2), 2 layers.
kvq::llm::Model random_model(std::uint64_t seed) {
  kvq::Rng rng(seed);
  kvq::llm::Model m;
  kvq::llm::ModelConfig& c = m.config;
  c.dim = 256;
  c.hidden_dim = 384;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.vocab_size = 97;
  c.max_context = 512;
  c.rope = kvq::RopeConfig{10000.0, kvq::RopeStyle::kHalfSplit};
  m.name = "random";
  m.format = "test";
  auto matrix = [&](int rows, int cols, float scale) {
    kvq::llm::Matrix w;
    w.rows = rows;
    w.cols = cols;
    w.data.resize(static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols));
    for (float& x : w.data) x = scale * rng.normal();
    return w;
  };
  const float s = 1.0f / std::sqrt(static_cast<float>(c.dim));
  m.token_embedding = matrix(c.vocab_size, c.dim, 1.0f);
  for (int l = 0; l < c.num_layers; ++l) {
    kvq::llm::LayerWeights w;
    w.attn_norm.assign(static_cast<std::size_t>(c.dim), 1.0f);
    w.ffn_norm.assign(static_cast<std::size_t>(c.dim), 1.0f);
    w.wq = matrix(c.q_dim(), c.dim, 2.0f * s);  // peaked enough that attention is not uniform
    w.wk = matrix(c.kv_dim(), c.dim, 2.0f * s);
    w.wv = matrix(c.kv_dim(), c.dim, s);
    w.wo = matrix(c.dim, c.q_dim(), s);
    w.w_gate = matrix(c.hidden_dim, c.dim, s);
    w.w_up = matrix(c.hidden_dim, c.dim, s);
    w.w_down = matrix(c.dim, c.hidden_dim, 1.0f / std::sqrt(static_cast<float>(c.hidden_dim)));
    m.layers.push_back(std::move(w));
  }
  m.final_norm.assign(static_cast<std::size_t>(c.dim), 1.0f);
  return m;
}

/// Generated tokens (after BOS) on which two runs agree, and the first step where they differ (-1: none).
std::pair<int, int> agreement(const std::vector<int>& a, const std::vector<int>& b) {
  int same = 0, first = -1;
  for (std::size_t i = 1; i < std::min(a.size(), b.size()); ++i) {
    if (a[i] == b[i]) {
      ++same;
    } else if (first < 0) {
      first = static_cast<int>(i) - 1;
    }
  }
  return {same, first};
}

}  // namespace

TEST_CASE("stories260K: greedy decoding for 200 steps on the GPU fp16 cache reproduces llama2.c's expected output",
          "[cuda][realdata][llm]") {
  const std::string expected = kvq::llm::read_file(data_path("stories260K/expected_greedy_200.txt"), "test data");
  REQUIRE(expected.size() > 100);
  const DeviceRun run = device_greedy<kvq::Fp16Policy<kvq::Float16>>(200);
  std::printf("stories260K, GPU fp16 cache: %s attention (fused kernels: %s); max attention row error vs CPU %.2e\n",
              kvq::llm::device_attention_name(run.attention), run.fused_why.empty() ? "take the shape" : run.fused_why.c_str(),
              run.worst_row);
  CHECK(run.attention == kvq::llm::DeviceAttention::kReference);  // head_dim 8
  INFO("device cache vs CPU witness: " << run.cache_diff);
  CHECK(run.cache_diff.empty());
  CHECK(run.worst_row <= 1e-4);
  const std::vector<int> cpu = kvq_test::cpu_greedy_tokens(stories().model, stories().tokenizer->bos(), "fp16", 200);
  const auto [same, first] = agreement(run.tokens, cpu);
  std::printf("stories260K, GPU fp16 cache vs CPU fp16 session: %d of 200 tokens agree (first difference at step %d)\n", same,
              first);
  INFO("GPU fp16 cache printed:\n" << run.text);
  CHECK(run.text.size() == expected.size());
  REQUIRE(run.text == expected);
  CHECK(run.tokens == cpu);
}

TEST_CASE("stories260K on GPU KIVI caches: device appends and attention equal the CPU's; greedy tokens against the CPU "
          "runtime reported",
          "[cuda][realdata][llm]") {
  auto check = [](auto tag) {
    using P = typename decltype(tag)::type;
    const DeviceRun run = device_greedy<P>(200);
    const std::vector<int> cpu = kvq_test::cpu_greedy_tokens(stories().model, stories().tokenizer->bos(), P::name(), 200);
    const auto [same, first] = agreement(run.tokens, cpu);
    std::printf("stories260K, GPU %s cache: %s attention, max attention row error vs CPU %.2e; greedy tokens agree with the "
                "CPU %s session on %d of 200 (first difference at step %d)\n",
                P::name().c_str(), kvq::llm::device_attention_name(run.attention), run.worst_row, P::name().c_str(), same,
                first);
    if (first >= 0) std::printf("  GPU: %s\n  CPU: %s\n", run.text.c_str(), text_of(cpu).c_str());
    CAPTURE(P::name());
    INFO("device cache vs CPU witness: " << run.cache_diff);
    CHECK(run.cache_diff.empty());
    CHECK(run.worst_row <= 1e-4);
  };
  check(kvq::PolicyTag<kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 128>>{});
  check(kvq::PolicyTag<kvq::KiviPolicy<kvq::Bits::k4, kvq::Bits::k4, 32, 128>>{});
}

TEST_CASE("a random model of head_dim 64 on the device cache: fused and reference attention equal the CPU's at every "
          "step; logits near the CPU runtime's",
          "[cuda][llm]") {
  const kvq::llm::Model model = random_model(kvq_test::case_seed("device_runtime_random_model", 0));
  const int vocab = model.config.vocab_size;
  kvq::Rng rng(kvq_test::case_seed("device_runtime_random_model", 1));
  std::vector<int> tokens(300);  // past KIVI's flushes at 128 and 256
  for (int& t : tokens) t = static_cast<int>(rng.next_u64() % static_cast<std::uint64_t>(vocab));
  auto check = [&](auto tag) {
    using P = typename decltype(tag)::type;
    const std::vector<float> cpu = kvq_test::cpu_logits(model, P::name(), tokens);
    for (const kvq::llm::DeviceAttention attention : {kvq::llm::DeviceAttention::kFused, kvq::llm::DeviceAttention::kReference}) {
      kvq::llm::DeviceSession<P> session(model, static_cast<int>(tokens.size()), nullptr, attention);
      REQUIRE(session.attention() == attention);
      AttentionWitness<P> witness(session, model.config.num_heads);
      std::vector<float> logits(cpu.size());
      // a chunk of 100 (token by token inside), then single tokens
      session.forward(tokens.data(), 100, logits.data(), true);
      for (std::size_t i = 100; i < tokens.size(); ++i) session.forward(&tokens[i], 1, logits.data() + i * static_cast<std::size_t>(vocab), true);
      session.check_status();
      const std::string cache_diff =
          kvq_test::compare_with_cpu(session.cache().contents(), session.cache().planner(), witness.cache);
      const double err = kvq_test::max_row_error(logits.data(), cpu.data(), static_cast<index_t>(tokens.size()), vocab);
      std::printf("random model (head_dim 64, GQA 2), GPU %s cache, %s attention: max attention row error vs CPU on the same "
                  "rows %.2e; max logits row error vs the CPU runtime %.2e\n",
                  P::name().c_str(), kvq::llm::device_attention_name(attention), witness.worst_row, err);
      CAPTURE(P::name(), kvq::llm::device_attention_name(attention));
      INFO("device cache vs CPU witness: " << cache_diff);
      CHECK(cache_diff.empty());
      // The kernels: attention on the same cache bytes and the same (16-bit) queries, the issue's
      // 2e-3 for the fused kernels (fp16 P, fp16 output) and fp32 agreement for the reference
      // kernel. (With the CPU on the fp32 queries the fused rows differed by 2.4e-3: the
      // queries' rounding, amplified by this model's peaked scores.)
      CHECK(witness.worst_row <= (attention == kvq::llm::DeviceAttention::kFused ? 2e-3 : 1e-4));
      // End to end, loosely: the session's host code (RoPE, norms) is compiled by nvcc's host pass,
      // without the CPU runtime's -march and contraction, so K/V differ from the CPU runtime's by
      // an fp16 ulp here and there. For fp16 that stays an ulp; KIVI-2 turns a one-ulp difference
      // at a rounding boundary into a whole 2-bit step of its group (a quarter of the group's
      // range), and two random layers amplify it: measured 5.8e-2 with the attention above within its 2e-3.
      constexpr bool kivi = !std::is_same_v<P, kvq::Fp16Policy<kvq::Float16>>;
      CHECK(err <= (kivi ? 1.5e-1 : 1e-2));
    }
  };
  check(kvq::PolicyTag<kvq::Fp16Policy<kvq::Float16>>{});
  check(kvq::PolicyTag<kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 128>>{});
}
