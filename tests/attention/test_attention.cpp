// SPDX-License-Identifier: Apache-2.0
// CPU decode attention (kvq::attend) against the fp64 reference (kvq::ref::attend) on the same
// cache, for every policy, GQA ratios 1/2/4/8, head_dim 64 and 128, several sequences of
// different lengths sharing one pool (interleaved appends), pre-RoPE policies with both RoPE
// conventions, CSKV with random orthonormal factors, split-KV over a ThreadPool(2), and
// sequences long enough to cross many blocks and wrap the window rings. RoPE itself is checked
// against an fp64 attention written here from the formula in transform/rope.hpp.
//
// Error measure (DESIGN.md §5, "1e-5 relative"): for one attend() output o [Hq, head_dim] and
// the reference r, rel = max_i |o_i - r_i| / max_i |r_i|; it must be <= 1e-5.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cache_testing.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::Bits;
using kvq::index_t;
using kvq::MetaFormat;
using kvq::RopeStyle;
using kvq::SequenceId;

using namespace kvq_test::policies;  // KiviK2, SkvqSmall, ...
using KiviK3 = kvq::KiviPolicy<Bits::k3, Bits::k8, 16, 32>;
using SkvqNoWindow = kvq::SkvqPolicy<Bits::k4, Bits::k2, 8, 0, 2, 1000, MetaFormat::kFp16, false>;
/// Pre-RoPE with a window longer than any test sequence: every key exact (fp16).
using ExactPreRope = kvq::SkvqPolicy<Bits::k8, Bits::k8, 16, 2048, 0, 1000, MetaFormat::kFp16, true>;

constexpr double kTolerance = 1e-5;

kvq::ThreadPool& two_threads() {
  static kvq::ThreadPool pool(2);
  return pool;
}

/// Random SKVQ channel groups of a row of `width`: a random permutation and `count` groups of
/// random sizes.
kvq::StreamCalibration random_groups(kvq::Rng& rng, index_t width, index_t count) {
  kvq::StreamCalibration g;
  for (index_t c = 0; c < width; ++c) g.permutation.push_back(static_cast<std::int32_t>(c));
  for (index_t c = width - 1; c > 0; --c) {
    std::swap(g.permutation[static_cast<std::size_t>(c)], g.permutation[rng.below(static_cast<std::uint32_t>(c + 1))]);
  }
  g.boundaries.push_back(0);
  for (index_t i = 1; i < count; ++i) {
    const index_t lo = g.boundaries.back() + 1, hi = width - (count - i);
    g.boundaries.push_back(static_cast<std::int32_t>(lo + static_cast<index_t>(rng.below(static_cast<std::uint32_t>(std::min<index_t>(hi - lo + 1, 2 * width / count))))));
  }
  g.boundaries.push_back(static_cast<std::int32_t>(width));
  return g;
}

struct Shape {
  index_t kv_heads;
  index_t ratio;  // query heads per kv head
  index_t dim;
};

/// Builds a cache of three or four sequences by interleaved appends and checks attend against
/// the reference at three points of the build and at the end, single-threaded and split-KV.
template <class P>
void attention_case(const char* label, std::uint64_t index, Shape shape, kvq::RopeConfig rope, bool long_sequence,
                    bool calibrated_groups = false) {
  const std::uint64_t seed = kvq_test::case_seed(label, index);
  kvq::Rng rng(seed);
  const index_t layers = 2, hkv = shape.kv_heads, dim = shape.dim, hq = hkv * shape.ratio, w = hkv * dim;
  const int nseq = 3 + static_cast<int>(rng.below(2));
  std::vector<index_t> target;
  for (int s = 0; s < nseq; ++s) target.push_back(1 + static_cast<index_t>(rng.below(300)));
  if (long_sequence) target[0] = 700 + static_cast<index_t>(rng.below(800));
  index_t total = 0;
  for (index_t t : target) total += t;
  CAPTURE(P::name(), seed, hkv, shape.ratio, dim, static_cast<int>(rope.style), rope.theta, target);

  kvq::CacheConfig cfg;
  cfg.num_layers = layers;
  cfg.num_kv_heads = hkv;
  cfg.head_dim = dim;
  cfg.num_blocks = kvq::QuantizedKVCache<P>::blocks_for_tokens(layers, total, nseq);
  cfg.rope = rope;
  kvq::CacheCalibration cal = kvq::random_latent_calibration<P>(cfg, seed + 11);
  if (calibrated_groups) {
    // Random permutations, group sizes and clip ratios; one more group than round(w / G).
    const index_t group = kvq_test::Expect<P>::group;
    const index_t count = std::max<index_t>(1, (w + group / 2) / group) + 1;
    for (index_t l = 0; l < layers; ++l) {
      cal.keys.push_back(random_groups(rng, w, count));
      cal.values.push_back(random_groups(rng, w, count));
      cal.keys.back().clip = 0.8f + 0.2f * static_cast<float>(rng.uniform());
      cal.values.back().clip = 0.8f + 0.2f * static_cast<float>(rng.uniform());
    }
  }
  kvq::QuantizedKVCache<P> cache(cfg, std::move(cal));
  std::vector<SequenceId> seqs;
  for (int s = 0; s < nseq; ++s) seqs.push_back(cache.add_sequence());
  const auto kbias = kvq_test::make_bias(rng, w), vbias = kvq_test::make_bias(rng, w, 0.5f);

  double worst = 0;
  auto check_all = [&] {
    for (int s = 0; s < nseq; ++s) {
      for (index_t l = 0; l < layers; ++l) {
        if (cache.length(seqs[static_cast<std::size_t>(s)], l) == 0) continue;
        const float qscale = std::array<float, 3>{0.3f, 1.0f, 3.0f}[rng.below(3)];
        std::vector<float> q(static_cast<std::size_t>(hq * dim));
        for (float& x : q) x = qscale * rng.normal();
        std::vector<float> cpu(q.size()), split(q.size()), ref(q.size());
        const kvq::StridedView<const float, 2> qv(q.data(), {hq, dim});
        kvq::attend(cache, seqs[static_cast<std::size_t>(s)], l, qv, kvq::StridedView<float, 2>(cpu.data(), {hq, dim}));
        kvq::AttentionOptions opt;
        opt.pool = &two_threads();
        opt.min_split_tokens = 64;
        kvq::attend(cache, seqs[static_cast<std::size_t>(s)], l, qv, kvq::StridedView<float, 2>(split.data(), {hq, dim}), opt);
        kvq::ref::attend(cache, seqs[static_cast<std::size_t>(s)], l, qv, kvq::StridedView<float, 2>(ref.data(), {hq, dim}));
        const double e1 = kvq_test::relative_error(cpu, ref);
        const double e2 = kvq_test::relative_error(split, ref);
        const double e3 = kvq_test::relative_error(split, cpu);
        worst = std::max({worst, e1, e2, e3});
        if (!(e1 <= kTolerance && e2 <= kTolerance && e3 <= kTolerance)) {
          CAPTURE(s, l, cache.length(seqs[static_cast<std::size_t>(s)], l), qscale, e1, e2, e3);
          REQUIRE(e1 <= kTolerance);
          REQUIRE(e2 <= kTolerance);
          REQUIRE(e3 <= kTolerance);
        }
      }
    }
  };

  // Interleaved appends: a random sequence and layer each time, mostly decode steps, sometimes
  // a prefill chunk; every layer of a sequence ends at its target length.
  std::vector<std::vector<index_t>> len(static_cast<std::size_t>(nseq), std::vector<index_t>(layers, 0));
  int checkpoints = 0;
  for (;;) {
    std::vector<std::pair<int, index_t>> open;
    for (int s = 0; s < nseq; ++s)
      for (index_t l = 0; l < layers; ++l)
        if (len[static_cast<std::size_t>(s)][static_cast<std::size_t>(l)] < target[static_cast<std::size_t>(s)]) open.emplace_back(s, l);
    if (open.empty()) break;
    const auto [s, l] = open[rng.below(static_cast<std::uint32_t>(open.size()))];
    index_t& have = len[static_cast<std::size_t>(s)][static_cast<std::size_t>(l)];
    const index_t left = target[static_cast<std::size_t>(s)] - have;
    const index_t n = rng.below(4) == 0 ? std::min<index_t>(left, 1 + static_cast<index_t>(rng.below(150))) : 1;
    const auto k = kvq_test::make_rows(rng, n, kbias), v = kvq_test::make_rows(rng, n, vbias, 0.5f);
    cache.append(seqs[static_cast<std::size_t>(s)], l, k.data(), v.data(), n);
    have += n;
    if (rng.below(static_cast<std::uint32_t>(total)) < 2 && checkpoints < 3) {
      ++checkpoints;
      check_all();
    }
  }
  check_all();

  // attend_batch over all sequences equals attend on each, bit for bit, with and without a pool.
  for (index_t l = 0; l < layers; ++l) {
    const auto b = static_cast<index_t>(nseq);
    std::vector<float> q(static_cast<std::size_t>(b * hq * dim));
    for (float& x : q) x = rng.normal();
    std::vector<float> batch(q.size()), pooled(q.size()), single(q.size());
    const kvq::Span<const SequenceId> ids(seqs.data(), seqs.size());
    kvq::attend_batch(cache, ids, l, kvq::StridedView<const float, 3>(q.data(), {b, hq, dim}),
                      kvq::StridedView<float, 3>(batch.data(), {b, hq, dim}));
    kvq::AttentionOptions opt;
    opt.pool = &two_threads();
    kvq::attend_batch(cache, ids, l, kvq::StridedView<const float, 3>(q.data(), {b, hq, dim}),
                      kvq::StridedView<float, 3>(pooled.data(), {b, hq, dim}), opt);
    for (index_t i = 0; i < b; ++i) {
      kvq::attend(cache, seqs[static_cast<std::size_t>(i)], l, kvq::StridedView<const float, 2>(q.data() + i * hq * dim, {hq, dim}),
                  kvq::StridedView<float, 2>(single.data() + i * hq * dim, {hq, dim}));
    }
    REQUIRE(std::memcmp(batch.data(), single.data(), single.size() * sizeof(float)) == 0);
    REQUIRE(std::memcmp(pooled.data(), single.data(), single.size() * sizeof(float)) == 0);
  }
  // Sanity of the test itself: the long sequence crosses several blocks and wraps the ring.
  if (long_sequence) {
    const kvq::StreamCounts c = cache.key_counts(seqs[0], 0);
    REQUIRE(c.length == target[0]);
    if (P::KeyWindow::max_window > 0 && P::KeyWindow::max_window < 700) REQUIRE(c.quantized > 0);
  }
  INFO("worst relative error " << worst);
  SUCCEED();
}

/// Shapes covering GQA ratios 1, 2, 4, 8 and head_dim 64 and 128: `all` runs all eight,
/// otherwise four (each ratio once, head_dim alternating with the case index).
template <class P>
void run_shapes(const char* label, bool all, kvq::RopeConfig rope = {}, bool calibrated = false) {
  std::uint64_t index = 0;
  kvq::Rng pick(kvq_test::case_seed(label, 1000));
  for (index_t ratio : {1, 2, 4, 8}) {
    for (index_t dim : {64, 128}) {
      if (!all && (dim == 64) != ((ratio == 1 || ratio == 4) ^ (index % 2 == 1))) {
        ++index;
        continue;
      }
      const index_t kv = ratio == 8 ? 1 + static_cast<index_t>(pick.below(2)) : 1 + static_cast<index_t>(pick.below(3));
      attention_case<P>(label, index, {kv, ratio, dim}, rope, /*long_sequence=*/index % 3 == 0, calibrated);
      ++index;
    }
  }
}

/// out[h] = softmax(q[h] · RoPE(k_t, t) / sqrt(d)) · v in double with RoPE as
/// transform/rope.hpp documents it: pair i rotated by t * theta^(-2i/d); pairs (i, i + d/2)
/// (half split) or (2i, 2i + 1) (adjacent).
std::vector<double> rope_attention(const std::vector<float>& q, index_t hq, const std::vector<float>& keys,
                                   const std::vector<float>& values, index_t len, index_t hkv, index_t dim,
                                   kvq::RopeConfig rope) {
  std::vector<double> out(static_cast<std::size_t>(hq * dim), 0.0);
  const index_t group = hq / hkv, half = dim / 2;
  for (index_t qh = 0; qh < hq; ++qh) {
    const index_t h = qh / group;
    std::vector<double> s(static_cast<std::size_t>(len));
    double mx = -INFINITY;
    for (index_t t = 0; t < len; ++t) {
      std::vector<double> k(static_cast<std::size_t>(dim));
      for (index_t c = 0; c < dim; ++c) k[static_cast<std::size_t>(c)] = keys[static_cast<std::size_t>((t * hkv + h) * dim + c)];
      for (index_t i = 0; i < half; ++i) {
        const double a = static_cast<double>(t) * std::pow(rope.theta, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
        const index_t ia = rope.style == RopeStyle::kAdjacentPairs ? 2 * i : i;
        const index_t ib = rope.style == RopeStyle::kAdjacentPairs ? 2 * i + 1 : i + half;
        const double x0 = k[static_cast<std::size_t>(ia)], x1 = k[static_cast<std::size_t>(ib)];
        k[static_cast<std::size_t>(ia)] = x0 * std::cos(a) - x1 * std::sin(a);
        k[static_cast<std::size_t>(ib)] = x0 * std::sin(a) + x1 * std::cos(a);
      }
      double dot = 0;
      for (index_t c = 0; c < dim; ++c) dot += static_cast<double>(q[static_cast<std::size_t>(qh * dim + c)]) * k[static_cast<std::size_t>(c)];
      s[static_cast<std::size_t>(t)] = dot / std::sqrt(static_cast<double>(dim));
      mx = std::max(mx, s[static_cast<std::size_t>(t)]);
    }
    double total = 0;
    for (double& x : s) total += (x = std::exp(x - mx));
    for (index_t t = 0; t < len; ++t) {
      for (index_t c = 0; c < dim; ++c) {
        out[static_cast<std::size_t>(qh * dim + c)] +=
            s[static_cast<std::size_t>(t)] / total * values[static_cast<std::size_t>((t * hkv + h) * dim + c)];
      }
    }
  }
  return out;
}

}  // namespace

TEST_CASE("attend equals the fp64 reference: KIVI", "[attention][kivi]") {
  run_shapes<KiviSmall>("attn kivi small", false);
  run_shapes<KiviK2>("attn kivi k2", true);
  run_shapes<KiviK4>("attn kivi k4", false);
  run_shapes<KiviK3>("attn kivi k3v8", false);
}

TEST_CASE("attend equals the fp64 reference: SKVQ (pre-RoPE, both RoPE styles, sinks, calibrated groups)",
          "[attention][skvq]") {
  run_shapes<SkvqSmall>("attn skvq small half", false, {10000.0, RopeStyle::kHalfSplit});
  run_shapes<SkvqSmall>("attn skvq small adjacent", false, {500000.0, RopeStyle::kAdjacentPairs});
  run_shapes<SkvqK2V15>("attn skvq k2v1.5", true, {10000.0, RopeStyle::kHalfSplit});
  run_shapes<SkvqK2V2>("attn skvq k2v2", false, {100000.0, RopeStyle::kAdjacentPairs});
  run_shapes<SkvqNoWindow>("attn skvq no window post-rope", false);
  run_shapes<SkvqSmall>("attn skvq calibrated groups", false, {10000.0, RopeStyle::kHalfSplit}, true);
}

TEST_CASE("attend equals the fp64 reference: CSKV with random orthonormal factors, both RoPE styles",
          "[attention][cskv]") {
  run_shapes<CskvSmall>("attn cskv small half", false, {10000.0, RopeStyle::kHalfSplit});
  run_shapes<CskvSmall>("attn cskv small adjacent", false, {10000.0, RopeStyle::kAdjacentPairs});
  run_shapes<CskvK4V4>("attn cskv k4v4 half", true, {10000.0, RopeStyle::kHalfSplit});
  run_shapes<CskvK2V4>("attn cskv k2v4 adjacent", false, {500000.0, RopeStyle::kAdjacentPairs});
}

TEST_CASE("attend equals the fp64 reference: baselines (fp16, bf16, fp32, per-token)", "[attention][baseline]") {
  run_shapes<Fp16>("attn fp16", false);
  run_shapes<Bf16>("attn bf16", false);
  run_shapes<Fp32>("attn fp32", false);
  run_shapes<PerTokenK2>("attn pertoken k2", false);
  run_shapes<PerTokenK4>("attn pertoken k4", false);
}

TEST_CASE("pre-RoPE keys are rotated as transform/rope.hpp documents, for both conventions", "[attention][rope]") {
  for (RopeStyle style : {RopeStyle::kHalfSplit, RopeStyle::kAdjacentPairs}) {
    for (double theta : {10000.0, 500000.0}) {
      const std::uint64_t seed = kvq_test::case_seed("rope formula", static_cast<std::uint64_t>(style) * 2 + (theta > 1e5 ? 1 : 0));
      kvq::Rng rng(seed);
      const index_t hkv = 2, dim = 64, hq = 4, len = 300 + static_cast<index_t>(rng.below(400));
      CAPTURE(seed, static_cast<int>(style), theta, len);
      const kvq::RopeConfig rope{theta, style};
      auto cache = kvq_test::make_cache<ExactPreRope>(1, hkv, dim, 4, 1, rope);
      const auto seq = cache.add_sequence();
      const auto kbias = kvq_test::make_bias(rng, hkv * dim), vbias = kvq_test::make_bias(rng, hkv * dim);
      std::vector<float> keys = kvq_test::make_rows(rng, len, kbias), values = kvq_test::make_rows(rng, len, vbias);
      for (float& x : keys) x = kvq_test::round_to<kvq::Float16>(x);
      for (float& x : values) x = kvq_test::round_to<kvq::Float16>(x);
      cache.append(seq, 0, keys.data(), values.data(), len / 2);
      for (index_t t = len / 2; t < len; ++t) cache.append(seq, 0, keys.data() + t * hkv * dim, values.data() + t * hkv * dim, 1);
      REQUIRE(cache.key_counts(seq, 0).quantized == 0);  // every key exact: only RoPE differs
      std::vector<float> q(static_cast<std::size_t>(hq * dim));
      for (float& x : q) x = 2.0f * rng.normal();
      const std::vector<double> want = rope_attention(q, hq, keys, values, len, hkv, dim, rope);
      std::vector<float> got(q.size()), ref(q.size());
      kvq::attend(cache, seq, 0, kvq::StridedView<const float, 2>(q.data(), {hq, dim}), kvq::StridedView<float, 2>(got.data(), {hq, dim}));
      kvq::ref::attend(cache, seq, 0, kvq::StridedView<const float, 2>(q.data(), {hq, dim}), kvq::StridedView<float, 2>(ref.data(), {hq, dim}));
      std::vector<float> wantf(want.begin(), want.end());
      CHECK(kvq_test::relative_error(got, wantf) <= kTolerance);
      CHECK(kvq_test::relative_error(ref, wantf) <= 1e-6);
      // The other convention gives a clearly different result (the test can tell them apart).
      const kvq::RopeConfig other{theta, style == RopeStyle::kHalfSplit ? RopeStyle::kAdjacentPairs : RopeStyle::kHalfSplit};
      const std::vector<double> wrong = rope_attention(q, hq, keys, values, len, hkv, dim, other);
      CHECK(kvq_test::relative_error(got, std::vector<float>(wrong.begin(), wrong.end())) > 1e-3);
    }
  }
}

TEST_CASE("attention over a cache that held exactly one token, and with a caller-given scale", "[attention]") {
  const std::uint64_t seed = kvq_test::case_seed("attention one token", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  auto cache = kvq_test::make_cache<KiviK2>(1, 2, 64, 8);
  const auto seq = cache.add_sequence();
  const auto bias = kvq_test::make_bias(rng, 128);
  const auto k = kvq_test::make_rows(rng, 1, bias), v = kvq_test::make_rows(rng, 1, bias);
  cache.append(seq, 0, k.data(), v.data(), 1);
  std::vector<float> q(8 * 64), out(q.size());
  for (float& x : q) x = rng.normal();
  kvq::attend(cache, seq, 0, kvq::StridedView<const float, 2>(q.data(), {8, 64}), kvq::StridedView<float, 2>(out.data(), {8, 64}));
  // One token: the output is that token's value row (fp16) for every query head of its group.
  for (index_t h = 0; h < 8; ++h) {
    for (index_t c = 0; c < 64; ++c) {
      REQUIRE(out[static_cast<std::size_t>(h * 64 + c)] ==
              kvq_test::round_to<kvq::Float16>(v[static_cast<std::size_t>((h / 4) * 64 + c)]));
    }
  }
  // A caller-given scale is used instead of 1/sqrt(d): compare with the reference's scale.
  for (int i = 0; i < 40; ++i) cache.append(seq, 0, kvq_test::make_rows(rng, 1, bias).data(), kvq_test::make_rows(rng, 1, bias).data(), 1);
  std::vector<float> ref(q.size());
  kvq::AttentionOptions opt;
  opt.scale = 0.37f;
  kvq::attend(cache, seq, 0, kvq::StridedView<const float, 2>(q.data(), {8, 64}), kvq::StridedView<float, 2>(out.data(), {8, 64}), opt);
  kvq::ref::attend(cache, seq, 0, kvq::StridedView<const float, 2>(q.data(), {8, 64}), kvq::StridedView<float, 2>(ref.data(), {8, 64}), 0.37);
  REQUIRE(kvq_test::relative_error(out, ref) <= kTolerance);
  kvq::ref::attend(cache, seq, 0, kvq::StridedView<const float, 2>(q.data(), {8, 64}), kvq::StridedView<float, 2>(ref.data(), {8, 64}));
  REQUIRE(kvq_test::relative_error(out, ref) > 1e-3);  // the default scale differs
}

TEST_CASE("attend_batch validates every sequence before writing any output", "[attention][errors]") {
  const std::uint64_t seed = kvq_test::case_seed("attend batch errors", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  auto cache = kvq_test::make_cache<KiviSmall>(2, 2, 16, 32);
  const auto a = cache.add_sequence(), b = cache.add_sequence(), empty = cache.add_sequence();
  const auto bias = kvq_test::make_bias(rng, 32);
  const auto x = kvq_test::make_rows(rng, 20, bias);
  cache.append(a, 0, x.data(), x.data(), 20);
  cache.append(b, 0, x.data(), x.data(), 3);
  std::vector<float> q(3 * 4 * 16, 0.25f), out(q.size(), -5.0f);
  auto run = [&](std::vector<SequenceId> ids, index_t layer, std::vector<float> qq, const char* needle) {
    bool threw = false;
    try {
      const auto n = static_cast<index_t>(ids.size());
      kvq::attend_batch(cache, kvq::Span<const SequenceId>(ids.data(), ids.size()), layer,
                        kvq::StridedView<const float, 3>(qq.data(), {n, 4, 16}), kvq::StridedView<float, 3>(out.data(), {n, 4, 16}));
    } catch (const kvq::Error& e) {
      threw = true;
      const std::string what = e.what();
      CAPTURE(what, needle);
      REQUIRE(what.find(needle) != std::string::npos);
    }
    REQUIRE(threw);
    for (float o : out) REQUIRE(o == -5.0f);
  };
  run({a, b, 9}, 0, q, "argument 'seqs'");
  run({a, empty}, 0, std::vector<float>(q.begin(), q.begin() + 2 * 64), "argument 'seqs'");
  run({a, b}, 1, std::vector<float>(q.begin(), q.begin() + 2 * 64), "argument 'seqs'");  // no token in layer 1
  run({a, b}, 2, std::vector<float>(q.begin(), q.begin() + 2 * 64), "argument 'layer'");
  auto bad = std::vector<float>(q.begin(), q.begin() + 2 * 64);
  bad[100] = std::nanf("");
  run({a, b}, 0, bad, "argument 'q'");
}
