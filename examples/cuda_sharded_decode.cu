// SPDX-License-Identifier: Apache-2.0
// An engine's decode loop with the KV cache sharded by kv heads over the GPUs of a node (tensor
// parallelism): one process per GPU, each holding the KIVI-2 cache of its heads
// (kvq::cuda::ShardedDecode), appending and attending locally, and NCCL's all-gather
// (kvq::cuda::HeadComm) giving every rank the attention output of all heads. A whole decode
// step (plan upload, then per layer: append, attention, all-gather) is one CUDA graph replay.
// Rank 0 also feeds a CPU cache of the whole model the same tokens and checks the last step's
// gathered output against CPU attention.
//
// The ranks are this program's forked children (kvq::cuda::fork_ranks; an engine has its own
// launcher): world = the most GPUs that divide the 8 kv heads. Without NCCL this file is not
// built; without a GPU it prints "SKIPPED: no usable CUDA device".
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <kvq/cuda/head_comm.cuh>
#include <kvq/cuda/rank_board.hpp>
#include <kvq/cuda/sharded_decode.cuh>
#include <kvq/kvq.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

namespace {

using Policy = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, /*Group=*/128, /*Residual=*/128>;
using Exact = Policy::exact_type;  // kvq::Float16, bit-compatible with __half
using TQ = __half;

constexpr int kLayers = 4, kKvHeads = 8, kQueryHeads = 32, kHeadDim = 128, kDecodeSteps = 32;
const std::vector<int> kPrompts = {900, 260, 33};
const int kBatch = static_cast<int>(kPrompts.size());

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw kvq::Error(kvq::Status::kCudaError, std::string(what) + ": " + cudaGetErrorString(err));
}
void check(kvq::Status s, const char* what) {
  if (s != kvq::Status::kOk) throw kvq::Error(s, std::string(what) + " returned " + kvq::status_name(s));
}

/// The model's K or V of a layer's append ([batch][n][kv heads][head_dim]) or q ([batch][q heads][head_dim]),
/// drawn the same way in every process (an engine's ranks each compute their heads' part instead).
std::vector<Exact> draw(std::uint64_t seed, std::size_t n) {
  kvq::Rng rng(seed);
  std::vector<Exact> x(n);
  for (Exact& e : x) e = kvq::from_float<Exact>(rng.normal());
  return x;
}
/// rows x [heads][dim] -> rows x [count][dim] from head `first`: what rank's projection gives.
std::vector<Exact> heads_of(const std::vector<Exact>& full, int heads, int first, int count) {
  const std::size_t rows = full.size() / (static_cast<std::size_t>(heads) * kHeadDim);
  std::vector<Exact> out(rows * static_cast<std::size_t>(count) * kHeadDim);
  for (std::size_t r = 0; r < rows; ++r) {
    std::memcpy(out.data() + r * count * kHeadDim, full.data() + (r * heads + first) * kHeadDim, sizeof(Exact) * count * kHeadDim);
  }
  return out;
}

int run_rank(int rank, kvq::cuda::RankBoard& board) {
  check(cudaSetDevice(rank), "cudaSetDevice");
  const int world = board.world_size();
  const kvq::HeadShard shard = kvq::shard_heads<Policy>(kQueryHeads, kKvHeads, kHeadDim, world, rank);
  int longest = 0, total = 0;
  for (int p : kPrompts) {
    longest = std::max(longest, p + kDecodeSteps);
    total += p + kDecodeSteps;
  }
  kvq::CacheConfig model;  // the whole model's cache; each rank holds shard_config(model, shard)
  model.num_layers = kLayers;
  model.num_kv_heads = kKvHeads;
  model.head_dim = kHeadDim;
  model.num_blocks = kvq::QuantizedKVCache<Policy>::blocks_for_tokens(kLayers, total, kBatch);
  kvq::cuda::DeviceCacheLimits limits;
  limits.max_slots = kBatch;
  limits.max_tokens = 1024;
  limits.max_batch = kBatch;
  limits.max_append_tokens = 1024;
  kvq::cuda::ShardedDecode<Policy, TQ> sd(model, limits, shard);
  kvq::cuda::HeadComm comm(board, shard, kBatch, sizeof(TQ));  // the NCCL bootstrap through the board
  kvq::QuantizedKVCache<Policy> cpu(model);                     // rank 0's check, all heads

  cudaStream_t stream = nullptr;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  const std::size_t local_row = static_cast<std::size_t>(shard.kv_width());
  Exact *dk = nullptr, *dv = nullptr;
  TQ *dq = nullptr, *dout = nullptr;
  std::int32_t* dslots = nullptr;
  check(cudaMalloc(&dk, sizeof(Exact) * kLayers * 1024 * local_row), "cudaMalloc");
  check(cudaMalloc(&dv, sizeof(Exact) * kLayers * 1024 * local_row), "cudaMalloc");
  check(cudaMalloc(&dq, sizeof(TQ) * kLayers * kBatch * sd.chunk_elements()), "cudaMalloc");
  check(cudaMalloc(&dout, sizeof(TQ) * kLayers * kBatch * kQueryHeads * kHeadDim), "cudaMalloc");
  check(cudaMalloc(&dslots, sizeof(std::int32_t) * kBatch), "cudaMalloc");
  std::vector<kvq::SequenceId> slots;
  for (int b = 0; b < kBatch; ++b) {
    slots.push_back(sd.cache().add_sequence());
    cpu.add_sequence();
  }
  check(cudaMemcpy(dslots, slots.data(), sizeof(std::int32_t) * kBatch, cudaMemcpyHostToDevice), "cudaMemcpy (slots)");

  // Appends n tokens to `which` sequences: the rank's heads to its device cache, all heads to the CPU cache.
  auto append = [&](const std::vector<kvq::SequenceId>& which, int n, std::uint64_t seed) {
    const std::size_t numbers = static_cast<std::size_t>(kLayers) * which.size() * n * kKvHeads * kHeadDim;
    const std::vector<Exact> k = draw(seed, numbers), v = draw(seed + 1, numbers);
    const std::vector<Exact> lk = heads_of(k, kKvHeads, static_cast<int>(shard.first_kv_head), static_cast<int>(shard.num_kv_heads));
    const std::vector<Exact> lv = heads_of(v, kKvHeads, static_cast<int>(shard.first_kv_head), static_cast<int>(shard.num_kv_heads));
    sd.cache().plan_append(which.data(), static_cast<kvq::index_t>(which.size()), n);
    check(cudaMemcpyAsync(dk, lk.data(), sizeof(Exact) * lk.size(), cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync (k)");
    check(cudaMemcpyAsync(dv, lv.data(), sizeof(Exact) * lv.size(), cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync (v)");
    return std::make_pair(k, v);
  };
  auto feed_cpu = [&](const std::vector<kvq::SequenceId>& which, int n, const std::vector<Exact>& k, const std::vector<Exact>& v) {
    if (rank != 0) return;
    for (int l = 0; l < kLayers; ++l) {
      for (std::size_t b = 0; b < which.size(); ++b) {
        const std::size_t at = ((static_cast<std::size_t>(l) * which.size() + b) * n) * kKvHeads * kHeadDim;
        const kvq::StridedView<const Exact, 3> kr(k.data() + at, {n, kKvHeads, kHeadDim}), vr(v.data() + at, {n, kKvHeads, kHeadDim});
        cpu.append(which[b], l, kr, vr);
      }
    }
  };
  for (int b = 0; b < kBatch; ++b) {  // prefill, one sequence at a time
    const std::vector<kvq::SequenceId> one = {slots[static_cast<std::size_t>(b)]};
    const int n = kPrompts[static_cast<std::size_t>(b)];
    const auto kv = append(one, n, 100 + static_cast<std::uint64_t>(b) * 2);
    check(sd.cache().upload_plan(stream), "upload_plan");
    for (int l = 0; l < kLayers; ++l) {
      const std::size_t at = static_cast<std::size_t>(l) * n * local_row;
      check(sd.cache().append(l, dk + at, dv + at, stream), "append");
    }
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    feed_cpu(one, n, kv.first, kv.second);
  }

  // The decode step: one graph of the plan's upload and, per layer, append + attention + all-gather.
  auto enqueue_step = [&]() -> kvq::Status {
    kvq::Status s = sd.cache().upload_plan(stream);
    for (int l = 0; l < kLayers && s == kvq::Status::kOk; ++l) {
      const std::size_t at = static_cast<std::size_t>(l) * kBatch * local_row;
      s = sd.cache().append(l, dk + at, dv + at, stream);
      if (s == kvq::Status::kOk) s = sd.attend(l, dslots, kBatch, dq + static_cast<std::size_t>(l) * kBatch * sd.chunk_elements(), stream);
      if (s == kvq::Status::kOk) {
        s = comm.all_gather_heads(sd.local_out(), dout + static_cast<std::size_t>(l) * kBatch * kQueryHeads * kHeadDim, kBatch, stream);
      }
    }
    return s;
  };
  cudaGraphExec_t exec = nullptr;
  std::vector<Exact> q;
  double replay_us = 0.0;
  for (int step = 0; step < kDecodeSteps; ++step) {
    const auto kv = append(slots, 1, 5000 + static_cast<std::uint64_t>(step) * 3);
    q = draw(9000 + static_cast<std::uint64_t>(step), static_cast<std::size_t>(kLayers) * kBatch * kQueryHeads * kHeadDim);
    const std::vector<Exact> lq = heads_of(q, kQueryHeads, static_cast<int>(shard.first_q_head), static_cast<int>(shard.num_q_heads));
    check(cudaMemcpyAsync(dq, lq.data(), sizeof(TQ) * lq.size(), cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync (q)");
    if (exec == nullptr) {
      cudaGraph_t graph = nullptr;
      check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
      const kvq::Status captured = enqueue_step();
      check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
      check(captured, "capturing the decode step");
      check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
      check(cudaGraphDestroy(graph), "cudaGraphDestroy");
    }
    const auto t0 = std::chrono::steady_clock::now();
    check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
    comm.synchronize(stream);  // the step's wait (an engine waits here for its sampled tokens): never hangs on a failed rank
    if (step > 0) replay_us += std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    feed_cpu(slots, 1, kv.first, kv.second);
  }
  sd.cache().check_status();

  if (rank == 0) {  // the last step's gathered output (all 32 heads) against CPU attention
    std::vector<Exact> gpu(static_cast<std::size_t>(kLayers) * kBatch * kQueryHeads * kHeadDim);
    check(cudaMemcpy(gpu.data(), dout, sizeof(TQ) * gpu.size(), cudaMemcpyDeviceToHost), "cudaMemcpy (out)");
    double worst = 0.0;
    std::vector<float> qf(kQueryHeads * kHeadDim), ref(kQueryHeads * kHeadDim);
    for (int l = 0; l < kLayers; ++l) {
      for (int b = 0; b < kBatch; ++b) {
        const std::size_t at = (static_cast<std::size_t>(l) * kBatch + b) * kQueryHeads * kHeadDim;
        for (std::size_t i = 0; i < qf.size(); ++i) qf[i] = q[at + i].to_float();
        kvq::attend(cpu, slots[static_cast<std::size_t>(b)], l, kvq::StridedView<const float, 2>(qf.data(), {kQueryHeads, kHeadDim}),
                    kvq::StridedView<float, 2>(ref.data(), {kQueryHeads, kHeadDim}));
        for (int h = 0; h < kQueryHeads; ++h) {
          double e2 = 0, r2 = 0;
          for (int c = 0; c < kHeadDim; ++c) {
            const double d = gpu[at + h * kHeadDim + c].to_float() - ref[h * kHeadDim + c];
            e2 += d * d;
            r2 += static_cast<double>(ref[h * kHeadDim + c]) * ref[h * kHeadDim + c];
          }
          worst = std::max(worst, std::sqrt(e2 / std::max(r2, 1e-30)));
        }
      }
    }
    std::printf("%s: %d sequences x %d layers, %d kv heads sharded over %d GPU(s) (%d each), %d query heads\n", Policy::name().c_str(),
                kBatch, kLayers, kKvHeads, world, static_cast<int>(shard.num_kv_heads), kQueryHeads);
    std::printf("decode step (graph replay: %d x (append + attention + NCCL all-gather)): %.1f us\n", kLayers,
                replay_us / (kDecodeSteps - 1));
    std::printf("last step, gathered output vs CPU attention of all heads: max row error %.2e (limit 2e-3)\n", worst);
    if (!(worst < 2e-3)) return 1;
  }
  cudaGraphExecDestroy(exec);
  cudaFree(dk);
  cudaFree(dv);
  cudaFree(dq);
  cudaFree(dout);
  cudaFree(dslots);
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace

int main() {
  const pid_t probe = fork();  // count the GPUs in a child: the ranks must start CUDA themselves
  if (probe == 0) {
    int n = 0;
    _exit(cudaGetDeviceCount(&n) == cudaSuccess ? std::min(n, 8) : 0);
  }
  int status = 0;
  waitpid(probe, &status, 0);
  const int gpus = WIFEXITED(status) ? WEXITSTATUS(status) : 0;
  if (gpus == 0) {
    std::printf("SKIPPED: no usable CUDA device\n");
    return 0;
  }
  int world = gpus;
  while (kKvHeads % world != 0) --world;
  setenv("NCCL_NVLS_ENABLE", "0", 0);  // no NVLink multicast on shared hosts
  const std::vector<int> codes = kvq::cuda::fork_ranks("kvq_example_sharded_" + std::to_string(getpid()), world, run_rank);
  for (int c : codes) {
    if (c != 0) {
      std::fprintf(stderr, "cuda_sharded_decode: a rank failed\n");
      return 1;
    }
  }
  return 0;
}
