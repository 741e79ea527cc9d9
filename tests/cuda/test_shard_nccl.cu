// SPDX-License-Identifier: Apache-2.0
// Head-sharded decode over NCCL (cuda/head_comm.cuh), one process per rank (fork_ranks; this
// binary's parent never initialises CUDA, its own main probes the devices in a child):
// - world = min(GPUs, 4) ranks, each on its own GPU (world 1 on a one-GPU machine: the same
//   path with one rank): every rank's all-gathered output equals the unsharded ShardedDecode's
//   on its GPU bit for bit at every step and layer, also when the step is a replayed CUDA graph;
// - a rank that throws, or exits, before joining the communicator stops rank 0's bootstrap with
//   kRankFailure naming it (needs one GPU: the failing rank never touches one);
// - with 2 or more GPUs, a rank that fails after the bootstrap stops the other rank waiting for
//   its all-gather (synchronize), naming it. On one GPU this case says it did not run.
// Children report by exit code; the parent asserts.
// Catch2 first: this file has the session runner (v2 needs CATCH_CONFIG_RUNNER before any include of it).
#if __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kvq/cuda/head_comm.cuh"
#include "kvq/cuda/rank_board.hpp"
#include "seeds.hpp"
#include "shard_testing.hpp"

namespace {

using kvq::index_t;
using kvq::Status;
using kvq::cuda::fork_ranks;
using kvq::cuda::HeadComm;
using kvq::cuda::RankBoard;
using kvq_test::Device;
using kvq_test::RankDriver;
using kvq_test::ShardShape;

int g_devices = 0;

constexpr int kSawFailure = 10, kSawOther = 11, kNoError = 12, kMismatch = 5;

std::string board_name(const char* what) { return "kvq_test_nccl_" + std::to_string(getpid()) + "_" + what; }

/// Rank `rank` of a run on its GPU: its shard and the unsharded cache, the same tokens; returns
/// kRankExitOk when every gathered output equals the unsharded one, kMismatch otherwise.
int equal_to_one_gpu(int rank, RankBoard& board) {
  using P = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 128, 128>;
  using TQ = __half;
  using E = P::exact_type;
  const int world = board.world_size();
  if (cudaSetDevice(rank % g_devices) != cudaSuccess) throw kvq::Error(Status::kCudaError, "cudaSetDevice failed");
  const ShardShape shape{2, 8, 4, 128};
  const std::vector<index_t> prompts = {700, 128, 5};
  const index_t steps = 140, batch = 3;
  const std::int32_t splits = 3;
  kvq::CacheConfig model;
  model.num_layers = shape.layers;
  model.num_kv_heads = shape.kv_heads;
  model.head_dim = shape.dim;
  model.num_blocks = kvq::QuantizedKVCache<P>::blocks_for_tokens(shape.layers, 1200 + 3 * steps, batch);
  kvq::cuda::DeviceCacheLimits limits;
  limits.max_slots = batch;
  limits.max_tokens = 700 + steps;
  limits.max_batch = batch;
  limits.max_append_tokens = 700;
  const kvq::HeadShard whole = kvq::shard_heads<P>(shape.q_heads(), shape.kv_heads, shape.dim, 1, 0);
  const kvq::HeadShard mine = kvq::shard_heads<P>(shape.q_heads(), shape.kv_heads, shape.dim, world, rank);
  RankDriver<P, TQ> full(shape, model, limits, whole, splits, 700);
  RankDriver<P, TQ> part(shape, model, limits, mine, splits, 700);
  HeadComm comm(board, mine, static_cast<std::int32_t>(batch), sizeof(TQ));
  cudaStream_t stream = nullptr;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) throw kvq::Error(Status::kCudaError, "stream");

  const kvq_test::RunTokens<E> tokens{shape, kvq_test::case_seed("shard nccl", 0)};
  std::vector<kvq::SequenceId> slots;
  for (index_t b = 0; b < batch; ++b) {
    slots.push_back(full.sd.cache().add_sequence());
    if (part.sd.cache().add_sequence() != slots.back()) return kMismatch;
  }
  for (index_t b = 0; b < batch; ++b) {
    const index_t n = prompts[static_cast<std::size_t>(b)];
    const std::vector<kvq::SequenceId> one = {slots[static_cast<std::size_t>(b)]};
    const auto k = tokens.prompt(b, n, 0), v = tokens.prompt(b, n, 1);
    full.append(one, n, k, v, stream);
    part.append(one, n, k, v, stream);
  }
  const std::size_t out_bytes = static_cast<std::size_t>(batch) * full.sd.chunk_elements() * sizeof(TQ);
  Device<std::uint8_t> out(static_cast<std::size_t>(shape.layers) * out_bytes);
  std::vector<std::uint8_t> want(out_bytes), got(out_bytes);
  // The step's collective part, per layer: the rank's attention and the all-gather.
  auto enqueue = [&]() -> Status {
    for (index_t l = 0; l < shape.layers; ++l) {
      Status s = part.attend(l, static_cast<std::int32_t>(batch), stream);
      if (s == Status::kOk) {
        s = comm.all_gather_heads(part.sd.local_out(), out.ptr + static_cast<std::size_t>(l) * out_bytes, static_cast<std::int32_t>(batch), stream);
      }
      if (s != Status::kOk) return s;
    }
    return Status::kOk;
  };
  cudaGraphExec_t exec = nullptr;
  int mismatches = 0;
  for (index_t step = 0; step < steps; ++step) {
    const auto k = tokens.step(step, batch, 0), v = tokens.step(step, batch, 1), q = tokens.step(step, batch, 2);
    full.append(slots, 1, k, v, stream);
    part.append(slots, 1, k, v, stream);
    full.set_queries(slots, q, stream);
    part.set_queries(slots, q, stream);
    const bool graph = step >= steps - 8;  // the last steps replay one captured graph
    if (graph && exec == nullptr) {
      cudaGraph_t g = nullptr;
      if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) throw kvq::Error(Status::kCudaError, "capture");
      const Status captured = enqueue();
      if (cudaStreamEndCapture(stream, &g) != cudaSuccess || captured != Status::kOk ||
          cudaGraphInstantiate(&exec, g, 0) != cudaSuccess) {
        throw kvq::Error(Status::kCudaError, "capturing attention + all-gather failed");
      }
      cudaGraphDestroy(g);
    }
    if (graph) {
      if (cudaGraphLaunch(exec, stream) != cudaSuccess) throw kvq::Error(Status::kCudaError, "cudaGraphLaunch");
    } else if (enqueue() != Status::kOk) {
      throw kvq::Error(Status::kRankFailure, "enqueue: " + comm.last_error());
    }
    comm.synchronize(stream);
    for (index_t l = 0; l < shape.layers; ++l) {
      if (full.attend(l, static_cast<std::int32_t>(batch), stream) != Status::kOk) throw kvq::Error(Status::kCudaError, "attend (full)");
      cudaMemcpyAsync(want.data(), full.sd.local_out(), out_bytes, cudaMemcpyDeviceToHost, stream);
      cudaMemcpyAsync(got.data(), out.ptr + static_cast<std::size_t>(l) * out_bytes, out_bytes, cudaMemcpyDeviceToHost, stream);
      if (cudaStreamSynchronize(stream) != cudaSuccess) throw kvq::Error(Status::kCudaError, "cudaStreamSynchronize");
      if (std::memcmp(want.data(), got.data(), out_bytes) != 0) {
        std::fprintf(stderr, "rank %d: step %d layer %d: the gathered output differs from the one-GPU output\n", rank,
                     static_cast<int>(step), static_cast<int>(l));
        ++mismatches;
      }
    }
  }
  if (exec != nullptr) cudaGraphExecDestroy(exec);
  cudaStreamDestroy(stream);
  std::printf("rank %d of %d: %d steps x %d layers compared, %d differ\n", rank, world, static_cast<int>(steps),
              static_cast<int>(shape.layers), mismatches);
  return mismatches == 0 ? kvq::cuda::kRankExitOk : kMismatch;
}

/// Rank 0 builds a HeadComm (GPU 0) and reports what its bootstrap ended with.
int bootstrap_expecting(RankBoard& board, const std::string& expect) {
  if (cudaSetDevice(0) != cudaSuccess) throw kvq::Error(Status::kCudaError, "cudaSetDevice failed");
  const kvq::HeadShard s = kvq::shard_heads<kvq::Fp16Policy<kvq::Float16>>(8, 2, 64, board.world_size(), 0);
  try {
    HeadComm comm(board, s, 1, 2);
    return kNoError;
  } catch (const kvq::Error& e) {
    const std::string what = e.what();
    std::printf("rank 0: %s\n", what.c_str());
    return e.status() == Status::kRankFailure && what.find(expect) != std::string::npos ? kSawFailure : kSawOther;
  }
}

}  // namespace

TEST_CASE("NCCL sharded decode equals the one-GPU decode bit for bit", "[shard][nccl]") {
  const int world = std::min(g_devices, 4);
  std::printf("NCCL sharded decode: %d rank(s) on %d GPU(s)\n", world, g_devices);
  const std::vector<int> codes = fork_ranks(board_name("equal"), world, equal_to_one_gpu);
  REQUIRE(codes == std::vector<int>(static_cast<std::size_t>(world), kvq::cuda::kRankExitOk));
}

TEST_CASE("NCCL bootstrap: a rank that fails before joining stops rank 0, named", "[shard][nccl]") {
  const std::vector<int> thrown = fork_ranks(board_name("throw"), 2, [](int rank, RankBoard& board) {
    if (rank == 1) throw kvq::Error(Status::kInvalidArgument, "rank 1's config: num_kv_heads = 3 is not a multiple of 2");
    return bootstrap_expecting(board, "rank 1 failed: rank 1's config: num_kv_heads = 3");
  });
  REQUIRE(thrown == std::vector<int>{kSawFailure, kvq::cuda::kRankExitError});
  const std::vector<int> exited = fork_ranks(board_name("exit"), 2, [](int rank, RankBoard& board) {
    if (rank == 1) _exit(3);
    return bootstrap_expecting(board, "the process of rank 1");
  });
  REQUIRE(exited == std::vector<int>{kSawFailure, 3});
}

TEST_CASE("NCCL step: a rank that fails after the bootstrap stops the other's wait, named", "[shard][nccl]") {
  if (g_devices < 2) {
    WARN("not run: needs 2 GPUs, this machine has " << g_devices);
    return;
  }
  const std::vector<int> codes = fork_ranks(board_name("step"), 2, [](int rank, RankBoard& board) {
    if (cudaSetDevice(rank) != cudaSuccess) throw kvq::Error(Status::kCudaError, "cudaSetDevice failed");
    const kvq::HeadShard s = kvq::shard_heads<kvq::Fp16Policy<kvq::Float16>>(8, 2, 64, 2, rank);
    HeadComm comm(board, s, 1, 2);
    if (rank == 1) throw kvq::Error(Status::kOutOfCapacity, "rank 1: plan_append: the pools lack 2 blocks");
    Device<std::uint8_t> local(comm.chunk_bytes()), out(2 * comm.chunk_bytes());
    cudaStream_t stream = nullptr;
    cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (comm.all_gather_heads(local.ptr, out.ptr, 1, stream) != Status::kOk) return kSawOther;
    try {
      comm.synchronize(stream);  // rank 1 never joins this all-gather
      return kNoError;
    } catch (const kvq::Error& e) {
      const std::string what = e.what();
      std::printf("rank 0: %s\n", what.c_str());
      return e.status() == Status::kRankFailure && what.find("rank 1 failed: rank 1: plan_append") != std::string::npos ? kSawFailure
                                                                                                                       : kSawOther;
    }
  });
  REQUIRE(codes == std::vector<int>{kSawFailure, kvq::cuda::kRankExitError});
}

int main(int argc, char** argv) {
  // The devices, counted in a child: this process must not initialise CUDA before fork_ranks.
  const pid_t probe = fork();
  if (probe == 0) {
    int n = 0;
    _exit(cudaGetDeviceCount(&n) == cudaSuccess ? std::min(n, 100) : 0);
  }
  int status = 0;
  waitpid(probe, &status, 0);
  g_devices = WIFEXITED(status) ? WEXITSTATUS(status) : 0;
  if (g_devices == 0) {
    std::printf("SKIPPED: no usable CUDA device\n");
    return 77;
  }
  setenv("NCCL_NVLS_ENABLE", "0", 0);  // NVLink multicast stays off on shared hosts (the device tool's KINDS.md)
  return Catch::Session().run(argc, argv);
}
