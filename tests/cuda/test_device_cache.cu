// SPDX-License-Identifier: Apache-2.0
// kvq::cuda::DeviceKVCache against QuantizedKVCache: random fp16 / bf16 K/V for a ragged batch
// (prefill chunks of varying sizes, decode steps across several flushes, a freed slot reused),
// and after every step the device's key/value blocks of every (slot, layer), its exact rows,
// block tables and counts are byte-identical to the CPU cache fed the same tokens
// (kvq_test::compare_with_cpu). Also: decode steps replayed from a CUDA graph, upload() of a CPU
// cache (with a fork), download() into a host cache (byte-identical to the CPU cache, same CPU
// attention; round trip upload -> download; a config mismatch leaves the host cache unchanged),
// out of capacity (cache unchanged), non-finite input (check_status), and paged(). The same planner
// and kernel body run on the host in tests/cache/test_device_append_host.cpp (download too).
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kvq/cuda/device_cache.cuh"
#include "kvq/kvq.hpp"
#include "device_cache_testing.hpp"
#include "kvq_catch.hpp"
#include "require_error.hpp"
#include "seeds.hpp"

namespace {

using kvq::Bits;
using kvq::index_t;

void require_cuda(cudaError_t err) {
  INFO(cudaGetErrorString(err));
  REQUIRE(err == cudaSuccess);
}

/// A DeviceKVCache driven like an engine: inputs copied into fixed device buffers, plan_append,
/// upload_plan and one append per layer on a non-blocking stream; decode steps (n == 1) replayed
/// from a CUDA graph captured at the first one when `graph` is set.
template <class P>
struct GpuDevice {
  using E = typename P::exact_type;
  kvq::cuda::DeviceKVCache<P> cache;
  cudaStream_t stream = nullptr;
  E* k = nullptr;
  E* v = nullptr;
  bool graph = false;
  cudaGraphExec_t exec = nullptr;
  index_t graph_batch = 0;
  int replays = 0;

  GpuDevice(const kvq::CacheConfig& cfg, const kvq::cuda::DeviceCacheLimits& limits, bool use_graph = false)
      : cache(cfg, limits), graph(use_graph) {
    require_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    const std::size_t numbers = static_cast<std::size_t>(cfg.num_layers * cache.limits().max_batch *
                                                         cache.limits().max_append_tokens * cfg.num_kv_heads * cfg.head_dim);
    require_cuda(cudaMalloc(&k, numbers * sizeof(E)));
    require_cuda(cudaMalloc(&v, numbers * sizeof(E)));
  }
  GpuDevice(const GpuDevice&) = delete;
  GpuDevice& operator=(const GpuDevice&) = delete;
  ~GpuDevice() {
    if (exec != nullptr) cudaGraphExecDestroy(exec);
    cudaFree(k);
    cudaFree(v);
    cudaStreamDestroy(stream);
  }

  const kvq::cuda::AppendPlanner<P>& planner() const { return cache.planner(); }
  kvq::SequenceId add_sequence() { return cache.add_sequence(); }
  void free(kvq::SequenceId s) { cache.free(s); }
  kvq::cuda::DeviceCacheContents contents() const { return cache.contents(); }
  void upload(const kvq::QuantizedKVCache<P>& cpu) { cache.upload(cpu); }
  void download(kvq::QuantizedKVCache<P>& host) const { cache.download(host); }

  void launch_step(index_t batch, index_t n) {
    REQUIRE(cache.upload_plan(stream) == kvq::Status::kOk);
    const std::size_t layer = static_cast<std::size_t>(batch * n * cache.planner().width());
    for (index_t l = 0; l < cache.config().num_layers; ++l) {
      REQUIRE(cache.append(l, k + static_cast<std::size_t>(l) * layer, v + static_cast<std::size_t>(l) * layer, stream) ==
              kvq::Status::kOk);
    }
  }

  void append(const std::vector<kvq::SequenceId>& slots, index_t n, const std::vector<E>& hk, const std::vector<E>& hv) {
    const auto batch = static_cast<index_t>(slots.size());
    cache.plan_append(slots.data(), batch, n);
    REQUIRE(cache.planned_batch() == batch);
    REQUIRE(cache.plan_bytes() == static_cast<std::size_t>(cache.planner().plan_words(batch, n)) * sizeof(std::int32_t));
    require_cuda(cudaMemcpyAsync(k, hk.data(), hk.size() * sizeof(E), cudaMemcpyHostToDevice, stream));
    require_cuda(cudaMemcpyAsync(v, hv.data(), hv.size() * sizeof(E), cudaMemcpyHostToDevice, stream));
    if (graph && n == 1 && (exec == nullptr || batch == graph_batch)) {
      if (exec == nullptr) {  // capture the step (the plan just written is what its first launch copies)
        cudaGraph_t g = nullptr;
        require_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        launch_step(batch, n);
        require_cuda(cudaStreamEndCapture(stream, &g));
        require_cuda(cudaGraphInstantiate(&exec, g, 0));
        require_cuda(cudaGraphDestroy(g));
        graph_batch = batch;
      }
      require_cuda(cudaGraphLaunch(exec, stream));
      ++replays;
    } else {
      launch_step(batch, n);
    }
    require_cuda(cudaStreamSynchronize(stream));  // the test's host buffers are reused next step
    cache.check_status();
  }
};

template <class P>
void run_lockstep(const char* name, bool graph, int decode) {
  const std::uint64_t seed = kvq_test::case_seed(name, 0);
  CAPTURE(seed, P::name(), graph);
  const kvq::CacheConfig cfg = kvq_test::device_test_config(2, kvq_test::device_test_blocks<P>(2));
  kvq::QuantizedKVCache<P> cpu(cfg);
  GpuDevice<P> dev(cfg, kvq_test::device_test_limits(), graph);
  const kvq::PagedKVParams before = dev.cache.paged(1);
  kvq_test::Lockstep<P, GpuDevice<P>> run(cpu, dev, seed);
  run.run(decode);
  REQUIRE(cpu.key_counts(3, 0).quantized >= 3 * P::block_tokens);  // > 2 blocks of keys were flushed
  if (graph) REQUIRE(dev.replays >= decode - 1);
  const kvq::PagedKVParams after = dev.cache.paged(1);
  for (const auto* pair : {&before.keys, &before.values}) {  // stable device pointers
    const kvq::PagedStream& x = *pair;
    const kvq::PagedStream& y = pair == &before.keys ? after.keys : after.values;
    REQUIRE(x.pool == y.pool);
    REQUIRE(x.block_table == y.block_table);
    REQUIRE(x.quantized_tokens == y.quantized_tokens);
    REQUIRE(x.exact == y.exact);
  }
  REQUIRE(before.lengths == after.lengths);
}

using Kivi2g32 = kvq::KiviPolicy<Bits::k2, Bits::k2, 32, 128>;
using Kivi2g128 = kvq::KiviPolicy<Bits::k2, Bits::k2, 128, 128>;
using Kivi4g128 = kvq::KiviPolicy<Bits::k4, Bits::k4, 128, 128>;
using Kivi2g64 = kvq::KiviPolicy<Bits::k2, Bits::k2, 64, 128>;
using Fp16 = kvq::Fp16Policy<kvq::Float16>;
using Bf16 = kvq::Fp16Policy<kvq::BFloat16>;

}  // namespace

TEST_CASE("device cache fp16: every step byte-identical to the CPU cache", "[cuda][device_cache]") {
  run_lockstep<Fp16>("device cache fp16", false, 160);
}
TEST_CASE("device cache bf16: every step byte-identical to the CPU cache", "[cuda][device_cache]") {
  run_lockstep<Bf16>("device cache bf16", false, 40);
}
TEST_CASE("device cache kivi k2 g32: every step byte-identical to the CPU cache", "[cuda][device_cache]") {
  run_lockstep<Kivi2g32>("device cache kivi2 g32", false, 160);
}
TEST_CASE("device cache kivi k2 g128 (groups across two heads): every step byte-identical", "[cuda][device_cache]") {
  run_lockstep<Kivi2g128>("device cache kivi2 g128", false, 160);
}
TEST_CASE("device cache kivi k4 g128: every step byte-identical to the CPU cache", "[cuda][device_cache]") {
  run_lockstep<Kivi4g128>("device cache kivi4 g128", false, 160);
}
TEST_CASE("device cache kivi k2 g64: every step byte-identical to the CPU cache", "[cuda][device_cache]") {
  run_lockstep<Kivi2g64>("device cache kivi2 g64", false, 160);
}
TEST_CASE("device cache: decode steps replayed from a CUDA graph stay byte-identical", "[cuda][device_cache][graph]") {
  run_lockstep<Kivi2g32>("device cache graph kivi", true, 160);
  run_lockstep<Fp16>("device cache graph fp16", true, 40);
}

TEST_CASE("device cache: upload() of a CPU cache reproduces its bytes, then appends continue", "[cuda][device_cache]") {
  using P = Kivi2g32;
  const std::uint64_t seed = kvq_test::case_seed("device cache upload", 0);
  CAPTURE(seed);
  const kvq::CacheConfig cfg = kvq_test::device_test_config(2, kvq_test::device_test_blocks<P>(2));
  kvq::QuantizedKVCache<P> cpu(cfg);
  kvq::Rng rng(seed);
  const auto [a, b, c, f] = kvq_test::fill_for_upload(cpu, rng);
  GpuDevice<P> dev(cfg, kvq_test::device_test_limits());
  dev.upload(cpu);
  kvq_test::Lockstep<P, GpuDevice<P>> run(cpu, dev, seed + 1);
  run.check();  // the upload alone
  const kvq::SequenceId d = run.add();
  REQUIRE(d == b);
  run.append({d, a, c, f}, 3);
  for (int t = 0; t < 140; ++t) run.append({c, d, a, f}, 1);
  run.free(a);  // f keeps the shared blocks
  for (int t = 0; t < 10; ++t) run.append({f, c}, 1);
}

namespace {

/// Lockstep appends (ragged prefill chunks, decode steps across flushes, a reused slot; decode
/// steps from a CUDA graph when `graph`), then download() into a fresh host cache and into one
/// that held other sequences: both equal the CPU cache byte for byte, with the same attention.
template <class P>
void run_download(const char* name, bool graph, int decode) {
  const std::uint64_t seed = kvq_test::case_seed(name, 0);
  CAPTURE(seed, P::name(), graph);
  const kvq::CacheConfig cfg = kvq_test::device_test_config(2, kvq_test::device_test_blocks<P>(2));
  kvq::QuantizedKVCache<P> cpu(cfg);
  GpuDevice<P> dev(cfg, kvq_test::device_test_limits(), graph);
  kvq_test::Lockstep<P, GpuDevice<P>> run(cpu, dev, seed);
  run.run(decode);
  REQUIRE(cpu.key_counts(3, 0).quantized >= 2 * P::block_tokens);  // blocks were flushed
  kvq::QuantizedKVCache<P> fresh(cfg);
  kvq_test::require_download_equals(dev, fresh, cpu, seed + 1);
  (void)run.add();  // live but empty: its device rows are stale until its first append; the host's are zero
  kvq::QuantizedKVCache<P> used(cfg);
  const kvq::SequenceId u = used.add_sequence();
  const auto bias = kvq_test::make_bias(run.rng, cpu.width());
  for (index_t l = 0; l < 2; ++l) {
    const auto k = kvq_test::random_exact_rows<typename P::exact_type>(run.rng, 200, bias);
    used.append(u, l, k.data(), k.data(), 200);
  }
  kvq_test::require_download_equals(dev, used, cpu, seed + 2);
}

}  // namespace

TEST_CASE("device cache: download() after ragged appends equals the CPU cache byte for byte", "[cuda][device_cache][download]") {
  run_download<Kivi2g32>("device download kivi2 g32", false, 60);
  run_download<Kivi4g128>("device download kivi4 g128", false, 60);
  run_download<Fp16>("device download fp16", false, 40);
  run_download<Bf16>("device download bf16", false, 20);
  run_download<Kivi2g128>("device download graph kivi2 g128", true, 60);
}

TEST_CASE("device cache: upload() then download() round-trips a CPU cache; a wrong config changes nothing",
          "[cuda][device_cache][download]") {
  using P = Kivi2g32;
  const std::uint64_t seed = kvq_test::case_seed("device roundtrip", 0);
  CAPTURE(seed);
  const kvq::CacheConfig cfg = kvq_test::device_test_config(2, kvq_test::device_test_blocks<P>(2));
  kvq::QuantizedKVCache<P> cpu(cfg);
  kvq::Rng rng(seed);
  const auto [a, b, c, f] = kvq_test::fill_for_upload(cpu, rng);
  GpuDevice<P> dev(cfg, kvq_test::device_test_limits());
  dev.upload(cpu);
  kvq::QuantizedKVCache<P> back(cfg);
  kvq_test::require_download_equals(dev, back, cpu, seed + 1);
  // Appends on the device after the upload, then a second download into the same host cache.
  kvq_test::Lockstep<P, GpuDevice<P>> run(cpu, dev, seed + 2);
  run.append({c, a, f}, 129);
  for (int t = 0; t < 20; ++t) run.append({f, c, a}, 1);
  kvq_test::require_download_equals(dev, back, cpu, seed + 3);

  kvq::CacheConfig other = cfg;
  other.head_dim = 128;
  other.num_kv_heads = 2;
  kvq::QuantizedKVCache<P> wrong(other);
  const kvq::SequenceId w = wrong.add_sequence();
  const std::vector<kvq::Float16> row(static_cast<std::size_t>(wrong.width()), kvq::Float16(0.25f));
  wrong.append(w, 0, row.data(), row.data(), 1);
  const std::size_t bytes = wrong.memory_bytes();
  kvq_test::require_error([&] { dev.cache.download(wrong); },
                          {"kvq::cuda::DeviceKVCache::download", "argument 'host' = 'a cache of 2 layers, 2 kv heads of 128",
                           "the device cache's config (2 layers, 4 kv heads of 64"});
  REQUIRE(wrong.is_live(w));
  REQUIRE(wrong.length(w, 0) == 1);
  REQUIRE(wrong.memory_bytes() == bytes);
}

TEST_CASE("device cache: out of capacity throws and leaves the cache unchanged", "[cuda][device_cache]") {
  using P = Kivi2g32;
  const std::uint64_t seed = kvq_test::case_seed("device cache capacity", 0);
  const kvq::CacheConfig cfg = kvq_test::device_test_config(2, 5);  // 5 blocks per pool
  kvq::QuantizedKVCache<P> cpu(cfg);
  GpuDevice<P> dev(cfg, kvq_test::device_test_limits());
  kvq_test::Lockstep<P, GpuDevice<P>> run(cpu, dev, seed);
  const kvq::SequenceId a = run.add(), b = run.add();
  run.append({a, b}, 129);  // 4 of 5 blocks in each pool
  const kvq::cuda::DeviceCacheContents before = dev.contents();
  const index_t free_keys = dev.planner().key_ids().free_blocks();
  const kvq::SequenceId ab[] = {a, b};
  kvq_test::require_error([&] { dev.cache.plan_append(ab, 2, 128); },
                          {"plan_append", "argument 'n' = 128", "4 key and 4 value blocks", "1 key and 1 value blocks are free of 5"});
  try {
    dev.cache.plan_append(ab, 2, 128);
    FAIL("no kvq::Error");
  } catch (const kvq::Error& e) {
    REQUIRE(e.status() == kvq::Status::kOutOfCapacity);
  }
  REQUIRE(dev.planner().key_ids().free_blocks() == free_keys);
  REQUIRE(dev.cache.length(a, 1) == 129);
  const kvq::cuda::DeviceCacheContents after = dev.contents();
  REQUIRE(after.key_pool == before.key_pool);
  REQUIRE(after.value_pool == before.value_pool);
  REQUIRE(after.exact == before.exact);
  REQUIRE(after.key_table == before.key_table);
  REQUIRE(after.lengths == before.lengths);
  run.check();
  // Freeing one sequence makes room: the cache carries on in lockstep.
  run.free(b);
  run.append({a}, 128);
  REQUIRE(dev.cache.length(a, 0) == 257);
}

TEST_CASE("device cache: a non-finite input is reported by check_status", "[cuda][device_cache]") {
  using P = Kivi2g32;
  const kvq::CacheConfig cfg = kvq_test::device_test_config(2, 40);
  GpuDevice<P> dev(cfg, kvq_test::device_test_limits());
  const kvq::SequenceId a = dev.add_sequence(), b = dev.add_sequence();
  const index_t n = 3, width = cfg.num_kv_heads * cfg.head_dim;
  std::vector<kvq::Float16> k(static_cast<std::size_t>(2 * 2 * n * width), kvq::Float16(0.5f)), v = k;
  // Layer 1, batch entry 1 (slot b), token 2, channel 70 of v.
  v[static_cast<std::size_t>(((1 * 2 + 1) * n + 2) * width + 70)] = kvq::Float16(std::numeric_limits<float>::infinity());
  const kvq::SequenceId ab[] = {a, b};
  dev.cache.plan_append(ab, 2, n);
  require_cuda(cudaMemcpy(dev.k, k.data(), k.size() * sizeof(kvq::Float16), cudaMemcpyHostToDevice));
  require_cuda(cudaMemcpy(dev.v, v.data(), v.size() * sizeof(kvq::Float16), cudaMemcpyHostToDevice));
  dev.launch_step(2, n);
  kvq_test::require_error([&] { dev.cache.check_status(); },
                          {"argument 'v'", "position 2 of sequence 1 in layer 1", "non-finite"});
  dev.cache.check_status();  // cleared
  REQUIRE(dev.cache.append(2, dev.k, dev.v, dev.stream) == kvq::Status::kInvalidArgument);  // no layer 2
}

TEST_CASE("device cache: paged() describes the device arrays", "[cuda][device_cache]") {
  using P = Kivi2g128;
  const kvq::CacheConfig cfg = kvq_test::device_test_config(3, 30);
  kvq::cuda::DeviceKVCache<P> cache(cfg, kvq_test::device_test_limits());
  kvq::QuantizedKVCache<P> cpu(cfg);
  for (index_t l = 0; l < 3; ++l) {
    const kvq::PagedKVParams p = cache.paged(l);
    const kvq::HostPagedTables host = cpu.paged(l);
    const kvq::PagedKVParams h = host.params();
    REQUIRE(p.num_kv_heads == 4);
    REQUIRE(p.head_dim == 64);
    REQUIRE(p.exact_bytes == 2);
    const auto max_blocks = static_cast<std::size_t>(cache.planner().max_blocks());
    for (int stream = 0; stream < 2; ++stream) {
      const kvq::PagedStream& s = stream == 0 ? p.keys : p.values;
      const kvq::PagedStream& hs = stream == 0 ? h.keys : h.values;
      const kvq::PagedStream s0 = stream == 0 ? cache.paged(0).keys : cache.paged(0).values;
      REQUIRE(s.block_bytes == hs.block_bytes);
      REQUIRE(s.block.block_bytes == hs.block.block_bytes);
      REQUIRE(s.block.scales_offset == hs.block.scales_offset);
      REQUIRE(s.block.meta_group_stride == hs.block.meta_group_stride);
      REQUIRE(s.quantized == hs.quantized);
      REQUIRE(s.width == hs.width);
      REQUIRE(s.exact_stride == hs.exact_stride);
      REQUIRE(s.sinks_offset == hs.sinks_offset);
      REQUIRE(s.ring_offset == hs.ring_offset);
      REQUIRE(s.ring_capacity == hs.ring_capacity);
      REQUIRE(s.max_blocks == static_cast<std::int32_t>(max_blocks));
      REQUIRE(s.exact == s0.exact);
      REQUIRE(s.block_table == s0.block_table + static_cast<std::size_t>(l) * 6 * max_blocks);
      REQUIRE(s.quantized_tokens == s0.quantized_tokens + l * 6);
    }
    REQUIRE(p.lengths == cache.paged(0).lengths + l * 6);
  }
  kvq_test::require_error([&] { (void)cache.paged(3); }, {"argument 'layer' = 3"});
}
