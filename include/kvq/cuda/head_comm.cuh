// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief HeadComm: one rank's NCCL communicator of a head-sharded run, whose collective gives
///        every rank the attention output of all heads, and whose waits never hang on a failed
///        peer. nvcc only; needs NCCL (nccl.h, libnccl: built where CMake finds them).
///
/// Bootstrap (the constructor): rank 0 makes the NCCL unique id and posts it on the run's
/// RankBoard (cuda/rank_board.hpp), the others read it there; ncclCommInitRankConfig runs
/// non-blocking and the rank polls it together with the board, so a peer that failed (posted,
/// exited or silent past the board's timeout) ends the wait with kvq::Error(kRankFailure) naming
/// it, the communicator aborted. One warm-up all-gather makes NCCL's connections before any
/// stream is captured.
///
/// A step (graph-capturable, no host synchronisation): all_gather_heads(local, out, batch,
/// stream) enqueues ncclAllGather of every rank's local [batch][num_q_heads / world][head_dim]
/// into the gather buffer [world][batch][...] and interleave_heads (cuda/head_gather.cuh) into
/// out [batch][num_q_heads][head_dim] (for batch 1 the all-gather writes out directly). An engine
/// whose output projection is row-parallel reduces instead (each rank multiplies its heads'
/// output by its rows of W_o, then ncclAllReduce): kvq's part is then the local output alone.
///
/// Failures: synchronize(stream) is the rank's wait for its stream (where an engine waits anyway,
/// e.g. for the sampled tokens): it polls the stream, NCCL's asynchronous error and the board;
/// on any failure it posts this rank's error (so that the others stop too), aborts the
/// communicator (which ends its kernels waiting for peers) and throws kRankFailure. fail(message)
/// does the posting and the abort for an error the engine caught itself. After an abort every
/// call returns kRankFailure; the rank's cache stays as it was (nothing is written on failure).
///
/// Threading: one host thread at a time per HeadComm; the current CUDA device must be the rank's
/// GPU when the constructor runs (the communicator's device).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "kvq/cache/head_shard.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/status.hpp"
#include "kvq/cuda/device_memory.cuh"
#include "kvq/cuda/head_gather.cuh"
#include "kvq/cuda/rank_board.hpp"
#include "kvq/cuda/status.cuh"

namespace kvq {
namespace cuda {

static_assert(sizeof(ncclUniqueId) <= sizeof(RankBoardSegment::id), "kvq: the board's bootstrap bytes hold an ncclUniqueId");

class HeadComm {
 public:
  /// Joins the communicator of board.world_size() ranks as shard.rank (see the file comment).
  /// chunk: one batch entry of this rank's output, num_q_heads * head_dim * element_bytes of the
  /// shard; max_batch sizes the gather buffer (the only allocation). Throws kvq::Error:
  /// kInvalidArgument (a shard of another world size, max_batch < 1, element_bytes 0),
  /// kCudaError (memory), kRankFailure (NCCL, a peer's failure, the board's timeout).
  HeadComm(RankBoard& board, const HeadShard& shard, std::int32_t max_batch, std::size_t element_bytes)
      : board_(&board), rank_(static_cast<int>(shard.rank)), world_(static_cast<int>(shard.world_size)), max_batch_(max_batch),
        chunk_(static_cast<std::size_t>(shard.num_q_heads * shard.head_dim) * element_bytes) {
    constexpr const char* where = "kvq::cuda::HeadComm";
    if (board.world_size() != world_) {
      kvq::detail::throw_argument_error(where, "shard.world_size", world_, kvq::detail::concat("the board's world size, ", board.world_size()));
    }
    if (max_batch < 1) kvq::detail::throw_argument_error(where, "max_batch", max_batch, "at least 1");
    if (element_bytes == 0) kvq::detail::throw_argument_error(where, "element_bytes", element_bytes, "at least 1");
    try {
      gathered_ = detail::DeviceBytes(where, gathered_bytes(world_, max_batch_, chunk_));
      ncclUniqueId id{};
      if (rank_ == 0) {
        check_nccl(where, "ncclGetUniqueId", ncclGetUniqueId(&id));
        board.publish_id(&id, sizeof(id));
      } else {
        board.wait_id(rank_, &id, sizeof(id));
      }
      ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
      config.blocking = 0;  // the init and every call return at once: the waits poll the board
      const ncclResult_t init = ncclCommInitRankConfig(&comm_, world_, id, rank_, &config);
      if (init != ncclSuccess && init != ncclInProgress) check_nccl(where, "ncclCommInitRankConfig", init);
      await(where, "the communicator's initialisation (ncclCommInitRankConfig)");
      // Warm-up: NCCL connects its peers at the first collective; do it before any capture.
      cudaStream_t s = nullptr;
      detail::check_cuda(where, "cudaStreamCreateWithFlags", cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
      const ncclResult_t warm = ncclAllGather(gathered_.get(), gathered_.get(), chunk_, ncclUint8, comm_, s);
      if (warm != ncclSuccess && warm != ncclInProgress) check_nccl(where, "ncclAllGather (warm-up)", warm);
      try {
        await(where, "the warm-up all-gather's enqueue");
        synchronize(s);
      } catch (...) {
        cudaStreamDestroy(s);
        throw;
      }
      cudaStreamDestroy(s);
    } catch (const Error& e) {
      fail(e.what());
      release();
      throw;
    }
  }

  HeadComm(const HeadComm&) = delete;
  HeadComm& operator=(const HeadComm&) = delete;
  ~HeadComm() { release(); }

  int rank() const noexcept { return rank_; }
  int world_size() const noexcept { return world_; }
  bool failed() const noexcept { return failed_; }
  /// One batch entry of this rank's output, in bytes.
  std::size_t chunk_bytes() const noexcept { return chunk_; }

  /// Enqueues the gather of every rank's local [batch][shard heads][head_dim] into out
  /// [batch][num_q_heads][head_dim] (both device memory of this rank). Never allocates, never
  /// synchronises the device; capturable. kInvalidArgument (batch outside 1 .. max_batch, null
  /// pointers), kRankFailure (after a failure, or NCCL's error: last_error() says which),
  /// kCudaError (the reorder's copies).
  Status all_gather_heads(const void* local, void* out, std::int32_t batch, cudaStream_t stream) noexcept {
    if (failed_) return Status::kRankFailure;
    if (batch < 1 || batch > max_batch_ || local == nullptr || out == nullptr) return Status::kInvalidArgument;
    const bool direct = batch == 1;  // [world][1][chunk] is out's order already
    void* dst = direct ? out : gathered_.get();
    const ncclResult_t r = ncclAllGather(local, dst, static_cast<std::size_t>(batch) * chunk_, ncclUint8, comm_, stream);
    if (r != ncclSuccess && r != ncclInProgress) {
      last_error_ = kvq::detail::concat("ncclAllGather: ", ncclGetErrorString(r));
      return Status::kRankFailure;
    }
    if (r == ncclInProgress && !enqueued()) return Status::kRankFailure;
    return direct ? Status::kOk : interleave_heads(gathered_.get(), out, world_, batch, chunk_, stream);
  }

  /// Waits for `stream` (see the file comment); throws kvq::Error(kRankFailure or kCudaError)
  /// naming the failure, after posting it and aborting the communicator.
  void synchronize(cudaStream_t stream) {
    constexpr const char* where = "kvq::cuda::HeadComm::synchronize";
    if (failed_) throw Error(Status::kRankFailure, kvq::detail::concat(where, ": rank ", rank_, " has failed before: ", last_error_));
    try {
      board_->wait(where, rank_, "its stream (a collective whose peers have not arrived)", [&] {
        ncclResult_t async = ncclSuccess;
        ncclCommGetAsyncError(comm_, &async);
        if (async != ncclSuccess && async != ncclInProgress) {
          throw Error(Status::kRankFailure, kvq::detail::concat(where, ": NCCL reported ", ncclGetErrorString(async)));
        }
        const cudaError_t q = cudaStreamQuery(stream);
        if (q == cudaErrorNotReady) return false;
        if (q != cudaSuccess) throw Error(Status::kCudaError, kvq::detail::concat(where, ": cudaStreamQuery: ", cudaGetErrorString(q)));
        return true;
      });
    } catch (const Error& e) {
      fail(e.what());
      throw;
    }
  }

  /// Posts `message` as this rank's failure on the board and aborts the communicator. Never throws.
  void fail(const std::string& message) noexcept {
    board_->fail(rank_, message);
    if (last_error_.empty()) last_error_ = message;
    abort();
  }

  /// NCCL's or the board's last error as text ("" when none).
  const std::string& last_error() const noexcept { return last_error_; }

 private:
  [[noreturn]] void throw_nccl(const char* where, const char* call, ncclResult_t r) const {
    throw Error(Status::kRankFailure, kvq::detail::concat(where, ": rank ", rank_, ": ", call, " failed: ", ncclGetErrorString(r)));
  }
  void check_nccl(const char* where, const char* call, ncclResult_t r) const {
    if (r != ncclSuccess) throw_nccl(where, call, r);
  }
  /// Polls NCCL's asynchronous state until the last call finished (non-blocking communicator),
  /// the board reports a failure or the timeout passes.
  void await(const char* where, const char* what) {
    board_->wait(where, rank_, what, [&] {
      ncclResult_t async = ncclInProgress;
      const ncclResult_t q = ncclCommGetAsyncError(comm_, &async);
      if (q != ncclSuccess) throw_nccl(where, "ncclCommGetAsyncError", q);
      if (async == ncclInProgress) return false;
      if (async != ncclSuccess) throw_nccl(where, what, async);
      return true;
    });
  }
  /// await for a collective's enqueue, inside all_gather_heads (which does not throw).
  bool enqueued() noexcept {
    try {
      await("kvq::cuda::HeadComm::all_gather_heads", "the all-gather's enqueue");
      return true;
    } catch (const std::exception& e) {
      fail(e.what());
      return false;
    }
  }
  void abort() noexcept {
    if (comm_ != nullptr && !failed_) ncclCommAbort(comm_);
    failed_ = true;
    comm_ = nullptr;
  }
  void release() noexcept {
    if (comm_ != nullptr && !failed_) {
      // A healthy rank's collectives are complete (its steps were synchronised): finalize (the
      // non-blocking communicator returns at once; poll it, bounded by the board's timeout, and
      // abort when it does not end), then destroy.
      bool finalized = false;
      const ncclResult_t fin = ncclCommFinalize(comm_);
      if (fin == ncclSuccess || fin == ncclInProgress) {
        const auto deadline = RankBoard::clock::now() + board_->timeout();
        ncclResult_t async = ncclInProgress;
        while (ncclCommGetAsyncError(comm_, &async) == ncclSuccess && async == ncclInProgress &&
               RankBoard::clock::now() < deadline) {
        }
        finalized = async == ncclSuccess;
      }
      if (finalized) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
      comm_ = nullptr;
    }
    gathered_ = detail::DeviceBytes();
  }

  RankBoard* board_;
  int rank_, world_;
  std::int32_t max_batch_;
  std::size_t chunk_;
  ncclComm_t comm_ = nullptr;
  detail::DeviceBytes gathered_;  ///< [world][max_batch][chunk]
  bool failed_ = false;
  std::string last_error_;
};

}  // namespace cuda
}  // namespace kvq
