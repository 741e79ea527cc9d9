// SPDX-License-Identifier: Apache-2.0
// Matrix quantization: layout (KIVI per-channel keys, per-token values), SKVQ permuted channel
// groups, the half-step bound for every width, axis and metadata format, and argument checking
// that leaves the output untouched.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "kvq/core/random.hpp"
#include "kvq/quant/matrix.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::Bits;
using kvq::GroupAxis;
using kvq::index_t;
using kvq::MatrixQuantSpec;
using kvq::MetaFormat;

struct Buffers {
  std::vector<std::uint8_t> codes, scales, zeros;
  explicit Buffers(const kvq::MatrixLayout& l, std::uint8_t fill = 0)
      : codes(l.code_bytes, fill), scales(l.meta_bytes, fill), zeros(l.meta_bytes, fill) {}
  kvq::QuantizedMatrixRef ref() {
    return {{codes.data(), codes.size()}, {scales.data(), scales.size()}, {zeros.data(), zeros.size()}};
  }
  kvq::ConstQuantizedMatrixRef cref() const {
    return {{codes.data(), codes.size()}, {scales.data(), scales.size()}, {zeros.data(), zeros.size()}};
  }
};

std::vector<float> random_matrix(kvq::Rng& rng, index_t tokens, index_t channels) {
  std::vector<float> x(static_cast<std::size_t>(tokens * channels));
  std::vector<float> bias(static_cast<std::size_t>(channels));
  for (auto& b : bias) b = 2.0f * rng.normal();
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t c = 0; c < channels; ++c) {
      x[static_cast<std::size_t>(t * channels + c)] = bias[static_cast<std::size_t>(c)] + rng.normal();
    }
  }
  return x;
}

float decode_meta(MetaFormat f, const std::vector<std::uint8_t>& bytes, std::size_t index) {
  return kvq::dispatch_meta(f, [&](auto meta) {
    using Meta = decltype(meta);
    Meta m;
    std::memcpy(&m, bytes.data() + index * sizeof(Meta), sizeof(Meta));
    return m.to_float();
  });
}

// Checks |y - clamp(x, lo, hi)| <= scale / 2 (+ float slack) for every element, with lo and hi
// computed from the group's own elements and the scale read from the metadata array at the
// documented index.
void require_half_step_matrix(const std::vector<float>& x, const std::vector<float>& y,
                              index_t tokens, index_t channels, const MatrixQuantSpec& spec,
                              const kvq::MatrixLayout& layout, const Buffers& q) {
  for (index_t line = 0; line < layout.lines; ++line) {
    for (index_t g = 0; g < layout.groups_per_line; ++g) {
      const auto span = kvq::detail::group_span(spec, g);
      std::vector<std::size_t> idx;
      for (index_t i = 0; i < span.length; ++i) {
        index_t t = 0, c = 0;
        kvq::detail::group_element(spec, line, span, i, &t, &c);
        idx.push_back(static_cast<std::size_t>(t * channels + c));
      }
      float mn = x[idx[0]], mx = x[idx[0]];
      for (auto k : idx) {
        mn = std::min(mn, x[k]);
        mx = std::max(mx, x[k]);
      }
      const float lo = spec.clip * mn, hi = spec.clip * mx;
      const auto m = static_cast<std::size_t>(line * layout.groups_per_line + g);
      const double scale = decode_meta(spec.meta, q.scales, m);
      const double zero = decode_meta(spec.meta, q.zeros, m);
      const double top = zero + kvq::max_code(spec.bits) * scale;
      const double slack = 4.0 * std::numeric_limits<float>::epsilon() * std::max(std::abs(zero), std::abs(top));
      for (auto k : idx) {
        const double clipped = std::min<double>(std::max<double>(x[k], lo), hi);
        CAPTURE(line, g, k, x[k], y[k], scale, zero);
        REQUIRE(std::abs(y[k] - clipped) <= scale / 2 + slack);
      }
    }
  }
  (void)tokens;
}

}  // namespace

TEST_CASE("matrix round trip is within half a step for every width, axis and metadata format",
          "[quant][matrix][property]") {
  const std::uint64_t seed = kvq_test::case_seed("matrix half step", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  for (Bits bits : {Bits::kTernary, Bits::k2, Bits::k3, Bits::k4, Bits::k8}) {
    for (GroupAxis axis : {GroupAxis::kTokens, GroupAxis::kChannels}) {
      for (MetaFormat meta : {MetaFormat::kFp16, MetaFormat::kBf16, MetaFormat::kFp8E4M3}) {
        for (index_t group : {8, 32, 64}) {
          const index_t tokens = axis == GroupAxis::kTokens ? group * (1 + rng.below(3)) : 1 + rng.below(40);
          const index_t channels = axis == GroupAxis::kChannels ? group * (1 + rng.below(3)) : 1 + rng.below(40);
          MatrixQuantSpec spec;
          spec.bits = bits;
          spec.axis = axis;
          spec.group_size = group;
          spec.meta = meta;
          spec.clip = rng.below(2) == 0 ? 1.0f : 0.92f;
          CAPTURE(kvq::bits_label(bits), kvq::axis_label(axis), kvq::meta_label(meta), group, tokens, channels, spec.clip);
          const auto x = random_matrix(rng, tokens, channels);
          const auto layout = kvq::plan_matrix(tokens, channels, spec);
          REQUIRE(layout.groups_per_line * group == layout.line_length);
          Buffers q(layout);
          kvq::quantize_matrix(kvq::StridedView<const float, 2>(x.data(), {tokens, channels}), spec, q.ref());
          std::vector<float> y(x.size(), std::numeric_limits<float>::quiet_NaN());
          kvq::dequantize_matrix(q.cref(), spec, kvq::StridedView<float, 2>(y.data(), {tokens, channels}));
          require_half_step_matrix(x, y, tokens, channels, spec, layout, q);
        }
      }
    }
  }
}

TEST_CASE("per-channel layout is KIVI's: each channel's token codes form one packed stream",
          "[quant][matrix][kivi]") {
  kvq::Rng rng(kvq_test::case_seed("per-channel layout", 0));
  const index_t tokens = 64, channels = 5, group = 32;
  const auto x = random_matrix(rng, tokens, channels);
  MatrixQuantSpec spec;
  spec.bits = Bits::k2;
  spec.axis = GroupAxis::kTokens;
  spec.group_size = group;
  const auto layout = kvq::plan_matrix(tokens, channels, spec);
  REQUIRE(layout.lines == channels);
  REQUIRE(layout.line_bytes == 16);  // 64 tokens * 2 bits
  REQUIRE(layout.meta_bytes == static_cast<std::size_t>(channels * 2 * 2));
  Buffers q(layout);
  kvq::quantize_matrix(kvq::StridedView<const float, 2>(x.data(), {tokens, channels}), spec, q.ref());
  for (index_t c = 0; c < channels; ++c) {
    for (index_t g = 0; g < 2; ++g) {
      std::vector<std::uint8_t> stream(16, 0);
      kvq::GroupParams<kvq::Float16> p{};
      REQUIRE(kvq::quantize_group<Bits::k2>(kvq::StridedLoader<float>{&x[static_cast<std::size_t>(g * group * channels + c)], channels},
                                            group, 1.0f, stream.data(), static_cast<std::size_t>(g * group), &p) == kvq::Status::kOk);
      const auto base = static_cast<std::size_t>(c) * 16 + static_cast<std::size_t>(g) * 8;
      REQUIRE(std::equal(stream.begin() + g * 8, stream.begin() + g * 8 + 8, q.codes.begin() + static_cast<std::ptrdiff_t>(base)));
      const auto m = static_cast<std::size_t>(c * 2 + g);
      REQUIRE(decode_meta(MetaFormat::kFp16, q.scales, m) == p.scale.to_float());
      REQUIRE(decode_meta(MetaFormat::kFp16, q.zeros, m) == p.zero.to_float());
    }
  }
}

TEST_CASE("strided and fp16/bf16 inputs quantize like their contiguous float copies",
          "[quant][matrix]") {
  kvq::Rng rng(kvq_test::case_seed("strided input", 0));
  const index_t tokens = 32, channels = 24;
  const auto x = random_matrix(rng, tokens, channels);
  // Transposed storage: xt[c * tokens + t] = x[t, c].
  std::vector<float> xt(x.size());
  std::vector<kvq::Float16> xh(x.size());
  std::vector<float> xh_as_float(x.size());
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t c = 0; c < channels; ++c) {
      const auto k = static_cast<std::size_t>(t * channels + c);
      xt[static_cast<std::size_t>(c * tokens + t)] = x[k];
      xh[k] = kvq::Float16(x[k]);
      xh_as_float[k] = xh[k].to_float();
    }
  }
  for (GroupAxis axis : {GroupAxis::kTokens, GroupAxis::kChannels}) {
    MatrixQuantSpec spec;
    spec.bits = Bits::k4;
    spec.axis = axis;
    spec.group_size = 8;
    const auto layout = kvq::plan_matrix(tokens, channels, spec);
    Buffers a(layout), b(layout), c(layout), d(layout);
    kvq::quantize_matrix(kvq::StridedView<const float, 2>(x.data(), {tokens, channels}), spec, a.ref());
    kvq::quantize_matrix(kvq::StridedView<const float, 2>(xt.data(), {tokens, channels}, {1, tokens}), spec, b.ref());
    REQUIRE(a.codes == b.codes);
    REQUIRE(a.scales == b.scales);
    REQUIRE(a.zeros == b.zeros);
    kvq::quantize_matrix(kvq::StridedView<const kvq::Float16, 2>(xh.data(), {tokens, channels}), spec, c.ref());
    kvq::quantize_matrix(kvq::StridedView<const float, 2>(xh_as_float.data(), {tokens, channels}), spec, d.ref());
    REQUIRE(c.codes == d.codes);
    REQUIRE(c.scales == d.scales);
    // Dequantize to fp16 equals dequantize to float rounded to fp16.
    std::vector<float> yf(x.size());
    std::vector<kvq::Float16> yh(x.size());
    kvq::dequantize_matrix(a.cref(), spec, kvq::StridedView<float, 2>(yf.data(), {tokens, channels}));
    kvq::dequantize_matrix(a.cref(), spec, kvq::StridedView<kvq::Float16, 2>(yh.data(), {tokens, channels}));
    for (std::size_t k = 0; k < yf.size(); ++k) REQUIRE(yh[k].bits() == kvq::Float16(yf[k]).bits());
  }
}

TEST_CASE("SKVQ channel groups quantize the permuted row in variable-size groups",
          "[quant][matrix][skvq]") {
  kvq::Rng rng(kvq_test::case_seed("channel groups", 0));
  const index_t tokens = 7, channels = 32;
  const auto x = random_matrix(rng, tokens, channels);
  std::vector<std::int32_t> perm(static_cast<std::size_t>(channels));
  std::iota(perm.begin(), perm.end(), 0);
  for (std::size_t i = perm.size() - 1; i > 0; --i) std::swap(perm[i], perm[rng.below(static_cast<std::uint32_t>(i + 1))]);

  // Uniform boundaries with a permutation == uniform groups over the explicitly permuted matrix.
  const std::vector<std::int32_t> uniform{0, 8, 16, 24, 32};
  std::vector<float> xp(x.size());
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t p = 0; p < channels; ++p) {
      xp[static_cast<std::size_t>(t * channels + p)] = x[static_cast<std::size_t>(t * channels + perm[static_cast<std::size_t>(p)])];
    }
  }
  MatrixQuantSpec spec;
  spec.bits = Bits::kTernary;
  spec.axis = GroupAxis::kChannels;
  spec.meta = MetaFormat::kFp8E4M3;
  spec.clip = 0.96f;
  spec.group_size = 8;
  MatrixQuantSpec grouped = spec;
  grouped.channel_groups = {{perm.data(), perm.size()}, {uniform.data(), uniform.size()}};
  const auto layout = kvq::plan_matrix(tokens, channels, grouped);
  Buffers a(layout), b(layout);
  kvq::quantize_matrix(kvq::StridedView<const float, 2>(x.data(), {tokens, channels}), grouped, a.ref());
  kvq::quantize_matrix(kvq::StridedView<const float, 2>(xp.data(), {tokens, channels}), spec, b.ref());
  REQUIRE(a.codes == b.codes);
  REQUIRE(a.scales == b.scales);
  REQUIRE(a.zeros == b.zeros);

  // Variable boundaries: half-step bound, and dequantization scatters back to the original order.
  const std::vector<std::int32_t> variable{0, 3, 4, 17, 30, 32};
  grouped.channel_groups.boundaries = {variable.data(), variable.size()};
  const auto vlayout = kvq::plan_matrix(tokens, channels, grouped);
  REQUIRE(vlayout.groups_per_line == 5);
  Buffers v(vlayout);
  kvq::quantize_matrix(kvq::StridedView<const float, 2>(x.data(), {tokens, channels}), grouped, v.ref());
  std::vector<float> y(x.size(), std::numeric_limits<float>::quiet_NaN());
  kvq::dequantize_matrix(v.cref(), grouped, kvq::StridedView<float, 2>(y.data(), {tokens, channels}));
  require_half_step_matrix(x, y, tokens, channels, grouped, vlayout, v);
}

TEST_CASE("per-channel groups beat per-token groups on keys with outlier channels",
          "[quant][matrix][kivi]") {
  // KIVI §3.2: a few channels of K carry large fixed offsets. Per-token groups then spend their
  // range on the outliers; per-channel groups isolate them.
  kvq::Rng rng(kvq_test::case_seed("outlier channels", 0));
  const index_t tokens = 256, channels = 64;
  auto x = random_matrix(rng, tokens, channels);
  for (index_t c : {3, 17, 40}) {
    for (index_t t = 0; t < tokens; ++t) x[static_cast<std::size_t>(t * channels + c)] += 20.0f;
  }
  double err[2] = {0, 0};
  int i = 0;
  for (GroupAxis axis : {GroupAxis::kTokens, GroupAxis::kChannels}) {
    MatrixQuantSpec spec;
    spec.bits = Bits::k2;
    spec.axis = axis;
    spec.group_size = 32;
    const auto layout = kvq::plan_matrix(tokens, channels, spec);
    Buffers q(layout);
    kvq::quantize_matrix(kvq::StridedView<const float, 2>(x.data(), {tokens, channels}), spec, q.ref());
    std::vector<float> y(x.size());
    kvq::dequantize_matrix(q.cref(), spec, kvq::StridedView<float, 2>(y.data(), {tokens, channels}));
    for (std::size_t k = 0; k < x.size(); ++k) err[i] += (x[k] - y[k]) * (x[k] - y[k]);
    ++i;
  }
  CAPTURE(err[0], err[1]);
  REQUIRE(err[0] * 4 < err[1]);
}

namespace {

// Runs f (which must throw kvq::Error) and checks the status, that the message contains every
// fragment, and that the output buffers still hold their sentinel bytes.
template <class F>
void require_error_untouched(F&& f, const Buffers& q, kvq::Status status,
                             std::vector<std::string> fragments) {
  try {
    f();
    FAIL("no kvq::Error was thrown");
  } catch (const kvq::Error& e) {
    const std::string what = e.what();
    CAPTURE(what);
    REQUIRE(e.status() == status);
    for (const auto& frag : fragments) REQUIRE(what.find(frag) != std::string::npos);
  }
  for (auto b : q.codes) REQUIRE(b == 0xEE);
  for (auto b : q.scales) REQUIRE(b == 0xEE);
  for (auto b : q.zeros) REQUIRE(b == 0xEE);
}

}  // namespace

TEST_CASE("bad arguments raise kvq::Error naming them and change no output", "[quant][matrix][errors]") {
  const index_t tokens = 64, channels = 16;
  kvq::Rng rng(kvq_test::case_seed("bad arguments", 0));
  auto x = random_matrix(rng, tokens, channels);
  const kvq::StridedView<const float, 2> view(x.data(), {tokens, channels});
  MatrixQuantSpec good;
  good.bits = Bits::k2;
  good.axis = GroupAxis::kTokens;
  good.group_size = 32;
  Buffers q(kvq::plan_matrix(tokens, channels, good), 0xEE);
  const auto run = [&](const MatrixQuantSpec& spec) {
    return [&, spec] { kvq::quantize_matrix(view, spec, q.ref()); };
  };
  using kvq::Status;

  auto s = good;
  s.group_size = 0;
  require_error_untouched(run(s), q, Status::kInvalidArgument, {"'group_size' = 0", "positive divisor of the token count 64"});
  s.group_size = 48;
  require_error_untouched(run(s), q, Status::kInvalidArgument, {"'group_size' = 48", "token count 64"});
  s = good;
  s.axis = GroupAxis::kChannels;
  s.group_size = 5;
  require_error_untouched(run(s), q, Status::kInvalidArgument, {"'group_size' = 5", "channel count 16"});
  s = good;
  s.bits = static_cast<Bits>(5);
  require_error_untouched(run(s), q, Status::kInvalidArgument, {"'bits' = 5", "k2, k3, k4 or k8"});
  s = good;
  s.clip = 0.0f;
  require_error_untouched(run(s), q, Status::kInvalidArgument, {"'clip' = 0", "(0, 1]"});
  s.clip = 1.2f;
  require_error_untouched(run(s), q, Status::kInvalidArgument, {"'clip' = 1.2"});
  s = good;
  s.meta = static_cast<MetaFormat>(9);
  require_error_untouched(run(s), q, Status::kInvalidArgument, {"'meta' = 9"});

  // Channel groups: wrong axis, not a bijection, bad boundaries.
  std::vector<std::int32_t> perm(static_cast<std::size_t>(channels));
  std::iota(perm.begin(), perm.end(), 0);
  std::vector<std::int32_t> bounds{0, 8, 16};
  s = good;
  s.channel_groups = {{perm.data(), perm.size()}, {bounds.data(), bounds.size()}};
  require_error_untouched(run(s), q, Status::kInvalidArgument, {"'channel_groups'", "only with axis 'channel'"});
  s.axis = GroupAxis::kChannels;
  perm[3] = 5;
  require_error_untouched(run(s), q, Status::kInvalidArgument, {"'channel_groups.permutation'", "entry 5 = 5", "bijection"});
  perm[3] = 3;
  bounds = {0, 8, 8, 16};
  s.channel_groups.boundaries = {bounds.data(), bounds.size()};
  require_error_untouched(run(s), q, Status::kInvalidArgument, {"'channel_groups.boundaries'", "strictly increasing"});
  bounds = {0, 8, 15};
  s.channel_groups.boundaries = {bounds.data(), bounds.size()};
  require_error_untouched(run(s), q, Status::kInvalidArgument, {"'channel_groups.boundaries'", "from 0 to 16"});
  s.channel_groups.permutation = {perm.data(), 15};
  require_error_untouched(run(s), q, Status::kInvalidArgument, {"one entry per channel (16)"});

  // More channels than a permutation supports.
  std::vector<std::int32_t> wide(65537);
  std::iota(wide.begin(), wide.end(), 0);
  const std::vector<std::int32_t> wide_bounds{0, 65537};
  MatrixQuantSpec w = good;
  w.axis = GroupAxis::kChannels;
  w.channel_groups = {{wide.data(), wide.size()}, {wide_bounds.data(), wide_bounds.size()}};
  try {
    (void)kvq::plan_matrix(1, 65537, w);
    FAIL("no error");
  } catch (const kvq::Error& e) {
    REQUIRE(std::string(e.what()).find("at most 65536 channels with channel groups") != std::string::npos);
  }

  // Shape and buffer sizes.
  Buffers small(kvq::plan_matrix(tokens, channels, good), 0xEE);
  small.codes.pop_back();
  try {
    kvq::quantize_matrix(view, good, small.ref());
    FAIL("no error");
  } catch (const kvq::Error& e) {
    REQUIRE(std::string(e.what()).find("argument 'codes' = '255 bytes'; expected at least 256 bytes") != std::string::npos);
  }
  for (auto b : small.codes) REQUIRE(b == 0xEE);

  // Non-finite input: the position is named; nothing is written even though earlier groups
  // are valid.
  x[static_cast<std::size_t>(40 * channels + 7)] = std::numeric_limits<float>::infinity();
  require_error_untouched(run(good), q, Status::kNonFiniteInput, {"'x' = 'inf at [token 40, channel 7]'", "finite values"});
  x[static_cast<std::size_t>(40 * channels + 7)] = std::numeric_limits<float>::quiet_NaN();
  require_error_untouched(run(good), q, Status::kNonFiniteInput, {"nan at [token 40, channel 7]"});

  // FP8 metadata overflow.
  x[static_cast<std::size_t>(40 * channels + 7)] = -1000.0f;
  s = good;
  s.meta = MetaFormat::kFp8E4M3;
  Buffers q8(kvq::plan_matrix(tokens, channels, s), 0xEE);
  require_error_untouched([&] { kvq::quantize_matrix(view, s, q8.ref()); }, q8, Status::kMetadataOverflow,
                          {"group 1 of channel 7", "[token 32, channel 7]", "range [-1000", "fit fp8", "448"});
}
