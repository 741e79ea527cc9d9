// SPDX-License-Identifier: Apache-2.0
// CPU decode attention from a PagedKVParams (kvq::attend<Policy>(kv, slot, transforms, ...),
// kvq::attend_batch<Policy>(kv, slots, ...)) against attend on the cache, bit for bit: the cache
// overloads are wrappers over the paged code path, so an export of the cache
// (QuantizedKVCache::paged(layer).params() with transforms(layer)) must give the same floats.
// Random caches (printed seeds) of fp16, KIVI, SKVQ with random calibrated channel groups and clip
// ratios (pre-RoPE) and CSKV (random orthonormal factors): several sequences of ragged lengths
// built by interleaved decode steps and prefill chunks (crossing window flushes and ring wraps),
// a fork and a freed slot (the export has free slots), single-threaded and split-KV. Then the
// errors of the paged overloads: every mismatch of the params with the policy, a bad slot, shapes.
// Four policies only: this translation unit instantiates each attention path once more.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cache_testing.hpp"
#include "kvq_catch.hpp"
#include "require_error.hpp"
#include "seeds.hpp"

namespace {

using kvq::index_t;
using kvq::SequenceId;
using namespace kvq_test::policies;  // Fp16, KiviSmall, SkvqSmall, CskvSmall

kvq::ThreadPool& two_threads() {
  static kvq::ThreadPool pool(2);
  return pool;
}

/// Random SKVQ channel groups of a row of `width`: a random permutation, `count` groups of random
/// sizes and a random clip ratio.
kvq::StreamCalibration random_groups(kvq::Rng& rng, index_t width, index_t count) {
  kvq::StreamCalibration g;
  for (index_t c = 0; c < width; ++c) g.permutation.push_back(static_cast<std::int32_t>(c));
  for (index_t c = width - 1; c > 0; --c) {
    std::swap(g.permutation[static_cast<std::size_t>(c)], g.permutation[rng.below(static_cast<std::uint32_t>(c + 1))]);
  }
  g.boundaries.push_back(0);
  for (index_t i = 1; i < count; ++i) {
    const index_t lo = g.boundaries.back() + 1, hi = width - (count - i);
    g.boundaries.push_back(static_cast<std::int32_t>(lo + static_cast<index_t>(rng.below(static_cast<std::uint32_t>(hi - lo + 1)))));
  }
  g.boundaries.push_back(static_cast<std::int32_t>(width));
  g.clip = 0.8f + 0.2f * static_cast<float>(rng.uniform());
  return g;
}

/// attend on the cache and attend<P> on the layer's export, single-threaded and split-KV: equal
/// bits. Returns the number of comparisons.
template <class P>
int compare_one(const kvq::QuantizedKVCache<P>& cache, SequenceId seq, index_t layer, index_t hq, kvq::Rng& rng) {
  const index_t dim = cache.config().head_dim;
  std::vector<float> q(static_cast<std::size_t>(hq * dim));
  for (float& x : q) x = rng.normal();
  const kvq::StridedView<const float, 2> qv(q.data(), {hq, dim});
  const kvq::HostPagedTables tables = cache.paged(layer);
  const kvq::PagedKVParams kv = tables.params();
  const kvq::LayerTransforms transforms = cache.transforms(layer);
  kvq::AttentionOptions split;
  split.pool = &two_threads();
  split.min_split_tokens = 16;
  int compared = 0;
  for (const kvq::AttentionOptions& opt : {kvq::AttentionOptions{}, split}) {
    std::vector<float> from_cache(q.size(), -1.0f), from_paged(q.size(), -2.0f);
    kvq::attend(cache, seq, layer, qv, kvq::StridedView<float, 2>(from_cache.data(), {hq, dim}), opt);
    kvq::attend<P>(kv, seq, transforms, qv, kvq::StridedView<float, 2>(from_paged.data(), {hq, dim}), opt);
    CAPTURE(seq, layer, cache.length(seq, layer), opt.pool != nullptr);
    REQUIRE(std::memcmp(from_cache.data(), from_paged.data(), q.size() * sizeof(float)) == 0);
    ++compared;
  }
  return compared;
}

/// One random cache of P (see the file comment); every comparison must be bit-exact.
template <class P>
void paged_case(const char* label, std::uint64_t index, bool calibrated_groups) {
  const std::uint64_t seed = kvq_test::case_seed(label, index);
  kvq::Rng rng(seed);
  const index_t layers = 2, hkv = 1 + static_cast<index_t>(rng.below(2)), dim = rng.below(2) == 0 ? 16 : 32;
  const index_t hq = hkv * (rng.below(2) == 0 ? 1 : 3), w = hkv * dim;
  const int nseq = 3 + static_cast<int>(rng.below(2));
  std::vector<index_t> target;
  for (int s = 0; s < nseq; ++s) target.push_back(1 + static_cast<index_t>(rng.below(90)));
  target[0] = 150 + static_cast<index_t>(rng.below(150));  // several blocks, flushes and ring wraps
  index_t total = 0;
  for (index_t t : target) total += t;
  std::fprintf(stderr, "paged attention case '%s' #%llu: seed %llu (%s, %lld kv heads x %lld, %lld query heads)\n", label,
               static_cast<unsigned long long>(index), static_cast<unsigned long long>(seed), P::name().c_str(),
               static_cast<long long>(hkv), static_cast<long long>(dim), static_cast<long long>(hq));
  CAPTURE(P::name(), seed, hkv, dim, hq, target);

  kvq::CacheConfig cfg;
  cfg.num_layers = layers;
  cfg.num_kv_heads = hkv;
  cfg.head_dim = dim;
  cfg.num_blocks = kvq::QuantizedKVCache<P>::blocks_for_tokens(layers, 2 * total, 2 * nseq + 2);
  cfg.rope = {rng.below(2) == 0 ? 10000.0 : 500000.0, rng.below(2) == 0 ? kvq::RopeStyle::kHalfSplit : kvq::RopeStyle::kAdjacentPairs};
  kvq::CacheCalibration cal = kvq::random_latent_calibration<P>(cfg, seed + 11);
  if (calibrated_groups) {
    const index_t group = kvq_test::Expect<P>::group;
    const index_t count = std::max<index_t>(1, (w + group / 2) / group) + 1;
    for (index_t l = 0; l < layers; ++l) {
      cal.keys.push_back(random_groups(rng, w, count));
      cal.values.push_back(random_groups(rng, w, count));
    }
  }
  kvq::QuantizedKVCache<P> cache(cfg, std::move(cal));
  std::vector<SequenceId> seqs;
  const SequenceId gap = cache.add_sequence();  // freed below: slot 0 of the export is free
  for (int s = 0; s < nseq; ++s) seqs.push_back(cache.add_sequence());
  const auto kbias = kvq_test::make_bias(rng, w), vbias = kvq_test::make_bias(rng, w, 0.5f);
  {
    const auto k = kvq_test::make_rows(rng, 5, kbias), v = kvq_test::make_rows(rng, 5, vbias);
    cache.append(gap, 0, k.data(), v.data(), 5);
    cache.free(gap);
  }

  int compared = 0;
  std::vector<std::vector<index_t>> len(static_cast<std::size_t>(nseq), std::vector<index_t>(layers, 0));
  bool forked = false;
  for (;;) {
    std::vector<std::pair<int, index_t>> open;
    for (int s = 0; s < nseq; ++s)
      for (index_t l = 0; l < layers; ++l)
        if (len[static_cast<std::size_t>(s)][static_cast<std::size_t>(l)] < target[static_cast<std::size_t>(s)]) open.emplace_back(s, l);
    if (open.empty()) break;
    const auto [s, l] = open[rng.below(static_cast<std::uint32_t>(open.size()))];
    index_t& have = len[static_cast<std::size_t>(s)][static_cast<std::size_t>(l)];
    const index_t left = target[static_cast<std::size_t>(s)] - have;
    const index_t n = rng.below(5) == 0 ? std::min<index_t>(left, 1 + static_cast<index_t>(rng.below(40))) : 1;
    const auto k = kvq_test::make_rows(rng, n, kbias), v = kvq_test::make_rows(rng, n, vbias, 0.5f);
    const SequenceId seq = seqs[static_cast<std::size_t>(s)];
    cache.append(seq, l, k.data(), v.data(), n);
    have += n;
    // The long sequence after each of its steps (every flush and wrap), the others now and then.
    if (s == 0) compared += compare_one(cache, seq, l, hq, rng);
    if (rng.below(16) == 0) {
      for (SequenceId other : seqs) {
        if (cache.length(other, l) > 0) compared += compare_one(cache, other, l, hq, rng);
      }
    }
    if (!forked && s == 0 && have > target[0] / 2 && l == 0) {
      seqs.push_back(cache.fork(seq));  // shares full blocks, copies a partial one
      forked = true;
    }
  }
  // The fork is compared as it stands (its length is the source's at the fork).
  for (SequenceId seq : seqs) {
    for (index_t l = 0; l < layers; ++l) {
      if (cache.length(seq, l) > 0) compared += compare_one(cache, seq, l, hq, rng);
    }
  }

  // attend_batch on the export equals attend_batch on the cache, with and without a pool.
  for (index_t l = 0; l < layers; ++l) {
    std::vector<SequenceId> ids;
    for (SequenceId seq : seqs) {
      if (cache.length(seq, l) > 0) ids.push_back(seq);
    }
    std::reverse(ids.begin(), ids.end());  // batch entry b is not slot b
    const auto b = static_cast<index_t>(ids.size());
    std::vector<float> q(static_cast<std::size_t>(b * hq * dim));
    for (float& x : q) x = rng.normal();
    const kvq::HostPagedTables tables = cache.paged(l);
    for (kvq::ThreadPool* pool : {static_cast<kvq::ThreadPool*>(nullptr), &two_threads()}) {
      kvq::AttentionOptions opt;
      opt.pool = pool;
      std::vector<float> from_cache(q.size(), -1.0f), from_paged(q.size(), -2.0f);
      const kvq::Span<const SequenceId> span(ids.data(), ids.size());
      kvq::attend_batch(cache, span, l, kvq::StridedView<const float, 3>(q.data(), {b, hq, dim}),
                        kvq::StridedView<float, 3>(from_cache.data(), {b, hq, dim}), opt);
      kvq::attend_batch<P>(tables.params(), span, cache.transforms(l), kvq::StridedView<const float, 3>(q.data(), {b, hq, dim}),
                           kvq::StridedView<float, 3>(from_paged.data(), {b, hq, dim}), opt);
      REQUIRE(std::memcmp(from_cache.data(), from_paged.data(), q.size() * sizeof(float)) == 0);
      ++compared;
    }
  }
  // Sanity of the test itself: the long sequence crossed blocks and holds a window or sinks.
  const kvq::StreamCounts kc = cache.key_counts(seqs[0], 0), vc = cache.value_counts(seqs[0], 0);
  REQUIRE(kc.length == target[0]);
  REQUIRE(kc.quantized + vc.quantized >= P::block_tokens);
  std::fprintf(stderr, "  %d bit-exact comparisons\n", compared);
  REQUIRE(compared >= 4 * layers);
}

template <class P>
void run_cases(const char* label, bool calibrated = false) {
  for (std::uint64_t i = 0; i < 3; ++i) paged_case<P>(label, i, calibrated);
}

}  // namespace

TEST_CASE("attend on cache.paged(layer) equals attend on the cache bit for bit: fp16", "[attention][paged]") {
  run_cases<Fp16>("paged attention fp16");
}

TEST_CASE("attend on cache.paged(layer) equals attend on the cache bit for bit: KIVI", "[attention][paged]") {
  run_cases<KiviSmall>("paged attention kivi");
}

TEST_CASE("attend on cache.paged(layer) equals attend on the cache bit for bit: SKVQ, calibrated groups, pre-RoPE",
          "[attention][paged]") {
  run_cases<SkvqSmall>("paged attention skvq", true);
}

TEST_CASE("attend on cache.paged(layer) equals attend on the cache bit for bit: CSKV", "[attention][paged]") {
  run_cases<CskvSmall>("paged attention cskv");
}

TEST_CASE("attend on a PagedKVParams names the argument of every mismatch", "[attention][paged][errors]") {
  const std::uint64_t seed = kvq_test::case_seed("paged attention errors", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  const index_t dim = 16, hkv = 2, hq = 4, w = hkv * dim;
  auto cache = kvq_test::make_cache<KiviSmall>(2, hkv, dim, 64);
  const SequenceId a = cache.add_sequence(), empty = cache.add_sequence(), b = cache.add_sequence();
  const auto bias = kvq_test::make_bias(rng, w);
  const auto x = kvq_test::make_rows(rng, 30, bias);
  cache.append(a, 0, x.data(), x.data(), 30);
  cache.append(b, 0, x.data(), x.data(), 3);
  const kvq::HostPagedTables tables = cache.paged(0);
  const kvq::PagedKVParams good = tables.params();
  const kvq::LayerTransforms tr = cache.transforms(0);
  std::vector<float> q(static_cast<std::size_t>(hq * dim), 0.5f), out(q.size(), -5.0f);
  auto attend = [&](const kvq::PagedKVParams& kv, std::int32_t slot, const kvq::LayerTransforms& t) {
    return [&, kv, slot, t] {
      kvq::attend<KiviSmall>(kv, slot, t, kvq::StridedView<const float, 2>(q.data(), {hq, dim}),
                             kvq::StridedView<float, 2>(out.data(), {hq, dim}));
    };
  };
  attend(good, a, tr)();  // the good params work
  const std::vector<float> want = out;

  // Slots.
  kvq_test::require_error(attend(good, -1, tr), {"kvq::attend", "argument 'slot' = -1", "a slot in 0..2"});
  kvq_test::require_error(attend(good, 3, tr), {"argument 'slot' = 3", "(kv.slots = 3)"});
  kvq_test::require_error(attend(good, empty, tr), {"argument 'slot' = '1 of length 0'", "at least one token"});
  kvq::PagedKVParams kv = good;
  kv.slots = 0;
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.slots' = 0"});
  kv = good;
  kv.lengths = nullptr;
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.lengths'"});

  // Layer-wide fields against the policy.
  kv = good;
  kv.exact_bytes = 4;
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.exact_bytes' = 4", "expected 2"});
  kv = good;
  kv.keys.block_tokens = 16;
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.keys.block_tokens' = 16", "expected 8"});
  kv = good;
  kv.values.width = 16;
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.values.width' = 16", "expected 32"});
  kv = good;
  kv.values.block.bits = kvq::Bits::k4;
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.values.block' = '4-bit", "2-bit"});
  kv = good;
  kv.keys.quantized = false;
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.keys.quantized' = 'false'", "expected true"});
  kv = good;
  kv.keys.block_bytes = 8;
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.keys.block_bytes' = 8"});
  kv = good;
  kv.values.sinks = 2;
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.values.sinks' = 2", "expected 0"});
  kv = good;
  kv.head_dim = 0;
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.head_dim' = 0"});

  // Per-slot counts and tables.
  std::vector<std::int32_t> counts = tables.key_quantized;
  counts[static_cast<std::size_t>(a)] = 31;
  kv = good;
  kv.keys.quantized_tokens = counts.data();
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.keys.quantized_tokens' = 'quantized_tokens[0] = 31 of length 30'"});
  counts[static_cast<std::size_t>(a)] = 8;  // a window of 22 rows: more than the ring holds
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.keys.quantized_tokens' = 'quantized_tokens[0] = 8 of length 30'", "a window ring of"});
  std::vector<std::int32_t> table = tables.value_table;
  table[static_cast<std::size_t>(a) * static_cast<std::size_t>(tables.max_blocks)] = -1;
  kv = good;
  kv.values.block_table = table.data();
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.values.block_table' = 'block_table[0][0] = -1'"});
  kv = good;
  kv.keys.max_blocks = 1;
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.keys.block_table'", "at least 3 blocks"});
  kv = good;
  kv.values.exact = nullptr;
  kvq_test::require_error(attend(kv, a, tr), {"argument 'kv.values.exact' = 'nullptr'"});

  // Transforms.
  kvq::LayerTransforms t = tr;
  t.keys.kind = kvq::TransformKind::kChannelReorder;
  kvq_test::require_error(attend(good, a, t), {"argument 'transforms.keys' = 'reorder transform", "identity transform"});
  t = tr;
  t.values.stored_width = 8;
  kvq_test::require_error(attend(good, a, t), {"argument 'transforms.values'", "of width 32 -> 32"});
  const std::int32_t perm[2] = {1, 0};
  t = tr;
  t.values.groups.permutation = kvq::Span<const std::int32_t>(perm, 2);
  kvq_test::require_error(attend(good, a, t), {"argument 'transforms.values.groups'", "no channel groups"});
  const kvq::RopeRotator rotator(dim, {}, 64);
  t = tr;
  t.rope = &rotator;
  kvq_test::require_error(attend(good, a, t), {"argument 'transforms.rope' = 'a rotator'", "stores keys after RoPE"});

  // Shapes and values.
  kvq_test::require_error(
      [&] {
        kvq::attend<KiviSmall>(good, a, tr, kvq::StridedView<const float, 2>(q.data(), {3, dim}),
                               kvq::StridedView<float, 2>(out.data(), {3, dim}));
      },
      {"argument 'q' = '[3, 16]'", "multiple of num_kv_heads (2)"});
  kvq_test::require_error(
      [&] {
        kvq::attend<KiviSmall>(good, a, tr, kvq::StridedView<const float, 2>(q.data(), {hq, dim}),
                               kvq::StridedView<float, 2>(out.data(), {2, dim}));
      },
      {"argument 'out' = '[2, 16]'", "shape [4, 16]"});
  std::vector<float> bad = q;
  bad[5] = std::nanf("");
  try {
    kvq::attend<KiviSmall>(good, a, tr, kvq::StridedView<const float, 2>(bad.data(), {hq, dim}),
                           kvq::StridedView<float, 2>(out.data(), {hq, dim}));
    FAIL("no kvq::Error");
  } catch (const kvq::Error& e) {
    REQUIRE(e.status() == kvq::Status::kNonFiniteInput);
    REQUIRE(std::string(e.what()).find("argument 'q' = 'q[0, 5] = nan'") != std::string::npos);
  }
  REQUIRE(out == want);  // nothing above wrote the output

  // attend_batch validates every slot before writing any output.
  std::vector<float> qb(static_cast<std::size_t>(3 * hq * dim), 0.25f), outb(qb.size(), -5.0f);
  auto batch = [&](std::vector<std::int32_t> ids) {
    return [&, ids] {
      const auto n = static_cast<index_t>(ids.size());
      kvq::attend_batch<KiviSmall>(good, kvq::Span<const std::int32_t>(ids.data(), ids.size()), tr,
                                   kvq::StridedView<const float, 3>(qb.data(), {n, hq, dim}),
                                   kvq::StridedView<float, 3>(outb.data(), {n, hq, dim}));
    };
  };
  kvq_test::require_error(batch({a, b, 7}), {"kvq::attend_batch", "argument 'slots' = 'slots[2] = 7'", "a slot in 0..2"});
  kvq_test::require_error(batch({b, empty}), {"argument 'slots' = 'slots[1] = 1 of length 0'"});
  for (float o : outb) REQUIRE(o == -5.0f);
  batch({b, a})();
  for (float o : outb) REQUIRE(std::isfinite(o));

  // The cache's transforms of a bad layer.
  kvq_test::require_error([&] { (void)cache.transforms(2); }, {"kvq::QuantizedKVCache::transforms", "argument 'layer' = 2"});
}

TEST_CASE("attend on a PagedKVParams of a pre-RoPE policy needs the cache's rotator", "[attention][paged][errors]") {
  const std::uint64_t seed = kvq_test::case_seed("paged attention rope errors", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  const index_t dim = 16, hkv = 1, hq = 2;
  auto cache = kvq_test::make_cache<SkvqSmall>(1, hkv, dim, 16);
  const SequenceId a = cache.add_sequence();
  const auto bias = kvq_test::make_bias(rng, hkv * dim);
  const auto x = kvq_test::make_rows(rng, 20, bias);
  cache.append(a, 0, x.data(), x.data(), 20);
  const kvq::HostPagedTables tables = cache.paged(0);
  std::vector<float> q(static_cast<std::size_t>(hq * dim), 0.5f), out(q.size());
  auto attend = [&](const kvq::LayerTransforms& t) {
    return [&, t] {
      kvq::attend<SkvqSmall>(tables.params(), a, t, kvq::StridedView<const float, 2>(q.data(), {hq, dim}),
                             kvq::StridedView<float, 2>(out.data(), {hq, dim}));
    };
  };
  kvq::LayerTransforms t = cache.transforms(0);
  REQUIRE(t.rope != nullptr);
  attend(t)();
  t.rope = nullptr;
  kvq_test::require_error(attend(t), {"argument 'transforms.rope' = 'nullptr'", "stores them before RoPE", "head_dim 16"});
  const kvq::RopeRotator wrong_dim(32, {}, 64), short_runs(dim, {}, 8);
  t.rope = &wrong_dim;
  kvq_test::require_error(attend(t), {"argument 'transforms.rope' = 'a rotator of head_dim 32 for runs of 64 tokens'"});
  t.rope = &short_runs;
  kvq_test::require_error(attend(t), {"for runs of 8 tokens", "runs of at least 64 tokens"});
  // Channel groups of the wrong size.
  static const std::int32_t perm[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  t = cache.transforms(0);
  t.keys.groups.permutation = kvq::Span<const std::int32_t>(perm, 16);
  t.keys.groups.boundaries = kvq::Span<const std::int32_t>(perm, 1);
  kvq_test::require_error(attend(t), {"argument 'transforms.keys.groups'", "16 channels and 3 boundaries"});
}
