// SPDX-License-Identifier: Apache-2.0
// The device cache's plan and append kernel body (kvq/cuda/append_plan.hpp) run on the host:
// AppendPlanner plans, run_append_on_host runs AppendWork thread block after thread block (in
// both orders, over pools and exact rows filled with garbage), and after every step of a ragged
// prefill + decode schedule the arrays are byte-identical to a QuantizedKVCache fed the same
// tokens. The GPU test (tests/cuda/test_device_cache.cu) checks the same on the device.
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "device_cache_testing.hpp"
#include "kvq_catch.hpp"
#include "require_error.hpp"
#include "seeds.hpp"

namespace {

using kvq::Bits;
using kvq::index_t;

/// The device cache's arrays in host memory, written by the host run of the append kernel.
template <class P>
struct EmulatedDevice {
  using E = typename P::exact_type;
  struct Arrays {
    std::vector<std::uint8_t> key_pool, value_pool, exact;
    std::vector<std::int32_t> key_table, value_table, key_quantized, value_quantized, lengths;
  };
  kvq::cuda::AppendPlanner<P> planner_;
  Arrays arrays;
  std::vector<std::int32_t> plan;
  kvq::cuda::AppendStatusWord status{};
  bool reverse = false;

  EmulatedDevice(const kvq::CacheConfig& cfg, const kvq::cuda::DeviceCacheLimits& limits, bool rev)
      : planner_(cfg, limits), reverse(rev) {
    const auto blocks = static_cast<std::size_t>(cfg.num_blocks);
    // Garbage where the device has stale bytes of freed blocks and slots: the kernel must zero.
    arrays.key_pool.assign(blocks * planner_.key_layout().block_bytes, 0xA5);
    arrays.value_pool.assign(blocks * planner_.value_layout().block_bytes, 0x5A);
    arrays.exact.assign(static_cast<std::size_t>(planner_.limits().max_slots * planner_.slot_stride()) * sizeof(E), 0xC3);
    planner_.tables(arrays.key_table, arrays.value_table, arrays.key_quantized, arrays.value_quantized, arrays.lengths);
  }

  const kvq::cuda::AppendPlanner<P>& planner() const { return planner_; }
  kvq::SequenceId add_sequence() { return planner_.add_sequence(); }
  void free(kvq::SequenceId s) { planner_.free(s); }
  const Arrays& contents() const { return arrays; }

  void append(const std::vector<kvq::SequenceId>& slots, index_t n, const std::vector<E>& k, const std::vector<E>& v) {
    const auto batch = static_cast<index_t>(slots.size());
    plan.assign(static_cast<std::size_t>(planner_.plan_words(batch, n)), 0);
    planner_.plan(slots.data(), batch, n, plan.data());
    const std::size_t layer_numbers = static_cast<std::size_t>(batch * n * planner_.width());
    for (index_t l = 0; l < planner_.config().num_layers; ++l) {
      const kvq::cuda::AppendArgs a = planner_.launch_args(
          l, batch, n, plan.data(), k.data() + static_cast<std::size_t>(l) * layer_numbers,
          v.data() + static_cast<std::size_t>(l) * layer_numbers, arrays.key_pool.data(), arrays.value_pool.data(),
          arrays.exact.data(), arrays.key_table.data(), arrays.value_table.data(), arrays.key_quantized.data(),
          arrays.value_quantized.data(), arrays.lengths.data(), &status);
      kvq::cuda::run_append_on_host<P>(a, reverse);
    }
  }

  void upload(const kvq::QuantizedKVCache<P>& cpu) {
    planner_.assign(cpu);
    std::memcpy(arrays.key_pool.data(), cpu.key_pool().data(), arrays.key_pool.size());
    std::memcpy(arrays.value_pool.data(), cpu.value_pool().data(), arrays.value_pool.size());
    const auto& seqs = cpu.sequences();
    std::memcpy(arrays.exact.data(), seqs.exact_data(), static_cast<std::size_t>(seqs.slots() * seqs.slot_stride()) * sizeof(E));
    planner_.tables(arrays.key_table, arrays.value_table, arrays.key_quantized, arrays.value_quantized, arrays.lengths);
  }
};

template <class P>
void run_lockstep(bool reverse, std::uint64_t seed) {
  const kvq::CacheConfig cfg = kvq_test::device_test_config(2, kvq_test::device_test_blocks<P>(2));
  kvq::QuantizedKVCache<P> cpu(cfg);
  EmulatedDevice<P> dev(cfg, kvq_test::device_test_limits(), reverse);
  kvq_test::Lockstep<P, EmulatedDevice<P>> run(cpu, dev, seed);
  run.run(160);
  REQUIRE(dev.status.status == 0);
  REQUIRE(cpu.key_counts(3, 0).quantized >= 3 * P::block_tokens);  // > 2 blocks of keys were flushed
}

using Kivi2g32 = kvq::KiviPolicy<Bits::k2, Bits::k2, 32, 128>;
using Kivi2g128 = kvq::KiviPolicy<Bits::k2, Bits::k2, 128, 128>;
using Kivi4g128 = kvq::KiviPolicy<Bits::k4, Bits::k4, 128, 128>;
using Kivi2g64 = kvq::KiviPolicy<Bits::k2, Bits::k2, 64, 128>;
using Kivi42g32 = kvq::KiviPolicy<Bits::k4, Bits::k2, 32, 128>;
using Fp16 = kvq::Fp16Policy<kvq::Float16>;
using Bf16 = kvq::Fp16Policy<kvq::BFloat16>;

}  // namespace

TEMPLATE_TEST_CASE("the host run of the device append matches QuantizedKVCache byte for byte", "[cache][device]", Fp16,
                   Bf16, Kivi2g32, Kivi2g128, Kivi4g128, Kivi2g64, Kivi42g32) {
  static_assert(kvq::cuda::is_device_policy_v<TestType>, "a device policy");
  const std::uint64_t seed = kvq_test::case_seed("device append host", 0);
  CAPTURE(seed, TestType::name());
  SECTION("thread blocks in order") { run_lockstep<TestType>(false, seed); }
  SECTION("thread blocks in reverse order") { run_lockstep<TestType>(true, seed + 1); }
}

TEST_CASE("device plan: thread blocks own whole heads and whole groups", "[cache][device]") {
  kvq::CacheConfig cfg = kvq_test::device_test_config(1, 8);
  REQUIRE(kvq::cuda::AppendPlanner<Kivi2g32>(cfg, kvq_test::device_test_limits()).part_width() == 64);
  REQUIRE(kvq::cuda::AppendPlanner<Kivi2g128>(cfg, kvq_test::device_test_limits()).part_width() == 128);
  REQUIRE(kvq::cuda::AppendPlanner<Fp16>(cfg, kvq_test::device_test_limits()).part_width() == 64);
  cfg.num_kv_heads = 3;  // 192 channels: g128 groups need all three heads
  cfg.head_dim = 64;
  REQUIRE_THROWS(kvq::cuda::AppendPlanner<Kivi2g128>(cfg, kvq_test::device_test_limits()));  // 192 % 128 != 0 (CPU rejects it too)
  cfg.num_kv_heads = 2;
  cfg.head_dim = 96;  // 192 channels, g64: 2 heads per part (lcm)
  REQUIRE(kvq::cuda::AppendPlanner<Kivi2g64>(cfg, kvq_test::device_test_limits()).part_width() == 192);
}

TEST_CASE("device plan: upload of a CPU cache, then lockstep appends", "[cache][device]") {
  using P = Kivi2g32;
  const std::uint64_t seed = kvq_test::case_seed("device upload host", 0);
  CAPTURE(seed);
  const kvq::CacheConfig cfg = kvq_test::device_test_config(2, kvq_test::device_test_blocks<P>(2));
  kvq::QuantizedKVCache<P> cpu(cfg);
  kvq::Rng rng(seed);
  const auto bias = kvq_test::make_bias(rng, cpu.width());
  const kvq::SequenceId a = cpu.add_sequence(), b = cpu.add_sequence(), c = cpu.add_sequence();
  for (auto [s, n] : {std::pair{a, 300}, std::pair{b, 17}, std::pair{c, 140}}) {
    for (index_t l = 0; l < 2; ++l) {
      const auto k = kvq_test::random_exact_rows<kvq::Float16>(rng, n, bias);
      const auto v = kvq_test::random_exact_rows<kvq::Float16>(rng, n, bias);
      cpu.append(s, l, k.data(), v.data(), n);
    }
  }
  const kvq::SequenceId f = cpu.fork(a);  // shares a's full blocks
  cpu.free(b);                            // a free slot, free blocks amid the free list
  EmulatedDevice<P> dev(cfg, kvq_test::device_test_limits(), false);
  dev.upload(cpu);
  kvq_test::Lockstep<P, EmulatedDevice<P>> run(cpu, dev, seed + 1);
  run.check();
  const kvq::SequenceId d = run.add();
  REQUIRE(d == b);
  run.append({d, a, c, f}, 3);
  for (int t = 0; t < 140; ++t) run.append({c, d, a, f}, 1);
  run.free(a);  // f keeps the shared blocks
  for (int t = 0; t < 10; ++t) run.append({f, c}, 1);
}

TEST_CASE("device plan: out of capacity leaves the cache unchanged", "[cache][device]") {
  using P = Kivi2g32;
  kvq::CacheConfig cfg = kvq_test::device_test_config(2, 5);  // 5 blocks per pool
  kvq::cuda::DeviceCacheLimits lim = kvq_test::device_test_limits();
  kvq::cuda::AppendPlanner<P> planner(cfg, lim);
  const kvq::SequenceId a = planner.add_sequence(), b = planner.add_sequence();
  std::vector<std::int32_t> plan(static_cast<std::size_t>(planner.max_plan_words()));
  const kvq::SequenceId ab[] = {a, b};
  planner.plan(ab, 2, 129, plan.data());  // keys: 1 block per layer and sequence (4 of 5)
  const kvq::StreamCounts before = planner.sequences().layer(a, 1).key.counts;
  const index_t free_keys = planner.key_ids().free_blocks(), free_values = planner.value_ids().free_blocks();
  const std::vector<std::int32_t> copy = plan;
  kvq_test::require_error([&] { planner.plan(ab, 2, 128, plan.data()); },
                          {"plan_append", "argument 'n' = 128", "4 key and 4 value blocks", "1 key and 1 value blocks are free of 5"});
  try {
    planner.plan(ab, 2, 128, plan.data());
  } catch (const kvq::Error& e) {
    REQUIRE(e.status() == kvq::Status::kOutOfCapacity);
  }
  REQUIRE(plan == copy);
  REQUIRE(planner.key_ids().free_blocks() == free_keys);
  REQUIRE(planner.value_ids().free_blocks() == free_values);
  REQUIRE(planner.sequences().layer(a, 1).key.counts.length == before.length);
  REQUIRE(planner.sequences().layer(a, 1).key.counts.quantized == before.quantized);
  kvq_test::require_error([&] { planner.plan(ab, 2, 1000, plan.data()); }, {"argument 'n' = 1000", "max_append_tokens (320)"});
  const kvq::SequenceId aa[] = {a, a};
  kvq_test::require_error([&] { planner.plan(aa, 2, 1, plan.data()); }, {"argument 'slots'", "named twice"});
  const kvq::SequenceId dead[] = {4};
  kvq_test::require_error([&] { planner.plan(dead, 1, 1, plan.data()); }, {"slots[0] = 4", "live sequences"});
  // max_tokens: 1024 tokens a sequence.
  cfg.num_blocks = 100;
  kvq::cuda::AppendPlanner<P> roomy(cfg, lim);
  const kvq::SequenceId one[] = {roomy.add_sequence()};
  for (int i = 0; i < 3; ++i) roomy.plan(one, 1, 300, plan.data());
  kvq_test::require_error([&] { roomy.plan(one, 1, 300, plan.data()); },
                          {"argument 'n' = 300", "at most 124 tokens for sequence 0", "max_tokens = 1024"});
  REQUIRE(roomy.sequences().layer(one[0], 0).key.counts.length == 900);
}

TEST_CASE("device append: a non-finite input is recorded with its layer, slot and position", "[cache][device]") {
  using P = Kivi2g32;
  const kvq::CacheConfig cfg = kvq_test::device_test_config(2, 40);
  EmulatedDevice<P> dev(cfg, kvq_test::device_test_limits(), false);
  const kvq::SequenceId a = dev.add_sequence(), b = dev.add_sequence();
  const index_t n = 3, width = cfg.num_kv_heads * cfg.head_dim;
  std::vector<kvq::Float16> k(static_cast<std::size_t>(2 * 2 * n * width), kvq::Float16(0.5f)), v = k;
  // Layer 1, batch entry 1 (slot b), token 2, channel 70 of v.
  v[static_cast<std::size_t>(((1 * 2 + 1) * n + 2) * width + 70)] = kvq::Float16(std::numeric_limits<float>::infinity());
  dev.append({a, b}, n, k, v);
  REQUIRE(dev.status.status == static_cast<unsigned>(kvq::Status::kNonFiniteInput));
  REQUIRE(dev.status.first == ((1ull << 52) | (static_cast<unsigned long long>(b) << 32) | (2ull << 1) | 1ull));
}
