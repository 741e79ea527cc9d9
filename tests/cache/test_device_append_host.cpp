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

  /// DeviceKVCache::download's host half: the mirror into QuantizedKVCache::restore, memcpy for cudaMemcpy.
  void download(kvq::QuantizedKVCache<P>& host) const {
    planner_.check_host_config("kvq::cuda::DeviceKVCache::download", host.config());
    host.restore(planner_.sequences(), planner_.key_ids(), planner_.value_ids(), [&](const kvq::CacheBytes& b) {
      REQUIRE(b.key_pool_bytes == arrays.key_pool.size());
      REQUIRE(b.value_pool_bytes == arrays.value_pool.size());
      REQUIRE(b.exact_bytes <= arrays.exact.size());
      std::memcpy(b.key_pool, arrays.key_pool.data(), b.key_pool_bytes);
      std::memcpy(b.value_pool, arrays.value_pool.data(), b.value_pool_bytes);
      if (b.exact_bytes > 0) std::memcpy(b.exact, arrays.exact.data(), b.exact_bytes);
    });
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
  const auto [a, b, c, f] = kvq_test::fill_for_upload(cpu, rng);
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

namespace {

/// A CPU cache of `cfg` with a ragged batch of three sequences, a fork and a free (the same for
/// the same seed).
template <class P>
void fill_ragged(kvq::QuantizedKVCache<P>& cpu, std::uint64_t seed) {
  using E = typename kvq::QuantizedKVCache<P>::exact_type;
  kvq::Rng rng(seed);
  const auto bias = kvq_test::make_bias(rng, cpu.width());
  const kvq::SequenceId a = cpu.add_sequence(), b = cpu.add_sequence(), c = cpu.add_sequence();
  for (auto [s, n] : {std::pair{a, 300}, std::pair{b, 17}, std::pair{c, 140}}) {
    for (index_t l = 0; l < cpu.config().num_layers; ++l) {
      const auto k = kvq_test::random_exact_rows<E>(rng, n, bias);
      const auto v = kvq_test::random_exact_rows<E>(rng, n, bias);
      cpu.append(s, l, k.data(), v.data(), n);
    }
  }
  (void)cpu.fork(a);  // shares a's full blocks (reference counts 2)
  cpu.free(b);        // a free slot, free blocks amid the free list
}

}  // namespace

TEMPLATE_TEST_CASE("device download (host run): after ragged appends across flushes it equals the CPU cache",
                   "[cache][device][download]", Fp16, Bf16, Kivi2g32, Kivi4g128, Kivi42g32) {
  using P = TestType;
  const std::uint64_t seed = kvq_test::case_seed("device download host", 0);
  CAPTURE(seed, P::name());
  const kvq::CacheConfig cfg = kvq_test::device_test_config(2, kvq_test::device_test_blocks<P>(2));
  kvq::QuantizedKVCache<P> cpu(cfg);
  EmulatedDevice<P> dev(cfg, kvq_test::device_test_limits(), false);
  kvq_test::Lockstep<P, EmulatedDevice<P>> run(cpu, dev, seed);
  run.run(40);
  REQUIRE(cpu.key_counts(3, 0).quantized >= 2 * P::block_tokens);  // blocks were flushed
  (void)run.add();  // live but empty: the device's rows of its slot are garbage, the host's zero
  kvq::QuantizedKVCache<P> fresh(cfg);
  kvq_test::require_download_equals(dev, fresh, cpu, seed + 1);
  // Into a cache that held other sequences: everything it held is replaced.
  kvq::QuantizedKVCache<P> used(cfg);
  fill_ragged(used, seed + 2);
  kvq_test::require_download_equals(dev, used, cpu, seed + 3);
}

TEST_CASE("device download (host run): upload then download round-trips a cache with forks and free slots",
          "[cache][device][download]") {
  using P = Kivi2g32;
  const std::uint64_t seed = kvq_test::case_seed("device roundtrip host", 0);
  CAPTURE(seed);
  const kvq::CacheConfig cfg = kvq_test::device_test_config(2, kvq_test::device_test_blocks<P>(2));
  kvq::QuantizedKVCache<P> cpu(cfg);
  fill_ragged(cpu, seed);
  EmulatedDevice<P> dev(cfg, kvq_test::device_test_limits(), false);
  dev.upload(cpu);
  kvq::QuantizedKVCache<P> back(cfg);
  kvq_test::require_download_equals(dev, back, cpu, seed + 1);
  REQUIRE(back.key_pool().ids().refs(back.sequences().layer(0, 0).key.blocks[0]) == 2);  // the fork's share
  // The downloaded cache carries on like the original.
  kvq_test::Lockstep<P, EmulatedDevice<P>> run(cpu, dev, seed + 2);
  for (int t = 0; t < 130; ++t) run.append({0, 2, 3}, 1);
  kvq_test::require_download_equals(dev, back, cpu, seed + 3);
}

TEST_CASE("device download / QuantizedKVCache::restore: errors name the argument and leave the cache unchanged",
          "[cache][device][download]") {
  using P = Kivi2g32;
  using E = kvq::QuantizedKVCache<P>::exact_type;
  const std::uint64_t seed = kvq_test::case_seed("device download errors", 0);
  const kvq::CacheConfig cfg = kvq_test::device_test_config(2, kvq_test::device_test_blocks<P>(2));
  kvq::QuantizedKVCache<P> cpu(cfg);
  fill_ragged(cpu, seed);
  EmulatedDevice<P> dev(cfg, kvq_test::device_test_limits(), false);
  dev.upload(cpu);

  kvq::CacheConfig other = cfg;
  other.num_blocks += 1;
  kvq::QuantizedKVCache<P> wrong(other), twin(other);
  fill_ragged(wrong, seed + 1);
  fill_ragged(twin, seed + 1);
  kvq_test::require_error([&] { dev.download(wrong); },
                          {"kvq::cuda::DeviceKVCache::download", "argument 'host' = 'a cache of 2 layers, 4 kv heads of 64",
                           kvq::detail::concat(other.num_blocks, " blocks"), "the device cache's config"});
  REQUIRE(kvq_test::compare_caches(wrong, twin).empty());

  kvq::QuantizedKVCache<P> host(cfg), host_twin(cfg);
  fill_ragged(host, seed + 2);
  fill_ragged(host_twin, seed + 2);
  const kvq::cuda::AppendPlanner<P>& pl = dev.planner();
  auto no_fill = [](const kvq::CacheBytes&) { FAIL("fill must not run when the bookkeeping is rejected"); };
  kvq_test::require_error([&] { host.restore(kvq::SequenceTable<E>(3, kvq::ExactRows{}), pl.key_ids(), pl.value_ids(), no_fill); },
                          {"kvq::QuantizedKVCache::restore", "argument 'sequences' = 'a table of 3 layers", "num_layers = 2"});
  kvq_test::require_error([&] { host.restore(pl.sequences(), kvq::BlockIdAllocator(cfg.num_blocks + 1), pl.value_ids(), no_fill); },
                          {"argument 'key_ids' = 'ids of", "config().num_blocks"});
  kvq_test::require_error([&] { host.restore(pl.sequences(), pl.key_ids(), kvq::BlockIdAllocator(cfg.num_blocks), no_fill); },
                          {"argument 'value_ids' = 'block 0 with 0 references", "uses of the live sequences' block tables"});
  kvq::SequenceTable<E> bad = pl.sequences();
  bad.layer(0, 1).value.counts.length += 1;
  kvq_test::require_error([&] { host.restore(bad, pl.key_ids(), pl.value_ids(), no_fill); },
                          {"argument 'sequences' = 'sequence 0 layer 1: 300 key and 301 value tokens"});
  bad = pl.sequences();
  bad.layer(2, 0).key.counts.quantized = 0;  // 140 tokens: 128 quantized, 12 in the window; 140 do not fit the ring
  kvq_test::require_error([&] { host.restore(bad, pl.key_ids(), pl.value_ids(), no_fill); },
                          {"sequence 2 layer 0 keys: 140 tokens, 0 quantized", "window rule"});
  bad = pl.sequences();
  bad.layer(2, 1).key.blocks.push_back(0);
  kvq_test::require_error([&] { host.restore(bad, pl.key_ids(), pl.value_ids(), no_fill); },
                          {"sequence 2 layer 1 keys: 2 blocks", "1 blocks of 128 tokens for 128 quantized tokens"});
  bad = pl.sequences();
  bad.layer(2, 1).value.blocks[0] = static_cast<std::int32_t>(cfg.num_blocks);
  kvq_test::require_error([&] { host.restore(bad, pl.key_ids(), pl.value_ids(), no_fill); },
                          {kvq::detail::concat("block id ", cfg.num_blocks), "block ids in 0.."});
  // A failing copy: the new storage is dropped.
  REQUIRE_THROWS_AS(host.restore(pl.sequences(), pl.key_ids(), pl.value_ids(),
                                 [](const kvq::CacheBytes& b) {
                                   std::memset(b.key_pool, 0xEE, b.key_pool_bytes);
                                   throw kvq::Error(kvq::Status::kCudaError, "copy failed");
                                 }),
                    kvq::Error);
  REQUIRE(kvq_test::compare_caches(host, host_twin).empty());
  dev.download(host);  // and a valid one then succeeds
  REQUIRE(kvq_test::compare_caches(host, cpu).empty());
}
