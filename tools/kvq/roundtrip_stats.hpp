// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Quantize a [tokens, channels] matrix through kvq::quantize_matrix, dequantize it, and
///        measure the error and the storage actually used.
#pragma once

#include <vector>

#include "kvq/quant/matrix.hpp"

namespace kvq_tool {

struct RoundTrip {
  std::vector<float> dequantized;  ///< [tokens, channels]
  kvq::MatrixLayout layout;
  double max_abs_error = 0;
  double mean_abs_error = 0;
  double relative_frobenius = 0;  ///< ||x - x'||_F / ||x||_F
};

/// Throws kvq::Error for a bad spec or non-finite input. (Defined in roundtrip_stats.cpp: the
/// quantizer of every code width and metadata format is compiled once for the tool.)
RoundTrip round_trip(const std::vector<float>& x, kvq::index_t tokens, kvq::index_t channels,
                     const kvq::MatrixQuantSpec& spec);

}  // namespace kvq_tool
