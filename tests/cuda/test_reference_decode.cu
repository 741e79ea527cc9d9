// SPDX-License-Identifier: Apache-2.0
// The reference GPU decode attention (kvq/cuda/reference_decode.cuh) against the CPU's fused
// attention (kvq::attend) on the same cache bytes: a CPU QuantizedKVCache is filled with random
// tokens (ragged batch, prefill then decode steps across flush boundaries), copied to a
// DeviceKVCache (upload: the pools, exact rows and tables as they are), and every query head's
// output row must agree within 1e-4 relative (L2) with float queries (fp32 on both sides) and
// within 2e-3 with fp16 / bf16 queries and outputs (one rounding of the output), for head_dims
// and GQA ratios the fused kernels do not take (8, 96, 256; 16 query heads per kv head) and for
// ones they do.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <vector>

#include "kvq/cuda/device_cache.cuh"
#include "kvq/cuda/reference_decode.cuh"
#include "kvq/kvq.hpp"
#include "gpu_testing.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::index_t;

using kvq_test::Device;

/// The host type of query type TQ.
template <class TQ>
using HostQuery = std::conditional_t<std::is_same_v<TQ, float>, float,
                                     std::conditional_t<std::is_same_v<TQ, __half>, kvq::Float16, kvq::BFloat16>>;

template <class Policy, class TQ>
void check_reference(std::uint64_t seed, index_t kv_heads, index_t group, index_t dim, const std::vector<index_t>& lengths,
                     float scale = 0.0f) {
  using Cache = kvq::QuantizedKVCache<Policy>;
  using HQ = HostQuery<TQ>;
  kvq::Rng rng(seed);
  kvq::CacheConfig cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = kv_heads;
  cfg.head_dim = dim;
  index_t total = 0, longest = 0;
  for (index_t l : lengths) {
    total += l;
    longest = std::max(longest, l);
  }
  cfg.num_blocks = Cache::blocks_for_tokens(1, total, static_cast<index_t>(lengths.size())) + 4;
  Cache cache(cfg);
  const index_t width = kv_heads * dim;
  std::vector<kvq::SequenceId> seqs;
  for (index_t n : lengths) {
    const kvq::SequenceId s = cache.add_sequence();
    seqs.push_back(s);
    const index_t prefill = std::max<index_t>(1, n - 37);
    for (index_t done = 0; done < n;) {
      const index_t step = done == 0 ? prefill : 1;
      std::vector<kvq::Float16> k(static_cast<std::size_t>(step * width)), v(k.size());
      for (index_t i = 0; i < step * width; ++i) {
        const index_t c = i % width;  // channel-dependent offsets and scales, as real keys have
        k[static_cast<std::size_t>(i)] = kvq::Float16::from_float(
            rng.normal() * (1.0f + static_cast<float>(c % 7)) + 0.3f * static_cast<float>(c % 5), kvq::Rounding::kNearestEven);
        v[static_cast<std::size_t>(i)] = kvq::Float16::from_float(rng.normal(), kvq::Rounding::kNearestEven);
      }
      cache.append(s, 0, k.data(), v.data(), step);
      done += step;
    }
  }
  kvq::cuda::DeviceCacheLimits limits;
  limits.max_slots = static_cast<index_t>(lengths.size());
  limits.max_tokens = longest;
  kvq::cuda::DeviceKVCache<Policy> dev(cfg, limits);
  dev.upload(cache);

  const index_t heads = kv_heads * group;
  const auto batch = static_cast<index_t>(seqs.size());
  std::vector<HQ> q(static_cast<std::size_t>(batch * heads * dim));
  for (auto& x : q) x = kvq::from_float<HQ>(rng.normal());
  // Entries in reverse slot order, through the slots array.
  std::vector<std::int32_t> slots(seqs.rbegin(), seqs.rend());
  Device<HQ> dq(q);
  Device<HQ> dout(q.size());
  Device<std::int32_t> dslots(slots);
  kvq::cuda::DecodeAttentionArgs a;
  a.kv = dev.paged(0);
  a.q = dq.ptr;
  a.out = dout.ptr;
  a.slots = dslots.ptr;
  a.batch = static_cast<std::int32_t>(batch);
  a.num_q_heads = static_cast<std::int32_t>(heads);
  a.scale = scale;
  const std::string why = kvq::cuda::reference_decode_check<Policy, TQ>(a);
  INFO(why);
  REQUIRE(why.empty());
  REQUIRE(kvq::cuda::reference_decode_attention<Policy, TQ>(a, nullptr) == kvq::Status::kOk);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  std::vector<HQ> got(q.size());
  REQUIRE(cudaMemcpy(got.data(), dout.ptr, got.size() * sizeof(HQ), cudaMemcpyDeviceToHost) == cudaSuccess);

  // Per output row (entry, query head): the L2 error relative to the row's L2 norm; also the
  // largest element error relative to the largest magnitude of the batch entry.
  double worst = 0.0, worst_element = 0.0;
  kvq::AttentionOptions options;
  options.scale = scale;
  for (index_t b = 0; b < batch; ++b) {
    const kvq::SequenceId seq = slots[static_cast<std::size_t>(b)];
    std::vector<float> qf(static_cast<std::size_t>(heads * dim)), ref(qf.size());
    for (std::size_t i = 0; i < qf.size(); ++i) qf[i] = kvq::to_float(q[static_cast<std::size_t>(b * heads * dim) + i]);
    kvq::attend(cache, seq, 0, kvq::StridedView<const float, 2>(qf.data(), {heads, dim}),
                kvq::StridedView<float, 2>(ref.data(), {heads, dim}), options);
    float top = 0.0f;
    for (float r : ref) top = std::max(top, std::fabs(r));
    for (index_t h = 0; h < heads; ++h) {
      double err2 = 0.0, ref2 = 0.0;
      for (index_t c = 0; c < dim; ++c) {
        const std::size_t i = static_cast<std::size_t>(h * dim + c);
        const double d = static_cast<double>(kvq::to_float(got[static_cast<std::size_t>(b * heads * dim) + i])) - ref[i];
        err2 += d * d;
        ref2 += static_cast<double>(ref[i]) * ref[i];
        worst_element = std::max(worst_element, std::fabs(d) / top);
      }
      worst = std::max(worst, std::sqrt(err2 / std::max(ref2, 1e-30)));
    }
  }
  const char* qname = std::is_same_v<TQ, float> ? "f32" : std::is_same_v<TQ, __half> ? "f16" : "bf16";
  CAPTURE(Policy::name(), qname, seed, kv_heads, group, dim);
  UNSCOPED_INFO("max row error ||gpu - cpu|| / ||cpu|| = " << worst << ", max element error / max |cpu| = " << worst_element);
  std::printf("reference %s q=%s Hkv=%d group=%d d=%d: row error %.2e, element error %.2e\n", Policy::name().c_str(), qname,
              static_cast<int>(kv_heads), static_cast<int>(group), static_cast<int>(dim), worst, worst_element);
  REQUIRE(worst <= (std::is_same_v<TQ, float> ? 1e-4 : std::is_same_v<TQ, __half> ? 2e-3 : 4e-3));
}

}  // namespace

TEST_CASE("reference decode attention on the GPU equals CPU fused attention, any head_dim", "[cuda][attention][reference]") {
  const std::uint64_t seed = kvq_test::case_seed("reference_decode_gpu", 0);
  const std::vector<index_t> ragged = {1, 17, 130, 300, 777};
  const std::vector<index_t> flushes = {127, 128, 129, 255, 256, 257, 1200};
  using F16 = kvq::Fp16Policy<kvq::Float16>;
  using BF16 = kvq::Fp16Policy<kvq::BFloat16>;
  using K2g32 = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 128>;
  using K4g32 = kvq::KiviPolicy<kvq::Bits::k4, kvq::Bits::k4, 32, 128>;
  using K4g64 = kvq::KiviPolicy<kvq::Bits::k4, kvq::Bits::k4, 64, 128>;
  using K2g128 = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 128, 128>;
  SECTION("fp16 cache") {
    check_reference<F16, float>(seed, 4, 2, 8, ragged);          // stories260K's shape
    check_reference<F16, float>(seed + 1, 3, 3, 64, flushes);    // SmolLM2's shape
    check_reference<F16, float>(seed + 2, 2, 16, 128, ragged);   // 16 query heads per kv head
    check_reference<F16, float>(seed + 3, 1, 4, 256, ragged, 0.05f);
    check_reference<F16, __half>(seed + 4, 2, 5, 96, ragged);
  }
  SECTION("bf16 cache") {
    check_reference<BF16, float>(seed + 5, 4, 2, 8, ragged);
    check_reference<BF16, __nv_bfloat16>(seed + 6, 2, 4, 128, flushes);
  }
  SECTION("kivi") {
    check_reference<K2g32, float>(seed + 7, 4, 2, 8, flushes);   // stories260K's shape: value groups span 4 kv heads
    check_reference<K4g32, float>(seed + 8, 4, 2, 8, ragged);
    check_reference<K2g32, float>(seed + 9, 3, 3, 64, flushes);  // SmolLM2's shape
    check_reference<K4g64, float>(seed + 10, 3, 3, 64, ragged);
    check_reference<K2g128, float>(seed + 11, 2, 4, 128, flushes);
    check_reference<K2g32, __half>(seed + 12, 2, 5, 96, flushes);
  }
}
