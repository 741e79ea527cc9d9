// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Helpers of the sharded-decode GPU tests (host code, CUDA runtime): the tokens of a
///        run drawn from a seed (so that every process draws the same), their slices for a
///        rank, and RankDriver, which feeds one ShardedDecode its slices (prefill per sequence,
///        then decode steps) and runs its attention.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "kvq/cuda/sharded_decode.cuh"
#include "kvq/kvq.hpp"
#include "gpu_testing.hpp"
#include "kvq_catch.hpp"

namespace kvq_test {

using kvq::index_t;

/// The shape of a sharded run.
struct ShardShape {
  index_t layers = 2;
  index_t kv_heads = 4;
  index_t ratio = 4;  ///< query heads per kv head
  index_t dim = 128;
  index_t q_heads() const { return kv_heads * ratio; }
};

/// rows x [heads][dim] -> rows x [count][dim] (heads first .. first + count - 1).
template <class T>
std::vector<T> slice_heads(const std::vector<T>& full, index_t heads, index_t dim, index_t first, index_t count) {
  const auto rows = static_cast<index_t>(full.size()) / (heads * dim);
  std::vector<T> out(static_cast<std::size_t>(rows * count * dim));
  for (index_t r = 0; r < rows; ++r) {
    std::memcpy(out.data() + r * count * dim, full.data() + (r * heads + first) * dim, sizeof(T) * static_cast<std::size_t>(count * dim));
  }
  return out;
}

/// n random numbers of E (a kvq 16-bit type), normal.
template <class E>
std::vector<E> random_numbers(kvq::Rng& rng, std::size_t n) {
  std::vector<E> x(n);
  for (E& e : x) e = kvq::from_float<E>(rng.normal());
  return x;
}

/// One rank's ShardedDecode and its device inputs. Host inputs are the unsharded run's:
/// k, v [layers][batch][n][kv_heads][dim], q [layers][batch][q_heads][dim].
template <class P, class TQ>
struct RankDriver {
  using E = typename P::exact_type;
  ShardShape shape;
  kvq::cuda::ShardedDecode<P, TQ> sd;
  std::size_t max_rows;  ///< batch * n of the longest append
  Device<E> dk, dv;
  Device<TQ> dq;
  Device<std::int32_t> dslots;

  RankDriver(const ShardShape& s, const kvq::CacheConfig& model, const kvq::cuda::DeviceCacheLimits& limits, const kvq::HeadShard& shard,
             std::int32_t splits, std::size_t rows)
      : shape(s), sd(model, limits, shard, splits), max_rows(rows),
        dk(static_cast<std::size_t>(s.layers) * rows * static_cast<std::size_t>(shard.kv_width())),
        dv(static_cast<std::size_t>(s.layers) * rows * static_cast<std::size_t>(shard.kv_width())),
        dq(static_cast<std::size_t>(s.layers) * static_cast<std::size_t>(limits.max_batch) * sd.chunk_elements()),
        dslots(static_cast<std::size_t>(limits.max_batch)) {}

  /// Plans an append of n tokens to `slots`, uploads this rank's slices of k and v, enqueues the
  /// plan and every layer's append on `stream` (and waits: the host arrays may change next).
  void append(const std::vector<kvq::SequenceId>& slots, index_t n, const std::vector<E>& k, const std::vector<E>& v,
              cudaStream_t stream) {
    const kvq::HeadShard& s = sd.shard();
    const auto batch = static_cast<index_t>(slots.size());
    REQUIRE(static_cast<std::size_t>(batch * n) <= max_rows);
    sd.cache().plan_append(slots.data(), batch, n);
    const std::vector<E> lk = slice_heads(k, shape.kv_heads, shape.dim, s.first_kv_head, s.num_kv_heads);
    const std::vector<E> lv = slice_heads(v, shape.kv_heads, shape.dim, s.first_kv_head, s.num_kv_heads);
    REQUIRE(cudaMemcpyAsync(dk.ptr, lk.data(), sizeof(E) * lk.size(), cudaMemcpyHostToDevice, stream) == cudaSuccess);
    REQUIRE(cudaMemcpyAsync(dv.ptr, lv.data(), sizeof(E) * lv.size(), cudaMemcpyHostToDevice, stream) == cudaSuccess);
    REQUIRE(sd.cache().upload_plan(stream) == kvq::Status::kOk);
    const std::size_t layer_rows = static_cast<std::size_t>(batch * n) * static_cast<std::size_t>(s.kv_width());
    for (index_t l = 0; l < shape.layers; ++l) {
      const std::size_t at = static_cast<std::size_t>(l) * layer_rows;
      REQUIRE(sd.cache().append(l, dk.ptr + at, dv.ptr + at, stream) == kvq::Status::kOk);
    }
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
  }

  /// Uploads this rank's query heads of q and the slots (enqueued on `stream`).
  void set_queries(const std::vector<kvq::SequenceId>& slots, const std::vector<E>& q, cudaStream_t stream) {
    const kvq::HeadShard& s = sd.shard();
    const std::vector<E> lq = slice_heads(q, shape.q_heads(), shape.dim, s.first_q_head, s.num_q_heads);
    REQUIRE(cudaMemcpyAsync(dq.ptr, lq.data(), sizeof(E) * lq.size(), cudaMemcpyHostToDevice, stream) == cudaSuccess);
    std::vector<std::int32_t> ids(slots.begin(), slots.end());
    REQUIRE(cudaMemcpyAsync(dslots.ptr, ids.data(), sizeof(std::int32_t) * ids.size(), cudaMemcpyHostToDevice, stream) == cudaSuccess);
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
  }

  /// Attention of layer l on the uploaded queries, into sd.local_out().
  kvq::Status attend(index_t l, std::int32_t batch, cudaStream_t stream) const {
    return sd.attend(l, dslots.ptr, batch, dq.ptr + static_cast<std::size_t>(l) * static_cast<std::size_t>(batch) * sd.chunk_elements(), stream);
  }
};

/// The tokens of a run, drawn from `seed` the same way in every process: the prompts' K/V per
/// sequence (prefill), then per decode step K/V of all sequences and the queries.
template <class E>
struct RunTokens {
  ShardShape shape;
  std::uint64_t seed;
  std::vector<E> prompt(index_t seq, index_t n, int which) const {  // which: 0 keys, 1 values
    kvq::Rng rng(seed + 1000003ull * static_cast<std::uint64_t>(seq) + static_cast<std::uint64_t>(which));
    return random_numbers<E>(rng, static_cast<std::size_t>(shape.layers * n * shape.kv_heads * shape.dim));
  }
  std::vector<E> step(index_t s, index_t batch, int which) const {  // which: 0 keys, 1 values, 2 queries
    kvq::Rng rng(seed + 7777777ull * static_cast<std::uint64_t>(s + 1) + static_cast<std::uint64_t>(which));
    const index_t heads = which == 2 ? shape.q_heads() : shape.kv_heads;
    return random_numbers<E>(rng, static_cast<std::size_t>(shape.layers * batch * heads * shape.dim));
  }
};

}  // namespace kvq_test
