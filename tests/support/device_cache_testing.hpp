// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Helpers of the device cache tests (host-only): a CPU QuantizedKVCache and a device
///        cache (the real one, or the host run of its kernel) fed the same tokens in lockstep,
///        the byte comparison of the device's arrays with the CPU cache after every step, and
///        of a downloaded host cache with the CPU cache (compare_caches, require_download_equals).
///
/// A Device backend provides: add_sequence(), free(seq), append(slots, n, k, v) with k, v host
/// [num_layers][batch][n][width] of the exact type, upload(cpu), contents() (a
/// DeviceArrays-like struct: key_pool, value_pool, exact as bytes; key_table, value_table,
/// key_quantized, value_quantized, lengths as int32), planner() and download(host).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kvq/cuda/append_plan.hpp"
#include "kvq/kvq.hpp"
#include "cache_testing.hpp"
#include "kvq_catch.hpp"

namespace kvq_test {

using kvq::index_t;

/// "" when the device arrays `d` hold, for every live slot of `cpu` that has tokens, the CPU
/// cache's lengths, counts, block ids and block bytes in every layer, and its exact rows (the
/// whole layer's sinks and rings, unused rows included); else the first difference.
template <class P, class Contents>
std::string compare_with_cpu(const Contents& d, const kvq::cuda::AppendPlanner<P>& planner,
                             const kvq::QuantizedKVCache<P>& cpu) {
  using E = typename kvq::QuantizedKVCache<P>::exact_type;
  const kvq::SequenceTable<E>& seqs = cpu.sequences();
  const auto max_slots = static_cast<std::size_t>(planner.limits().max_slots);
  const auto max_blocks = static_cast<std::size_t>(planner.max_blocks());
  const kvq::ExactRows& rows = planner.exact_rows();
  if (rows.layer_stride() != seqs.exact_rows().layer_stride()) return "exact row layouts differ";
  for (kvq::SequenceId s = 0; s < seqs.slots(); ++s) {
    if (!cpu.is_live(s)) continue;
    if (!planner.is_live(s)) return kvq::detail::concat("slot ", s, " is live on the CPU only");
    for (index_t l = 0; l < cpu.config().num_layers; ++l) {
      const kvq::LayerState& ls = seqs.layer(s, l);
      const kvq::LayerState& ms = planner.sequences().layer(s, l);
      const std::string where = kvq::detail::concat("slot ", s, " layer ", l, ": ");
      if (ms.key.counts.length != ls.key.counts.length || ms.key.counts.quantized != ls.key.counts.quantized ||
          ms.value.counts.quantized != ls.value.counts.quantized || ms.key.blocks != ls.key.blocks ||
          ms.value.blocks != ls.value.blocks) {
        return where + "the host mirror's counts or block ids differ from the CPU cache's";
      }
      const std::size_t at = static_cast<std::size_t>(l) * max_slots + static_cast<std::size_t>(s);
      if (d.lengths[at] != ls.key.counts.length) {
        return where + kvq::detail::concat("device length ", d.lengths[at], ", CPU ", ls.key.counts.length);
      }
      if (ls.key.counts.length == 0) continue;  // not appended yet: the device rows are not the CPU's zeros
      if (d.key_quantized[at] != ls.key.counts.quantized || d.value_quantized[at] != ls.value.counts.quantized) {
        return where + kvq::detail::concat("device quantized ", d.key_quantized[at], "/", d.value_quantized[at], ", CPU ",
                                           ls.key.counts.quantized, "/", ls.value.counts.quantized);
      }
      for (int stream = 0; stream < 2; ++stream) {
        const bool key = stream == 0;
        const std::vector<std::int32_t>& blocks = key ? ls.key.blocks : ls.value.blocks;
        const std::vector<std::int32_t>& table = key ? d.key_table : d.value_table;
        const std::vector<std::uint8_t>& pool = key ? d.key_pool : d.value_pool;
        const kvq::BlockPool& cpu_pool = key ? cpu.key_pool() : cpu.value_pool();
        const std::size_t bytes = cpu_pool.block_bytes();
        for (std::size_t b = 0; b < blocks.size(); ++b) {
          const std::int32_t id = table[at * max_blocks + b];
          if (id != blocks[b]) {
            return where + kvq::detail::concat(key ? "key" : "value", " block ", b, ": device id ", id, ", CPU ", blocks[b]);
          }
          const std::uint8_t* dev = pool.data() + static_cast<std::size_t>(id) * bytes;
          const std::uint8_t* host = cpu_pool.data(blocks[b]);
          for (std::size_t i = 0; i < bytes; ++i) {
            if (dev[i] != host[i]) {
              const kvq::StreamLayout& layout = key ? cpu.key_layout() : cpu.value_layout();
              const char* region = !layout.quantized ? "rows"
                                   : i < layout.block.scales_offset ? "codes"
                                   : i < layout.block.zeros_offset  ? "scales"
                                   : i < layout.block.used_bytes()  ? "zeros"
                                                                    : "padding";
              return where + kvq::detail::concat(key ? "key" : "value", " block ", b, " (id ", id, ") byte ", i, " (",
                                                 region, "): device ", int{dev[i]}, ", CPU ", int{host[i]});
            }
          }
        }
      }
      const std::size_t stride = static_cast<std::size_t>(rows.layer_stride()) * sizeof(E);
      const std::uint8_t* dev_rows =
          d.exact.data() + (static_cast<std::size_t>(s) * static_cast<std::size_t>(planner.slot_stride()) +
                            static_cast<std::size_t>(l * rows.layer_stride())) * sizeof(E);
      const auto* host_rows = reinterpret_cast<const std::uint8_t*>(seqs.exact(s, l, true, false));
      if (stride > 0 && std::memcmp(dev_rows, host_rows, stride) != 0) {
        std::size_t i = 0;
        while (dev_rows[i] == host_rows[i]) ++i;
        const index_t row = static_cast<index_t>(i / sizeof(E)) / rows.width;
        return where + kvq::detail::concat("exact row ", row, " of the layer (key sinks, key ring, value sinks, value ring: ",
                                           rows.key_sinks, ", ", rows.key_ring, ", ", rows.value_sinks, ", ", rows.value_ring,
                                           " rows) differs at byte ", i);
      }
    }
  }
  return "";
}

/// "" when two host caches of one config hold the same thing byte for byte: the same slots (live
/// or free), per live slot and layer the same counts, block ids, block bytes and exact rows
/// (the whole layer's sinks and rings), the same reference counts and free blocks in both pools
/// and the same memory_bytes(); else the first difference. (Free blocks' and free slots' stale
/// bytes are not compared.)
template <class P>
std::string compare_caches(const kvq::QuantizedKVCache<P>& got, const kvq::QuantizedKVCache<P>& want) {
  using E = typename kvq::QuantizedKVCache<P>::exact_type;
  const kvq::SequenceTable<E>& gs = got.sequences();
  const kvq::SequenceTable<E>& ws = want.sequences();
  if (gs.slots() != ws.slots()) return kvq::detail::concat(gs.slots(), " slots, expected ", ws.slots());
  const kvq::ExactRows& rows = ws.exact_rows();
  for (kvq::SequenceId s = 0; s < ws.slots(); ++s) {
    if (gs.is_live(s) != ws.is_live(s)) {
      return kvq::detail::concat("slot ", s, ws.is_live(s) ? " is live" : " is free", " in the expected cache only");
    }
    if (!ws.is_live(s)) continue;
    for (index_t l = 0; l < want.config().num_layers; ++l) {
      const std::string where = kvq::detail::concat("slot ", s, " layer ", l, ": ");
      for (int stream = 0; stream < 2; ++stream) {
        const bool key = stream == 0;
        const kvq::StreamState& g = gs.layer(s, l).stream(key);
        const kvq::StreamState& w = ws.layer(s, l).stream(key);
        const char* name = key ? "keys" : "values";
        if (g.counts.length != w.counts.length || g.counts.quantized != w.counts.quantized) {
          return where + kvq::detail::concat(name, " hold ", g.counts.length, " tokens (", g.counts.quantized, " quantized), expected ",
                                             w.counts.length, " (", w.counts.quantized, ")");
        }
        if (g.blocks != w.blocks) return where + name + ": block ids differ";
        const kvq::BlockPool& gp = key ? got.key_pool() : got.value_pool();
        const kvq::BlockPool& wp = key ? want.key_pool() : want.value_pool();
        for (std::size_t b = 0; b < w.blocks.size(); ++b) {
          if (std::memcmp(gp.data(w.blocks[b]), wp.data(w.blocks[b]), wp.block_bytes()) != 0) {
            return where + kvq::detail::concat(name, " block ", b, " (id ", w.blocks[b], "): bytes differ");
          }
        }
      }
      const std::size_t bytes = static_cast<std::size_t>(rows.layer_stride()) * sizeof(E);
      if (bytes > 0 && std::memcmp(gs.exact(s, l, true, false), ws.exact(s, l, true, false), bytes) != 0) {
        return where + "exact rows differ";
      }
    }
  }
  for (int stream = 0; stream < 2; ++stream) {
    const kvq::BlockIdAllocator& g = (stream == 0 ? got.key_pool() : got.value_pool()).ids();
    const kvq::BlockIdAllocator& w = (stream == 0 ? want.key_pool() : want.value_pool()).ids();
    if (g.num_blocks() != w.num_blocks() || g.free_blocks() != w.free_blocks()) {
      return kvq::detail::concat(stream == 0 ? "key" : "value", " pool: ", g.free_blocks(), " of ", g.num_blocks(),
                                 " blocks free, expected ", w.free_blocks(), " of ", w.num_blocks());
    }
    for (index_t b = 0; b < w.num_blocks(); ++b) {
      if (g.refs(static_cast<std::int32_t>(b)) != w.refs(static_cast<std::int32_t>(b))) {
        return kvq::detail::concat(stream == 0 ? "key" : "value", " block ", b, ": ", g.refs(static_cast<std::int32_t>(b)),
                                   " references, expected ", w.refs(static_cast<std::int32_t>(b)));
      }
    }
  }
  if (got.memory_bytes() != want.memory_bytes()) {
    return kvq::detail::concat("memory_bytes ", got.memory_bytes(), ", expected ", want.memory_bytes());
  }
  return "";
}

/// Downloads a device backend (download(QuantizedKVCache&)) into `into` (fresh or not) and
/// requires it to equal `cpu` (compare_caches) and CPU attention on it to equal attention on `cpu`
/// bit for bit, for random queries of two query heads per kv head, every live sequence and layer.
template <class P, class Device>
void require_download_equals(const Device& dev, kvq::QuantizedKVCache<P>& into, const kvq::QuantizedKVCache<P>& cpu,
                             std::uint64_t seed) {
  dev.download(into);
  const std::string diff = compare_caches(into, cpu);
  INFO(diff);
  REQUIRE(diff.empty());
  kvq::Rng rng(seed);
  const index_t heads = 2 * cpu.config().num_kv_heads, dim = cpu.config().head_dim;
  std::vector<float> q(static_cast<std::size_t>(heads * dim)), a(q.size()), b(q.size());
  int attended = 0;
  for (kvq::SequenceId s = 0; s < cpu.sequences().slots(); ++s) {
    if (!cpu.is_live(s) || cpu.length(s) == 0) continue;
    for (index_t l = 0; l < cpu.config().num_layers; ++l) {
      for (float& x : q) x = rng.normal();
      kvq::attend(into, s, l, kvq::StridedView<const float, 2>(q.data(), {heads, dim}), kvq::StridedView<float, 2>(a.data(), {heads, dim}));
      kvq::attend(cpu, s, l, kvq::StridedView<const float, 2>(q.data(), {heads, dim}), kvq::StridedView<float, 2>(b.data(), {heads, dim}));
      CAPTURE(s, l);
      REQUIRE(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
      ++attended;
    }
  }
  REQUIRE(attended > 0);
}

/// Random rows of the exact type E, [count][width] with a per-channel bias per stream.
template <class E>
std::vector<E> random_exact_rows(kvq::Rng& rng, index_t count, const std::vector<float>& bias) {
  const std::vector<float> x = make_rows(rng, count, bias);
  std::vector<E> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = kvq::from_float<E>(x[i]);
  return out;
}

/// The CPU cache of the upload and download tests (2 layers, fp16 rows): sequences a, b and c of
/// 300, 17 and 140 random rows, then a fork f of a (sharing a's full blocks) and b freed (a free
/// slot, free blocks amid the free list).
struct UploadFixture {
  kvq::SequenceId a, b, c, f;
};
template <class P>
UploadFixture fill_for_upload(kvq::QuantizedKVCache<P>& cpu, kvq::Rng& rng) {
  const auto bias = make_bias(rng, cpu.width());
  UploadFixture u{cpu.add_sequence(), cpu.add_sequence(), cpu.add_sequence(), 0};
  for (const auto& [s, n] : {std::pair<kvq::SequenceId, index_t>{u.a, 300}, {u.b, 17}, {u.c, 140}}) {
    for (index_t l = 0; l < 2; ++l) {
      const auto k = random_exact_rows<kvq::Float16>(rng, n, bias);
      const auto v = random_exact_rows<kvq::Float16>(rng, n, bias);
      cpu.append(s, l, k.data(), v.data(), n);
    }
  }
  u.f = cpu.fork(u.a);
  cpu.free(u.b);
  return u;
}

/// A CPU cache and a device backend fed the same operations; every append is compared.
template <class P, class Device>
struct Lockstep {
  using E = typename kvq::QuantizedKVCache<P>::exact_type;
  kvq::QuantizedKVCache<P>& cpu;
  Device& dev;
  kvq::Rng rng;
  std::vector<float> key_bias, value_bias;
  int steps = 0;

  Lockstep(kvq::QuantizedKVCache<P>& c, Device& d, std::uint64_t seed) : cpu(c), dev(d), rng(seed) {
    key_bias = make_bias(rng, cpu.width());
    value_bias = make_bias(rng, cpu.width());
  }

  kvq::SequenceId add() {
    const kvq::SequenceId a = cpu.add_sequence();
    const kvq::SequenceId b = dev.add_sequence();
    REQUIRE(a == b);
    return a;
  }
  void free(kvq::SequenceId s) {
    cpu.free(s);
    dev.free(s);
  }

  /// n tokens for each of `slots` in every layer, on both; then the comparison.
  void append(const std::vector<kvq::SequenceId>& slots, index_t n) {
    const index_t layers = cpu.config().num_layers, width = cpu.width();
    const auto batch = static_cast<index_t>(slots.size());
    const std::vector<E> k = random_exact_rows<E>(rng, layers * batch * n, key_bias);
    const std::vector<E> v = random_exact_rows<E>(rng, layers * batch * n, value_bias);
    for (index_t l = 0; l < layers; ++l) {
      for (index_t i = 0; i < batch; ++i) {
        const std::size_t at = static_cast<std::size_t>(((l * batch + i) * n) * width);
        cpu.append(slots[static_cast<std::size_t>(i)], l, k.data() + at, v.data() + at, n);
      }
    }
    dev.append(slots, n, k, v);
    ++steps;
    check();
  }

  void check() {
    CAPTURE(steps);
    const auto contents = dev.contents();
    const std::string diff = compare_with_cpu(contents, dev.planner(), cpu);
    INFO(diff);
    REQUIRE(diff.empty());
  }

  /// The test's schedule: a ragged batch of 4 sequences (prefill chunks of 37, 300, 129, 128,
  /// 5 tokens), `decode` decode steps of all live ones, a free and a new sequence (slot reuse)
  /// with its own prefill, and a chunk after decode steps (KIVI's pending flush first).
  void run(int decode) {
    const kvq::SequenceId a = add(), b = add(), c = add(), d = add();
    append({a, b, c}, 37);
    append({d}, 300);
    append({b}, 129);
    append({c, a}, 128);
    std::vector<kvq::SequenceId> live = {a, b, c, d};
    for (int t = 0; t < decode; ++t) {
      append(live, 1);
      if (t == decode / 3) append({c}, 5);
      if (t == decode / 2) {
        free(b);
        const kvq::SequenceId e = add();
        REQUIRE(e == b);  // the slot is reused: new blocks and rows must not show the old ones
        append({e}, 200);
        live = {d, a, e, c};
      }
    }
  }
};

/// A config of `layers` layers, 4 kv heads of 64 (a 256-wide row: KIVI g128 groups span two heads).
inline kvq::CacheConfig device_test_config(index_t layers, index_t blocks) {
  kvq::CacheConfig cfg;
  cfg.num_layers = layers;
  cfg.num_kv_heads = 4;
  cfg.head_dim = 64;
  cfg.num_blocks = blocks;
  return cfg;
}

/// Limits of the lockstep tests' device caches (6 slots, ragged batches of up to 5) and the
/// blocks per pool that hold their schedule.
inline kvq::cuda::DeviceCacheLimits device_test_limits() {
  kvq::cuda::DeviceCacheLimits lim;
  lim.max_slots = 6;
  lim.max_tokens = 1024;
  lim.max_batch = 5;
  lim.max_append_tokens = 320;
  return lim;
}
template <class P>
kvq::index_t device_test_blocks(kvq::index_t layers) {
  return kvq::QuantizedKVCache<P>::blocks_for_tokens(layers, 6 * 700, 6);
}

}  // namespace kvq_test
