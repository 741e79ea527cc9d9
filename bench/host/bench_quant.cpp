// SPDX-License-Identifier: Apache-2.0
// Throughput of quantize+pack and unpack+dequantize over a [tokens, channels] fp32 matrix, as
// bytes/s of fp32 data, and as a fraction of this machine's memory read bandwidth measured by
// BM_memory_read in the same run.
//
//   kvq_bench_quant [--benchmark_filter=...] [--kvq_smoke]
//
// bits: 1 = ternary (1.5), 2, 4; axis: 0 = groups along tokens (per-channel, KIVI keys),
// 1 = groups along channels (per-token).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kvq/core/random.hpp"
#include "kvq/quant/matrix.hpp"

namespace {

kvq::index_t g_tokens = 4096;
kvq::index_t g_channels = 1024;
double g_read_bandwidth = 0;  // bytes/s, measured in main

const std::vector<float>& input() {
  static const std::vector<float> x = [] {
    kvq::Rng rng(1);
    std::vector<float> v(static_cast<std::size_t>(g_tokens * g_channels));
    for (auto& e : v) e = rng.normal();
    return v;
  }();
  return x;
}

// Reads every word of x once (an integer sum, which the compiler vectorizes): the speed limit
// for any pass that streams this data.
std::uint32_t stream_read(const std::vector<float>& x) {
  const auto* words = reinterpret_cast<const std::uint32_t*>(x.data());
  std::uint32_t sum = 0;
  for (std::size_t i = 0; i < x.size(); ++i) sum += words[i];
  return sum;
}

// Best of 20 passes over the benchmarks' own input, so that the limit and the benchmarks see
// the same working set (here 16 MiB, which may sit in a large last-level cache).
double measure_read_bandwidth() {
  double best = 0;
  for (int rep = 0; rep < 20; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    std::uint32_t sum = stream_read(input());
    benchmark::DoNotOptimize(sum);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(input().size() * sizeof(float)) / s);
  }
  return best;
}

kvq::MatrixQuantSpec spec_of(const benchmark::State& state) {
  kvq::MatrixQuantSpec spec;
  const auto bits = state.range(0);
  spec.bits = bits == 1 ? kvq::Bits::kTernary : static_cast<kvq::Bits>(bits);
  spec.group_size = state.range(1);
  spec.axis = state.range(2) == 0 ? kvq::GroupAxis::kTokens : kvq::GroupAxis::kChannels;
  return spec;
}

void report(benchmark::State& state, const kvq::MatrixQuantSpec& spec, const kvq::MatrixLayout& layout) {
  const double bytes = static_cast<double>(input().size() * sizeof(float));
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  state.counters["of_read_bw"] = benchmark::Counter(bytes * static_cast<double>(state.iterations()) / g_read_bandwidth,
                                                    benchmark::Counter::kIsRate);
  state.counters["bits_per_elem"] = layout.bits_per_element();
  state.SetLabel(kvq::bits_label(spec.bits) + "-bit " +
                 (spec.axis == kvq::GroupAxis::kTokens ? "per-channel" : "per-token") + " g" +
                 std::to_string(spec.group_size));
}

struct Quantized {
  kvq::MatrixLayout layout;
  std::vector<std::uint8_t> codes, scales, zeros;
  std::vector<kvq::GroupParams<kvq::Float16>> params;  // for the per-group primitive
  explicit Quantized(const kvq::MatrixQuantSpec& spec)
      : layout(kvq::plan_matrix(g_tokens, g_channels, spec)),
        codes(layout.code_bytes),
        scales(layout.meta_bytes),
        zeros(layout.meta_bytes),
        params(static_cast<std::size_t>(layout.lines * layout.groups_per_line)) {}
  kvq::QuantizedMatrixRef ref() {
    return {{codes.data(), codes.size()}, {scales.data(), scales.size()}, {zeros.data(), zeros.size()}};
  }
};

// The full host API: validation pass (finite values, metadata range) + quantize + pack.
void BM_quant_quantize_matrix(benchmark::State& state) {
  const auto spec = spec_of(state);
  Quantized q(spec);
  const kvq::StridedView<const float, 2> x(input().data(), {g_tokens, g_channels});
  for (auto _ : state) {
    kvq::quantize_matrix(x, spec, q.ref());
    benchmark::ClobberMemory();
  }
  report(state, spec, q.layout);
}

// The per-group primitive a cache calls on append: quantize_group over every group (one
// min/max pass and one quantize pass per group, no separate validation pass, parameters kept
// as GroupParams instead of the matrix's byte arrays).
template <kvq::Bits B>
void quantize_groups(const kvq::MatrixQuantSpec& spec, Quantized& q) {
  // The same group order and loaders as quantize_matrix's second pass.
  const kvq::StridedView<const float, 2> x(input().data(), {g_tokens, g_channels});
  kvq::detail::for_each_group(q.layout, spec, [&](kvq::index_t line, kvq::index_t g, kvq::detail::GroupSpan span) {
    kvq::detail::with_group_loader<float>(x, spec, line, span, [&](const auto& load) {
      kvq::quantize_group<B>(load, span.length, spec.clip,
                             q.codes.data() + static_cast<std::size_t>(line) * q.layout.line_bytes,
                             static_cast<std::size_t>(span.start),
                             &q.params[static_cast<std::size_t>(line * q.layout.groups_per_line + g)]);
    });
  });
}

void BM_quant_quantize_groups(benchmark::State& state) {
  const auto spec = spec_of(state);
  Quantized q(spec);
  for (auto _ : state) {
    kvq::dispatch_bits(spec.bits, [&](auto b) { quantize_groups<decltype(b)::value>(spec, q); });
    benchmark::ClobberMemory();
  }
  report(state, spec, q.layout);
}

// Unpack + dequantize the whole matrix back to fp32.
void BM_quant_dequantize_matrix(benchmark::State& state) {
  const auto spec = spec_of(state);
  Quantized q(spec);
  kvq::quantize_matrix(kvq::StridedView<const float, 2>(input().data(), {g_tokens, g_channels}), spec, q.ref());
  std::vector<float> y(input().size());
  const kvq::ConstQuantizedMatrixRef in{{q.codes.data(), q.codes.size()},
                                        {q.scales.data(), q.scales.size()},
                                        {q.zeros.data(), q.zeros.size()}};
  for (auto _ : state) {
    kvq::dequantize_matrix(in, spec, kvq::StridedView<float, 2>(y.data(), {g_tokens, g_channels}));
    benchmark::ClobberMemory();
  }
  report(state, spec, q.layout);
}

// The machine's limit for streaming fp32 data, for reference in the same run.
void BM_memory_read(benchmark::State& state) {
  const auto& x = input();
  for (auto _ : state) {
    std::uint32_t sum = stream_read(x);
    benchmark::DoNotOptimize(sum);
  }
  const double bytes = static_cast<double>(x.size() * sizeof(float));
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  state.counters["of_read_bw"] = benchmark::Counter(bytes * static_cast<double>(state.iterations()) / g_read_bandwidth,
                                                    benchmark::Counter::kIsRate);
}

void quant_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"bits", "group", "axis"})
      ->ArgsProduct({{1, 2, 4}, {32, 64, 128}, {0, 1}})
      ->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_memory_read)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_quant_quantize_matrix)->Apply(quant_args);
BENCHMARK(BM_quant_quantize_groups)->Apply(quant_args);
BENCHMARK(BM_quant_dequantize_matrix)->Apply(quant_args);

}  // namespace

int main(int argc, char** argv) {
  // --kvq_smoke: a small matrix and no bandwidth probe, for the CI smoke run.
  bool smoke = false;
  int kept = 0;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--kvq_smoke") == 0) {
      smoke = true;
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  if (smoke) {
    g_tokens = 256;
    g_channels = 128;
  }
  g_read_bandwidth = smoke ? 1e10 : measure_read_bandwidth();
  benchmark::AddCustomContext("kvq_build_type", KVQ_BUILD_TYPE);
  benchmark::AddCustomContext("kvq_read_bandwidth_GBps", std::to_string(g_read_bandwidth / 1e9));
  benchmark::AddCustomContext("kvq_matrix", std::to_string(g_tokens) + " tokens x " + std::to_string(g_channels) + " channels fp32");
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
