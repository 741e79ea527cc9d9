// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief ShardedDecode<Policy, TQ>: one rank's part of a head-sharded (tensor-parallel) decode:
///        the device cache of the rank's kv heads and decode attention of its query heads into
///        a local output that a collective joins. nvcc only; no NCCL (cuda/head_comm.cuh has it).
///
/// Sharding is configuration, not a fork of the code: a rank's cache is a DeviceKVCache<Policy>
/// of shard_config(model, shard) (cache/head_shard.hpp), fed the rank's slices of K/V
/// ([batch][n][shard.num_kv_heads][head_dim], what a column-parallel K/V projection gives), and
/// its attention is decode_attention<Policy, TQ> on the rank's query heads q_local
/// [batch][shard.num_q_heads][head_dim]. Every head's output equals the unsharded cache's for the
/// same tokens and the same num_splits, bit for bit (kvq_test_cuda_shard): the kernels work per
/// kv head. For bit-equality with a one-GPU run, pass that run's num_splits; 0 lets
/// decode_splits_for choose for the rank's heads (the fastest, and the rounding of the pieces'
/// merge then differs from the one-GPU run's in the last bits).
///
/// A step per layer, all on one stream, graph-capturable, no host synchronisation:
///   cache().plan_append(...) once per step (host), cache().upload_plan(stream),
///   cache().append(layer, k_local, v_local, stream), attend(layer, slots, batch, q_local, stream),
///   then the collective: HeadComm::all_gather_heads(local_out(), out, batch, stream) gives every
///   rank out [batch][num_q_heads][head_dim]; a row-parallel output projection reads local_out()
///   and reduces instead.
///
/// Ownership: the constructor allocates the cache, the attention workspace (sized for
/// limits.max_batch) and local_out; nothing is allocated later. Threading as DeviceKVCache's.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kvq/cache/head_shard.hpp"
#include "kvq/core/error.hpp"
#include "kvq/cuda/decode_attention.cuh"
#include "kvq/cuda/device_cache.cuh"

namespace kvq {
namespace cuda {

template <class Policy, class TQ = typename detail::DecodeKernelOf<Policy>::exact>
class ShardedDecode {
 public:
  /// model: the unsharded cache's shape; limits: the rank's cache's (sequences, tokens, batch);
  /// num_splits: 0 for decode_splits_for on the rank's heads, else 1 .. 1024. Throws kvq::Error
  /// (kInvalidArgument naming the argument, kCudaError).
  ShardedDecode(const CacheConfig& model, const DeviceCacheLimits& limits, const HeadShard& shard, std::int32_t num_splits = 0)
      : shard_(shard), cache_(shard_config(model, shard), limits) {
    constexpr const char* where = "kvq::cuda::ShardedDecode";
    if (num_splits < 0 || num_splits > 1024) kvq::detail::throw_argument_error(where, "num_splits", num_splits, "0 (automatic) or 1 .. 1024");
    const auto hkv = static_cast<std::int32_t>(shard.num_kv_heads), d = static_cast<std::int32_t>(shard.head_dim);
    const auto max_blocks = static_cast<std::int32_t>(cache_.planner().max_blocks());
    splits_ = num_splits > 0 ? num_splits : decode_splits_for<Policy, TQ>(max_batch(), hkv, d, max_blocks);
    workspace_bytes_ = decode_workspace_bytes<Policy>(max_batch(), static_cast<std::int32_t>(shard.num_q_heads), hkv, d, splits_);
    workspace_ = detail::DeviceBytes(where, workspace_bytes_);
    local_out_ = detail::DeviceBytes(where, static_cast<std::size_t>(max_batch()) * chunk_elements() * sizeof(TQ));
    detail::check_cuda(where, "cudaMemset (workspace counters)", cudaMemset(workspace_.get(), 0, workspace_bytes_));
    // The counters are zero before any stream's first launch (cudaMemset runs on the legacy stream).
    detail::check_cuda(where, "cudaDeviceSynchronize", cudaDeviceSynchronize());
  }

  DeviceKVCache<Policy>& cache() noexcept { return cache_; }
  const DeviceKVCache<Policy>& cache() const noexcept { return cache_; }
  const HeadShard& shard() const noexcept { return shard_; }
  std::int32_t num_splits() const noexcept { return splits_; }
  /// The most batch entries of one attend (the cache's limits.max_batch, 0 there meaning max_slots).
  std::int32_t max_batch() const noexcept { return static_cast<std::int32_t>(cache_.limits().max_batch); }
  /// The rank's attention output, device [max_batch][shard.num_q_heads][head_dim] of TQ.
  TQ* local_out() const noexcept { return local_out_.template get<TQ>(); }
  /// Elements of one batch entry of local_out.
  std::size_t chunk_elements() const noexcept { return static_cast<std::size_t>(shard_.num_q_heads * shard_.head_dim); }

  /// The launch arguments of attend (for decode_check, or to launch it another way).
  DecodeAttentionArgs args(index_t layer, const std::int32_t* slots, std::int32_t batch, const TQ* q_local) const {
    DecodeAttentionArgs a;
    a.kv = cache_.paged(layer);
    a.q = q_local;
    a.out = local_out();
    a.slots = slots;
    a.batch = batch;
    a.num_q_heads = static_cast<std::int32_t>(shard_.num_q_heads);
    a.num_splits = splits_;
    a.workspace = workspace_.get();
    a.workspace_bytes = workspace_bytes_;
    return a;
  }

  /// Decode attention of the rank's query heads of one layer into local_out: q_local device
  /// [batch][shard.num_q_heads][head_dim], slots device [batch] (the cache's slots). Returns
  /// decode_attention's status; kInvalidArgument also for a bad layer or batch (1 .. max_batch).
  Status attend(index_t layer, const std::int32_t* slots, std::int32_t batch, const TQ* q_local, cudaStream_t stream) const {
    if (layer < 0 || layer >= cache_.config().num_layers || batch < 1 || batch > max_batch()) return Status::kInvalidArgument;
    return decode_attention<Policy, TQ>(args(layer, slots, batch, q_local), stream);
  }

 private:
  HeadShard shard_;
  DeviceKVCache<Policy> cache_;
  std::int32_t splits_ = 1;
  std::size_t workspace_bytes_ = 0;
  detail::DeviceBytes workspace_;
  detail::DeviceBytes local_out_;
};

}  // namespace cuda
}  // namespace kvq
