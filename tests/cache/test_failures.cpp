// SPDX-License-Identifier: Apache-2.0
// Failure atomicity: every invalid call throws kvq::Error with the documented status and a
// message naming the argument, and leaves everything a caller can observe (memory, pool use,
// live sequences, counts, keys and values read back) exactly as it was. A shadow cache receives
// only the valid calls; after every call both caches must read the same, so the cache keeps
// working after each failure. Also: calibration errors (SKVQ channel groups, CSKV factors) and
// configuration errors.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "cache_testing.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::Bits;
using kvq::index_t;
using kvq::MetaFormat;
using kvq::SequenceId;
using kvq::Status;
using kvq_test::Expect;

using namespace kvq_test::policies;  // KiviK2, SkvqSmall, ...

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

/// Runs f, which must throw kvq::Error with `status` and a message containing every needle.
void require_error(const std::function<void()>& f, Status status, std::initializer_list<const char*> needles) {
  bool threw = false;
  try {
    f();
  } catch (const kvq::Error& e) {
    threw = true;
    const std::string what = e.what();
    CAPTURE(what);
    REQUIRE(e.status() == status);
    for (const char* n : needles) {
      CAPTURE(n);
      REQUIRE(what.find(n) != std::string::npos);
    }
  }
  REQUIRE(threw);
}

/// The tested cache and its shadow, which only sees the calls that must succeed.
template <class P>
struct Pair {
  static constexpr index_t layers = 2, heads = 2, dim = 16, width = heads * dim;
  kvq::QuantizedKVCache<P> cache;
  kvq::QuantizedKVCache<P> shadow;
  kvq::Rng rng;
  std::vector<float> kbias, vbias;

  Pair(index_t blocks, std::uint64_t seed)
      : cache(kvq_test::make_cache<P>(layers, heads, dim, blocks, 5)),
        shadow(kvq_test::make_cache<P>(layers, heads, dim, blocks, 5)),
        rng(seed) {
    kbias = kvq_test::make_bias(rng, width);
    vbias = kvq_test::make_bias(rng, width);
  }

  std::vector<float> rows(index_t n, bool key) { return kvq_test::make_rows(rng, n, key ? kbias : vbias); }

  void require_same() {
    const std::string d = kvq_test::diff(kvq_test::snapshot(cache), kvq_test::snapshot(shadow));
    CAPTURE(d);
    REQUIRE(d.empty());
  }
  SequenceId add() {
    const SequenceId a = cache.add_sequence();
    REQUIRE(shadow.add_sequence() == a);
    return a;
  }
  void valid_append(SequenceId seq, index_t layer, index_t n) {
    const auto k = rows(n, true), v = rows(n, false);
    cache.append(seq, layer, k.data(), v.data(), n);
    shadow.append(seq, layer, k.data(), v.data(), n);
    require_same();
  }
  /// f(cache) must throw as described and change nothing.
  void invalid(const std::function<void(kvq::QuantizedKVCache<P>&)>& f, Status status,
               std::initializer_list<const char*> needles) {
    const kvq_test::CacheSnapshot before = kvq_test::snapshot(cache);
    require_error([&] { f(cache); }, status, needles);
    const std::string d = kvq_test::diff(before, kvq_test::snapshot(cache));
    CAPTURE(d);
    REQUIRE(d.empty());
    require_same();
  }
};

/// Rows [n, heads, dim] with one element replaced.
std::vector<float> poisoned(std::vector<float> x, index_t index, float value) {
  x[static_cast<std::size_t>(index)] = value;
  return x;
}

template <class P>
void failure_walk(const char* label) {
  using E = typename Expect<P>::exact_type;
  using Cache = kvq::QuantizedKVCache<P>;
  constexpr index_t L = Pair<P>::layers, H = Pair<P>::heads, D = Pair<P>::dim, W = Pair<P>::width;
  const std::uint64_t seed = kvq_test::case_seed(label, 0);
  CAPTURE(P::name(), seed);
  Pair<P> t(20, seed);
  const SequenceId s0 = t.add(), s1 = t.add(), s2 = t.add();
  t.valid_append(s0, 0, 20);
  t.valid_append(s0, 1, 5);
  t.valid_append(s1, 0, 1);
  t.cache.free(s2);
  t.shadow.free(s2);
  t.require_same();

  const auto k = t.rows(30, true), v = t.rows(30, false);
  auto append = [&](SequenceId seq, index_t layer, const std::vector<float>& kk, const std::vector<float>& vv, index_t n) {
    return [&, seq, layer, n](Cache& c) { c.append(seq, layer, kk.data(), vv.data(), n); };
  };
  const char* A = "kvq::QuantizedKVCache::append";

  SECTION("bad sequence ids and layers") {
    for (SequenceId bad : {-1, 3, 99, s2}) {
      CAPTURE(bad);
      t.invalid(append(bad, 0, k, v, 3), Status::kInvalidArgument, {A, "argument 'seq'"});
    }
    for (index_t bad : {index_t{-1}, L, index_t{1000}}) {
      CAPTURE(bad);
      t.invalid(append(s0, bad, k, v, 3), Status::kInvalidArgument, {A, "argument 'layer'"});
    }
    t.invalid([&](Cache& c) { c.free(s2); }, Status::kInvalidArgument, {"free", "argument 'seq'"});
    t.invalid([&](Cache& c) { c.free(-1); }, Status::kInvalidArgument, {"free", "argument 'seq'"});
    t.invalid([&](Cache& c) { (void)c.fork(s2); }, Status::kInvalidArgument, {"fork", "argument 'source'"});
    t.invalid([&](Cache& c) { (void)c.length(s2); }, Status::kInvalidArgument, {"argument 'seq'"});
    t.invalid([&](Cache& c) { (void)c.length(s0, L); }, Status::kInvalidArgument, {"argument 'layer'"});
    t.invalid([&](Cache& c) { (void)c.key_counts(7, 0); }, Status::kInvalidArgument, {"argument 'seq'"});
    t.invalid([&](Cache& c) { (void)c.value_counts(s0, -1); }, Status::kInvalidArgument, {"argument 'layer'"});
    t.invalid([&](Cache& c) { (void)c.key_view(s2, 0); }, Status::kInvalidArgument, {"argument 'seq'"});
    std::vector<float> buf(1000);
    t.invalid([&](Cache& c) { c.read_keys(s2, 0, buf.data()); }, Status::kInvalidArgument, {"argument 'seq'"});
    t.invalid([&](Cache& c) { c.read_values(s0, L, buf.data()); }, Status::kInvalidArgument, {"argument 'layer'"});
  }

  SECTION("wrong k / v shapes") {
    const index_t wrong_heads[3] = {3, H + 1, D};
    const index_t wrong_dim[3] = {3, H, D - 2};
    const index_t right[3] = {3, H, D};
    const index_t more[3] = {4, H, D};
    using V3 = kvq::StridedView<const float, 3>;
    t.invalid([&](Cache& c) { c.append(s0, 0, V3(k.data(), wrong_heads), V3(v.data(), right)); }, Status::kInvalidArgument,
              {A, "argument 'k'", "shape"});
    t.invalid([&](Cache& c) { c.append(s0, 0, V3(k.data(), wrong_dim), V3(v.data(), right)); }, Status::kInvalidArgument,
              {A, "argument 'k'"});
    t.invalid([&](Cache& c) { c.append(s0, 0, V3(k.data(), right), V3(v.data(), wrong_dim)); }, Status::kInvalidArgument,
              {A, "argument 'v'"});
    t.invalid([&](Cache& c) { c.append(s0, 0, V3(k.data(), right), V3(v.data(), more)); }, Status::kInvalidArgument,
              {A, "argument 'v'"});
    t.invalid([&](Cache& c) { c.append(s0, 0, V3(nullptr, right), V3(v.data(), right)); }, Status::kInvalidArgument,
              {A, "argument 'k'"});
  }

  SECTION("NaN, Inf and out-of-range values anywhere in a chunk") {
    for (index_t token : {index_t{0}, index_t{13}, index_t{29}}) {
      const index_t at = token * W + static_cast<index_t>(t.rng.below(static_cast<std::uint32_t>(W)));
      CAPTURE(token, at);
      const auto kn = poisoned(k, at, kNaN);
      const auto vi = poisoned(v, at, kInf);
      const auto km = poisoned(k, at, -kInf);
      const std::string pos = "[" + std::to_string(token) + ", ";
      t.invalid(append(s0, 0, kn, v, 30), Status::kNonFiniteInput, {A, "argument 'k'", pos.c_str()});
      t.invalid(append(s0, 1, k, vi, 30), Status::kNonFiniteInput, {A, "argument 'v'", pos.c_str()});
      t.invalid(append(s1, 0, km, v, 30), Status::kNonFiniteInput, {A, "argument 'k'"});
      // A decode step (one token) too.
      const auto k1 = poisoned(k, at % W, kNaN);
      t.invalid(append(s1, 0, k1, v, 1), Status::kNonFiniteInput, {A, "argument 'k'"});
      if constexpr (!std::is_same_v<E, float>) {
        // Beyond the exact type's range (fp16: 65504; bf16: about 3.39e38).
        const float big = std::is_same_v<E, kvq::Float16> ? 70000.0f : std::numeric_limits<float>::max();
        const auto kb = poisoned(k, at, -big);
        const auto vb = poisoned(v, at, big);
        t.invalid(append(s0, 0, kb, v, 30), Status::kNonFiniteInput, {A, "argument 'k'", "range"});
        t.invalid(append(s0, 0, k, vb, 30), Status::kNonFiniteInput, {A, "argument 'v'", "range"});
      }
    }
    // fp16 input that is out of range for a bf16-free cache: BFloat16 rows of 1e6.
    if constexpr (std::is_same_v<E, kvq::Float16>) {
      std::vector<kvq::BFloat16> kb(static_cast<std::size_t>(W), kvq::BFloat16(1.0f));
      kb[5] = kvq::BFloat16(1e6f);
      t.invalid([&](Cache& c) { c.append(s0, 0, kb.data(), kb.data(), 1); }, Status::kNonFiniteInput, {A, "argument 'k'"});
    }
  }

  SECTION("a full pool: kOutOfCapacity, for one big chunk and for the decode step that does not fit") {
    t.invalid(
        [&](Cache& c) {
          const auto kk = kvq_test::make_rows(t.rng, 5000, t.kbias);
          c.append(s0, 0, kk.data(), kk.data(), 5000);
        },
        Status::kOutOfCapacity, {A, "num_blocks", "free"});
    // Decode steps until the pools run out; the failing step changes nothing.
    bool failed = false;
    for (int i = 0; i < 2000 && !failed; ++i) {
      const auto kk = t.rows(1, true), vv = t.rows(1, false);
      const kvq_test::CacheSnapshot before = kvq_test::snapshot(t.cache);
      try {
        t.cache.append(s1, 1, kk.data(), vv.data(), 1);
      } catch (const kvq::Error& e) {
        failed = true;
        REQUIRE(e.status() == Status::kOutOfCapacity);
        REQUIRE(kvq_test::diff(before, kvq_test::snapshot(t.cache)).empty());
        REQUIRE((t.cache.key_pool().free_blocks() == 0 || t.cache.value_pool().free_blocks() == 0));
        continue;
      }
      t.shadow.append(s1, 1, kk.data(), vv.data(), 1);
    }
    REQUIRE(failed);
    t.require_same();
    // Fork needs copies of s0's partial blocks: once the pools cannot hold them, fork fails and
    // adds nothing (forks that still fit are made on both caches until then).
    std::vector<SequenceId> forks;
    bool fork_failed = false;
    for (int i = 0; i < 100 && !fork_failed; ++i) {
      index_t partial_k = 0, partial_v = 0;
      for (index_t l = 0; l < L; ++l) {
        partial_k += t.cache.key_counts(s0, l).quantized % P::block_tokens != 0;
        partial_v += t.cache.value_counts(s0, l).quantized % P::block_tokens != 0;
      }
      REQUIRE(partial_k + partial_v > 0);
      if (partial_k > t.cache.key_pool().free_blocks() || partial_v > t.cache.value_pool().free_blocks()) {
        fork_failed = true;
        t.invalid([&](Cache& c) { (void)c.fork(s0); }, Status::kOutOfCapacity, {"fork", "argument 'source'", "num_blocks"});
      } else {
        forks.push_back(t.cache.fork(s0));
        REQUIRE(t.shadow.fork(s0) == forks.back());
        t.require_same();
      }
    }
    REQUIRE(fork_failed);
    // Freeing makes room again; everything keeps working.
    for (SequenceId f : forks) {
      t.cache.free(f);
      t.shadow.free(f);
    }
    t.cache.free(s1);
    t.shadow.free(s1);
    t.require_same();
    const SequenceId f = t.cache.fork(s0);
    REQUIRE(t.shadow.fork(s0) == f);
    t.require_same();
  }

  SECTION("attend: bad sequence, layer, q, out, scale; empty sequence or layer; NaN q") {
    const index_t hq = 2 * H;
    std::vector<float> q(static_cast<std::size_t>(hq * D), 0.5f), out(static_cast<std::size_t>(hq * D), -7.0f);
    using Q = kvq::StridedView<const float, 2>;
    using O = kvq::StridedView<float, 2>;
    const SequenceId empty = t.add();
    auto attend = [&](SequenceId seq, index_t layer, Q qq, O oo, kvq::AttentionOptions o = {}) {
      return [=, &out](Cache& c) {
        (void)out;
        kvq::attend(c, seq, layer, qq, oo, o);
      };
    };
    const Q qok(q.data(), {hq, D});
    const O ook(out.data(), {hq, D});
    auto check = [&](const std::function<void(Cache&)>& f, Status st, std::initializer_list<const char*> needles) {
      t.invalid(f, st, needles);
      for (float x : out) REQUIRE(x == -7.0f);  // the output is not written
    };
    check(attend(s2, 0, qok, ook), Status::kInvalidArgument, {"kvq::attend", "argument 'seq'"});
    check(attend(-1, 0, qok, ook), Status::kInvalidArgument, {"kvq::attend", "argument 'seq'"});
    check(attend(s0, L, qok, ook), Status::kInvalidArgument, {"kvq::attend", "argument 'layer'"});
    check(attend(s0, 0, Q(q.data(), {hq, D - 2}), ook), Status::kInvalidArgument, {"kvq::attend", "argument 'q'"});
    check(attend(s0, 0, Q(q.data(), {H + 1, D}), O(out.data(), {H + 1, D})), Status::kInvalidArgument,
          {"kvq::attend", "argument 'q'", "multiple of num_kv_heads"});
    check(attend(s0, 0, Q(q.data(), {0, D}), O(out.data(), {0, D})), Status::kInvalidArgument, {"kvq::attend", "argument 'q'"});
    check(attend(s0, 0, qok, O(out.data(), {H, D})), Status::kInvalidArgument, {"kvq::attend", "argument 'out'"});
    check(attend(empty, 0, qok, ook), Status::kInvalidArgument, {"kvq::attend", "argument 'seq'", "at least one token"});
    check(attend(s1, 1, qok, ook), Status::kInvalidArgument, {"kvq::attend", "argument 'seq'", "at least one token"});
    kvq::AttentionOptions neg;
    neg.scale = -1.0f;
    check(attend(s0, 0, qok, ook, neg), Status::kInvalidArgument, {"kvq::attend", "argument 'options.scale'"});
    neg.scale = kNaN;
    check(attend(s0, 0, qok, ook, neg), Status::kInvalidArgument, {"kvq::attend", "argument 'options.scale'"});
    for (float bad : {kNaN, kInf, -kInf}) {
      auto qb = q;
      qb[static_cast<std::size_t>(hq * D - 3)] = bad;
      check(attend(s0, 0, Q(qb.data(), {hq, D}), ook), Status::kNonFiniteInput, {"kvq::attend", "argument 'q'"});
    }
    // A valid call on both caches gives the same output, bit for bit.
    std::vector<float> a(out.size()), b(out.size());
    kvq::attend(t.cache, s0, 0, qok, O(a.data(), {hq, D}));
    kvq::attend(t.shadow, s0, 0, qok, O(b.data(), {hq, D}));
    REQUIRE(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  }

  // After the failures: the cache keeps working (decode steps, a chunk, a fork) exactly like
  // the shadow that never saw them.
  for (int i = 0; i < 12; ++i) t.valid_append(s0, i % 2, 1);
  t.valid_append(s0, 0, 17);
  if (t.cache.is_live(s1)) t.valid_append(s1, 0, 9);
  const SequenceId f = t.cache.fork(s0);
  REQUIRE(t.shadow.fork(s0) == f);
  t.valid_append(f, 1, 3);
  t.require_same();
}

}  // namespace

TEMPLATE_TEST_CASE("every invalid call throws a named kvq::Error and changes nothing; the cache keeps working",
                   "[cache][errors]", KiviSmall, SkvqSmall, CskvSmall, PerTokenSmall, Fp16, Bf16, Fp32) {
  failure_walk<TestType>("failure walk");
}

TEST_CASE("SKVQ: values whose groups overflow FP8 metadata are rejected by the append that brings them",
          "[cache][errors][skvq]") {
  // SkvqSmall: S = 3, W = 6, G = 8, width 32, fp8 e4m3 metadata (max 448), clip 0.92. A group
  // containing -1e4 needs a zero-point of -9200: not representable.
  const std::uint64_t seed = kvq_test::case_seed("skvq fp8 overflow", 0);
  CAPTURE(seed);
  Pair<SkvqSmall> t(40, seed);
  const SequenceId s = t.add();
  t.valid_append(s, 0, 4);
  constexpr index_t W = Pair<SkvqSmall>::width;
  const auto k = t.rows(14, true), v = t.rows(14, false);
  const char* A = "kvq::QuantizedKVCache::append";
  // In a chunk whose tokens are quantized at once (positions past the sinks and the window).
  for (index_t token : {index_t{0}, index_t{5}, index_t{13}}) {
    CAPTURE(token);
    const auto kb = poisoned(k, token * W + 9, -1e4f);
    const auto vb = poisoned(v, token * W + 30, 2e4f);
    t.invalid([&](auto& c) { c.append(s, 0, kb.data(), v.data(), 14); }, Status::kMetadataOverflow,
              {A, "argument 'k'", "fp8"});
    // Only the values overflow: the keys of the chunk would fit (the key blocks must be given back).
    t.invalid([&](auto& c) { c.append(s, 0, k.data(), vb.data(), 14); }, Status::kMetadataOverflow,
              {A, "argument 'v'", "fp8"});
    // A decode step into the window (quantized only W steps later) fails now, not then.
    t.invalid([&](auto& c) { c.append(s, 0, kb.data() + token * W, v.data(), 1); }, Status::kMetadataOverflow,
              {A, "argument 'k'", "fp8"});
    t.invalid([&](auto& c) { c.append(s, 0, k.data(), vb.data() + token * W, 1); }, Status::kMetadataOverflow,
              {A, "argument 'v'", "fp8"});
  }
  // Sinks are never quantized: such a token is accepted as one of the first S tokens.
  {
    const auto kb = poisoned(k, 1 * W + 9, -1e4f);
    t.cache.append(s, 1, kb.data(), v.data(), 3);
    t.shadow.append(s, 1, kb.data(), v.data(), 3);
    t.require_same();
    for (int i = 0; i < 10; ++i) t.valid_append(s, 1, 1);  // the huge key stays in the sinks
  }
  // Large values whose groups still fit (|x| * 0.92 < 448) are fine.
  auto ok = k;
  for (float& x : ok) x = x > 0 ? 400.0f : -400.0f;
  t.cache.append(s, 0, ok.data(), v.data(), 14);
  t.shadow.append(s, 0, ok.data(), v.data(), 14);
  t.require_same();
  for (int i = 0; i < 10; ++i) t.valid_append(s, 0, 1);
}

TEST_CASE("SKVQ channel groups: mixed group counts, bad permutation or boundaries, wrong layer count, bad clip -> kvq::Error",
          "[cache][errors][calibration]") {
  using P = SkvqSmall;  // G = 8: width 32 has 4 groups without calibration
  kvq::CacheConfig cfg;
  cfg.num_layers = 2;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 16;
  cfg.num_blocks = 8;
  kvq::StreamCalibration good;
  for (int c = 0; c < 32; ++c) good.permutation.push_back(31 - c);
  good.boundaries = {0, 5, 16, 20, 32};
  auto with = [&](std::vector<kvq::StreamCalibration> keys, std::vector<kvq::StreamCalibration> values) {
    kvq::CacheCalibration cal;
    cal.keys = std::move(keys);
    cal.values = std::move(values);
    return cal;
  };
  const char* Q = "kvq::QuantizedKVCache";
  // Valid: per layer, or empty entries (identity, equal groups of the same count) mixed in.
  REQUIRE_NOTHROW(kvq::QuantizedKVCache<P>(cfg, with({good, good}, {good, kvq::StreamCalibration{}})));
  // The group count comes from the calibration (here 3 and 5 groups in every layer) ...
  auto three = good;
  three.boundaries = {0, 10, 20, 32};
  auto five = good;
  five.boundaries = {0, 4, 8, 16, 24, 32};
  {
    kvq::QuantizedKVCache<P> c3(cfg, with({three, kvq::StreamCalibration{}}, {five, five}));
    REQUIRE(c3.key_layout().block.groups_per_line == 3);
    REQUIRE(c3.value_layout().block.groups_per_line == 5);
    REQUIRE(c3.key_transform(1).groups.boundaries.size() == 4);  // layer 1: 3 equal groups
  }
  // ... but is one per stream: layers that disagree are rejected.
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, with({good, three}, {})}; }, Status::kInvalidArgument,
                {Q, "argument 'calibration.keys'", "layer 1", "3 groups", "4 groups (layer 0"});
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, with({}, {five, good})}; }, Status::kInvalidArgument,
                {Q, "argument 'calibration.values'", "layer 1", "4 groups", "5 groups"});
  // A permutation with a repeated channel, a short one, one out of range.
  auto repeated = good;
  repeated.permutation[7] = repeated.permutation[3];
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, with({repeated, good}, {})}; }, Status::kInvalidArgument,
                {Q, "argument 'calibration.keys'", "layer 0", "permutation", "bijection"});
  auto shorter = good;
  shorter.permutation.pop_back();
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, with({good, shorter}, {})}; }, Status::kInvalidArgument,
                {Q, "calibration.keys", "layer 1", "permutation"});
  auto outside = good;
  outside.permutation[0] = 32;
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, with({}, {good, outside})}; }, Status::kInvalidArgument,
                {Q, "calibration.values", "permutation"});
  // Boundaries: not ending at the width, not increasing, or given without a permutation.
  auto open_end = good;
  open_end.boundaries = {0, 5, 16, 20, 31};
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, with({open_end, good}, {})}; }, Status::kInvalidArgument,
                {Q, "calibration.keys", "boundaries"});
  auto unsorted = good;
  unsorted.boundaries = {0, 16, 5, 20, 32};
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, with({unsorted, good}, {})}; }, Status::kInvalidArgument,
                {Q, "calibration.keys", "boundaries"});
  auto no_permutation = good;
  no_permutation.permutation.clear();
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, with({no_permutation, good}, {})}; }, Status::kInvalidArgument,
                {Q, "calibration.keys", "layer 0", "permutation"});
  // Wrong number of layers.
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, with({good}, {})}; }, Status::kInvalidArgument,
                {Q, "calibration.keys", "1 layers", "one per layer (2)"});
  // Clip ratios outside (0, 1].
  for (float bad : {-0.5f, 1.5f, kNaN}) {
    auto clipped = good;
    clipped.clip = bad;
    CAPTURE(bad);
    require_error([&] { kvq::QuantizedKVCache<P>{cfg, with({good, clipped}, {})}; }, Status::kInvalidArgument,
                  {Q, "calibration.keys", "layer 1", "clip", "(0, 1]"});
  }
  // Channel groups given to policies that do not reorder channels; a clip ratio for exact rows.
  kvq::CacheCalibration cal = with({good, good}, {});
  require_error([&] { kvq::QuantizedKVCache<KiviSmall>{cfg, cal}; }, Status::kInvalidArgument,
                {Q, "calibration.keys", "do not reorder"});
  require_error([&] { kvq::QuantizedKVCache<Fp16>{cfg, cal}; }, Status::kInvalidArgument,
                {Q, "calibration.keys", "do not reorder"});
  require_error([&] { kvq::QuantizedKVCache<PerTokenSmall>{cfg, with({}, {good, good})}; }, Status::kInvalidArgument,
                {Q, "calibration.values"});
  kvq::StreamCalibration clip_only;
  clip_only.clip = 0.9f;
  require_error([&] { kvq::QuantizedKVCache<Fp16>{cfg, with({clip_only, clip_only}, {})}; }, Status::kInvalidArgument,
                {Q, "calibration.keys", "clip", "stored exactly"});
  REQUIRE_NOTHROW(kvq::QuantizedKVCache<KiviSmall>(cfg, with({clip_only, clip_only}, {clip_only, clip_only})));
}

TEST_CASE("CSKV factors: missing, wrong shapes or non-finite -> kvq::Error; factors for a non-latent policy too",
          "[cache][errors][calibration]") {
  using P = CskvSmall;  // ranks: keys 50% and values 75% of head_dim 16 per head -> 16 and 24 of width 32
  kvq::CacheConfig cfg;
  cfg.num_layers = 2;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 16;
  cfg.num_blocks = 8;
  const index_t kr = Expect<P>::key_rank(2, 16), vr = Expect<P>::value_rank(2, 16);
  REQUIRE(kr == 16);
  REQUIRE(vr == 24);
  auto layer = [](index_t width, index_t rank) {
    kvq::StreamCalibration s;
    s.latent = kvq::random_orthonormal_factor(width, rank, 3);
    return s;
  };
  auto cal_of = [](std::vector<kvq::StreamCalibration> keys, std::vector<kvq::StreamCalibration> values) {
    kvq::CacheCalibration c;
    c.keys = std::move(keys);
    c.values = std::move(values);
    return c;
  };
  const auto k = layer(32, kr), v = layer(32, vr);
  const char* Q = "kvq::QuantizedKVCache";
  REQUIRE_NOTHROW(kvq::QuantizedKVCache<P>(cfg, cal_of({k, k}, {v, v})));
  require_error([&] { kvq::QuantizedKVCache<P>{cfg}; }, Status::kInvalidArgument,
                {Q, "argument 'calibration.keys'", "layer 0", "rank 0", "each of the 2 layers", "rank 16"});
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, cal_of({k}, {v, v})}; }, Status::kInvalidArgument,
                {Q, "calibration.keys", "1 layers"});
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, cal_of({k, k}, {v, layer(30, vr)})}; }, Status::kInvalidArgument,
                {Q, "calibration.values", "layer 1", "width 30"});
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, cal_of({layer(32, kr + 2), k}, {v, v})}; }, Status::kInvalidArgument,
                {Q, "calibration.keys", "layer 0", "rank 18", "rank 16"});
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, cal_of({k, k}, {layer(32, vr - 1), v})}; }, Status::kInvalidArgument,
                {Q, "calibration.values", "rank 23", "rank 24"});
  auto truncated = k;
  truncated.latent.up.pop_back();
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, cal_of({k, truncated}, {v, v})}; }, Status::kInvalidArgument,
                {Q, "calibration.keys", "layer 1", "floats"});
  auto nan = v;
  nan.latent.down[17] = kNaN;
  require_error([&] { kvq::QuantizedKVCache<P>{cfg, cal_of({k, k}, {nan, v})}; }, Status::kNonFiniteInput,
                {Q, "calibration.values", "layer 0", "finite"});
  // Fp16 latents (CskvFp16Policy) need factors just the same.
  require_error([&] { kvq::QuantizedKVCache<CskvFp16Small>{cfg}; }, Status::kInvalidArgument,
                {Q, "calibration.keys", "latent factors"});
  // Factors given to a policy without a latent projection.
  require_error([&] { kvq::QuantizedKVCache<KiviSmall>{cfg, cal_of({k, k}, {})}; }, Status::kInvalidArgument,
                {Q, "calibration.keys", "not a latent"});
  // random_orthonormal_factor validates its rank.
  require_error([&] { (void)kvq::random_orthonormal_factor(32, 33, 1); }, Status::kInvalidArgument,
                {"random_orthonormal_factor", "argument 'rank'"});
  require_error([&] { (void)kvq::random_orthonormal_factor(32, 0, 1); }, Status::kInvalidArgument,
                {"random_orthonormal_factor", "argument 'rank'"});
  require_error([&] { (void)kvq::random_orthonormal_factor(0, 4, 1); }, Status::kInvalidArgument,
                {"random_orthonormal_factor", "argument 'width'"});
}

TEST_CASE("cache configuration errors name the field", "[cache][errors]") {
  kvq::CacheConfig good;
  good.num_layers = 2;
  good.num_kv_heads = 2;
  good.head_dim = 16;
  good.num_blocks = 4;
  const char* Q = "kvq::QuantizedKVCache";
  auto bad = [&](auto mutate, const char* needle) {
    kvq::CacheConfig c = good;
    mutate(c);
    require_error([&] { kvq::QuantizedKVCache<KiviSmall>{c}; }, Status::kInvalidArgument, {needle});
  };
  bad([](kvq::CacheConfig& c) { c.num_layers = 0; }, "argument 'num_layers'");
  bad([](kvq::CacheConfig& c) { c.num_kv_heads = -1; }, "argument 'num_kv_heads'");
  bad([](kvq::CacheConfig& c) { c.head_dim = 0; }, "argument 'head_dim'");
  bad([](kvq::CacheConfig& c) { c.head_dim = 15; }, "argument 'head_dim'");
  bad([](kvq::CacheConfig& c) { c.num_blocks = -1; }, "argument 'num_blocks'");
  bad([](kvq::CacheConfig& c) { c.rope.theta = 1.0; }, "argument 'theta'");
  bad([](kvq::CacheConfig& c) { c.rope.theta = kNaN; }, "argument 'theta'");
  // KIVI values need G | num_kv_heads * head_dim: 1 head of 6 channels with G = 4.
  bad([](kvq::CacheConfig& c) { c.num_kv_heads = 1; c.head_dim = 6; }, "argument 'head_dim'");
  require_error([&] {
    kvq::CacheConfig c = good;
    c.num_kv_heads = 1;
    c.head_dim = 6;
    kvq::QuantizedKVCache<PerTokenSmall>{c};
  }, Status::kInvalidArgument, {Q, "argument 'head_dim'", "divide"});
  // A pool of zero blocks is valid (everything in windows) but takes no quantized token.
  kvq::CacheConfig zero = good;
  zero.num_blocks = 0;
  kvq::QuantizedKVCache<KiviSmall> cache(zero);
  const auto s = cache.add_sequence();
  std::vector<float> x(32 * 8, 1.0f);
  cache.append(s, 0, x.data(), x.data(), 7);  // stays in the residual
  require_error([&] { cache.append(s, 0, x.data(), x.data(), 8); }, Status::kOutOfCapacity, {"argument 'k'"});
  REQUIRE(cache.length(s) == 7);
}

TEST_CASE("CSKV: a latent whose group overflows fp16 metadata fails the append atomically", "[cache][errors][cskv]") {
  // Orthonormal factors keep |c| <= |x| * sqrt(width): rows of +-60000 give latents far beyond
  // fp16's 65504, which the key or value flush (chunks of 4 tokens) cannot store.
  const std::uint64_t seed = kvq_test::case_seed("cskv latent overflow", 0);
  CAPTURE(seed);
  Pair<CskvSmall> t(40, seed);
  constexpr index_t W = Pair<CskvSmall>::width;
  const SequenceId s = t.add();
  t.valid_append(s, 0, 62);  // 60 quantized (one block of 64 rows), window 2
  const auto k = t.rows(9, true), v = t.rows(9, false);
  std::vector<float> huge(k.size());
  for (std::size_t i = 0; i < huge.size(); ++i) huge[i] = (i % 3 == 0 ? -1.0f : 1.0f) * 60000.0f;
  const char* A = "kvq::QuantizedKVCache::append";
  t.invalid([&](auto& c) { c.append(s, 0, huge.data(), v.data(), 9); }, Status::kMetadataOverflow, {A, "argument 'k'", "fp16"});
  // Keys fit, values do not: the key block taken for this append (rows 64..67) is given back.
  REQUIRE(t.cache.key_pool().used_blocks() == 1);
  t.invalid([&](auto& c) { c.append(s, 0, k.data(), huge.data(), 9); }, Status::kMetadataOverflow, {A, "argument 'v'", "fp16"});
  // Decode steps that complete a chunk with an overflowing token in it.
  t.valid_append(s, 0, 1);  // 63 tokens: window 3
  t.invalid([&](auto& c) { c.append(s, 0, k.data(), huge.data() + 2 * W, 1); }, Status::kMetadataOverflow,
            {A, "argument 'v'", "from this append"});
  for (int i = 0; i < 9; ++i) t.valid_append(s, 0, 1);
}
