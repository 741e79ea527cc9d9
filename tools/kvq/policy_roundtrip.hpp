// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief `kvq roundtrip --policy`: K and V dumps through a real QuantizedKVCache of a registered
///        policy and back.
#pragma once

#include <cstdint>
#include <string>

namespace kvq_tool {

struct PolicyRoundtripOptions {
  std::string policy;
  std::string keys;        ///< K.npy [tokens, kv_heads, head_dim], float32 or float16
  std::string values;      ///< V.npy, same shape
  std::string out_keys;    ///< optional: dequantized keys (the input's dtype)
  std::string out_values;  ///< optional: dequantized values
  double rope_theta = 10000.0;
  std::string rope_style = "half";
  std::uint64_t seed = 1;     ///< random orthonormal CSKV factors
  std::string key_weights;    ///< optional: W_K [hidden, kv_heads * head_dim] for SVD factors
  std::string value_weights;  ///< optional: W_V, same shape
};

/// Runs the round trip and prints the report; throws kvq::Error on bad input (nothing written).
int run_policy_roundtrip(const PolicyRoundtripOptions& o);

}  // namespace kvq_tool
