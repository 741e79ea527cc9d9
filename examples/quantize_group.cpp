// SPDX-License-Identifier: Apache-2.0
// The quantization core in one page: KIVI-style 2-bit keys (groups of 32 tokens per channel)
// and values (groups of 32 channels per token) for one attention head, stored as real packed
// bits, read back, and compared with the input.
#include <kvq/kvq.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

int main() {
  constexpr kvq::index_t kTokens = 128, kHeadDim = 64, kGroup = 32;

  // K and V of one head, [tokens, head_dim] row-major; channel 5 of K is an outlier channel.
  kvq::Rng rng(7);
  std::vector<float> k(kTokens * kHeadDim), v(kTokens * kHeadDim);
  for (kvq::index_t t = 0; t < kTokens; ++t) {
    for (kvq::index_t c = 0; c < kHeadDim; ++c) {
      k[t * kHeadDim + c] = rng.normal() + (c == 5 ? 12.0f : 0.0f);
      v[t * kHeadDim + c] = rng.normal();
    }
  }

  // KIVI: keys per-channel (groups run along tokens), values per-token (groups along channels).
  kvq::MatrixQuantSpec key_spec;
  key_spec.bits = kvq::Bits::k2;
  key_spec.axis = kvq::GroupAxis::kTokens;
  key_spec.group_size = kGroup;
  kvq::MatrixQuantSpec value_spec = key_spec;
  value_spec.axis = kvq::GroupAxis::kChannels;

  double total_bytes = 0, worst = 0, half_step = 0;
  for (const auto& [x, spec] : {std::pair{&k, key_spec}, std::pair{&v, value_spec}}) {
    // plan_matrix validates the spec and sizes the buffers; nothing is allocated by kvq.
    const kvq::MatrixLayout layout = kvq::plan_matrix(kTokens, kHeadDim, spec);
    std::vector<std::uint8_t> codes(layout.code_bytes), scales(layout.meta_bytes), zeros(layout.meta_bytes);
    kvq::quantize_matrix(kvq::StridedView<const float, 2>(x->data(), {kTokens, kHeadDim}), spec,
                         {{codes.data(), codes.size()}, {scales.data(), scales.size()}, {zeros.data(), zeros.size()}});
    std::vector<float> back(x->size());
    kvq::dequantize_matrix({{codes.data(), codes.size()}, {scales.data(), scales.size()}, {zeros.data(), zeros.size()}},
                           spec, kvq::StridedView<float, 2>(back.data(), {kTokens, kHeadDim}));
    for (std::size_t i = 0; i < back.size(); ++i) worst = std::fmax(worst, std::fabs(back[i] - (*x)[i]));
    // Scales are stored as fp16 (spec.meta); every element is within half its group's step.
    for (std::size_t g = 0; g < scales.size() / sizeof(kvq::Float16); ++g) {
      kvq::Float16 scale;
      std::memcpy(&scale, scales.data() + g * sizeof scale, sizeof scale);
      half_step = std::fmax(half_step, 0.5 * scale.to_float());
    }
    total_bytes += static_cast<double>(layout.total_bytes());
    std::printf("%s: %zu code bytes + 2 x %zu metadata bytes = %.2f bits/element\n",
                spec.axis == kvq::GroupAxis::kTokens ? "keys  " : "values", layout.code_bytes,
                layout.meta_bytes, layout.bits_per_element());
  }
  const double fp16_bytes = 2.0 * 2.0 * kTokens * kHeadDim;
  std::printf("K+V: %.0f bytes instead of %.0f in fp16 (%.2fx smaller); max |error| %.3f <= %.3f\n",
              total_bytes, fp16_bytes, fp16_bytes / total_bytes, worst, half_step);
  return worst <= half_step * (1 + 1e-6) ? 0 : 1;
}
