// SPDX-License-Identifier: Apache-2.0
// Decode attention on the CPU: kvq's fused attention over quantized caches against fp32
// attention with Eigen (matrix-vector per query head, and matrix-matrix over a GQA group) and
// against kvq's own fp16 cache, in one run, plus the cost of appending one token (items/s =
// decode-step appends of one token to one layer per second).
//
//   kvq_bench_attention [--benchmark_filter=...] [--kvq_smoke]
//
// Shape: one sequence, one layer, 1 kv head of head_dim 128 and 8 query heads (GQA 8:1);
// tokens 4K / 32K / 128K; threads 1 and 2 (split-KV through kvq::ThreadPool).
// Counters: tokens/s, elem/s (key and value elements attended per second), cache_B/s (bytes of
// the cache read per second). After the run a table prints each variant's time and its speedup
// over the fp32 baselines measured in the same run.
#include <benchmark/benchmark.h>

#include <Eigen/Dense>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "kvq/kvq.hpp"

namespace {

constexpr kvq::index_t kHeadDim = 128;
constexpr kvq::index_t kKvHeads = 1;
constexpr kvq::index_t kQueryHeads = 8;
std::vector<kvq::index_t> g_tokens = {4096, 32768, 131072};

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Keys and values [tokens, kv_heads * head_dim] with a few outlier channels (like real keys),
/// and queries [query_heads, head_dim]; seeded.
struct Data {
  std::vector<float> keys, values, query;
  explicit Data(kvq::index_t tokens) {
    kvq::Rng rng(7);
    keys.resize(static_cast<std::size_t>(tokens * kKvHeads * kHeadDim));
    values.resize(keys.size());
    for (std::size_t i = 0; i < keys.size(); ++i) {
      const bool outlier = (i % kHeadDim) % 37 == 3;
      keys[i] = rng.normal() * (outlier ? 8.0f : 1.0f);
      values[i] = rng.normal();
    }
    query.resize(static_cast<std::size_t>(kQueryHeads * kHeadDim));
    for (float& q : query) q = rng.normal() * 0.3f;
  }
};

const Data& data(kvq::index_t tokens) {
  static std::map<kvq::index_t, std::unique_ptr<Data>> cache;
  auto& d = cache[tokens];
  if (!d) d = std::make_unique<Data>(tokens);
  return *d;
}

kvq::ThreadPool& pool() {
  static kvq::ThreadPool p(2);
  return p;
}

void set_counters(benchmark::State& state, kvq::index_t tokens, double cache_bytes) {
  const double iters = static_cast<double>(state.iterations());
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens) * iters, benchmark::Counter::kIsRate);
  state.counters["elem/s"] = benchmark::Counter(2.0 * static_cast<double>(tokens * kKvHeads * kHeadDim) * iters,
                                                benchmark::Counter::kIsRate);
  state.counters["cache_B/s"] = benchmark::Counter(cache_bytes * iters, benchmark::Counter::kIsRate);
}

// fp32 baseline 1: per query head, scores = K q (matrix-vector), softmax, out = V^T p.
void BM_attention_fp32_eigen_gemv(benchmark::State& state) {
  const kvq::index_t tokens = state.range(0);
  const Data& d = data(tokens);
  Eigen::Map<const RowMatrix> k(d.keys.data(), tokens, kHeadDim);
  Eigen::Map<const RowMatrix> v(d.values.data(), tokens, kHeadDim);
  Eigen::VectorXf scores(tokens);
  RowMatrix out(kQueryHeads, kHeadDim);
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  for (auto _ : state) {
    for (kvq::index_t h = 0; h < kQueryHeads; ++h) {
      Eigen::Map<const Eigen::VectorXf> q(d.query.data() + h * kHeadDim, kHeadDim);
      scores.noalias() = k * q;
      scores *= scale;
      scores = (scores.array() - scores.maxCoeff()).exp();
      out.row(h).noalias() = (v.transpose() * scores).transpose() / scores.sum();
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, 2.0 * static_cast<double>(tokens * kHeadDim) * sizeof(float));
}

// fp32 baseline 2: the GQA group at once: S = K Q^T (matrix-matrix), softmax per column, O = V^T P.
void BM_attention_fp32_eigen_gemm(benchmark::State& state) {
  const kvq::index_t tokens = state.range(0);
  const Data& d = data(tokens);
  Eigen::Map<const RowMatrix> k(d.keys.data(), tokens, kHeadDim);
  Eigen::Map<const RowMatrix> v(d.values.data(), tokens, kHeadDim);
  Eigen::Map<const RowMatrix> q(d.query.data(), kQueryHeads, kHeadDim);
  Eigen::MatrixXf scores(tokens, kQueryHeads);
  Eigen::MatrixXf out(kHeadDim, kQueryHeads);
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  for (auto _ : state) {
    scores.noalias() = k * q.transpose();
    scores *= scale;
    for (kvq::index_t h = 0; h < kQueryHeads; ++h) {
      scores.col(h) = (scores.col(h).array() - scores.col(h).maxCoeff()).exp();
      scores.col(h) /= scores.col(h).sum();
    }
    out.noalias() = v.transpose() * scores;
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, 2.0 * static_cast<double>(tokens * kHeadDim) * sizeof(float));
}

/// A one-layer cache of kKvHeads x kHeadDim with room for `tokens` tokens (CSKV gets seeded
/// random orthonormal factors), holding sequence 0 with the first `prefill` tokens of data().
template <class Policy>
std::unique_ptr<kvq::QuantizedKVCache<Policy>> make_cache(kvq::index_t tokens, kvq::index_t prefill) {
  using Cache = kvq::QuantizedKVCache<Policy>;
  kvq::CacheConfig cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = kKvHeads;
  cfg.head_dim = kHeadDim;
  cfg.num_blocks = Cache::blocks_for_tokens(1, tokens);
  auto cache = std::make_unique<Cache>(cfg, kvq::random_latent_calibration<Policy>(cfg, 11));
  const kvq::SequenceId seq = cache->add_sequence();
  if (prefill == 0) return cache;
  const Data& d = data(prefill);
  constexpr kvq::index_t chunk = 4096;
  for (kvq::index_t t = 0; t < prefill; t += chunk) {
    const kvq::index_t n = std::min(chunk, prefill - t);
    cache->append(seq, 0, d.keys.data() + t * kHeadDim, d.values.data() + t * kHeadDim, n);
  }
  return cache;
}

template <class Policy>
kvq::QuantizedKVCache<Policy>& filled_cache(kvq::index_t tokens) {
  static std::map<kvq::index_t, std::unique_ptr<kvq::QuantizedKVCache<Policy>>> caches;
  auto& cache = caches[tokens];
  if (!cache) cache = make_cache<Policy>(tokens, tokens);
  return *cache;
}

template <class Policy>
void BM_attention_kvq(benchmark::State& state) {
  const kvq::index_t tokens = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  auto& cache = filled_cache<Policy>(tokens);
  const Data& d = data(tokens);
  std::vector<float> out(static_cast<std::size_t>(kQueryHeads * kHeadDim));
  const kvq::index_t shape[2] = {kQueryHeads, kHeadDim};
  kvq::AttentionOptions options;
  options.pool = threads > 1 ? &pool() : nullptr;
  for (auto _ : state) {
    kvq::attend(cache, 0, 0, kvq::StridedView<const float, 2>(d.query.data(), shape),
                kvq::StridedView<float, 2>(out.data(), shape), options);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  set_counters(state, tokens, static_cast<double>(cache.memory_bytes()));
  state.counters["bits/elem"] = cache.bits_per_element();
}

// Cost of one decode-step append (one token, one layer) on a cache that already holds
// `tokens` tokens; includes the flushes the policy's state machine performs along the way.
template <class Policy>
void BM_append_kvq(benchmark::State& state) {
  const kvq::index_t tokens = state.range(0);
  constexpr kvq::index_t kAppends = 4096;
  const Data& d = data(4096);
  for (auto _ : state) {
    state.PauseTiming();
    auto cache_ptr = make_cache<Policy>(tokens + kAppends, tokens);
    auto& cache = *cache_ptr;
    const kvq::SequenceId seq = 0;
    state.ResumeTiming();
    for (kvq::index_t i = 0; i < kAppends; ++i) {
      const kvq::index_t t = i % 4096;
      cache.append(seq, 0, d.keys.data() + t * kHeadDim, d.values.data() + t * kHeadDim, 1);
    }
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * kAppends);  // tokens/s; 1e6 / that = us per token
}

using Fp16 = kvq::Fp16Policy<kvq::Float16>;
using Kivi2 = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 128>;
using Kivi4 = kvq::KiviPolicy<kvq::Bits::k4, kvq::Bits::k4, 32, 128>;
using SkvqK2V15 = kvq::SkvqPolicy<kvq::Bits::k2, kvq::Bits::kTernary, 128, 128, 5>;
using PerToken2 = kvq::PerTokenPolicy<kvq::Bits::k2, kvq::Bits::k2, 32>;
using Cskv = kvq::CskvPolicy<kvq::Bits::k4, kvq::Bits::k4, 50, 50, 32>;

void attention_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"tokens", "threads"});
  for (kvq::index_t t : g_tokens) {
    for (int threads : {1, 2}) b->Args({t, threads});
  }
  b->Unit(benchmark::kMillisecond);
}
void baseline_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"tokens"});
  for (kvq::index_t t : g_tokens) b->Args({t});
  b->Unit(benchmark::kMillisecond);
}

/// Keeps every run's time for the speedup table printed after the console output.
class RecordingReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      if (r.run_type == Run::RT_Iteration) {
        times_[r.benchmark_name()] = r.GetAdjustedRealTime();
      }
    }
    ConsoleReporter::ReportRuns(runs);
  }
  void print_speedups() const {
    std::printf("\nSpeedup of kvq attention over the fp32 baselines of this run (ms; x = baseline time / time)\n");
    std::printf("%-22s %8s %7s %10s %12s %12s\n", "variant", "tokens", "threads", "time_ms", "vs_gemv_fp32", "vs_gemm_fp32");
    for (const auto& [name, time] : times_) {
      if (name.rfind("BM_attention_kvq", 0) != 0) continue;
      const std::size_t lt = name.find('<');
      const std::size_t gt = name.find('>');
      const std::string policy = name.substr(lt + 1, gt - lt - 1);
      const long tokens = std::stol(name.substr(name.find("tokens:") + 7));
      const long threads = std::stol(name.substr(name.find("threads:") + 8));
      const std::string suffix = "/tokens:" + std::to_string(tokens);
      const auto gemv = times_.find("BM_attention_fp32_eigen_gemv" + suffix);
      const auto gemm = times_.find("BM_attention_fp32_eigen_gemm" + suffix);
      std::printf("%-22s %8ld %7ld %10.3f %12.2f %12.2f\n", policy.c_str(), tokens, threads, time,
                  gemv == times_.end() ? 0.0 : gemv->second / time, gemm == times_.end() ? 0.0 : gemm->second / time);
    }
  }

 private:
  std::map<std::string, double> times_;
};

}  // namespace

namespace {

template <class Policy>
void register_policy(const std::string& label, bool append_too) {
  benchmark::RegisterBenchmark(("BM_attention_kvq<" + label + ">").c_str(), BM_attention_kvq<Policy>)
      ->Apply(attention_args);
  if (append_too) {
    benchmark::RegisterBenchmark(("BM_append_kvq<" + label + ">").c_str(), BM_append_kvq<Policy>)
        ->ArgNames({"tokens"})
        ->Arg(g_tokens.front())
        ->Iterations(3)
        ->Unit(benchmark::kMillisecond);
  }
}

// Registered at run time so that --kvq_smoke can shrink the shapes first.
void register_all() {
  benchmark::RegisterBenchmark("BM_attention_fp32_eigen_gemv", BM_attention_fp32_eigen_gemv)->Apply(baseline_args);
  benchmark::RegisterBenchmark("BM_attention_fp32_eigen_gemm", BM_attention_fp32_eigen_gemm)->Apply(baseline_args);
  register_policy<Fp16>("fp16", true);
  register_policy<Kivi2>(Kivi2::name(), true);
  register_policy<Kivi4>(Kivi4::name(), false);
  register_policy<SkvqK2V15>(SkvqK2V15::name(), true);
  register_policy<PerToken2>(PerToken2::name(), true);
  register_policy<Cskv>(Cskv::name(), true);
}

}  // namespace

int main(int argc, char** argv) {
  // --kvq_smoke: 256 tokens only, for the CI smoke run.
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--kvq_smoke") == 0) {
      g_tokens = {256};
      for (int j = i; j + 1 < argc; ++j) argv[j] = argv[j + 1];
      --argc;
      break;
    }
  }
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  RecordingReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.print_speedups();
  benchmark::Shutdown();
  return 0;
}
