// SPDX-License-Identifier: Apache-2.0
// Issue #11's benchmark: the decode step of a Llama-2-7B-shaped KIVI-2 g128 cache (32 layers,
// 32 kv heads = 32 query heads, head_dim 128; about 74 KB per token) sharded by kv heads over
// --world ranks, a process per GPU (fork_ranks), each a ShardedDecode of 32 / world heads and a
// HeadComm (NCCL all-gather of the heads' outputs); --world 1 is the same path on one GPU.
//
//   kvq_bench_shard [--world N] [--tokens T] [--batch B] [--steps S] [--json FILE]
// --tokens: positions per sequence (default: the most that every rank's GPU holds, 90% of its
// free memory); prefilled through the cache's own append kernels in chunks of 8192 tokens.
//
// Per decode step, on one stream per rank: the plan's upload, then for each layer the append of
// one token per sequence, the rank's attention and the all-gather. Timed (a) eagerly with CUDA
// events between the phases (per-layer means over the steps: append, attention, all-gather) and
// (b) as a replayed CUDA graph of the whole step (the step time an engine sees). Bytes per layer
// are what the attention kernel reads of the rank's cache; the copy bandwidth is measured in the
// same run on each rank's GPU. Rank 0 prints the table; every rank's numbers go to the JSON.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gpu_bench.cuh"
#include "kvq/cuda/head_comm.cuh"
#include "kvq/cuda/rank_board.hpp"
#include "kvq/cuda/sharded_decode.cuh"
#include "kvq/kvq.hpp"

namespace {

using Policy = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 128, 128>;
using TQ = __half;
constexpr int kLayers = 32, kKvHeads = 32, kQHeads = 32, kDim = 128, kChunk = 8192;

struct Options {
  int world = 1;
  long long tokens = 0;
  int batch = 1;
  int steps = 20;
  std::string json;
};

struct RankResult {
  int rank = 0, world = 1, gpu = 0;
  long long tokens = 0;
  int batch = 1;
  double prefill_s = 0, append_us = 0, attention_us = 0, gather_us = 0, eager_step_us = 0, graph_step_us = 0;
  double bytes_per_layer = 0, copy_tbs = 0, cache_gb = 0;
  std::int32_t splits = 0;
};

/// Bytes of one rank's cache per token of one layer (both streams' blocks of its heads).
std::size_t rank_bytes_per_token(const kvq::CacheConfig& rank_config) {
  kvq::QuantizedKVCache<Policy> probe(rank_config);
  return (probe.key_pool().block_bytes() + probe.value_pool().block_bytes()) / Policy::block_tokens;
}

RankResult run_rank(int rank, kvq::cuda::RankBoard& board, const Options& opt) {
  int devices = 0;
  KVQ_CHECK(cudaGetDeviceCount(&devices));
  RankResult r;
  r.rank = rank;
  r.world = opt.world;
  r.gpu = rank % devices;
  r.batch = opt.batch;
  KVQ_CHECK(cudaSetDevice(r.gpu));
  const kvq::HeadShard shard = kvq::shard_heads<Policy>(kQHeads, kKvHeads, kDim, opt.world, rank);
  kvq::CacheConfig model;
  model.num_layers = kLayers;
  model.num_kv_heads = kKvHeads;
  model.head_dim = kDim;
  model.num_blocks = 1;
  const std::size_t per_token = rank_bytes_per_token(kvq::shard_config(model, shard));  // one layer
  long long tokens = opt.tokens;
  if (tokens <= 0) {
    std::size_t free_bytes = 0, total_bytes = 0;
    KVQ_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    const double usable = 0.9 * static_cast<double>(free_bytes) - 4.0 * kChunk * shard.kv_width();  // minus the prefill rows
    tokens = static_cast<long long>(usable / (static_cast<double>(per_token) * kLayers * opt.batch)) / kChunk * kChunk;
  }
  r.tokens = tokens;
  model.num_blocks = kvq::QuantizedKVCache<Policy>::blocks_for_tokens(kLayers, (tokens + opt.steps + 256) * opt.batch, opt.batch);
  kvq::cuda::DeviceCacheLimits limits;
  limits.max_slots = opt.batch;
  limits.max_tokens = tokens + opt.steps + 256;
  limits.max_batch = opt.batch;
  limits.max_append_tokens = kChunk;
  kvq::cuda::ShardedDecode<Policy, TQ> sd(model, limits, shard);
  r.splits = sd.num_splits();
  r.cache_gb = static_cast<double>(model.num_blocks) * static_cast<double>(per_token) * Policy::block_tokens * 1e-9;
  kvq::cuda::HeadComm comm(board, shard, opt.batch, sizeof(TQ));

  cudaStream_t stream = nullptr;
  KVQ_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const std::size_t width = static_cast<std::size_t>(shard.kv_width());
  void *dk = nullptr, *dv = nullptr, *dq = nullptr, *dout = nullptr;
  std::int32_t* dslots = nullptr;
  KVQ_CHECK(cudaMalloc(&dk, static_cast<std::size_t>(kChunk) * width * 2));
  KVQ_CHECK(cudaMalloc(&dv, static_cast<std::size_t>(kChunk) * width * 2));
  KVQ_CHECK(cudaMalloc(&dq, static_cast<std::size_t>(kLayers) * opt.batch * sd.chunk_elements() * sizeof(TQ)));
  KVQ_CHECK(cudaMalloc(&dout, static_cast<std::size_t>(kLayers) * opt.batch * kQHeads * kDim * sizeof(TQ)));
  KVQ_CHECK(cudaMalloc(&dslots, sizeof(std::int32_t) * static_cast<std::size_t>(opt.batch)));
  // The prefill's rows: [chunk][width] of one random draw per rank, appended to every layer; the
  // decode tokens are their first rows (the timing does not depend on the numbers).
  fill_halves(dk, static_cast<std::uint64_t>(kChunk) * width, 11 + static_cast<std::uint64_t>(rank), stream);
  fill_halves(dv, static_cast<std::uint64_t>(kChunk) * width, 23 + static_cast<std::uint64_t>(rank), stream);
  fill_halves(dq, static_cast<std::uint64_t>(kLayers) * opt.batch * sd.chunk_elements(), 37 + static_cast<std::uint64_t>(rank), stream);
  std::vector<kvq::SequenceId> slots;
  for (int b = 0; b < opt.batch; ++b) slots.push_back(sd.cache().add_sequence());
  std::vector<std::int32_t> ids(slots.begin(), slots.end());
  KVQ_CHECK(cudaMemcpyAsync(dslots, ids.data(), sizeof(std::int32_t) * ids.size(), cudaMemcpyHostToDevice, stream));
  KVQ_CHECK(cudaStreamSynchronize(stream));

  auto status_ok = [](kvq::Status s, const char* what) {
    if (s != kvq::Status::kOk) throw kvq::Error(s, std::string("bench: ") + what + " returned " + kvq::status_name(s));
  };
  const auto* k_rows = static_cast<const Policy::exact_type*>(dk);
  const auto* v_rows = static_cast<const Policy::exact_type*>(dv);
  const auto t0 = std::chrono::steady_clock::now();
  for (int b = 0; b < opt.batch; ++b) {
    for (long long done = 0; done < tokens; done += kChunk) {
      const auto n = static_cast<kvq::index_t>(std::min<long long>(kChunk, tokens - done));
      sd.cache().plan_append(&slots[static_cast<std::size_t>(b)], 1, n);
      status_ok(sd.cache().upload_plan(stream), "upload_plan");
      for (int l = 0; l < kLayers; ++l) status_ok(sd.cache().append(l, k_rows, v_rows, stream), "append");
    }
  }
  KVQ_CHECK(cudaStreamSynchronize(stream));
  r.prefill_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  sd.cache().check_status();
  board.barrier(rank, "the other ranks' prefill");

  const std::size_t out_layer = static_cast<std::size_t>(opt.batch) * kQHeads * kDim;
  auto layer_q = [&](int l) { return static_cast<const TQ*>(dq) + static_cast<std::size_t>(l) * opt.batch * sd.chunk_elements(); };
  auto layer_out = [&](int l) { return static_cast<TQ*>(dout) + static_cast<std::size_t>(l) * out_layer; };
  std::vector<cudaEvent_t> ev(static_cast<std::size_t>(kLayers) * 3 + 1);
  for (cudaEvent_t& e : ev) KVQ_CHECK(cudaEventCreate(&e));
  auto enqueue_step = [&](bool events) {
    status_ok(sd.cache().upload_plan(stream), "upload_plan");
    if (events) KVQ_CHECK(cudaEventRecord(ev[0], stream));
    for (int l = 0; l < kLayers; ++l) {
      status_ok(sd.cache().append(l, k_rows, v_rows, stream), "append");
      if (events) KVQ_CHECK(cudaEventRecord(ev[static_cast<std::size_t>(3 * l + 1)], stream));
      status_ok(sd.attend(l, dslots, opt.batch, layer_q(l), stream), "attend");
      if (events) KVQ_CHECK(cudaEventRecord(ev[static_cast<std::size_t>(3 * l + 2)], stream));
      status_ok(comm.all_gather_heads(sd.local_out(), layer_out(l), opt.batch, stream), "all_gather_heads");
      if (events) KVQ_CHECK(cudaEventRecord(ev[static_cast<std::size_t>(3 * l + 3)], stream));
    }
  };
  auto elapsed_us = [](cudaEvent_t a, cudaEvent_t b) {
    float ms = 0;
    KVQ_CHECK(cudaEventElapsedTime(&ms, a, b));
    return 1e3 * ms;
  };
  // (a) eager, phases by events.
  for (int s = 0; s < opt.steps; ++s) {
    sd.cache().plan_append(slots.data(), opt.batch, 1);
    enqueue_step(true);
    comm.synchronize(stream);
    if (s < 2) continue;  // warm-up
    for (int l = 0; l < kLayers; ++l) {
      const std::size_t e = static_cast<std::size_t>(3 * l);
      r.append_us += elapsed_us(ev[e], ev[e + 1]);
      r.attention_us += elapsed_us(ev[e + 1], ev[e + 2]);
      r.gather_us += elapsed_us(ev[e + 2], ev[e + 3]);
    }
    r.eager_step_us += elapsed_us(ev[0], ev[static_cast<std::size_t>(3 * kLayers)]);
  }
  const double measured = std::max(1, opt.steps - 2);
  r.append_us /= measured * kLayers;
  r.attention_us /= measured * kLayers;
  r.gather_us /= measured * kLayers;
  r.eager_step_us /= measured;
  // (b) the whole step as a graph, replayed.
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  sd.cache().plan_append(slots.data(), opt.batch, 1);
  KVQ_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  enqueue_step(false);
  KVQ_CHECK(cudaStreamEndCapture(stream, &graph));
  KVQ_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t g0 = ev[0], g1 = ev[1];
  for (int s = 0; s < opt.steps; ++s) {
    if (s > 0) sd.cache().plan_append(slots.data(), opt.batch, 1);
    KVQ_CHECK(cudaEventRecord(g0, stream));
    KVQ_CHECK(cudaGraphLaunch(exec, stream));
    KVQ_CHECK(cudaEventRecord(g1, stream));
    comm.synchronize(stream);
    if (s >= 2) r.graph_step_us += elapsed_us(g0, g1);
  }
  r.graph_step_us /= measured;
  sd.cache().check_status();

  const std::size_t bytes = 1ull << 30;
  void *a = nullptr, *b = nullptr;
  KVQ_CHECK(cudaMalloc(&a, bytes));
  KVQ_CHECK(cudaMalloc(&b, bytes));
  r.copy_tbs = copy_bandwidth(a, b, bytes) * 1e-12;
  cudaFree(a);
  cudaFree(b);
  // What attention reads per layer: the rank's blocks of every sequence (and the fp16 window).
  r.bytes_per_layer = static_cast<double>(per_token) * static_cast<double>(tokens) * opt.batch;
  board.barrier(rank, "the other ranks' end");
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  for (cudaEvent_t& e : ev) cudaEventDestroy(e);
  cudaFree(dk);
  cudaFree(dv);
  cudaFree(dq);
  cudaFree(dout);
  cudaFree(dslots);
  cudaStreamDestroy(stream);
  return r;
}

std::string to_json(const RankResult& r) {
  std::ostringstream o;
  o << "{\"rank\": " << r.rank << ", \"world\": " << r.world << ", \"gpu\": " << r.gpu << ", \"tokens\": " << r.tokens
    << ", \"batch\": " << r.batch << ", \"splits\": " << r.splits << ", \"cache_gb\": " << r.cache_gb << ", \"prefill_s\": " << r.prefill_s
    << ", \"append_us\": " << r.append_us << ", \"attention_us\": " << r.attention_us << ", \"gather_us\": " << r.gather_us
    << ", \"eager_step_us\": " << r.eager_step_us << ", \"graph_step_us\": " << r.graph_step_us
    << ", \"bytes_per_layer\": " << r.bytes_per_layer << ", \"copy_tbs\": " << r.copy_tbs << "}";
  return o.str();
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "kvq_bench_shard: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--world") {
      opt.world = std::atoi(next());
    } else if (a == "--tokens") {
      opt.tokens = std::atoll(next());
    } else if (a == "--batch") {
      opt.batch = std::atoi(next());
    } else if (a == "--steps") {
      opt.steps = std::atoi(next());
    } else if (a == "--json") {
      opt.json = next();
    } else {
      std::fprintf(stderr, "usage: kvq_bench_shard [--world N] [--tokens T] [--batch B] [--steps S] [--json FILE]\n");
      return 2;
    }
  }
  if (opt.world < 1 || kKvHeads % opt.world != 0 || opt.batch < 1 || opt.steps < 3) {
    std::fprintf(stderr, "kvq_bench_shard: --world must divide %d, --batch >= 1, --steps >= 3\n", kKvHeads);
    return 2;
  }
  setenv("NCCL_NVLS_ENABLE", "0", 0);  // NVLink multicast stays off on shared hosts
  char dir_template[] = "/tmp/kvq_bench_shard_XXXXXX";
  const char* dir = mkdtemp(dir_template);
  if (dir == nullptr) return 1;
  const std::string board = "kvq_bench_shard_" + std::to_string(getpid());
  const std::vector<int> codes = kvq::cuda::fork_ranks(
      board, opt.world,
      [&](int rank, kvq::cuda::RankBoard& b) {
        int devices = 0;
        if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) return kvq::cuda::kRankExitSkipped;
        const RankResult r = run_rank(rank, b, opt);
        std::ofstream(std::string(dir) + "/rank" + std::to_string(rank) + ".json") << to_json(r) << "\n";
        return kvq::cuda::kRankExitOk;
      },
      std::chrono::minutes(20));
  for (int c : codes) {
    if (c == kvq::cuda::kRankExitSkipped) {
      std::printf("SKIPPED: no usable CUDA device\n");
      return 77;
    }
    if (c != 0) {
      std::fprintf(stderr, "kvq_bench_shard: a rank failed (exit codes:");
      for (int x : codes) std::fprintf(stderr, " %d", x);
      std::fprintf(stderr, ")\n");
      return 1;
    }
  }
  std::vector<std::string> lines;
  for (int rank = 0; rank < opt.world; ++rank) {
    std::ifstream in(std::string(dir) + "/rank" + std::to_string(rank) + ".json");
    std::string line;
    std::getline(in, line);
    lines.push_back(line);
    std::remove((std::string(dir) + "/rank" + std::to_string(rank) + ".json").c_str());
  }
  rmdir(dir);
  std::string all = "[";
  for (std::size_t i = 0; i < lines.size(); ++i) all += (i ? ",\n " : "") + lines[i];
  all += "]\n";
  std::printf("kvq_bench_shard: Llama-2-7B shape (%d layers, %d kv heads, d%d), %s, world %d\n", kLayers, kKvHeads, kDim,
              Policy::name().c_str(), opt.world);
  std::printf("%s", all.c_str());
  if (!opt.json.empty()) std::ofstream(opt.json) << all;
  return 0;
}
