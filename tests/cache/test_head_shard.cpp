// SPDX-License-Identifier: Apache-2.0
// Sharding by kv heads (cache/head_shard.hpp): the ranks' heads cover the model's once each; a
// rank's cache, fed the slices of the rows, reads every element of its heads as the unsharded
// cache does, and its attention outputs equal the unsharded cache's for the same heads bit for
// bit, after prefills, decode steps across flushes and ragged batches, for every policy that
// shards (the CSKV latent projection does not: it mixes every head's channels); bad arguments
// throw naming them.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kvq/layout/paged_read.hpp"

#include "cache_testing.hpp"
#include "kvq_catch.hpp"
#include "require_error.hpp"
#include "seeds.hpp"

namespace {

using kvq::index_t;
using kvq::SequenceId;
using kvq::Status;
using kvq_test::require_error;
using namespace kvq_test::policies;

struct ShardCase {
  index_t kv_heads;
  index_t ratio;  ///< query heads per kv head
  index_t dim;
  index_t world;
};

/// Channel orders that keep each rank's channels among its positions, `per_rank` groups a rank.
kvq::StreamCalibration rank_local_groups(kvq::Rng& rng, index_t width, index_t world, index_t per_rank) {
  kvq::StreamCalibration g;
  const index_t w = width / world;
  for (index_t c = 0; c < width; ++c) g.permutation.push_back(static_cast<std::int32_t>(c));
  g.boundaries.push_back(0);
  for (index_t r = 0; r < world; ++r) {
    for (index_t c = w - 1; c > 0; --c) {
      std::swap(g.permutation[static_cast<std::size_t>(r * w + c)],
                g.permutation[static_cast<std::size_t>(r * w + rng.below(static_cast<std::uint32_t>(c + 1)))]);
    }
    for (index_t i = 1; i < per_rank; ++i) {
      g.boundaries.push_back(static_cast<std::int32_t>(r * w + i * w / per_rank + rng.below(3)));
    }
    g.boundaries.push_back(static_cast<std::int32_t>((r + 1) * w));
  }
  g.clip = 0.8f + 0.2f * static_cast<float>(rng.uniform());
  return g;
}

/// One unsharded cache and `world` rank caches fed the same tokens (the ranks their slices):
/// prefills of ragged lengths, then decode steps with attention after each step's append.
template <class P>
void sharded_case(const char* label, std::uint64_t index, ShardCase shape, bool calibrated = false) {
  const std::uint64_t seed = kvq_test::case_seed(label, index);
  kvq::Rng rng(seed);
  const index_t layers = 2, hkv = shape.kv_heads, dim = shape.dim, hq = hkv * shape.ratio, w = hkv * dim;
  const int nseq = 2 + static_cast<int>(rng.below(3));
  std::vector<index_t> prompt;
  for (int s = 0; s < nseq; ++s) prompt.push_back(1 + static_cast<index_t>(rng.below(400)));
  const index_t steps = 130 + static_cast<index_t>(rng.below(20));  // crosses KIVI's 128-token flush
  index_t total = 0;
  for (index_t t : prompt) total += t + steps;
  CAPTURE(P::name(), seed, hkv, shape.ratio, dim, shape.world, prompt, steps, calibrated);

  kvq::CacheConfig cfg;
  cfg.num_layers = layers;
  cfg.num_kv_heads = hkv;
  cfg.head_dim = dim;
  cfg.num_blocks = kvq::QuantizedKVCache<P>::blocks_for_tokens(layers, total, nseq);
  kvq::CacheCalibration cal;
  if (calibrated) {
    for (index_t l = 0; l < layers; ++l) {
      cal.keys.push_back(rank_local_groups(rng, w, shape.world, 2));
      cal.values.push_back(rank_local_groups(rng, w, shape.world, 3));
    }
  }
  kvq::QuantizedKVCache<P> full(cfg, cal);
  std::vector<kvq::HeadShard> shard;
  std::vector<kvq::QuantizedKVCache<P>> ranks;
  for (index_t r = 0; r < shape.world; ++r) {
    shard.push_back(kvq::shard_heads<P>(hq, hkv, dim, shape.world, r));
    ranks.emplace_back(kvq::shard_config(cfg, shard.back()), kvq::shard_calibration(cal, shard.back()));
  }
  // The ranks' heads are the model's, each once, in order.
  for (index_t r = 0; r < shape.world; ++r) {
    REQUIRE(shard[static_cast<std::size_t>(r)].first_kv_head == r * (hkv / shape.world));
    REQUIRE(shard[static_cast<std::size_t>(r)].first_q_head == r * (hq / shape.world));
    REQUIRE(shard[static_cast<std::size_t>(r)].num_q_heads == shard[static_cast<std::size_t>(r)].num_kv_heads * shape.ratio);
  }

  std::vector<SequenceId> seqs;
  for (int s = 0; s < nseq; ++s) {
    seqs.push_back(full.add_sequence());
    for (auto& c : ranks) REQUIRE(c.add_sequence() == seqs.back());
  }
  const auto kbias = kvq_test::make_bias(rng, w), vbias = kvq_test::make_bias(rng, w, 0.5f);
  auto append_all = [&](SequenceId seq, index_t layer, index_t n) {
    const auto k = kvq_test::make_rows(rng, n, kbias), v = kvq_test::make_rows(rng, n, vbias);
    const auto kv_k = kvq_test::rows_view(k.data(), n, hkv, dim), kv_v = kvq_test::rows_view(v.data(), n, hkv, dim);
    full.append(seq, layer, kv_k, kv_v);
    for (index_t r = 0; r < shape.world; ++r) {
      const kvq::HeadShard& s = shard[static_cast<std::size_t>(r)];
      ranks[static_cast<std::size_t>(r)].append(seq, layer, kvq::shard_rows(kv_k, s), kvq::shard_rows(kv_v, s));
    }
  };
  for (int s = 0; s < nseq; ++s) {
    for (index_t l = 0; l < layers; ++l) append_all(seqs[static_cast<std::size_t>(s)], l, prompt[static_cast<std::size_t>(s)]);
  }

  const auto batch = static_cast<index_t>(nseq);
  std::vector<float> q(static_cast<std::size_t>(batch * hq * dim)), out(q.size()), part(q.size());
  std::size_t compared = 0;
  for (index_t step = 0; step < steps; ++step) {
    for (index_t l = 0; l < layers; ++l) {
      for (SequenceId seq : seqs) append_all(seq, l, 1);
      for (float& x : q) x = rng.normal();
      const kvq::StridedView<const float, 3> qv(q.data(), {batch, hq, dim});
      const kvq::Span<const SequenceId> ids(seqs.data(), seqs.size());
      kvq::attend_batch(full, ids, l, qv, kvq::StridedView<float, 3>(out.data(), {batch, hq, dim}));
      for (index_t r = 0; r < shape.world; ++r) {
        const kvq::HeadShard& s = shard[static_cast<std::size_t>(r)];
        const kvq::StridedView<float, 3> pv(part.data(), {batch, s.num_q_heads, dim});
        kvq::attend_batch(ranks[static_cast<std::size_t>(r)], ids, l, kvq::shard_rows(qv, s), pv);
        for (index_t b = 0; b < batch; ++b) {
          const float* want = out.data() + (b * hq + s.first_q_head) * dim;
          const float* got = part.data() + b * s.num_q_heads * dim;
          CAPTURE(step, l, r, b);
          REQUIRE(std::memcmp(want, got, sizeof(float) * static_cast<std::size_t>(s.num_q_heads * dim)) == 0);
          ++compared;
        }
      }
    }
  }
  REQUIRE(compared == static_cast<std::size_t>(steps * layers * shape.world * batch));

  // Every element of the ranks' streams reads as the unsharded cache's (where the policy's
  // streams are paged-readable: stored as they come).
  if constexpr (kvq::is_paged_readable_v<P>) {
    for (index_t l = 0; l < layers; ++l) {
      const kvq::HostPagedTables ft = full.paged(l);
      const kvq::PagedKVParams fp = ft.params();
      for (index_t r = 0; r < shape.world; ++r) {
        const kvq::HeadShard& s = shard[static_cast<std::size_t>(r)];
        const kvq::HostPagedTables rt = ranks[static_cast<std::size_t>(r)].paged(l);
        const kvq::PagedKVParams rp = rt.params();
        for (SequenceId seq : seqs) {
          const auto slot = static_cast<std::int32_t>(seq);
          REQUIRE(rp.lengths[slot] == fp.lengths[slot]);
          REQUIRE(rp.keys.quantized_tokens[slot] == fp.keys.quantized_tokens[slot]);
          REQUIRE(rp.values.quantized_tokens[slot] == fp.values.quantized_tokens[slot]);
          std::size_t differ = 0;
          for (std::int32_t p = 0; p < fp.lengths[slot]; ++p) {
            for (std::int32_t c = 0; c < static_cast<std::int32_t>(s.kv_width()); ++c) {
              const auto fc = static_cast<std::int32_t>(s.first_kv_channel()) + c;
              differ += kvq::paged_key<P>(rp, slot, p, c) != kvq::paged_key<P>(fp, slot, p, fc);
              differ += kvq::paged_value<P>(rp, slot, p, c) != kvq::paged_value<P>(fp, slot, p, fc);
            }
          }
          CAPTURE(l, r, seq);
          REQUIRE(differ == 0);
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("shard_heads: the ranks hold whole GQA groups, each head once", "[shard]") {
  for (index_t world : {1, 2, 4, 8}) {
    index_t next_kv = 0, next_q = 0;
    for (index_t r = 0; r < world; ++r) {
      const kvq::HeadShard s = kvq::shard_heads<KiviK2>(32, 8, 128, world, r);
      REQUIRE(s.first_kv_head == next_kv);
      REQUIRE(s.first_q_head == next_q);
      REQUIRE(s.num_kv_heads == 8 / world);
      REQUIRE(s.num_q_heads == 4 * s.num_kv_heads);
      REQUIRE(s.first_kv_channel() == s.first_kv_head * 128);
      next_kv += s.num_kv_heads;
      next_q += s.num_q_heads;
    }
    REQUIRE(next_kv == 8);
    REQUIRE(next_q == 32);
  }
  const kvq::HeadShard s = kvq::shard_heads<Fp16>(9, 3, 64, 3, 2);  // SmolLM2's heads over 3 ranks
  REQUIRE(s.first_kv_head == 2);
  REQUIRE(s.first_q_head == 6);
  REQUIRE(s.num_q_heads == 3);
}

TEST_CASE("shard_heads, shard_config, shard_calibration, shard_rows: bad arguments are named", "[shard]") {
  require_error([] { kvq::shard_heads<KiviK2>(32, 8, 128, 3, 0); }, Status::kInvalidArgument,
                {"kvq::shard_heads", "world_size", "3", "divisor of num_kv_heads (8)"});
  require_error([] { kvq::shard_heads<KiviK2>(32, 8, 128, 0, 0); }, Status::kInvalidArgument, {"world_size", "0"});
  require_error([] { kvq::shard_heads<KiviK2>(32, 8, 128, 4, 4); }, Status::kInvalidArgument, {"rank", "4", "0 .. 3"});
  require_error([] { kvq::shard_heads<KiviK2>(30, 8, 128, 4, 0); }, Status::kInvalidArgument, {"num_q_heads", "30"});
  // KIVI g128 values are grouped per token over 128 channels: a 64-channel rank would cut them.
  require_error([] { kvq::shard_heads<kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 128, 128>>(8, 4, 64, 4, 1); },
                Status::kInvalidArgument, {"world_size", "64 channels per rank", "group of 128 channels"});
  const kvq::HeadShard s = kvq::shard_heads<SkvqK2V2G32>(8, 4, 32, 2, 1);
  kvq::CacheConfig cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = 8;
  cfg.head_dim = 32;
  require_error([&] { kvq::shard_config(cfg, s); }, Status::kInvalidArgument, {"kvq::shard_config", "model", "8 kv heads"});
  kvq::CacheCalibration cal;
  cal.keys.emplace_back();
  for (std::int32_t c = 0; c < 128; ++c) cal.keys[0].permutation.push_back(127 - c);  // moves channels across ranks
  cal.keys[0].boundaries = {0, 64, 128};
  require_error([&] { kvq::shard_calibration(cal, s); }, Status::kInvalidArgument,
                {"calibration.keys[0]", "permutation[64] = 63", "rank 1's channels 64 .. 127"});
  for (std::int32_t c = 0; c < 128; ++c) cal.keys[0].permutation[static_cast<std::size_t>(c)] = c;
  cal.keys[0].boundaries = {0, 60, 128};
  require_error([&] { kvq::shard_calibration(cal, s); }, Status::kInvalidArgument,
                {"calibration.keys[0]", "channels 64 and 128"});
  kvq::CacheCalibration latent;
  latent.values.emplace_back();
  latent.values[0].latent.down.assign(8, 1.0f);
  require_error([&] { kvq::shard_calibration(latent, s); }, Status::kInvalidArgument,
                {"calibration.values[0]", "latent projection"});
  std::vector<float> rows(2 * 3 * 32);
  require_error([&] { kvq::shard_rows(kvq::StridedView<const float, 3>(rows.data(), {2, 3, 32}), s); },
                Status::kInvalidArgument, {"kvq::shard_rows", "rows", "[..., 3, 32]", "[..., 4 or 8, 32]"});
}

TEST_CASE("sharded caches: the ranks' attention equals the unsharded cache's bit for bit", "[shard]") {
  sharded_case<Fp16>("shard fp16", 0, {4, 4, 32, 2});
  sharded_case<Bf16>("shard bf16", 0, {4, 2, 32, 4});
  sharded_case<KiviK2>("shard kivi2 g32", 0, {4, 4, 64, 2});
  sharded_case<KiviK2>("shard kivi2 g32 smollm2", 1, {3, 3, 64, 3});
  sharded_case<KiviK4>("shard kivi4 g32 mha", 0, {4, 1, 32, 4});
  sharded_case<kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 128, 128>>("shard kivi2 g128", 0, {4, 4, 128, 4});
  sharded_case<PerTokenK2>("shard per-token", 0, {4, 2, 32, 2});
  sharded_case<SkvqK2V2G32>("shard skvq", 0, {4, 2, 32, 2});
  sharded_case<SkvqK2V15G32>("shard skvq calibrated", 0, {4, 2, 32, 2}, true);
}
