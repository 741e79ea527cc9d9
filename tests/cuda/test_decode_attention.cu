// SPDX-License-Identifier: Apache-2.0
// GPU decode attention against the CPU's fused attention (kvq::attend) on the same cache bytes:
// a CPU QuantizedKVCache is filled with random tokens (ragged batch, several flush boundaries),
// its pools, block tables and exact rows are copied to the device as they are, and every query
// head's output row must agree within 2e-3 relative (L2) for fp16; bf16 within 4e-3 (2^-8: the
// tensor cores take the probabilities in bf16, 8 significant bits).
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "kvq/cuda/decode_attention.cuh"
#include "kvq/kvq.hpp"
#include "gpu_testing.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::index_t;

using kvq_test::Device;

/// The device copy of one layer of a CPU cache: pools byte for byte, flat block tables, counts,
/// and per slot the exact rows [key sinks | key ring | value sinks | value ring].
template <class Policy>
struct DeviceCopy {
  using Cache = kvq::QuantizedKVCache<Policy>;
  using E = typename Cache::exact_type;
  std::vector<std::int32_t> key_table, value_table, key_q, value_q, lengths;
  std::vector<std::uint8_t> exact;
  Device<std::uint8_t> key_pool, value_pool;
  std::unique_ptr<Device<std::int32_t>> dkt, dvt, dkq, dvq, dlen;
  std::unique_ptr<Device<std::uint8_t>> dexact;
  kvq::PagedKVParams params;

  DeviceCopy(const Cache& cache, const std::vector<kvq::SequenceId>& seqs, index_t layer)
      : key_pool(cache.key_pool().reserved_bytes()), value_pool(cache.value_pool().reserved_bytes()) {
    REQUIRE(cudaMemcpy(key_pool.ptr, cache.key_pool().data(0), cache.key_pool().reserved_bytes(), cudaMemcpyHostToDevice) ==
            cudaSuccess);
    REQUIRE(cudaMemcpy(value_pool.ptr, cache.value_pool().data(0), cache.value_pool().reserved_bytes(),
                       cudaMemcpyHostToDevice) == cudaSuccess);
    const auto n = static_cast<index_t>(seqs.size());
    index_t max_blocks = 1;
    for (auto s : seqs) {
      max_blocks = std::max<index_t>(max_blocks, kvq::ceil_div<index_t>(cache.key_counts(s, layer).quantized, Cache::block_tokens));
      max_blocks = std::max<index_t>(max_blocks, kvq::ceil_div<index_t>(cache.value_counts(s, layer).quantized, Cache::block_tokens));
    }
    key_table.assign(static_cast<std::size_t>(n * max_blocks), 0);
    value_table = key_table;
    const index_t width = cache.width();
    const auto kv = cache.key_view(seqs[0], layer), vv = cache.value_view(seqs[0], layer);
    const std::size_t row = static_cast<std::size_t>(width) * sizeof(E);
    const std::size_t ks = kv.rule.sinks * row, kr = static_cast<std::size_t>(kv.ring_capacity) * row;
    const std::size_t vs = vv.rule.sinks * row, vr = static_cast<std::size_t>(vv.ring_capacity) * row;
    const std::size_t stride = ks + kr + vs + vr;
    exact.assign(std::max<std::size_t>(1, stride * seqs.size()), 0);
    for (index_t i = 0; i < n; ++i) {
      const auto k = cache.key_view(seqs[static_cast<std::size_t>(i)], layer);
      const auto v = cache.value_view(seqs[static_cast<std::size_t>(i)], layer);
      for (index_t b = 0; b < kvq::ceil_div<index_t>(k.counts.quantized, Cache::block_tokens); ++b) key_table[i * max_blocks + b] = k.blocks[b];
      for (index_t b = 0; b < kvq::ceil_div<index_t>(v.counts.quantized, Cache::block_tokens); ++b) value_table[i * max_blocks + b] = v.blocks[b];
      key_q.push_back(k.counts.quantized);
      value_q.push_back(v.counts.quantized);
      lengths.push_back(k.counts.length);
      std::uint8_t* base = exact.data() + static_cast<std::size_t>(i) * stride;
      if (ks) std::memcpy(base, k.sinks, ks);
      if (kr) std::memcpy(base + ks, k.ring, kr);
      if (vs) std::memcpy(base + ks + kr, v.sinks, vs);
      if (vr) std::memcpy(base + ks + kr + vs, v.ring, vr);
    }
    dkt = std::make_unique<Device<std::int32_t>>(key_table);
    dvt = std::make_unique<Device<std::int32_t>>(value_table);
    dkq = std::make_unique<Device<std::int32_t>>(key_q);
    dvq = std::make_unique<Device<std::int32_t>>(value_q);
    dlen = std::make_unique<Device<std::int32_t>>(lengths);
    dexact = std::make_unique<Device<std::uint8_t>>(exact);
    auto stream = [&](kvq::PagedStream& s, const kvq::StreamLayout& l, std::uint8_t* pool, const std::int32_t* table,
                      const std::int32_t* q, std::size_t sinks_offset, std::size_t ring_offset, index_t sinks, index_t ring) {
      s.pool = pool;
      s.block_bytes = l.block_bytes;
      s.block = l.block;
      s.quantized = l.quantized;
      s.block_tokens = static_cast<std::int32_t>(l.block_tokens);
      s.width = static_cast<std::int32_t>(l.width);
      s.block_table = table;
      s.max_blocks = static_cast<std::int32_t>(max_blocks);
      s.quantized_tokens = q;
      s.exact = dexact->ptr;
      s.exact_stride = stride;
      s.sinks_offset = sinks_offset;
      s.ring_offset = ring_offset;
      s.sinks = static_cast<std::int32_t>(sinks);
      s.ring_capacity = static_cast<std::int32_t>(std::max<index_t>(ring, 1));
    };
    stream(params.keys, cache.key_layout(), key_pool.ptr, dkt->ptr, dkq->ptr, 0, ks, kv.rule.sinks, kv.ring_capacity);
    stream(params.values, cache.value_layout(), value_pool.ptr, dvt->ptr, dvq->ptr, ks + kr, ks + kr + vs, vv.rule.sinks,
           vv.ring_capacity);
    params.lengths = dlen->ptr;
    params.num_kv_heads = static_cast<std::int32_t>(cache.config().num_kv_heads);
    params.head_dim = static_cast<std::int32_t>(cache.config().head_dim);
    params.exact_bytes = static_cast<std::int32_t>(sizeof(E));
  }
};

template <class Policy, class TQ>
void check_policy(std::uint64_t seed, index_t kv_heads, index_t group, index_t dim, const std::vector<index_t>& lengths,
                  std::int32_t splits) {
  using Cache = kvq::QuantizedKVCache<Policy>;
  using HostQ = std::conditional_t<std::is_same_v<TQ, __half>, kvq::Float16, kvq::BFloat16>;
  kvq::Rng rng(seed);
  kvq::CacheConfig cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = kv_heads;
  cfg.head_dim = dim;
  index_t total = 0;
  for (index_t l : lengths) total += l;
  cfg.num_blocks = Cache::blocks_for_tokens(1, total, static_cast<index_t>(lengths.size())) + 4;
  Cache cache(cfg);
  std::vector<kvq::SequenceId> seqs;
  const index_t width = kv_heads * dim;
  for (index_t n : lengths) {
    const kvq::SequenceId s = cache.add_sequence();
    seqs.push_back(s);
    // a prefill chunk, then decode steps (the KIVI flushes after attention)
    const index_t prefill = std::max<index_t>(1, n - 37);
    for (index_t done = 0; done < n;) {
      const index_t step = done == 0 ? prefill : 1;
      std::vector<kvq::Float16> k(static_cast<std::size_t>(step * width)), v(k.size());
      for (index_t i = 0; i < step * width; ++i) {
        // channel-dependent offsets and scales, as real keys have
        const index_t c = i % width;
        k[static_cast<std::size_t>(i)] = kvq::Float16::from_float(rng.normal() * (1.0f + static_cast<float>(c % 7)) + 0.3f * static_cast<float>(c % 5), kvq::Rounding::kNearestEven);
        v[static_cast<std::size_t>(i)] = kvq::Float16::from_float(rng.normal(), kvq::Rounding::kNearestEven);
      }
      cache.append(s, 0, k.data(), v.data(), step);
      done += step;
    }
  }
  const index_t heads = kv_heads * group;
  const auto batch = static_cast<index_t>(seqs.size());
  std::vector<HostQ> q(static_cast<std::size_t>(batch * heads * dim));
  for (auto& x : q) x = HostQ::from_float(rng.normal(), kvq::Rounding::kNearestEven);

  DeviceCopy<Policy> dev(cache, seqs, 0);
  Device<HostQ> dq(q);
  Device<HostQ> dout(q.size());
  kvq::cuda::DecodeAttentionArgs a;
  a.kv = dev.params;
  a.q = dq.ptr;
  a.out = dout.ptr;
  a.batch = static_cast<std::int32_t>(batch);
  a.num_q_heads = static_cast<std::int32_t>(heads);
  a.num_splits = splits;
  a.workspace_bytes = kvq::cuda::decode_workspace_bytes<Policy>(a.batch, a.num_q_heads, a.kv.num_kv_heads, a.kv.head_dim, splits);
  Device<std::uint8_t> ws(a.workspace_bytes);
  a.workspace = ws.ptr;
  REQUIRE(kvq::cuda::decode_workspace_clear(ws.ptr, a.workspace_bytes, nullptr) == kvq::Status::kOk);
  const std::string why = kvq::cuda::decode_check<Policy, TQ>(a);
  INFO(why);
  REQUIRE(why.empty());
  for (int rep = 0; rep < 2; ++rep) {  // the second launch checks that the counters were left at zero
    REQUIRE(kvq::cuda::decode_attention<Policy, TQ>(a, nullptr) == kvq::Status::kOk);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    std::vector<HostQ> got(q.size());
    REQUIRE(cudaMemcpy(got.data(), dout.ptr, got.size() * sizeof(HostQ), cudaMemcpyDeviceToHost) == cudaSuccess);

    // Per output row (entry, query head): the L2 error relative to the row's L2 norm; also the
    // largest element error relative to the largest magnitude of the batch entry.
    double worst = 0.0, worst_element = 0.0;
    for (index_t b = 0; b < batch; ++b) {
      std::vector<float> qf(static_cast<std::size_t>(heads * dim)), ref(qf.size());
      for (std::size_t i = 0; i < qf.size(); ++i) qf[i] = q[static_cast<std::size_t>(b * heads * dim) + i].to_float();
      kvq::attend(cache, seqs[static_cast<std::size_t>(b)], 0, kvq::StridedView<const float, 2>(qf.data(), {heads, dim}),
                  kvq::StridedView<float, 2>(ref.data(), {heads, dim}));
      const HostQ* row = got.data() + static_cast<std::size_t>(b * heads * dim);
      worst = std::max(worst, kvq_test::max_row_error(row, ref.data(), heads, dim));
      float scale = 0.0f;
      for (float r : ref) scale = std::max(scale, std::fabs(r));
      for (std::size_t i = 0; i < ref.size(); ++i) {
        worst_element = std::max(worst_element, std::fabs(static_cast<double>(row[i].to_float()) - ref[i]) / scale);
      }
    }
    CAPTURE(Policy::name(), seed, kv_heads, group, dim, splits, rep);
    UNSCOPED_INFO("max row error ||gpu - cpu|| / ||cpu|| = " << worst << ", max element error / max |cpu| = " << worst_element);
    std::printf("%s Hkv=%d group=%d d=%d splits=%d: row error %.2e, element error %.2e\n", Policy::name().c_str(),
                static_cast<int>(kv_heads), static_cast<int>(group), static_cast<int>(dim), splits, worst, worst_element);
    REQUIRE(worst <= (std::is_same_v<TQ, __half> ? 2e-3 : 4e-3));
  }
}

}  // namespace

TEST_CASE("decode attention on the GPU equals CPU fused attention", "[cuda][attention]") {
  const std::uint64_t seed = kvq_test::case_seed("decode_attention_gpu", 0);
  const std::vector<index_t> ragged = {1, 17, 130, 300, 777};
  const std::vector<index_t> flushes = {255, 256, 257, 1200};
  SECTION("fp16") {
    check_policy<kvq::Fp16Policy<kvq::Float16>, __half>(seed, 2, 4, 128, ragged, 1);
    check_policy<kvq::Fp16Policy<kvq::Float16>, __half>(seed + 1, 3, 3, 64, ragged, 3);
    check_policy<kvq::Fp16Policy<kvq::Float16>, __half>(seed + 2, 2, 1, 128, flushes, 4);
  }
  SECTION("bf16") { check_policy<kvq::Fp16Policy<kvq::BFloat16>, __nv_bfloat16>(seed + 3, 2, 4, 128, ragged, 2); }
  SECTION("kivi-2 g128") {
    using P = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 128, 128>;
    check_policy<P, __half>(seed + 4, 2, 4, 128, ragged, 1);
    check_policy<P, __half>(seed + 5, 2, 8, 128, flushes, 3);
    check_policy<P, __half>(seed + 6, 4, 1, 128, flushes, 2);
  }
  SECTION("kivi-2 g32") {
    using P = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 128>;
    check_policy<P, __half>(seed + 7, 2, 4, 128, flushes, 2);
    check_policy<P, __half>(seed + 8, 3, 3, 64, ragged, 2);
  }
  SECTION("kivi-2 g64") {
    using P = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 64, 128>;
    check_policy<P, __half>(seed + 9, 2, 4, 128, flushes, 2);
    check_policy<P, __half>(seed + 10, 2, 2, 64, flushes, 1);
  }
  SECTION("kivi-4 g128") {
    using P = kvq::KiviPolicy<kvq::Bits::k4, kvq::Bits::k4, 128, 128>;
    check_policy<P, __half>(seed + 11, 2, 4, 128, flushes, 2);
    check_policy<P, __half>(seed + 12, 2, 4, 64, ragged, 1);
  }
  SECTION("kivi-4 g32") {
    using P = kvq::KiviPolicy<kvq::Bits::k4, kvq::Bits::k4, 32, 128>;
    check_policy<P, __half>(seed + 13, 2, 4, 128, flushes, 2);
  }
  SECTION("many pieces") {
    // More pieces than a warp's lanes (the merge's loops over pieces), the short sequence's
    // pieces mostly empty (maximum -inf), as the long-context launches of the benchmark run.
    check_policy<kvq::Fp16Policy<kvq::Float16>, __half>(seed + 14, 2, 4, 128, {8000, 300}, 40);
    using P = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 128, 128>;
    check_policy<P, __half>(seed + 15, 2, 4, 128, {20000, 700}, 40);
  }
}
