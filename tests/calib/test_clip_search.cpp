// SPDX-License-Identifier: Apache-2.0
// SKVQ clip-ratio search (calib/clip_search.hpp): the attention-output error against an
// independent fp64 loop (post- and pre-RoPE keys, GQA, sinks), alpha = 1 on data that clipping
// cannot help, the grid minimum on heavy-tailed data, SKVQ channel groups against a
// hand-permuted quantization, and argument checking.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "kvq/calib/clip_search.hpp"
#include "kvq/core/random.hpp"
#include "kvq/quant/matrix.hpp"
#include "kvq/transform/rope.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::Bits;
using kvq::GroupAxis;
using kvq::index_t;
using kvq::MatrixQuantSpec;
using kvq::MetaFormat;
using kvq::Status;
using kvq::calib::AttentionSample;
using kvq::calib::ClipSearchOptions;

std::size_t idx(index_t i) { return static_cast<std::size_t>(i); }

MatrixQuantSpec per_token(Bits bits, index_t group_size, MetaFormat meta = MetaFormat::kFp16) {
  MatrixQuantSpec s;
  s.bits = bits;
  s.axis = GroupAxis::kChannels;
  s.group_size = group_size;
  s.meta = meta;
  return s;
}

AttentionSample make_sample(index_t tokens, index_t query_heads, index_t kv_heads, index_t head_dim,
                            index_t sinks) {
  AttentionSample s;
  s.tokens = tokens;
  s.query_heads = query_heads;
  s.kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.sinks = sinks;
  s.q.resize(idx(tokens * query_heads * head_dim));
  s.k.resize(idx(tokens * kv_heads * head_dim));
  s.v.resize(s.k.size());
  return s;
}

// Gaussian q, k, v with per-channel offsets and scales (outlier-ish channels), like real caches.
void fill_gaussian(kvq::Rng& rng, AttentionSample& s) {
  const index_t c = s.kv_heads * s.head_dim;
  std::vector<float> bias(idx(c)), scale(idx(c));
  for (index_t i = 0; i < c; ++i) {
    bias[idx(i)] = rng.normal();
    scale[idx(i)] = std::exp(0.5f * rng.normal());
  }
  for (auto& x : s.q) x = rng.normal();
  for (std::size_t i = 0; i < s.k.size(); ++i) {
    s.k[i] = bias[i % idx(c)] + scale[i % idx(c)] * rng.normal();
    s.v[i] = rng.normal();
  }
}

// Student-t with 3 degrees of freedom: heavy tails, where clipping helps.
float student_t3(kvq::Rng& rng) {
  const float z = rng.normal();
  float chi2 = 0.0f;
  for (int i = 0; i < 3; ++i) {
    const float n = rng.normal();
    chi2 += n * n;
  }
  const float t = z / std::sqrt(chi2 / 3.0f + 1e-6f);
  return std::max(-64.0f, std::min(64.0f, t));  // zero-points stay within FP8 E4M3's 448
}

// The scored positions as the header documents them, written again.
std::vector<index_t> expected_positions(index_t tokens, index_t sinks, index_t queries) {
  std::vector<index_t> p;
  const index_t first = sinks + 1;
  const index_t n = tokens - first;
  if (n <= queries) {
    for (index_t t = first; t < tokens; ++t) p.push_back(t);
  } else if (queries == 1) {
    p.push_back(tokens - 1);
  } else {
    for (index_t j = 0; j < queries; ++j) p.push_back(first + j * (n - 1) / (queries - 1));
  }
  return p;
}

// x [tokens, channels] with rows sinks.. replaced by their quantize -> dequantize round trip.
std::vector<float> round_trip(const std::vector<float>& x, index_t tokens, index_t channels,
                              index_t sinks, const MatrixQuantSpec& spec) {
  const index_t n = tokens - sinks;
  const kvq::MatrixLayout l = kvq::plan_matrix(n, channels, spec);
  std::vector<std::uint8_t> codes(l.code_bytes), scales(l.meta_bytes), zeros(l.meta_bytes);
  std::vector<float> y = x;
  kvq::quantize_matrix<float>(kvq::StridedView<const float, 2>(x.data() + sinks * channels, {n, channels}), spec,
                              {{codes.data(), codes.size()}, {scales.data(), scales.size()}, {zeros.data(), zeros.size()}});
  kvq::dequantize_matrix<float>({{codes.data(), codes.size()}, {scales.data(), scales.size()}, {zeros.data(), zeros.size()}},
                                spec, kvq::StridedView<float, 2>(y.data() + sinks * channels, {n, channels}));
  return y;
}

// Independent fp64 loop: sum ||o - o^||^2 / sum ||o||^2 over the positions and query heads, with
// o^ attending over k_hat / v_hat ([tokens, kv_heads * head_dim], already round-tripped).
double reference_error(const AttentionSample& s, const std::vector<float>& k_hat,
                       const std::vector<float>& v_hat, const std::vector<index_t>& positions) {
  const index_t d = s.head_dim;
  const index_t c = s.kv_heads * d;
  const index_t group = s.query_heads / s.kv_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  // Keys as attention sees them: [tokens, kv_heads, head_dim] in double, rotated when pre-RoPE.
  auto attention_keys = [&](const std::vector<float>& k) {
    std::vector<double> out(k.begin(), k.end());
    if (s.rope != nullptr) {
      for (index_t t = 0; t < s.tokens; ++t) {
        for (index_t h = 0; h < s.kv_heads; ++h) s.rope->rotate_exact(out.data() + t * c + h * d, t);
      }
    }
    return out;
  };
  const std::vector<double> k_exact = attention_keys(s.k);
  const std::vector<double> k_quant = attention_keys(k_hat);
  auto attend = [&](const std::vector<double>& k, const std::vector<float>& v, index_t t, index_t qh,
                    std::vector<double>& o) {
    const index_t h = qh / group;
    std::vector<double> p(idx(t + 1));
    double mx = -std::numeric_limits<double>::infinity();
    for (index_t j = 0; j <= t; ++j) {
      double dot = 0.0;
      for (index_t i = 0; i < d; ++i) {
        dot += static_cast<double>(s.q[idx((t * s.query_heads + qh) * d + i)]) * k[idx(j * c + h * d + i)];
      }
      p[idx(j)] = dot * scale;
      mx = std::max(mx, p[idx(j)]);
    }
    double total = 0.0;
    for (auto& e : p) total += (e = std::exp(e - mx));
    o.assign(idx(d), 0.0);
    for (index_t j = 0; j <= t; ++j) {
      for (index_t i = 0; i < d; ++i) o[idx(i)] += p[idx(j)] / total * static_cast<double>(v[idx(j * c + h * d + i)]);
    }
  };
  double num = 0.0;
  double den = 0.0;
  std::vector<double> o, o_hat;
  for (index_t t : positions) {
    for (index_t qh = 0; qh < s.query_heads; ++qh) {
      attend(k_exact, s.v, t, qh, o);
      attend(k_quant, v_hat, t, qh, o_hat);
      for (index_t i = 0; i < d; ++i) {
        num += (o[idx(i)] - o_hat[idx(i)]) * (o[idx(i)] - o_hat[idx(i)]);
        den += o[idx(i)] * o[idx(i)];
      }
    }
  }
  return num / den;
}

bool close(double a, double b, double rel) { return std::fabs(a - b) <= rel * std::max(std::fabs(a), std::fabs(b)); }

// Every per-token group of x holds values on its own grid {z + i * s, i = 0..levels-1} with both
// extremes present; z and s are dyadic, exact in fp16, so alpha = 1 reproduces x exactly.
void fill_on_grid(kvq::Rng& rng, std::vector<float>& x, index_t group_size, int levels) {
  const float steps[] = {0.125f, 0.25f, 0.375f, 0.5f, 0.75f};
  for (std::size_t g = 0; g < x.size(); g += idx(group_size)) {
    const float z = 0.125f * static_cast<float>(static_cast<int>(rng.below(257)) - 128);
    const float s = steps[rng.below(5)];
    for (index_t i = 0; i < group_size; ++i) {
      const int code = i == 0 ? 0 : i == 1 ? levels - 1 : static_cast<int>(rng.below(static_cast<std::uint32_t>(levels)));
      x[g + idx(i)] = z + static_cast<float>(code) * s;
    }
    for (index_t i = group_size - 1; i > 0; --i) {  // shuffle within the group
      std::swap(x[g + idx(i)], x[g + rng.below(static_cast<std::uint32_t>(i + 1))]);
    }
  }
}

struct Caught {
  std::string what;
  Status status = Status::kOk;
};

template <class F>
Caught error_of(F&& f) {
  try {
    f();
  } catch (const kvq::Error& e) {
    return {e.what(), e.status()};
  }
  return {"(no kvq::Error)", Status::kOk};
}

bool has(const Caught& c, const std::string& fragment) { return c.what.find(fragment) != std::string::npos; }

}  // namespace

TEST_CASE("clip grid and scored query positions", "[calib][clip]") {
  const std::vector<float> grid = kvq::calib::clip_grid({});
  REQUIRE(grid.size() == 21);
  CHECK(grid.front() == 0.80f);
  CHECK(grid[12] == 0.92f);
  CHECK(grid[16] == 0.96f);
  CHECK(grid.back() == 1.00f);
  for (std::size_t i = 0; i < grid.size(); ++i) {
    CAPTURE(i);
    CHECK(grid[i] == static_cast<float>(0.80 + 0.01 * static_cast<double>(i)));
  }
  ClipSearchOptions one;
  one.lo = one.hi = 0.9f;
  CHECK(kvq::calib::clip_grid(one) == std::vector<float>{0.9f});
  ClipSearchOptions coarse;
  coarse.lo = 0.5f;
  coarse.step = 0.2f;  // 0.5, 0.7, 0.9 (1.1 is past hi)
  CHECK(kvq::calib::clip_grid(coarse) == std::vector<float>{0.5f, 0.7f, 0.9f});

  CHECK(kvq::calib::scored_query_positions(10, 2, 64) == std::vector<index_t>{3, 4, 5, 6, 7, 8, 9});
  CHECK(kvq::calib::scored_query_positions(101, 0, 5) == std::vector<index_t>{1, 25, 50, 75, 100});
  CHECK(kvq::calib::scored_query_positions(50, 5, 1) == std::vector<index_t>{49});
  const std::vector<index_t> p = kvq::calib::scored_query_positions(512, 5, 64);
  REQUIRE(p.size() == 64);
  CHECK(p.front() == 6);
  CHECK(p.back() == 511);
  CHECK(std::adjacent_find(p.begin(), p.end(), [](index_t a, index_t b) { return b <= a; }) == p.end());
}

TEST_CASE("alpha search returns 1.0 when clipping cannot help", "[calib][clip]") {
  const std::uint64_t seed = kvq_test::case_seed("clip_search_on_grid", 0);
  INFO("seed " << seed);
  kvq::Rng rng(seed);
  const index_t group_size = 16;
  for (const Bits bits : {Bits::k2, Bits::kTernary}) {
    const int levels = bits == Bits::k2 ? 4 : 3;
    for (const bool pre_rope : {false, true}) {
      CAPTURE(static_cast<int>(bits), pre_rope);
      AttentionSample s = make_sample(48, 4, 2, 16, 3);
      for (auto& x : s.q) x = rng.normal();
      fill_on_grid(rng, s.k, group_size, levels);
      fill_on_grid(rng, s.v, group_size, levels);
      const kvq::RopeRotator rope(16, {10000.0, kvq::RopeStyle::kHalfSplit}, 1);
      if (pre_rope) s.rope = &rope;
      const MatrixQuantSpec spec = per_token(bits, group_size);
      ClipSearchOptions options;
      options.queries = 16;
      const kvq::calib::ClipSearchResult r = kvq::calib::search_clip(s, spec, spec, options);
      CHECK(r.key_error_at(1.0f) == 0.0);
      CHECK(r.value_error_at(1.0f) == 0.0);
      CHECK(r.key_clip == 1.0f);
      CHECK(r.value_clip == 1.0f);
      // Clipping does hurt here: every smaller alpha has a positive error.
      for (std::size_t i = 0; i + 1 < r.grid.size(); ++i) {
        CAPTURE(r.grid[i]);
        CHECK(r.key_error[i] > 0.0);
        CHECK(r.value_error[i] > 0.0);
      }
      CHECK(kvq::calib::attention_output_error(s, &spec, &spec, options) == 0.0);
    }
  }
}

TEST_CASE("attention_output_error equals an independent fp64 computation", "[calib][clip]") {
  const std::uint64_t seed = kvq_test::case_seed("clip_search_reference", 0);
  INFO("seed " << seed);
  kvq::Rng rng(seed);
  struct Case {
    const char* name;
    bool rope;
    kvq::RopeStyle style;
    index_t query_heads, kv_heads, sinks, queries;
    Bits bits;
  };
  const Case cases[] = {
      {"post-RoPE keys, GQA 4/2, sinks 3, 10 of 36 positions", false, kvq::RopeStyle::kHalfSplit, 4, 2, 3, 10, Bits::k2},
      {"pre-RoPE half-split, GQA 6/2, 3-bit", true, kvq::RopeStyle::kHalfSplit, 6, 2, 3, 10, Bits::k3},
      {"pre-RoPE adjacent, MHA 2/2, no sinks, all positions", true, kvq::RopeStyle::kAdjacentPairs, 2, 2, 0, 64, Bits::kTernary},
      {"pre-RoPE half-split, MQA 3/1, one query", true, kvq::RopeStyle::kHalfSplit, 3, 1, 5, 1, Bits::k2},
  };
  for (const Case& c : cases) {
    INFO(c.name);
    AttentionSample s = make_sample(40, c.query_heads, c.kv_heads, 16, c.sinks);
    fill_gaussian(rng, s);
    const kvq::RopeRotator rope(16, {10000.0, c.style}, 1);
    if (c.rope) s.rope = &rope;
    ClipSearchOptions options;
    options.queries = c.queries;
    const std::vector<index_t> positions = expected_positions(s.tokens, s.sinks, c.queries);
    const index_t channels = s.kv_heads * s.head_dim;

    CHECK(kvq::calib::attention_output_error(s, nullptr, nullptr, options) == 0.0);

    MatrixQuantSpec spec = per_token(c.bits, 8);
    spec.clip = 0.93f;
    const std::vector<float> k_hat = round_trip(s.k, s.tokens, channels, s.sinks, spec);
    const std::vector<float> v_hat = round_trip(s.v, s.tokens, channels, s.sinks, spec);
    const double want_k = reference_error(s, k_hat, s.v, positions);
    const double want_v = reference_error(s, s.k, v_hat, positions);
    const double want_kv = reference_error(s, k_hat, v_hat, positions);
    const double got_k = kvq::calib::attention_output_error(s, &spec, nullptr, options);
    const double got_v = kvq::calib::attention_output_error(s, nullptr, &spec, options);
    const double got_kv = kvq::calib::attention_output_error(s, &spec, &spec, options);
    CAPTURE(want_k, got_k, want_v, got_v, want_kv, got_kv);
    CHECK(want_k > 0.0);
    CHECK(want_v > 0.0);
    CHECK(close(got_k, want_k, 1e-9));
    CHECK(close(got_v, want_v, 1e-9));
    CHECK(close(got_kv, want_kv, 1e-9));

    // The model gives the same numbers, and the same again (deterministic).
    kvq::calib::AttentionErrorModel model(s, options);
    CHECK(model.positions() == positions);
    CHECK(model.error(&spec, nullptr) == got_k);
    CHECK(model.error(nullptr, &spec) == got_v);
    CHECK(model.error(&spec, &spec) == got_kv);
    CHECK(model.error(&spec, nullptr) == got_k);
  }
}

TEST_CASE("on heavy-tailed data the searched alpha is the grid minimum", "[calib][clip]") {
  const std::uint64_t seed = kvq_test::case_seed("clip_search_heavy_tails", 0);
  INFO("seed " << seed);
  kvq::Rng rng(seed);
  AttentionSample s = make_sample(256, 6, 2, 32, 5);
  for (auto& x : s.q) x = 0.5f * rng.normal();
  for (auto& x : s.k) x = student_t3(rng);
  for (auto& x : s.v) x = student_t3(rng);
  const kvq::RopeRotator rope(32, {100000.0, kvq::RopeStyle::kHalfSplit}, 1);
  s.rope = &rope;
  ClipSearchOptions options;
  options.queries = 32;
  options.lo = 0.70f;  // 0.70 .. 1.00: 31 alphas
  const MatrixQuantSpec spec = per_token(Bits::k2, 32, MetaFormat::kFp8E4M3);
  const kvq::calib::ClipSearchResult r = kvq::calib::search_clip(s, spec, spec, options);
  REQUIRE(r.grid.size() == 31);
  REQUIRE(r.key_error.size() == r.grid.size());
  REQUIRE(r.value_error.size() == r.grid.size());
  INFO("key clip " << r.key_clip << " (error " << r.key_error_at(r.key_clip) << ", at 1: " << r.key_error_at(1.0f)
                   << "), value clip " << r.value_clip << " (error " << r.value_error_at(r.value_clip)
                   << ", at 1: " << r.value_error_at(1.0f) << ")");
  auto check_stream = [&](const char* name, const std::vector<double>& errors, float clip, auto at) {
    INFO(name);
    const double best = at(clip);
    CHECK(best == *std::min_element(errors.begin(), errors.end()));
    for (const float a : {1.0f, 0.96f, 0.92f}) {
      CAPTURE(a);
      CHECK(best <= at(a));
    }
    // Ties go to the larger alpha: no later grid point reaches the minimum.
    const auto at_clip = static_cast<std::size_t>(std::find(r.grid.begin(), r.grid.end(), clip) - r.grid.begin());
    REQUIRE(at_clip < r.grid.size());
    for (std::size_t i = at_clip + 1; i < r.grid.size(); ++i) CHECK(errors[i] > best);
  };
  check_stream("keys", r.key_error, r.key_clip, [&](float a) { return r.key_error_at(a); });
  check_stream("values", r.value_error, r.value_clip, [&](float a) { return r.value_error_at(a); });
  // Heavy tails at 2 bits: clipping strictly helps both streams.
  CHECK(r.key_clip < 1.0f);
  CHECK(r.value_clip < 1.0f);
  CHECK(r.key_error_at(r.key_clip) < r.key_error_at(1.0f));
  CHECK(r.value_error_at(r.value_clip) < r.value_error_at(1.0f));
  // The search scores exactly what attention_output_error scores.
  for (const float a : {0.70f, 0.92f, 1.0f}) {
    MatrixQuantSpec clipped = spec;
    clipped.clip = a;
    CAPTURE(a);
    CHECK(kvq::calib::attention_output_error(s, &clipped, nullptr, options) == r.key_error_at(a));
    CHECK(kvq::calib::attention_output_error(s, nullptr, &clipped, options) == r.value_error_at(a));
  }
}

TEST_CASE("channel groups are honoured", "[calib][clip]") {
  const std::uint64_t seed = kvq_test::case_seed("clip_search_channel_groups", 0);
  INFO("seed " << seed);
  kvq::Rng rng(seed);
  AttentionSample s = make_sample(40, 4, 2, 16, 2);
  const index_t channels = 32;
  // Channel magnitudes spread over e^-3 .. e^3: which channels share a group matters.
  std::vector<float> magnitude(idx(channels));
  for (auto& m : magnitude) m = std::exp(rng.uniform(-3.0f, 3.0f));
  for (auto& x : s.q) x = rng.normal();
  for (std::size_t i = 0; i < s.k.size(); ++i) {
    s.k[i] = magnitude[i % idx(channels)] * rng.normal();
    s.v[i] = magnitude[(i * 7 + 3) % idx(channels)] * rng.normal();
  }
  const kvq::RopeRotator rope(16, {10000.0, kvq::RopeStyle::kHalfSplit}, 1);
  s.rope = &rope;
  std::vector<std::int32_t> perm(idx(channels));
  std::iota(perm.begin(), perm.end(), 0);
  for (index_t i = channels - 1; i > 0; --i) std::swap(perm[idx(i)], perm[rng.below(static_cast<std::uint32_t>(i + 1))]);
  const std::vector<std::int32_t> bounds = {0, 3, 8, 16, 17, 25, 32};
  std::vector<std::int32_t> identity(idx(channels));
  std::iota(identity.begin(), identity.end(), 0);

  MatrixQuantSpec grouped = per_token(Bits::k2, 0);
  grouped.clip = 0.95f;
  grouped.channel_groups = {{perm.data(), perm.size()}, {bounds.data(), bounds.size()}};
  MatrixQuantSpec unpermuted = grouped;
  unpermuted.channel_groups.permutation = {identity.data(), identity.size()};
  MatrixQuantSpec uniform = per_token(Bits::k2, 8);
  uniform.clip = 0.95f;

  // By hand: gather each group's channels, quantize it as one per-token group of its length,
  // scatter the round trip back.
  auto by_hand = [&](const std::vector<float>& x) {
    std::vector<float> y = x;
    const index_t n = s.tokens - s.sinks;
    for (std::size_t g = 0; g + 1 < bounds.size(); ++g) {
      const index_t len = bounds[g + 1] - bounds[g];
      std::vector<float> part(idx(s.tokens * len));
      for (index_t t = 0; t < s.tokens; ++t) {
        for (index_t i = 0; i < len; ++i) part[idx(t * len + i)] = x[idx(t * channels + perm[idx(bounds[g] + i)])];
      }
      MatrixQuantSpec one = per_token(Bits::k2, len);
      one.clip = 0.95f;
      const std::vector<float> part_hat = round_trip(part, s.tokens, len, s.sinks, one);
      for (index_t t = s.sinks; t < s.sinks + n; ++t) {
        for (index_t i = 0; i < len; ++i) y[idx(t * channels + perm[idx(bounds[g] + i)])] = part_hat[idx(t * len + i)];
      }
    }
    return y;
  };
  ClipSearchOptions options;
  options.queries = 12;
  const std::vector<index_t> positions = expected_positions(s.tokens, s.sinks, options.queries);
  const double want_k = reference_error(s, by_hand(s.k), s.v, positions);
  const double want_v = reference_error(s, s.k, by_hand(s.v), positions);
  const double got_k = kvq::calib::attention_output_error(s, &grouped, nullptr, options);
  const double got_v = kvq::calib::attention_output_error(s, nullptr, &grouped, options);
  const double plain_k = kvq::calib::attention_output_error(s, &unpermuted, nullptr, options);
  const double plain_v = kvq::calib::attention_output_error(s, nullptr, &unpermuted, options);
  const double uniform_k = kvq::calib::attention_output_error(s, &uniform, nullptr, options);
  const double uniform_v = kvq::calib::attention_output_error(s, nullptr, &uniform, options);
  CAPTURE(want_k, got_k, plain_k, uniform_k, want_v, got_v, plain_v, uniform_v);
  CHECK(close(got_k, want_k, 1e-9));
  CHECK(close(got_v, want_v, 1e-9));
  CHECK(!close(got_k, plain_k, 1e-3));
  CHECK(!close(got_v, plain_v, 1e-3));
  CHECK(!close(got_k, uniform_k, 1e-3));
  CHECK(!close(got_v, uniform_v, 1e-3));

  // search_clip carries the groups into every candidate.
  const kvq::calib::ClipSearchResult r = kvq::calib::search_clip(s, grouped, grouped, options);
  CHECK(r.key_error_at(0.95f) == got_k);
  CHECK(r.value_error_at(0.95f) == got_v);
}

TEST_CASE("clip search rejects bad input", "[calib][clip]") {
  const std::uint64_t seed = kvq_test::case_seed("clip_search_errors", 0);
  INFO("seed " << seed);
  kvq::Rng rng(seed);
  AttentionSample good = make_sample(12, 4, 2, 8, 2);
  fill_gaussian(rng, good);
  const MatrixQuantSpec spec = per_token(Bits::k2, 8);
  auto error = [&](const AttentionSample& s, const ClipSearchOptions& o = {}) {
    return error_of([&] { kvq::calib::search_clip(s, spec, spec, o); });
  };
  REQUIRE(error(good).status == Status::kOk);

  SECTION("extents and sizes") {
    AttentionSample s = good;
    s.tokens = 0;
    Caught c = error(s);
    CHECK(has(c, "kvq::calib::search_clip: argument 's.tokens' = 0; expected a positive extent"));
    s = good;
    s.kv_heads = 3;
    c = error(s);
    CHECK(has(c, "argument 's.query_heads' = 4; expected a multiple of kv_heads = 3"));
    s = good;
    s.q.pop_back();
    c = error(s);
    CHECK(has(c, "argument 's.q' = '383 floats'; expected 384 floats"));
    s = good;
    s.k.push_back(0.0f);
    c = error(s);
    CHECK(has(c, "argument 's.k' = '193 floats'; expected 192 floats"));
    s = good;
    s.v.clear();
    c = error(s);
    CHECK(has(c, "argument 's.v' = '0 floats'"));
    CHECK(c.status == Status::kInvalidArgument);
  }
  SECTION("sinks") {
    AttentionSample s = good;
    s.sinks = 11;
    CHECK(has(error(s), "argument 's.sinks' = 11; expected 0 <= sinks < tokens - 1 = 11"));
    s.sinks = -1;
    CHECK(has(error(s), "argument 's.sinks' = -1"));
    s.sinks = 10;
    CHECK(error(s).status == Status::kOk);
  }
  SECTION("non-finite data") {
    AttentionSample s = good;
    s.k[idx(3 * 16 + 5)] = std::numeric_limits<float>::quiet_NaN();
    Caught c = error(s);
    CHECK(has(c, "argument 's.k' = 'nan at [token 3, channel 5]'; expected finite values"));
    CHECK(c.status == Status::kNonFiniteInput);
    s = good;
    s.q[idx(7 * 32 + 1)] = std::numeric_limits<float>::infinity();
    c = error(s);
    CHECK(has(c, "argument 's.q' = 'inf at [token 7, channel 1]'"));
    s = good;
    s.v[0] = -std::numeric_limits<float>::infinity();  // a sink: still reported
    CHECK(has(error(s), "argument 's.v' = '-inf at [token 0, channel 0]'"));
  }
  SECTION("options") {
    ClipSearchOptions o;
    o.lo = 0.0f;
    CHECK(has(error(good, o), "argument 'options.lo' = 0; expected a grid start in (0, 1]"));
    o = {};
    o.hi = 1.01f;
    CHECK(has(error(good, o), "argument 'options.hi' = 1.00999999; expected a grid end in [lo = 0.800000012, 1]"));
    o = {};
    o.hi = 0.7f;
    CHECK(has(error(good, o), "argument 'options.hi' = 0.699999988"));
    o = {};
    o.step = 0.0f;
    CHECK(has(error(good, o), "argument 'options.step' = 0; expected a finite grid step >= 1e-6"));
    o = {};
    o.step = std::numeric_limits<float>::quiet_NaN();
    CHECK(has(error(good, o), "argument 'options.step' = nan"));
    o = {};
    o.queries = 0;
    CHECK(has(error(good, o), "argument 'options.queries' = 0; expected at least 1"));
    REQUIRE_THROWS_WITH(kvq::calib::clip_grid(o), KVQ_CONTAINS("kvq::calib::clip_grid: argument 'options.queries'"));
  }
  SECTION("specs") {
    MatrixQuantSpec per_channel = spec;
    per_channel.axis = GroupAxis::kTokens;
    Caught c = error_of([&] { kvq::calib::attention_output_error(good, &per_channel, nullptr); });
    CHECK(has(c, "kvq::calib::attention_output_error: argument 'key_spec' = 'a spec with axis 'token''; "
                 "expected axis 'channel'"));
    c = error_of([&] { kvq::calib::search_clip(good, spec, per_channel); });
    CHECK(has(c, "kvq::calib::search_clip: argument 'value_spec'"));
    MatrixQuantSpec odd = spec;
    odd.group_size = 5;
    c = error_of([&] { kvq::calib::attention_output_error(good, nullptr, &odd); });
    CHECK(has(c, "kvq::plan_matrix: argument 'group_size' = 5; expected a positive divisor of the channel count 16"));
  }
  SECTION("rope built for another head_dim") {
    AttentionSample s = good;
    const kvq::RopeRotator wider(16, {10000.0, kvq::RopeStyle::kHalfSplit}, 1);
    const kvq::RopeRotator wider_adjacent(16, {10000.0, kvq::RopeStyle::kAdjacentPairs}, 1);
    const kvq::RopeRotator narrower(4, {10000.0, kvq::RopeStyle::kAdjacentPairs}, 1);
    const kvq::RopeRotator unset;
    const kvq::RopeRotator right(8, {10000.0, kvq::RopeStyle::kAdjacentPairs}, 1);
    s.rope = &wider;
    CHECK(has(error(s), "argument 's.rope' = 'a rotator for head_dim 16'; expected a RopeRotator built "
                        "with head_dim = s.head_dim = 8"));
    s.rope = &wider_adjacent;
    CHECK(has(error(s), "argument 's.rope' = 'a rotator for head_dim 16'"));
    s.rope = &narrower;
    CHECK(has(error(s), "argument 's.rope' = 'a rotator for head_dim 4'"));
    s.rope = &unset;
    CHECK(has(error(s), "argument 's.rope' = 'a rotator that rotates nothing"));
    s.rope = &right;
    CHECK(error(s).status == Status::kOk);
    AttentionSample odd = make_sample(12, 2, 1, 7, 0);
    fill_gaussian(rng, odd);
    odd.rope = &right;
    const MatrixQuantSpec spec7 = per_token(Bits::k2, 7);
    CHECK(has(error_of([&] { kvq::calib::search_clip(odd, spec7, spec7); }),
              "argument 's.head_dim' = 7; expected an even head_dim <= 1024 with pre-RoPE keys"));
    odd.rope = nullptr;
    CHECK(error_of([&] { kvq::calib::search_clip(odd, spec7, spec7); }).status == Status::kOk);
  }
  SECTION("quantization errors propagate") {
    AttentionSample s = good;
    for (auto& x : s.v) x *= 1e6f;  // beyond E4M3's 448
    const MatrixQuantSpec fp8 = per_token(Bits::k2, 8, MetaFormat::kFp8E4M3);
    const Caught c = error_of([&] { kvq::calib::attention_output_error(s, nullptr, &fp8); });
    CHECK(has(c, "kvq::quantize_matrix: argument 'x'"));
    CHECK(c.status == Status::kMetadataOverflow);
  }
  SECTION("lookup off the grid") {
    const kvq::calib::ClipSearchResult r = kvq::calib::search_clip(good, spec, spec);
    CHECK(r.key_error_at(0.92f) == r.key_error[12]);
    CHECK(r.value_error_at(0.8f) == r.value_error[0]);
    REQUIRE_THROWS_WITH(r.key_error_at(0.925f),
                        KVQ_CONTAINS("kvq::calib::ClipSearchResult::key_error_at: argument 'alpha' = 0.925000012; "
                                     "expected one of the 21 grid values 0.8 .. 1"));
    REQUIRE_THROWS_WITH(r.value_error_at(0.5f), KVQ_CONTAINS("value_error_at: argument 'alpha' = 0.5"));
  }
}
