// SPDX-License-Identifier: Apache-2.0
// A cache built with a calibration (SKVQ channel groups of a group count other than the
// default, a clip ratio per layer and stream) writes, byte for byte, the codes and metadata that
// quantize_matrix writes for the same rows: once with the permutation in the spec (the gather
// path) and once on explicitly permuted rows with boundaries only. The block layout is the
// same in every layer; the transform the cache reports is the calibration's.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cache_testing.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::Bits;
using kvq::GroupAxis;
using kvq::index_t;
using kvq::MetaFormat;

// SKVQ with 2-bit keys, ternary values, G = 8, window 6, 3 sinks (fp8 metadata, clip 0.92).
using P = kvq_test::policies::SkvqSmall;

/// A random permutation of `width` channels and `count` groups of random sizes (>= 1).
kvq::StreamCalibration random_calibration(kvq::Rng& rng, index_t width, index_t count, float clip) {
  kvq::StreamCalibration s;
  for (index_t c = 0; c < width; ++c) s.permutation.push_back(static_cast<std::int32_t>(c));
  for (index_t c = width - 1; c > 0; --c) {
    std::swap(s.permutation[static_cast<std::size_t>(c)], s.permutation[rng.below(static_cast<std::uint32_t>(c + 1))]);
  }
  std::vector<std::int32_t> cuts;
  while (static_cast<index_t>(cuts.size()) < count - 1) {
    const auto cut = static_cast<std::int32_t>(1 + rng.below(static_cast<std::uint32_t>(width - 1)));
    if (std::find(cuts.begin(), cuts.end(), cut) == cuts.end()) cuts.push_back(cut);
  }
  std::sort(cuts.begin(), cuts.end());
  s.boundaries.push_back(0);
  s.boundaries.insert(s.boundaries.end(), cuts.begin(), cuts.end());
  s.boundaries.push_back(static_cast<std::int32_t>(width));
  s.clip = clip;
  return s;
}

struct Quantized {
  std::vector<std::uint8_t> codes, scales, zeros;
  kvq::MatrixLayout layout;
};

Quantized quantize(const std::vector<float>& rows, index_t n, index_t width, const kvq::MatrixQuantSpec& spec) {
  Quantized q;
  q.layout = kvq::plan_matrix(n, width, spec);
  q.codes.assign(q.layout.code_bytes, 0);
  q.scales.assign(q.layout.meta_bytes, 0);
  q.zeros.assign(q.layout.meta_bytes, 0);
  kvq::quantize_matrix(kvq::StridedView<const float, 2>(rows.data(), {n, width}), spec,
                       {{q.codes.data(), q.codes.size()}, {q.scales.data(), q.scales.size()}, {q.zeros.data(), q.zeros.size()}});
  return q;
}

}  // namespace

TEST_CASE("a calibrated SKVQ cache equals quantize_matrix on the (permuted) rows bit for bit", "[cache][calibration]") {
  const index_t layers = 3, heads = 2, dim = 16, width = heads * dim, groups = 5;  // default would be 4
  for (std::uint64_t index = 0; index < 4; ++index) {
    const std::uint64_t seed = kvq_test::case_seed("calibrated blocks", index);
    CAPTURE(seed);
    kvq::Rng rng(seed);
    kvq::CacheConfig cfg;
    cfg.num_layers = layers;
    cfg.num_kv_heads = heads;
    cfg.head_dim = dim;
    cfg.num_blocks = kvq::QuantizedKVCache<P>::blocks_for_tokens(layers, 400);
    kvq::CacheCalibration cal;
    for (index_t l = 0; l < layers; ++l) {
      cal.keys.push_back(random_calibration(rng, width, groups, 0.80f + 0.05f * static_cast<float>(l)));
      cal.values.push_back(random_calibration(rng, width, groups, l == 1 ? 0.0f : 0.97f));  // 0: the policy's 0.92
    }
    const kvq::CacheCalibration given = cal;
    kvq::QuantizedKVCache<P> cache(cfg, cal);
    REQUIRE(cache.key_layout().block.groups_per_line == groups);
    REQUIRE(cache.value_layout().block.groups_per_line == groups);

    const kvq::SequenceId seq = cache.add_sequence();
    std::vector<std::vector<float>> keys(static_cast<std::size_t>(layers)), values(keys.size());
    const auto bias = kvq_test::make_bias(rng, width);
    const index_t prefill = 37 + static_cast<index_t>(rng.below(60)), steps = 90;
    for (index_t l = 0; l < layers; ++l) {
      auto& k = keys[static_cast<std::size_t>(l)];
      auto& v = values[static_cast<std::size_t>(l)];
      k = kvq_test::make_rows(rng, prefill + steps, bias);
      v = kvq_test::make_rows(rng, prefill + steps, bias, 0.5f);
      cache.append(seq, l, k.data(), v.data(), prefill);
      for (index_t t = prefill; t < prefill + steps; ++t) {
        cache.append(seq, l, k.data() + t * width, v.data() + t * width, 1);
      }
    }

    for (index_t l = 0; l < layers; ++l) {
      for (const bool is_key : {true, false}) {
        CAPTURE(l, is_key);
        const kvq::StreamCalibration& c = (is_key ? given.keys : given.values)[static_cast<std::size_t>(l)];
        const float clip = c.clip > 0.0f ? c.clip : P::ValueStream::clip;
        const kvq::StreamTransform t = is_key ? cache.key_transform(l) : cache.value_transform(l);
        REQUIRE(t.kind == kvq::TransformKind::kChannelReorder);
        REQUIRE(t.clip == clip);
        REQUIRE(std::vector<std::int32_t>(t.groups.permutation.begin(), t.groups.permutation.end()) == c.permutation);
        REQUIRE(std::vector<std::int32_t>(t.groups.boundaries.begin(), t.groups.boundaries.end()) == c.boundaries);

        const kvq::StreamView<kvq::Float16> view = is_key ? cache.key_view(seq, l) : cache.value_view(seq, l);
        const index_t q = view.counts.quantized, first = view.sink_count();
        REQUIRE(q > 0);
        // The quantized rows as appended (rounded to the cache's fp16 exact type).
        const auto& src = is_key ? keys[static_cast<std::size_t>(l)] : values[static_cast<std::size_t>(l)];
        std::vector<float> rows(static_cast<std::size_t>(q * width)), permuted(rows.size());
        for (index_t r = 0; r < q; ++r) {
          for (index_t ch = 0; ch < width; ++ch) {
            rows[static_cast<std::size_t>(r * width + ch)] =
                kvq_test::round_to<kvq::Float16>(src[static_cast<std::size_t>((first + r) * width + ch)]);
          }
          for (index_t p = 0; p < width; ++p) {
            permuted[static_cast<std::size_t>(r * width + p)] =
                rows[static_cast<std::size_t>(r * width + c.permutation[static_cast<std::size_t>(p)])];
          }
        }
        kvq::MatrixQuantSpec spec;
        spec.bits = is_key ? P::KeyStream::bits : P::ValueStream::bits;
        spec.axis = GroupAxis::kChannels;
        spec.meta = MetaFormat::kFp8E4M3;
        spec.clip = clip;
        spec.channel_groups = c.groups();
        const Quantized gathered = quantize(rows, q, width, spec);
        std::vector<std::int32_t> identity(static_cast<std::size_t>(width));
        for (index_t p = 0; p < width; ++p) identity[static_cast<std::size_t>(p)] = static_cast<std::int32_t>(p);
        spec.channel_groups = {{identity.data(), identity.size()}, {c.boundaries.data(), c.boundaries.size()}};
        const Quantized direct = quantize(permuted, q, width, spec);
        REQUIRE(gathered.codes == direct.codes);
        REQUIRE(gathered.scales == direct.scales);
        REQUIRE(gathered.zeros == direct.zeros);

        // Block by block: codes of each row line, then its scales and zeros (BlockLayout::meta_index).
        const kvq::StreamLayout& layout = *view.layout;
        const std::size_t line = layout.block.line_bytes, meta = kvq::meta_bytes(spec.meta);
        REQUIRE(line == gathered.layout.line_bytes);
        index_t bad = -1;
        for (index_t r = 0; r < q && bad < 0; ++r) {
          const std::uint8_t* block = view.pool->data(view.blocks[r / layout.block_tokens]);
          const index_t row = r % layout.block_tokens;
          bool same = std::memcmp(block + static_cast<std::size_t>(row) * line,
                                  gathered.codes.data() + static_cast<std::size_t>(r) * line, line) == 0;
          for (index_t g = 0; g < groups; ++g) {
            const std::size_t at = layout.block.meta_index(row, g) * meta;
            const std::size_t want = static_cast<std::size_t>(r * groups + g) * meta;
            same = same && std::memcmp(layout.block.scales(block) + at, gathered.scales.data() + want, meta) == 0 &&
                   std::memcmp(layout.block.zeros(block) + at, gathered.zeros.data() + want, meta) == 0;
          }
          if (!same) bad = r;
        }
        CAPTURE(q, bad);
        REQUIRE(bad == -1);
      }
    }
  }
}
