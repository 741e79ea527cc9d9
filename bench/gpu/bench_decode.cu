// SPDX-License-Identifier: Apache-2.0
// kvq's GPU decode attention on the shapes of issue #10's targets, on synthetic device caches
// (random codes, valid fp16 metadata, an fp16 window of 128 tokens, block ids scattered over the
// pool as a paged cache has them). Prints one line per case and writes JSON for
// bench/gpu/report.py, which joins it with sdpa_baseline.py's JSON into the results table.
//
//   kvq_bench_decode [--json FILE] [--quick] [--only SUBSTRING] [--splits N]
// (--only append: the append steps alone; --splits: every case with N pieces of blocks instead of
// decode_splits_for's choice)
//
// Timing: CUDA events around each launch, the L2 flushed before each (a 512 MiB memset), median
// of 30; cases marked graph replay one captured launch 500 times back to back (warm L2, as
// triton's do_bench_cudagraph does on the PyTorch side) and report the mean. Bytes are what the
// kernel reads of the cache: every staged block part plus the window rows.
//
// Append per decode step (issue #10's last target): a DeviceKVCache of one layer is prefilled
// through its own append kernels (chunks of 512 tokens), then 256 decode steps append one token
// to every sequence: the host plan (plan_append, wall clock), the plan's copy (upload_plan) and
// the layer's append kernel (CUDA events), mean and maximum over the steps (a key flush every
// 128 steps). An engine uploads the plan once per step and appends once per layer, so the
// per-layer cost to set against one layer's attention is the append kernel. Its events are
// recorded behind a 40 us spin kernel, so that the host's launch latency (a few us) lies under the
// spin rather than between the events, as it lies under the previous kernels of an engine's step
// and under the L2 flush before each attention launch here; a second series of as many steps times
// the same launches on an idle GPU (the launch latency included) for comparison.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <chrono>

#include "kvq/cuda/decode_attention.cuh"
#include "kvq/cuda/device_cache.cuh"
#include "kvq/kvq.hpp"
#include "gpu_bench.cuh"

namespace {

/// Fills blocks: random code bytes, scales in [0.01, 0.05], zero-points in [-0.5, 0] (quantized
/// layouts), or fp16 numbers in [-1, 1] (exact blocks, window rows).
__global__ void fill_kernel(std::uint8_t* pool, std::uint64_t bytes, std::uint64_t block_bytes, std::uint64_t scales,
                            std::uint64_t zeros, std::uint64_t used, bool quantized, std::uint64_t seed) {
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x * 2;
  for (std::uint64_t i = (static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 2; i < bytes; i += stride) {
    const std::uint64_t at = i % block_bytes;
    const std::uint32_t h = hash32(seed * 0x9E3779B97F4A7C15ULL + i);
    const float u = static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
    __half value;
    if (!quantized) {
      value = __float2half_rn(2.0f * u - 1.0f);
    } else if (at < scales || at >= used) {
      pool[i] = static_cast<std::uint8_t>(h);
      pool[i + 1] = static_cast<std::uint8_t>(h >> 8);
      continue;
    } else if (at < zeros) {
      value = __float2half_rn(0.01f + 0.04f * u);
    } else {
      value = __float2half_rn(-0.5f * u);
    }
    std::memcpy(pool + i, &value, 2);
  }
}

struct Case {
  std::string name;      // kvq case
  std::string baseline;  // sdpa_baseline.py case of the same shape
  std::string policy;
  int batch, hq, hkv, dim, tokens;
  bool graph;
};

struct Result {
  Case c;
  double us = 0;
  double bytes = 0;
  int splits = 0;
};

template <class Policy>
Result run_case(const Case& c, int splits, void* flush, std::size_t flush_bytes) {
  using Cache = kvq::QuantizedKVCache<Policy>;
  kvq::CacheConfig cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = c.hkv;
  cfg.head_dim = c.dim;
  cfg.num_blocks = 1;
  const Cache shape(cfg);  // the block layouts of this config (a one-block cache)
  const kvq::StreamLayout& kl = shape.key_layout();
  const kvq::StreamLayout& vl = shape.value_layout();
  const int bt = Cache::block_tokens;
  const bool kivi = kl.quantized;
  const int window = kivi ? 128 : 0;
  const int stored = c.tokens - window;  // tokens in blocks, both streams
  const int per_seq = (stored + bt - 1) / bt;
  const std::int64_t blocks = static_cast<std::int64_t>(per_seq) * c.batch;

  std::uint8_t *kpool, *vpool, *exact;
  KVQ_CHECK(cudaMalloc(&kpool, static_cast<std::size_t>(blocks) * kl.block_bytes));
  KVQ_CHECK(cudaMalloc(&vpool, static_cast<std::size_t>(blocks) * vl.block_bytes));
  const std::size_t row = static_cast<std::size_t>(c.hkv) * c.dim * 2;
  const int kring = Policy::KeyWindow::window_capacity, vring = Policy::ValueWindow::window_capacity;
  const std::size_t exact_stride = row * static_cast<std::size_t>(kring + vring);
  KVQ_CHECK(cudaMalloc(&exact, std::max<std::size_t>(1, exact_stride * c.batch)));
  fill_kernel<<<1024, 256>>>(kpool, blocks * kl.block_bytes, kl.block_bytes, kl.block.scales_offset, kl.block.zeros_offset,
                             kl.block.used_bytes(), kivi, 1);
  fill_kernel<<<1024, 256>>>(vpool, blocks * vl.block_bytes, vl.block_bytes, vl.block.scales_offset, vl.block.zeros_offset,
                             vl.block.used_bytes(), kivi, 2);
  if (exact_stride) fill_kernel<<<256, 256>>>(exact, exact_stride * c.batch, exact_stride, 0, 0, 0, false, 3);
  KVQ_CHECK(cudaGetLastError());

  // Block ids scattered over the pool (a stride coprime with the pool size).
  std::vector<std::int32_t> table(static_cast<std::size_t>(blocks));
  std::int64_t step = 7919;
  while (std::__gcd<std::int64_t>(step, blocks) != 1) ++step;
  for (std::int64_t i = 0; i < blocks; ++i) table[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((i * step) % blocks);
  std::vector<std::int32_t> lengths(c.batch, c.tokens), quantized(c.batch, stored);
  std::int32_t *dtable, *dlen, *dq;
  KVQ_CHECK(cudaMalloc(&dtable, table.size() * 4));
  KVQ_CHECK(cudaMalloc(&dlen, c.batch * 4));
  KVQ_CHECK(cudaMalloc(&dq, c.batch * 4));
  KVQ_CHECK(cudaMemcpy(dtable, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  KVQ_CHECK(cudaMemcpy(dlen, lengths.data(), c.batch * 4, cudaMemcpyHostToDevice));
  KVQ_CHECK(cudaMemcpy(dq, quantized.data(), c.batch * 4, cudaMemcpyHostToDevice));

  kvq::PagedKVParams kv;
  auto stream = [&](kvq::PagedStream& s, const kvq::StreamLayout& l, std::uint8_t* pool, std::size_t ring_offset, int ring) {
    s.pool = pool;
    s.block_bytes = l.block_bytes;
    s.block = l.block;
    s.quantized = l.quantized;
    s.block_tokens = bt;
    s.width = static_cast<std::int32_t>(l.width);
    s.block_table = dtable;
    s.max_blocks = per_seq;
    s.quantized_tokens = dq;
    s.exact = exact;
    s.exact_stride = exact_stride;
    s.ring_offset = ring_offset;
    s.ring_capacity = std::max(ring, 1);
  };
  stream(kv.keys, kl, kpool, 0, kring);
  stream(kv.values, vl, vpool, row * static_cast<std::size_t>(kring), vring);
  kv.lengths = dlen;
  kv.num_kv_heads = c.hkv;
  kv.head_dim = c.dim;
  kv.exact_bytes = 2;

  using TQ = typename kvq::cuda::detail::DecodeKernelOf<Policy>::exact;
  const std::size_t qn = static_cast<std::size_t>(c.batch) * c.hq * c.dim;
  void *q, *out;
  KVQ_CHECK(cudaMalloc(&q, qn * 2));
  KVQ_CHECK(cudaMalloc(&out, qn * 2));
  fill_kernel<<<64, 256>>>(static_cast<std::uint8_t*>(q), qn * 2, qn * 2, 0, 0, 0, false, 4);

  kvq::cuda::DecodeAttentionArgs a;
  a.kv = kv;
  a.q = q;
  a.out = out;
  a.batch = c.batch;
  a.num_q_heads = c.hq;
  a.num_splits = splits > 0 ? splits : kvq::cuda::decode_splits_for<Policy, TQ>(c.batch, c.hkv, c.dim, per_seq);
  a.workspace_bytes = kvq::cuda::decode_workspace_bytes<Policy>(c.batch, c.hq, c.hkv, c.dim, a.num_splits);
  KVQ_CHECK(cudaMalloc(&a.workspace, a.workspace_bytes));
  KVQ_CHECK(cudaMemset(a.workspace, 0, a.workspace_bytes));
  const std::string why = kvq::cuda::decode_check<Policy, TQ>(a);
  if (!why.empty()) {
    std::fprintf(stderr, "%s: %s\n", c.name.c_str(), why.c_str());
    std::exit(1);
  }

  cudaStream_t s;
  KVQ_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t e0, e1;
  KVQ_CHECK(cudaEventCreate(&e0));
  KVQ_CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) {
    if (kvq::cuda::decode_attention<Policy, TQ>(a, s) != kvq::Status::kOk) std::exit(1);
  }
  KVQ_CHECK(cudaStreamSynchronize(s));
  Result r;
  r.c = c;
  r.splits = a.num_splits;
  if (c.graph) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    KVQ_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    if (kvq::cuda::decode_attention<Policy, TQ>(a, s) != kvq::Status::kOk) std::exit(1);
    KVQ_CHECK(cudaStreamEndCapture(s, &graph));
    KVQ_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int i = 0; i < 20; ++i) KVQ_CHECK(cudaGraphLaunch(exec, s));
    constexpr int reps = 500;
    KVQ_CHECK(cudaEventRecord(e0, s));
    for (int i = 0; i < reps; ++i) KVQ_CHECK(cudaGraphLaunch(exec, s));
    KVQ_CHECK(cudaEventRecord(e1, s));
    KVQ_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    KVQ_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    r.us = 1e3 * ms / reps;
    KVQ_CHECK(cudaGraphExecDestroy(exec));
    KVQ_CHECK(cudaGraphDestroy(graph));
  } else {
    std::vector<float> times;
    for (int i = 0; i < 30; ++i) {
      KVQ_CHECK(cudaMemsetAsync(flush, i, flush_bytes, s));
      KVQ_CHECK(cudaEventRecord(e0, s));
      if (kvq::cuda::decode_attention<Policy, TQ>(a, s) != kvq::Status::kOk) std::exit(1);
      KVQ_CHECK(cudaEventRecord(e1, s));
      KVQ_CHECK(cudaEventSynchronize(e1));
      float ms = 0;
      KVQ_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      times.push_back(ms);
    }
    std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
    r.us = 1e3 * times[times.size() / 2];
  }
  KVQ_CHECK(cudaGetLastError());
  // Bytes read: each kv head's part of every block it streams, the window rows, q and out.
  double per_block;
  if (kivi) {
    per_block = static_cast<double>(kl.block.used_bytes() + vl.block.used_bytes()) / c.hkv;
  } else {
    per_block = 2.0 * bt * c.dim * 2;
  }
  r.bytes = static_cast<double>(c.batch) * c.hkv * (per_seq * per_block + 2.0 * window * c.dim * 2) + 2.0 * qn * 2;
  cudaFree(kpool);
  cudaFree(vpool);
  cudaFree(exact);
  cudaFree(dtable);
  cudaFree(dlen);
  cudaFree(dq);
  cudaFree(q);
  cudaFree(out);
  cudaFree(a.workspace);
  cudaStreamDestroy(s);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return r;
}

struct AppendResult {
  std::string name, policy, attention_case;
  int batch = 0, hkv = 0, dim = 0, tokens = 0, steps = 0;
  double plan_us = 0, upload_us = 0, append_us = 0, append_max_us = 0, idle_append_us = 0;
};

/// Keeps the GPU busy for `ns` nanoseconds (one thread), so that the launches queued behind it
/// are timed without the host's launch latency.
__global__ void spin_kernel(std::uint64_t ns) {
  std::uint64_t t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}

template <class Policy>
AppendResult run_append(const std::string& name, const std::string& policy, const std::string& attention_case, int batch,
                        int hkv, int dim, int tokens) {
  using Exact = typename Policy::exact_type;
  constexpr int chunk = 512, steps = 256;
  kvq::CacheConfig cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = hkv;
  cfg.head_dim = dim;
  cfg.num_blocks = kvq::QuantizedKVCache<Policy>::blocks_for_tokens(1, (tokens + 2 * steps) * batch, batch);
  kvq::cuda::DeviceCacheLimits limits;
  limits.max_slots = batch;
  limits.max_tokens = tokens + 2 * steps;
  limits.max_batch = batch;
  limits.max_append_tokens = chunk;
  kvq::cuda::DeviceKVCache<Policy> cache(cfg, limits);
  std::vector<kvq::SequenceId> slots;
  for (int b = 0; b < batch; ++b) slots.push_back(cache.add_sequence());
  const std::size_t rows = static_cast<std::size_t>(batch) * chunk * hkv * dim;
  std::uint8_t *k, *v;
  KVQ_CHECK(cudaMalloc(&k, rows * sizeof(Exact)));
  KVQ_CHECK(cudaMalloc(&v, rows * sizeof(Exact)));
  fill_kernel<<<1024, 256>>>(k, rows * sizeof(Exact), rows * sizeof(Exact), 0, 0, 0, false, 11);
  fill_kernel<<<1024, 256>>>(v, rows * sizeof(Exact), rows * sizeof(Exact), 0, 0, 0, false, 12);
  KVQ_CHECK(cudaGetLastError());
  cudaStream_t s;
  KVQ_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  auto step = [&](int n) {
    cache.plan_append(slots.data(), batch, n);
    if (cache.upload_plan(s) != kvq::Status::kOk) std::exit(1);
    if (cache.append(0, reinterpret_cast<const Exact*>(k), reinterpret_cast<const Exact*>(v), s) != kvq::Status::kOk) {
      std::exit(1);
    }
  };
  for (int done = 0; done < tokens; done += chunk) step(std::min(chunk, tokens - done));
  KVQ_CHECK(cudaStreamSynchronize(s));
  cache.check_status();

  cudaEvent_t e0, e1, e2;
  KVQ_CHECK(cudaEventCreate(&e0));
  KVQ_CHECK(cudaEventCreate(&e1));
  KVQ_CHECK(cudaEventCreate(&e2));
  AppendResult r;
  r.name = name;
  r.policy = policy;
  r.attention_case = attention_case;
  r.batch = batch;
  r.hkv = hkv;
  r.dim = dim;
  r.tokens = tokens;
  r.steps = steps;
  for (int i = 0; i < 2 * steps; ++i) {
    const bool idle = i >= steps;  // the second series: no spin ahead of the events
    const auto t0 = std::chrono::steady_clock::now();
    cache.plan_append(slots.data(), batch, 1);
    const auto t1 = std::chrono::steady_clock::now();
    if (!idle) spin_kernel<<<1, 1, 0, s>>>(40000);
    KVQ_CHECK(cudaEventRecord(e0, s));
    if (cache.upload_plan(s) != kvq::Status::kOk) std::exit(1);
    KVQ_CHECK(cudaEventRecord(e1, s));
    if (cache.append(0, reinterpret_cast<const Exact*>(k), reinterpret_cast<const Exact*>(v), s) != kvq::Status::kOk) {
      std::exit(1);
    }
    KVQ_CHECK(cudaEventRecord(e2, s));
    KVQ_CHECK(cudaEventSynchronize(e2));
    float up = 0, ap = 0;
    KVQ_CHECK(cudaEventElapsedTime(&up, e0, e1));
    KVQ_CHECK(cudaEventElapsedTime(&ap, e1, e2));
    if (idle) {
      r.idle_append_us += 1e3 * ap / steps;
      continue;
    }
    r.plan_us += std::chrono::duration<double, std::micro>(t1 - t0).count() / steps;
    r.upload_us += 1e3 * up / steps;
    r.append_us += 1e3 * ap / steps;
    r.append_max_us = std::max(r.append_max_us, 1e3 * static_cast<double>(ap));
  }
  cache.check_status();
  cudaFree(k);
  cudaFree(v);
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaEventDestroy(e2);
  cudaStreamDestroy(s);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const char* json = nullptr;
  bool quick = false;
  std::string only;
  int splits = 0;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--json") && i + 1 < argc) {
      json = argv[++i];
    } else if (!std::strcmp(argv[i], "--quick")) {
      quick = true;
    } else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) {
      only = argv[++i];
    } else if (!std::strcmp(argv[i], "--splits") && i + 1 < argc) {
      splits = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--json FILE] [--quick] [--only SUBSTRING] [--splits N]\n", argv[0]);
      return 2;
    }
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  cudaDeviceProp props{};
  KVQ_CHECK(cudaGetDeviceProperties(&props, 0));
  const std::size_t flush_bytes = 512u << 20;
  void *flush, *flush2;
  KVQ_CHECK(cudaMalloc(&flush, flush_bytes));
  KVQ_CHECK(cudaMalloc(&flush2, flush_bytes));
  const double copy = copy_bandwidth(flush, flush2, flush_bytes);
  cudaFree(flush2);

  using Kivi2g128 = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 128, 128>;
  using Kivi2g32 = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 128>;
  using Kivi4g128 = kvq::KiviPolicy<kvq::Bits::k4, kvq::Bits::k4, 128, 128>;
  using Fp16 = kvq::Fp16Policy<kvq::Float16>;
  using Bf16 = kvq::Fp16Policy<kvq::BFloat16>;
  const std::vector<Case> cases = {
      {"kivi2-g128/b1-128k", "llama8b-b1-128k", "kivi2g128", 1, 32, 8, 128, 131072, false},
      {"kivi2-g128/b1-1m", "llama8b-b1-1m", "kivi2g128", 1, 32, 8, 128, 1048576, false},
      {"kivi2-g32/b1-128k", "llama8b-b1-128k", "kivi2g32", 1, 32, 8, 128, 131072, false},
      {"kivi2-g128/b8-32k", "llama8b-b8-32k", "kivi2g128", 8, 32, 8, 128, 32768, false},
      {"kivi2-g128/mha-b1-64k", "mha-b1-64k", "kivi2g128", 1, 32, 32, 128, 65536, false},
      {"kivi4-g128/b1-128k", "llama8b-b1-128k", "kivi4g128", 1, 32, 8, 128, 131072, false},
      {"kivi2-g128/b1-4k-graph", "llama8b-b1-4k-graph", "kivi2g128", 1, 32, 8, 128, 4096, true},
      {"kivi2-g32/smollm2-b64-2k", "smollm2-b64-2k", "kivi2g32", 64, 9, 3, 64, 2048, false},
      {"kivi2-g32/smollm2-b64-2k-graph", "smollm2-b64-2k-graph", "kivi2g32", 64, 9, 3, 64, 2048, true},
      {"fp16/b1-128k", "llama8b-b1-128k", "fp16", 1, 32, 8, 128, 131072, false},
      {"bf16/b1-128k", "llama8b-b1-128k-bf16", "bf16", 1, 32, 8, 128, 131072, false},
      {"fp16/b8-32k", "llama8b-b8-32k", "fp16", 8, 32, 8, 128, 32768, false},
  };
  std::printf("%s, %d SMs; copy bandwidth (read + write) %.2f TB/s\n", props.name, props.multiProcessorCount, copy / 1e12);
  std::printf("%-34s %7s %9s %9s %8s %7s\n", "case", "splits", "kvq us", "MB read", "TB/s", "% copy");
  std::vector<Result> results;
  for (Case c : cases) {
    if (!only.empty() && c.name.find(only) == std::string::npos) continue;
    if (quick) c.tokens = std::min(c.tokens, 8192);
    Result r;
    if (c.policy == "kivi2g128") r = run_case<Kivi2g128>(c, splits, flush, flush_bytes);
    if (c.policy == "kivi2g32") r = run_case<Kivi2g32>(c, splits, flush, flush_bytes);
    if (c.policy == "kivi4g128") r = run_case<Kivi4g128>(c, splits, flush, flush_bytes);
    if (c.policy == "fp16") r = run_case<Fp16>(c, splits, flush, flush_bytes);
    if (c.policy == "bf16") r = run_case<Bf16>(c, splits, flush, flush_bytes);
    const double tbs = r.bytes / (r.us * 1e-6) / 1e12;
    std::printf("%-34s %7d %9.1f %9.1f %8.2f %6.0f%%\n", c.name.c_str(), r.splits, r.us, r.bytes / 1e6, tbs,
                100.0 * tbs * 1e12 / copy);
    std::fflush(stdout);
    results.push_back(r);
  }
  std::vector<AppendResult> appends;
  if (only.empty() || only.find("append") != std::string::npos) {
    const int tokens = quick ? 8192 : 32768;
    appends.push_back(run_append<Kivi2g128>("append/kivi2-g128/b8-32k", "kivi2g128", "kivi2-g128/b8-32k", 8, 8, 128, tokens));
    appends.push_back(run_append<Fp16>("append/fp16/b8-32k", "fp16", "fp16/b8-32k", 8, 8, 128, tokens));
    std::printf("\n%-28s %6s %10s %10s %10s %10s %10s\n", "append per decode step", "steps", "plan us", "upload us",
                "append us", "max us", "idle us");
    for (const AppendResult& a : appends) {
      std::printf("%-28s %6d %10.2f %10.2f %10.2f %10.2f %10.2f\n", a.name.c_str(), a.steps, a.plan_us, a.upload_us,
                  a.append_us, a.append_max_us, a.idle_append_us);
    }
  }
  if (json) {
    FILE* f = std::fopen(json, "w");
    if (!f) return 1;
    std::fprintf(f, "{\"device\": \"%s\", \"sms\": %d, \"copy_bytes_per_second\": %.6g, \"cases\": [\n", props.name,
                 props.multiProcessorCount, copy);
    for (std::size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      std::fprintf(f,
                   " {\"name\": \"%s\", \"baseline\": \"%s\", \"policy\": \"%s\", \"batch\": %d, \"hq\": %d, \"hkv\": %d, "
                   "\"dim\": %d, \"tokens\": %d, \"graph\": %s, \"splits\": %d, \"us\": %.4f, \"bytes\": %.0f}%s\n",
                   r.c.name.c_str(), r.c.baseline.c_str(), r.c.policy.c_str(), r.c.batch, r.c.hq, r.c.hkv, r.c.dim,
                   r.c.tokens, r.c.graph ? "true" : "false", r.splits, r.us, r.bytes, i + 1 < results.size() ? "," : "");
    }
    std::fprintf(f, "], \"append\": [\n");
    for (std::size_t i = 0; i < appends.size(); ++i) {
      const AppendResult& a = appends[i];
      std::fprintf(f,
                   " {\"name\": \"%s\", \"policy\": \"%s\", \"attention_case\": \"%s\", \"batch\": %d, \"hkv\": %d, "
                   "\"dim\": %d, \"tokens\": %d, \"steps\": %d, \"plan_us\": %.4f, \"upload_us\": %.4f, "
                   "\"append_us\": %.4f, \"append_max_us\": %.4f, \"idle_append_us\": %.4f}%s\n",
                   a.name.c_str(), a.policy.c_str(), a.attention_case.c_str(), a.batch, a.hkv, a.dim, a.tokens, a.steps,
                   a.plan_us, a.upload_us, a.append_us, a.append_max_us, a.idle_append_us, i + 1 < appends.size() ? "," : "");
    }
    std::fprintf(f, "]}\n");
    std::fclose(f);
  }
  cudaFree(flush);
  return 0;
}
