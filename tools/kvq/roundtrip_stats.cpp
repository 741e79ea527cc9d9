// SPDX-License-Identifier: Apache-2.0
#include "roundtrip_stats.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace kvq_tool {

RoundTrip round_trip(const std::vector<float>& x, kvq::index_t tokens, kvq::index_t channels,
                     const kvq::MatrixQuantSpec& spec) {
  RoundTrip r;
  r.layout = kvq::plan_matrix(tokens, channels, spec);
  std::vector<std::uint8_t> codes(r.layout.code_bytes), scales(r.layout.meta_bytes),
      zeros(r.layout.meta_bytes);
  kvq::quantize_matrix(kvq::StridedView<const float, 2>(x.data(), {tokens, channels}), spec,
                       {{codes.data(), codes.size()},
                        {scales.data(), scales.size()},
                        {zeros.data(), zeros.size()}});
  r.dequantized.assign(x.size(), 0.0f);
  kvq::dequantize_matrix(
      kvq::ConstQuantizedMatrixRef{{codes.data(), codes.size()},
                                   {scales.data(), scales.size()},
                                   {zeros.data(), zeros.size()}},
      spec, kvq::StridedView<float, 2>(r.dequantized.data(), {tokens, channels}));
  double sum_abs = 0, sum_sq_err = 0, sum_sq = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double e = std::abs(static_cast<double>(x[i]) - r.dequantized[i]);
    r.max_abs_error = std::max(r.max_abs_error, e);
    sum_abs += e;
    sum_sq_err += e * e;
    sum_sq += static_cast<double>(x[i]) * x[i];
  }
  if (!x.empty()) r.mean_abs_error = sum_abs / static_cast<double>(x.size());
  r.relative_frobenius = sum_sq > 0 ? std::sqrt(sum_sq_err / sum_sq) : std::sqrt(sum_sq_err);
  return r;
}

}  // namespace kvq_tool
