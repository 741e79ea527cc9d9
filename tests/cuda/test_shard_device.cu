// SPDX-License-Identifier: Apache-2.0
// Head-sharded decode on one GPU without NCCL (cuda/sharded_decode.cuh, cuda/head_gather.cuh):
// world_size ranks, each a ShardedDecode of its kv heads on the same device, fed the slices of
// the same tokens (ragged prefills, decode steps across KIVI's flushes); their local outputs
// stacked rank by rank (what an all-gather leaves) and put in order by interleave_heads equal
// the unsharded ShardedDecode's output bit for bit at every step and layer, with the same
// num_splits. Also interleave_heads against a host transpose, and its argument checks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "kvq/cuda/head_gather.cuh"
#include "kvq_catch.hpp"
#include "seeds.hpp"
#include "shard_testing.hpp"

namespace {

using kvq::index_t;
using kvq_test::Device;
using kvq_test::RankDriver;
using kvq_test::ShardShape;

template <class P>
void virtual_ranks(const char* label, ShardShape shape, index_t world, std::int32_t splits, std::vector<index_t> prompts, index_t steps) {
  using TQ = typename kvq::cuda::detail::DecodeKernelOf<P>::exact;  // __half, or __nv_bfloat16 for a bf16 cache
  using E = typename P::exact_type;
  const std::uint64_t seed = kvq_test::case_seed(label, 0);
  CAPTURE(P::name(), seed, shape.kv_heads, shape.ratio, shape.dim, world, splits, prompts, steps);
  const auto batch = static_cast<index_t>(prompts.size());
  index_t longest = 0, total = 0;
  for (index_t p : prompts) {
    longest = std::max(longest, p + steps);
    total += p + steps;
  }
  kvq::CacheConfig model;
  model.num_layers = shape.layers;
  model.num_kv_heads = shape.kv_heads;
  model.head_dim = shape.dim;
  model.num_blocks = kvq::QuantizedKVCache<P>::blocks_for_tokens(shape.layers, total, batch);
  kvq::cuda::DeviceCacheLimits limits;
  limits.max_slots = batch;
  limits.max_tokens = longest;
  limits.max_batch = batch;
  index_t prompt_max = 0;
  for (index_t p : prompts) prompt_max = std::max(prompt_max, p);
  limits.max_append_tokens = prompt_max;
  const auto rows = static_cast<std::size_t>(std::max(prompt_max, batch));

  const kvq::HeadShard whole = kvq::shard_heads<P>(shape.q_heads(), shape.kv_heads, shape.dim, 1, 0);
  RankDriver<P, TQ> full(shape, model, limits, whole, splits, rows);
  std::vector<std::unique_ptr<RankDriver<P, TQ>>> ranks;
  for (index_t r = 0; r < world; ++r) {
    const kvq::HeadShard s = kvq::shard_heads<P>(shape.q_heads(), shape.kv_heads, shape.dim, world, r);
    ranks.push_back(std::make_unique<RankDriver<P, TQ>>(shape, model, limits, s, splits, rows));
    REQUIRE(ranks.back()->sd.num_splits() == splits);
  }
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess);

  const kvq_test::RunTokens<E> tokens{shape, seed};
  std::vector<kvq::SequenceId> slots;
  for (index_t b = 0; b < batch; ++b) {
    slots.push_back(full.sd.cache().add_sequence());
    for (auto& r : ranks) REQUIRE(r->sd.cache().add_sequence() == slots.back());
  }
  for (index_t b = 0; b < batch; ++b) {
    const index_t n = prompts[static_cast<std::size_t>(b)];
    const auto k = tokens.prompt(b, n, 0), v = tokens.prompt(b, n, 1);
    const std::vector<kvq::SequenceId> one = {slots[static_cast<std::size_t>(b)]};
    full.append(one, n, k, v, stream);
    for (auto& r : ranks) r->append(one, n, k, v, stream);
  }

  const std::size_t chunk = ranks[0]->sd.chunk_elements() * sizeof(TQ);  // one rank's heads of one entry
  const std::size_t out_bytes = static_cast<std::size_t>(batch) * full.sd.chunk_elements() * sizeof(TQ);
  Device<std::uint8_t> gathered(out_bytes), out(out_bytes);
  std::vector<std::uint8_t> want(out_bytes), got(out_bytes);
  std::size_t compared = 0;
  for (index_t step = 0; step < steps; ++step) {
    const auto k = tokens.step(step, batch, 0), v = tokens.step(step, batch, 1), q = tokens.step(step, batch, 2);
    full.append(slots, 1, k, v, stream);
    full.set_queries(slots, q, stream);
    for (auto& r : ranks) {
      r->append(slots, 1, k, v, stream);
      r->set_queries(slots, q, stream);
    }
    for (index_t l = 0; l < shape.layers; ++l) {
      REQUIRE(full.attend(l, static_cast<std::int32_t>(batch), stream) == kvq::Status::kOk);
      for (index_t r = 0; r < world; ++r) {
        REQUIRE(ranks[static_cast<std::size_t>(r)]->attend(l, static_cast<std::int32_t>(batch), stream) == kvq::Status::kOk);
        REQUIRE(cudaMemcpyAsync(gathered.ptr + static_cast<std::size_t>(r * batch) * chunk, ranks[static_cast<std::size_t>(r)]->sd.local_out(),
                                static_cast<std::size_t>(batch) * chunk, cudaMemcpyDeviceToDevice, stream) == cudaSuccess);
      }
      REQUIRE(kvq::cuda::interleave_heads(gathered.ptr, out.ptr, static_cast<std::int32_t>(world), static_cast<std::int32_t>(batch), chunk,
                                          stream) == kvq::Status::kOk);
      REQUIRE(cudaMemcpyAsync(want.data(), full.sd.local_out(), out_bytes, cudaMemcpyDeviceToHost, stream) == cudaSuccess);
      REQUIRE(cudaMemcpyAsync(got.data(), out.ptr, out_bytes, cudaMemcpyDeviceToHost, stream) == cudaSuccess);
      REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
      CAPTURE(step, l);
      REQUIRE(std::memcmp(want.data(), got.data(), out_bytes) == 0);
      ++compared;
    }
  }
  REQUIRE(compared == static_cast<std::size_t>(steps * shape.layers));
  // The outputs are attention, not zeros: the comparison compared numbers.
  bool nonzero = false;
  for (std::uint8_t x : want) nonzero = nonzero || x != 0;
  REQUIRE(nonzero);
  full.sd.cache().check_status();
  for (auto& r : ranks) r->sd.cache().check_status();
  cudaStreamDestroy(stream);
}

}  // namespace

TEST_CASE("interleave_heads: the ranks' chunks in the unsharded order", "[shard]") {
  for (std::int32_t world : {1, 2, 3, 4}) {
    for (std::int32_t batch : {1, 2, 5}) {
      const std::size_t chunk = 96;
      const std::size_t bytes = kvq::cuda::gathered_bytes(world, batch, chunk);
      std::vector<std::uint8_t> src(bytes), want(bytes), got(bytes);
      for (std::size_t i = 0; i < bytes; ++i) src[i] = static_cast<std::uint8_t>(i * 37 + 11);
      for (std::int32_t r = 0; r < world; ++r) {
        for (std::int32_t b = 0; b < batch; ++b) {
          std::memcpy(want.data() + static_cast<std::size_t>(b * world + r) * chunk, src.data() + static_cast<std::size_t>(r * batch + b) * chunk, chunk);
        }
      }
      Device<std::uint8_t> d_src(src), d_out(bytes);
      REQUIRE(kvq::cuda::interleave_heads(d_src.ptr, d_out.ptr, world, batch, chunk, nullptr) == kvq::Status::kOk);
      REQUIRE(cudaMemcpy(got.data(), d_out.ptr, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
      CAPTURE(world, batch);
      REQUIRE(got == want);
    }
  }
  Device<std::uint8_t> buf(64);
  REQUIRE(kvq::cuda::interleave_heads(buf.ptr, buf.ptr, 2, 2, 16, nullptr) == kvq::Status::kInvalidArgument);  // in place, batch 2
  REQUIRE(kvq::cuda::interleave_heads(buf.ptr, buf.ptr, 2, 1, 16, nullptr) == kvq::Status::kOk);               // batch 1: nothing to move
  REQUIRE(kvq::cuda::interleave_heads(nullptr, buf.ptr, 2, 1, 16, nullptr) == kvq::Status::kInvalidArgument);
  REQUIRE(kvq::cuda::interleave_heads(buf.ptr, buf.ptr, 0, 1, 16, nullptr) == kvq::Status::kInvalidArgument);
}

TEST_CASE("sharded decode on one GPU: the ranks' gathered outputs equal the unsharded output bit for bit", "[shard]") {
  using kvq::Bits;
  virtual_ranks<kvq::Fp16Policy<kvq::Float16>>("shard device fp16", {2, 4, 4, 128}, 2, 2, {300, 129, 1}, 20);
  virtual_ranks<kvq::Fp16Policy<kvq::BFloat16>>("shard device bf16", {2, 8, 2, 64}, 4, 3, {200, 17}, 20);
  virtual_ranks<kvq::KiviPolicy<Bits::k2, Bits::k2, 128, 128>>("shard device kivi2 g128", {2, 8, 4, 128}, 4, 3, {700, 128, 5}, 140);
  virtual_ranks<kvq::KiviPolicy<Bits::k4, Bits::k4, 32, 128>>("shard device kivi4 g32 mha", {2, 4, 1, 64}, 2, 1, {260, 40}, 130);
  virtual_ranks<kvq::KiviPolicy<Bits::k2, Bits::k2, 32, 128>>("shard device kivi2 smollm2", {2, 3, 3, 64}, 3, 2, {520, 300, 77, 1}, 135);
}
