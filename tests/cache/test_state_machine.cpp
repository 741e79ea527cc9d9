// SPDX-License-Identifier: Apache-2.0
// The sink / quantized / window state machine of every policy, step by step, against the model
// written from ALGORITHMS.md in cache_testing.hpp (§1.4 KIVI, §2.6 SKVQ, §3.2 CSKV; baselines
// quantize every token at once), and the contents read back: exact positions equal the input
// rounded to the exact type bit for bit; quantized positions equal quantize_matrix +
// dequantize_matrix of the same rows bit for bit (non-latent policies) or lie within half a
// quantization step in latent space (CSKV).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cache_testing.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::Bits;
using kvq::GroupAxis;
using kvq::index_t;
using kvq::MetaFormat;
using kvq_test::Expect;
using kvq_test::Method;
using kvq_test::StreamExpect;
using kvq_test::StreamModel;

// Small parameters keep the walks short; the registry's defaults are walked too.
using namespace kvq_test::policies;  // KiviK2, SkvqSmall, ...
using SkvqNoWindow = kvq::SkvqPolicy<Bits::k4, Bits::k2, 8, 0, 2, 1000, MetaFormat::kFp16, false>;
using SkvqNoSinks = kvq::SkvqPolicy<Bits::k8, Bits::k3, 16, 5, 0, 960, MetaFormat::kBf16>;

/// Equal channel groups as policy/skvq.hpp documents them for a row that G does not divide:
/// max(1, round(width / G)) groups in identity order, sizes differing by at most one.
kvq::StreamCalibration equal_groups(index_t width, index_t group) {
  const index_t count = std::max<index_t>(1, (width + group / 2) / group);
  kvq::StreamCalibration d;
  for (index_t c = 0; c < width; ++c) d.permutation.push_back(static_cast<std::int32_t>(c));
  for (index_t g = 0; g <= count; ++g) d.boundaries.push_back(static_cast<std::int32_t>(g * width / count));
  return d;
}

/// quantize_matrix then dequantize_matrix of rows x [n, width] (the quant layer's round trip).
std::vector<float> round_trip(const kvq::MatrixQuantSpec& spec, const float* x, index_t n, index_t width) {
  const kvq::MatrixLayout l = kvq::plan_matrix(n, width, spec);
  std::vector<std::uint8_t> codes(l.code_bytes), scales(l.meta_bytes), zeros(l.meta_bytes);
  kvq::quantize_matrix(kvq::StridedView<const float, 2>(x, {n, width}), spec,
                       {{codes.data(), codes.size()}, {scales.data(), scales.size()}, {zeros.data(), zeros.size()}});
  std::vector<float> y(static_cast<std::size_t>(n * width));
  kvq::dequantize_matrix(kvq::ConstQuantizedMatrixRef{{codes.data(), codes.size()},
                                                      {scales.data(), scales.size()},
                                                      {zeros.data(), zeros.size()}},
                         spec, kvq::StridedView<float, 2>(y.data(), {n, width}));
  return y;
}

/// One stream (keys or values) of one layer as the test knows it.
struct RefStream {
  bool is_key = true;
  StreamModel model;
  StreamExpect expect;
  kvq::StreamCalibration groups;     // SKVQ groups (and clip) the reference quantizes with (empty: uniform)
  std::vector<float> bias;
  std::vector<float> input;          // [length, W] every appended row, rounded to exact_type
  std::vector<float> expected;       // [length, W] non-latent: what quantized rows must read back
  std::vector<double> latent;        // [length, rank] CSKV: c = input · A in double
  index_t referenced = 0;            // quantized rows whose expectation is computed
};

template <class P>
class Walk {
 public:
  using X = Expect<P>;
  using E = typename X::exact_type;
  static constexpr bool latent = X::latent;

  Walk(index_t layers, index_t heads, index_t dim, std::uint64_t seed, kvq::CacheCalibration cal = {})
      : layers_(layers), heads_(heads), dim_(dim), width_(heads * dim), rng_(seed), cache_(build(layers, heads, dim, cal)) {
    seq_ = cache_.add_sequence();
    for (index_t l = 0; l < layers; ++l) {
      for (int k = 0; k < 2; ++k) {
        RefStream s;
        s.is_key = k == 0;
        s.model = s.is_key ? X::key_model() : X::value_model();
        s.expect = s.is_key ? X::key_stream(heads, dim) : X::value_stream(heads, dim);
        const auto& given = s.is_key ? cal.keys : cal.values;
        if (!given.empty() && given[static_cast<std::size_t>(l)].has_groups()) {
          s.groups = given[static_cast<std::size_t>(l)];
        } else if (s.expect.reorders && width_ % s.expect.spec.group_size != 0) {
          s.groups = equal_groups(width_, s.expect.spec.group_size);
        }
        s.bias = kvq_test::make_bias(rng_, width_);
        streams_.push_back(std::move(s));
      }
    }
  }

  kvq::QuantizedKVCache<P>& cache() { return cache_; }

  /// Appends n tokens to every layer (the same n), advances the models, checks everything.
  void append(index_t n, bool check_contents) {
    for (index_t l = 0; l < layers_; ++l) {
      RefStream& ks = stream(l, true);
      RefStream& vs = stream(l, false);
      const std::vector<float> k = kvq_test::make_rows(rng_, n, ks.bias);
      const std::vector<float> v = kvq_test::make_rows(rng_, n, vs.bias);
      cache_.append(seq_, l, kvq_test::rows_view(k.data(), n, heads_, dim_), kvq_test::rows_view(v.data(), n, heads_, dim_));
      push(ks, k, n);
      push(vs, v, n);
    }
    for (RefStream& s : streams_) check_counts(s);
    if (check_contents) {
      for (index_t l = 0; l < layers_; ++l) {
        check_contents_of(l, stream(l, true));
        check_contents_of(l, stream(l, false));
      }
    }
    check_memory();
  }

 private:
  static kvq::QuantizedKVCache<P> build(index_t layers, index_t heads, index_t dim, kvq::CacheCalibration cal) {
    kvq::CacheConfig cfg;
    cfg.num_layers = layers;
    cfg.num_kv_heads = heads;
    cfg.head_dim = dim;
    cfg.num_blocks = layers * 64;
    if constexpr (latent) cal = kvq::random_latent_calibration<P>(cfg, 77);
    return kvq::QuantizedKVCache<P>(cfg, std::move(cal));
  }

  RefStream& stream(index_t layer, bool is_key) {
    return streams_[static_cast<std::size_t>(2 * layer + (is_key ? 0 : 1))];
  }
  index_t layer_of(const RefStream& s) const {
    return static_cast<index_t>(&s - streams_.data()) / 2;
  }

  void push(RefStream& s, const std::vector<float>& rows, index_t n) {
    for (float x : rows) s.input.push_back(kvq_test::round_to<E>(x));
    s.expected.resize(s.input.size());
    s.model.append(n);
    if constexpr (latent) {
      const kvq::StreamTransform f = s.is_key ? cache_.key_transform(layer_of(s)) : cache_.value_transform(layer_of(s));
      const index_t rank = f.stored_width;
      const float* down = f.down;
      for (index_t t = s.model.length - n; t < s.model.length; ++t) {
        for (index_t j = 0; j < rank; ++j) {
          double acc = 0;
          for (index_t i = 0; i < width_; ++i) {
            acc += static_cast<double>(s.input[static_cast<std::size_t>(t * width_ + i)]) *
                   down[static_cast<std::size_t>(i * rank + j)];
          }
          s.latent.push_back(acc);
        }
      }
    }
    // Expectations of rows that just became quantized.
    const index_t q = s.model.quantized;
    if (q > s.referenced && !latent) {
      const index_t first = s.model.sink_cap + s.referenced;  // absolute position
      const index_t count = q - s.referenced;
      const float* x = s.input.data() + first * width_;
      std::vector<float> y;
      if (!s.expect.quantized) {
        y.assign(x, x + count * width_);  // exact blocks hold the rounded rows
      } else {
        kvq::MatrixQuantSpec spec = s.expect.spec;
        if (spec.axis == GroupAxis::kTokens) {
          // Per-channel groups of G tokens start at quantized row 0 and never straddle a flush.
          INFO("flush of " << count << " rows from quantized row " << s.referenced << " with G = " << spec.group_size);
          REQUIRE(s.referenced % spec.group_size == 0);
          REQUIRE(count % spec.group_size == 0);
        }
        spec.channel_groups = s.groups.groups();
        if (spec.channel_groups.permutation.empty()) spec.channel_groups = {};
        if (s.groups.clip > 0.0f) spec.clip = s.groups.clip;
        y = round_trip(spec, x, count, width_);
      }
      std::copy(y.begin(), y.end(), s.expected.begin() + first * width_);
      s.referenced = q;
    }
  }

  void check_counts(const RefStream& s) {
    const index_t l = layer_of(s);
    const kvq::StreamCounts c = s.is_key ? cache_.key_counts(seq_, l) : cache_.value_counts(seq_, l);
    const kvq::WindowRule& rule = s.is_key ? cache_.key_rule() : cache_.value_rule();
    INFO((s.is_key ? "keys" : "values") << " of layer " << l << ": model length " << s.model.length << ", sinks "
                                        << s.model.sinks() << ", quantized " << s.model.quantized << ", window "
                                        << s.model.window() << "; cache length " << c.length << ", quantized "
                                        << c.quantized);
    REQUIRE(c.length == s.model.length);
    REQUIRE(cache_.length(seq_, l) == s.model.length);
    REQUIRE(c.quantized == s.model.quantized);
    REQUIRE(rule.sinks == s.model.sink_cap);
    REQUIRE(rule.sink_count(c) == s.model.sinks());
    REQUIRE(rule.window_count(c) == s.model.window());
    // Every position's segment as the view (the attention's input) reports it.
    const kvq::StreamView<E> view = s.is_key ? cache_.key_view(seq_, l) : cache_.value_view(seq_, l);
    index_t bad = -1;
    for (index_t p = 0; p < s.model.length && bad < 0; ++p) {
      if (static_cast<int>(view.segment(p)) != s.model.segment(p)) bad = p;
    }
    CAPTURE(bad);
    REQUIRE(bad == -1);
  }

  void check_contents_of(index_t l, const RefStream& s) {
    const index_t len = s.model.length;
    std::vector<float> out(static_cast<std::size_t>(len * width_), std::numeric_limits<float>::quiet_NaN());
    if (s.is_key) {
      cache_.read_keys(seq_, l, out.data());
    } else {
      cache_.read_values(seq_, l, out.data());
    }
    INFO((s.is_key ? "keys" : "values") << " of layer " << l << " at length " << len << " (sinks " << s.model.sinks()
                                        << ", quantized " << s.model.quantized << ", window " << s.model.window() << ")");
    index_t bad = -1;
    for (index_t p = 0; p < len && bad < 0; ++p) {
      const bool quantized = s.model.segment(p) == 1;
      if (quantized && latent) continue;
      const float* want = (quantized ? s.expected.data() : s.input.data()) + p * width_;
      if (std::memcmp(want, out.data() + p * width_, static_cast<std::size_t>(width_) * sizeof(float)) != 0) bad = p;
    }
    if (bad >= 0) {
      index_t c = 0;
      const float* want = (s.model.segment(bad) == 1 ? s.expected.data() : s.input.data()) + bad * width_;
      while (c < width_ && want[c] == out[static_cast<std::size_t>(bad * width_ + c)]) ++c;
      CAPTURE(bad, s.model.segment(bad), c, want[c], out[static_cast<std::size_t>(bad * width_ + c)]);
      REQUIRE(bad == -1);
    }
    if constexpr (latent) check_latent(l, s, out);
  }

  /// CSKV: the stored latent of every quantized row is within half a step of c = x·A (step from
  /// the group's min/max, computed here in double), and the row read back is c_stored·B.
  void check_latent(index_t l, const RefStream& s, const std::vector<float>& out) {
    const kvq::StreamTransform f = s.is_key ? cache_.key_transform(l) : cache_.value_transform(l);
    const index_t rank = f.stored_width;
    const float* up = f.up;
    const index_t q = s.model.quantized;
    if (q == 0) return;
    // Stored latents through the view, block run by block run.
    const kvq::StreamView<E> view = s.is_key ? cache_.key_view(seq_, l) : cache_.value_view(seq_, l);
    std::vector<float> stored(static_cast<std::size_t>(q * rank));
    for (index_t p = 0; p < q;) {
      const index_t n = view.run(p, q - p);
      view.decode_stored(p, n, stored.data() + p * rank, rank);
      p += n;
    }
    const std::vector<double>& c = s.latent;  // latents in double
    const double qmax = kvq::max_code(s.expect.spec.bits);
    auto check_group = [&](auto index_of, index_t n, const char* what, index_t a, index_t b) {
      double mn = INFINITY, mx = -INFINITY;
      for (index_t i = 0; i < n; ++i) {
        mn = std::min(mn, c[index_of(i)]);
        mx = std::max(mx, c[index_of(i)]);
      }
      const double big = std::max(std::abs(mn), std::abs(mx));
      const double tol = 0.5 * (mx - mn) / qmax * (1 + 2e-3) + 2e-3 * big / qmax + 1e-5 * std::max(1.0, big);
      for (index_t i = 0; i < n; ++i) {
        const double err = std::abs(static_cast<double>(stored[index_of(i)]) - c[index_of(i)]);
        if (!(err <= tol)) {
          CAPTURE(what, a, b, i, mn, mx, tol, err);
          REQUIRE(err <= tol);
        }
      }
    };
    const kvq::MatrixQuantSpec& spec = s.expect.spec;
    if (spec.axis == GroupAxis::kTokens) {
      for (index_t j = 0; j < rank; ++j) {
        for (index_t g = 0; g < q / spec.group_size; ++g) {
          check_group([&](index_t i) { return static_cast<std::size_t>((g * spec.group_size + i) * rank + j); },
                      spec.group_size, "latent channel / token group", j, g);
        }
      }
    } else {
      for (index_t t = 0; t < q; ++t) {
        for (index_t g = 0; g < rank / spec.group_size; ++g) {
          check_group([&](index_t i) { return static_cast<std::size_t>(t * rank + g * spec.group_size + i); },
                      spec.group_size, "token / latent group", t, g);
        }
      }
    }
    // Reconstruction: out = stored · B.
    for (index_t t = 0; t < q; ++t) {
      for (index_t i = 0; i < width_; ++i) {
        double want = 0, mag = 0;
        for (index_t j = 0; j < rank; ++j) {
          const double term = static_cast<double>(stored[static_cast<std::size_t>(t * rank + j)]) *
                              up[static_cast<std::size_t>(j * width_ + i)];
          want += term;
          mag += std::abs(term);
        }
        const double got = out[static_cast<std::size_t>(t * width_ + i)];
        if (!(std::abs(got - want) <= 1e-5 * mag + 1e-30)) {
          CAPTURE(t, i, got, want, mag);
          REQUIRE(std::abs(got - want) <= 1e-5 * mag + 1e-30);
        }
      }
    }
  }

  void check_memory() {
    // Blocks in use: each stream of each layer holds ceil(quantized / T) blocks of its own.
    std::size_t key_blocks = 0, value_blocks = 0;
    for (const RefStream& s : streams_) {
      const index_t blocks = (s.model.quantized + P::block_tokens - 1) / P::block_tokens;
      (s.is_key ? key_blocks : value_blocks) += static_cast<std::size_t>(blocks);
    }
    REQUIRE(static_cast<std::size_t>(cache_.key_pool().used_blocks()) == key_blocks);
    REQUIRE(static_cast<std::size_t>(cache_.value_pool().used_blocks()) == value_blocks);
    const index_t key_width = latent ? X::key_rank(heads_, dim_) : width_;
    const index_t value_width = latent ? X::value_rank(heads_, dim_) : width_;
    const std::size_t key_block = kvq_test::expected_block_bytes(X::key_stream(heads_, dim_), P::block_tokens, key_width);
    const std::size_t value_block = kvq_test::expected_block_bytes(X::value_stream(heads_, dim_), P::block_tokens, value_width);
    // Exact rows per layer and stream: the sinks plus the window ring.
    std::size_t exact_rows = 0;
    for (index_t k = 0; k < 2; ++k) {
      const StreamModel m = k == 0 ? X::key_model() : X::value_model();
      exact_rows += static_cast<std::size_t>(m.sink_cap + m.ring_rows());
    }
    const std::size_t exact = static_cast<std::size_t>(layers_) * exact_rows * static_cast<std::size_t>(width_) * sizeof(E);
    REQUIRE(cache_.memory_bytes() == key_blocks * key_block + value_blocks * value_block + exact);
  }

  index_t layers_, heads_, dim_, width_;
  kvq::Rng rng_;
  kvq::QuantizedKVCache<P> cache_;
  kvq::SequenceId seq_ = -1;
  std::vector<RefStream> streams_;
};

/// Prefill L, then decode steps (single-token appends), a prefill-style chunk onto the
/// non-empty state, more decode steps and an empty append; checks after every append.
template <class P>
void walk_policy(index_t layers, index_t heads, index_t dim, const char* label, bool check_every_step,
                 kvq::CacheCalibration cal = {}) {
  using X = Expect<P>;
  REQUIRE(P::name() == X::name());
  const index_t steps = std::max(X::residual, X::group) + 3;
  std::uint64_t index = 0;
  for (index_t prefill : kvq_test::probe_lengths<P>()) {
    const std::uint64_t seed = kvq_test::case_seed(label, index++);
    CAPTURE(P::name(), seed, prefill);
    Walk<P> w(layers, heads, dim, seed, cal);
    w.append(prefill, true);
    for (index_t step = 0; step < steps; ++step) {
      CAPTURE(step);
      const bool full = check_every_step || step < 3 || step % 16 == 0 || step == steps - 1;
      w.append(1, full);
    }
    w.append(X::residual + 2, true);  // a chunk onto the non-empty state settles at once
    for (index_t step = 0; step < 3; ++step) w.append(1, true);
    w.append(0, true);  // an empty append changes nothing
  }
}

}  // namespace

TEMPLATE_TEST_CASE("state machine, small parameters: counts, segments, contents and memory after every append",
                   "[cache][state]", KiviSmall, KiviSmall34, SkvqSmall, SkvqNoWindow, SkvqNoSinks, CskvSmall,
                   CskvFp16Small, PerTokenSmall, Fp16, Bf16, Fp32) {
  walk_policy<TestType>(2, 2, 16, "state machine small", true);
}

TEMPLATE_TEST_CASE("state machine, registry defaults: counts, segments, contents and memory", "[cache][state]", KiviK2,
                   KiviK4, SkvqK2V15, SkvqK2V2, CskvK4V4, CskvK2V4, PerTokenK2, PerTokenK4) {
  walk_policy<TestType>(1, 2, 64, "state machine defaults", false);
}

TEST_CASE("state machine, SKVQ with calibrated channel groups and with a row that G does not divide",
          "[cache][state][skvq]") {
  // Calibrated: a random permutation and variable group sizes (4 groups over 32 channels).
  const std::uint64_t seed = kvq_test::case_seed("skvq calibrated groups", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  kvq::CacheCalibration cal;
  for (int l = 0; l < 2; ++l) {
    for (auto* list : {&cal.keys, &cal.values}) {
      kvq::StreamCalibration g;
      g.clip = l == 0 ? 0.85f : 1.0f;  // a calibrated clip ratio per layer
      for (int c = 0; c < 32; ++c) g.permutation.push_back(c);
      for (int c = 31; c > 0; --c) std::swap(g.permutation[static_cast<std::size_t>(c)], g.permutation[rng.below(static_cast<std::uint32_t>(c + 1))]);
      g.boundaries = {0, 3 + static_cast<std::int32_t>(rng.below(5)), 16, 27 + static_cast<std::int32_t>(rng.below(3)), 32};
      list->push_back(g);
    }
  }
  walk_policy<SkvqSmall>(2, 2, 16, "skvq calibrated", true, cal);
  // Width 40 with G = 8 * ... : SkvqNoSinks has G = 16, width 2 * 20 = 40 -> round(2.5) = 3 groups.
  walk_policy<SkvqNoSinks>(1, 2, 20, "skvq uneven groups", true);
}

TEST_CASE("KIVI: a decode step that fills the key residual leaves it pending; a chunk settles at once",
          "[cache][state][kivi]") {
  // G = 4, R = 8 (ALGORITHMS.md §1.4, steps 3 and 6; window_schedule.hpp).
  const std::uint64_t seed = kvq_test::case_seed("kivi pending", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  const auto bias = kvq_test::make_bias(rng, 32);
  auto cache = kvq_test::make_cache<KiviSmall>(1, 2, 16, 16);
  const auto decode = cache.add_sequence();
  const auto prefill = cache.add_sequence();
  std::vector<float> rows = kvq_test::make_rows(rng, 20, bias);
  for (index_t t = 0; t < 8; ++t) cache.append(decode, 0, rows.data() + t * 32, rows.data() + t * 32, 1);
  // Eight decode steps: |K_r| == R, flushed only after this step's attention -> still exact.
  REQUIRE(cache.key_counts(decode, 0).quantized == 0);
  REQUIRE(cache.key_rule().window_count(cache.key_counts(decode, 0)) == 8);
  REQUIRE(cache.value_counts(decode, 0).quantized == 0);
  std::vector<float> keys(20 * 32);
  cache.read_keys(decode, 0, keys.data());
  for (index_t i = 0; i < 8 * 32; ++i) REQUIRE(keys[static_cast<std::size_t>(i)] == kvq_test::round_to<kvq::Float16>(rows[static_cast<std::size_t>(i)]));
  REQUIRE(cache.key_pool().used_blocks() == 0);
  // The same 8 tokens as one prefill chunk: quantized at once (L mod R = 0 -> empty residual).
  cache.append(prefill, 0, rows.data(), rows.data(), 8);
  REQUIRE(cache.key_counts(prefill, 0).quantized == 8);
  REQUIRE(cache.key_rule().window_count(cache.key_counts(prefill, 0)) == 0);
  REQUIRE(cache.value_counts(prefill, 0).quantized == 0);  // L <= R: values all in V_r
  REQUIRE(cache.key_pool().used_blocks() == 1);
  // The next decode step of the first sequence performs the pending flush first.
  cache.append(decode, 0, rows.data() + 8 * 32, rows.data() + 8 * 32, 1);
  REQUIRE(cache.key_counts(decode, 0).quantized == 8);
  REQUIRE(cache.key_rule().window_count(cache.key_counts(decode, 0)) == 1);
  // Values: R + 1 tokens in V_r during the step (pending pop), R after the next append.
  REQUIRE(cache.value_counts(decode, 0).quantized == 0);
  REQUIRE(cache.value_rule().window_count(cache.value_counts(decode, 0)) == 9);
  cache.append(decode, 0, rows.data() + 9 * 32, rows.data() + 9 * 32, 1);
  REQUIRE(cache.value_counts(decode, 0).quantized == 1);
  REQUIRE(cache.value_rule().window_count(cache.value_counts(decode, 0)) == 9);
  // Both sequences now hold the same quantized keys for tokens 0..7 (identical groups).
  std::vector<float> a(20 * 32), b(20 * 32);
  cache.read_keys(decode, 0, a.data());
  cache.read_keys(prefill, 0, b.data());
  REQUIRE(std::memcmp(a.data(), b.data(), 8 * 32 * sizeof(float)) == 0);
  // A chunk appended after a pending flush: pending flush first, then whole chunks of R leave.
  for (index_t t = 10; t < 16; ++t) cache.append(decode, 0, rows.data() + t * 32, rows.data() + t * 32, 1);
  REQUIRE(cache.key_counts(decode, 0).length == 16);
  REQUIRE(cache.key_counts(decode, 0).quantized == 8);  // residual of 8: pending
  cache.append(decode, 0, rows.data(), rows.data(), 3);
  REQUIRE(cache.key_counts(decode, 0).quantized == 16);
  REQUIRE(cache.key_rule().window_count(cache.key_counts(decode, 0)) == 3);
  REQUIRE(cache.value_rule().window_count(cache.value_counts(decode, 0)) == 8);
  REQUIRE(cache.value_counts(decode, 0).quantized == 11);
}

TEST_CASE("WindowRule agrees with the ALGORITHMS.md model for random append sequences", "[cache][state]") {
  const std::uint64_t seed = kvq_test::case_seed("window rule random", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  for (int trial = 0; trial < 400; ++trial) {
    const auto r = static_cast<index_t>(1 + rng.below(12));
    const auto s = static_cast<index_t>(rng.below(6));
    const int method = static_cast<int>(rng.below(5));
    StreamModel model;
    kvq::WindowRule rule;
    switch (method) {
      case 0: model = {Method::kKiviKeys, 0, r}; rule = {0, r - 1, r, kvq::FlushTiming::kAfterAttention}; break;
      case 1: model = {Method::kKiviValues, 0, r}; rule = {0, r, 1, kvq::FlushTiming::kAfterAttention}; break;
      case 2: model = {Method::kSkvq, s, r - 1}; rule = {s, r - 1, 1, kvq::FlushTiming::kBeforeAttention}; break;
      case 3: model = {Method::kCskv, 0, r}; rule = {0, r - 1, r, kvq::FlushTiming::kBeforeAttention}; break;
      default: model = {Method::kImmediate, 0, 0}; rule = kvq::WindowRule::of<Fp16::KeyWindow>(); break;
    }
    kvq::StreamCounts c{};
    for (int step = 0; step < 60; ++step) {
      const auto n = static_cast<index_t>(rng.below(4) == 0 ? rng.below(3 * static_cast<std::uint32_t>(r) + 3) : 1);
      c = rule.after_append(c, n);
      model.append(n);
      if (c.length != model.length || c.quantized != model.quantized) {
        CAPTURE(trial, method, r, s, step, n, c.length, c.quantized, model.length, model.quantized);
        REQUIRE(c.quantized == model.quantized);
      }
    }
  }
  // The compiled-in specs are the documented ones.
  using K = kvq::WindowRule;
  const K kivi_k = K::of<KiviK2::KeyWindow>(), kivi_v = K::of<KiviK2::ValueWindow>();
  REQUIRE((kivi_k.sinks == 0 && kivi_k.max_window == 127 && kivi_k.chunk == 128 && kivi_k.timing == kvq::FlushTiming::kAfterAttention));
  REQUIRE((kivi_v.sinks == 0 && kivi_v.max_window == 128 && kivi_v.chunk == 1 && kivi_v.timing == kvq::FlushTiming::kAfterAttention));
  const K skvq = K::of<SkvqK2V15::KeyWindow>();
  REQUIRE((skvq.sinks == 5 && skvq.max_window == 128 && skvq.chunk == 1 && skvq.timing == kvq::FlushTiming::kBeforeAttention));
  const K cskv = K::of<CskvK4V4::ValueWindow>();
  REQUIRE((cskv.sinks == 0 && cskv.max_window == 31 && cskv.chunk == 32 && cskv.timing == kvq::FlushTiming::kBeforeAttention));
}

TEST_CASE("append takes float, Float16 and BFloat16 rows with any strides; all give the same cache",
          "[cache][append]") {
  const std::uint64_t seed = kvq_test::case_seed("append input types", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  const index_t heads = 2, dim = 16, w = heads * dim, n = 37;
  auto run = [&](auto policy_tag) {
    using P = typename decltype(policy_tag)::type;
    auto cache = kvq_test::make_cache<P>(1, heads, dim, 64);
    const auto bias = kvq_test::make_bias(rng, w);
    std::vector<float> x = kvq_test::make_rows(rng, n, bias);
    for (float& v : x) v = kvq_test::round_to<kvq::BFloat16>(v);  // representable in every input type
    std::vector<kvq::Float16> xh(x.size());
    std::vector<kvq::BFloat16> xb(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      xh[i] = kvq::Float16(x[i]);
      xb[i] = kvq::BFloat16(x[i]);
    }
    // Strided: [n, heads, dim] inside a buffer of [heads, n, 2 * dim] (every other float used).
    std::vector<float> xs(static_cast<std::size_t>(n * w * 2), std::numeric_limits<float>::quiet_NaN());
    for (index_t t = 0; t < n; ++t)
      for (index_t h = 0; h < heads; ++h)
        for (index_t c = 0; c < dim; ++c) xs[static_cast<std::size_t>((h * n + t) * 2 * dim + 2 * c)] = x[static_cast<std::size_t>(t * w + h * dim + c)];
    const kvq::StridedView<const float, 3> strided(xs.data(), {n, heads, dim}, {2 * dim, n * 2 * dim, 2});
    std::vector<std::vector<float>> keys, values;
    for (int kind = 0; kind < 4; ++kind) {
      const auto seq = cache.add_sequence();
      // Chunks of 10, then decode steps, to exercise both paths.
      for (index_t t = 0; t < n;) {
        const index_t m = t < 20 ? std::min<index_t>(10, n - t) : 1;
        const index_t shape[3] = {m, heads, dim};
        switch (kind) {
          case 0: cache.append(seq, 0, x.data() + t * w, x.data() + t * w, m); break;
          case 1: cache.append(seq, 0, kvq::StridedView<const kvq::Float16, 3>(xh.data() + t * w, shape), kvq::StridedView<const kvq::Float16, 3>(xh.data() + t * w, shape)); break;
          case 2: cache.append(seq, 0, xb.data() + t * w, xb.data() + t * w, m); break;
          default: {
            const kvq::StridedView<const float, 3> part(&strided(t, 0, 0), shape, {strided.stride(0), strided.stride(1), strided.stride(2)});
            cache.append(seq, 0, part, part);
          }
        }
        t += m;
      }
      keys.emplace_back(static_cast<std::size_t>(n * w));
      values.emplace_back(static_cast<std::size_t>(n * w));
      cache.read_keys(seq, 0, keys.back().data());
      cache.read_values(seq, 0, values.back().data());
    }
    for (int kind = 1; kind < 4; ++kind) {
      CAPTURE(P::name(), kind);
      REQUIRE(std::memcmp(keys[0].data(), keys[static_cast<std::size_t>(kind)].data(), keys[0].size() * sizeof(float)) == 0);
      REQUIRE(std::memcmp(values[0].data(), values[static_cast<std::size_t>(kind)].data(), values[0].size() * sizeof(float)) == 0);
    }
  };
  run(kvq::PolicyTag<KiviSmall>{});
  run(kvq::PolicyTag<SkvqSmall>{});
  run(kvq::PolicyTag<CskvSmall>{});
  run(kvq::PolicyTag<Fp32>{});
}
