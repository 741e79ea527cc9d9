// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The fp64 oracle of decode attention: dequantize everything, softmax naively.
#pragma once

#include <cmath>
#include <vector>

#include "kvq/cache/quantized_kv_cache.hpp"
#include "kvq/core/view.hpp"

namespace kvq::ref {

/// out[h] = softmax(scale * q[h] · K^T) · V in double over the cache's dequantized keys and
/// values (read_keys / read_values; RoPE applied in double for pre-RoPE policies).
/// q, out [num_query_heads, head_dim]; scale 0 means 1 / sqrt(head_dim).
template <class Policy>
void attend(const QuantizedKVCache<Policy>& cache, SequenceId seq, index_t layer, StridedView<const float, 2> q,
            StridedView<float, 2> out, double scale = 0.0) {
  const CacheConfig& cfg = cache.config();
  const index_t len = cache.length(seq, layer);
  const index_t heads = cfg.num_kv_heads;
  const index_t dim = cfg.head_dim;
  const index_t query_heads = q.extent(0);
  const index_t group = query_heads / heads;
  std::vector<float> keys(static_cast<std::size_t>(len * heads * dim));
  std::vector<float> values(keys.size());
  cache.read_keys(seq, layer, keys.data());
  cache.read_values(seq, layer, values.data());
  const RopeRotator* rope = cache.key_view(seq, layer).rope;  // keys stored before RoPE
  if (scale == 0.0) scale = 1.0 / std::sqrt(static_cast<double>(dim));
  std::vector<double> k(static_cast<std::size_t>(dim));
  std::vector<double> s(static_cast<std::size_t>(len));
  for (index_t qh = 0; qh < query_heads; ++qh) {
    const index_t h = qh / group;
    double mx = -INFINITY;
    for (index_t t = 0; t < len; ++t) {
      for (index_t c = 0; c < dim; ++c) k[static_cast<std::size_t>(c)] = keys[static_cast<std::size_t>((t * heads + h) * dim + c)];
      if (rope != nullptr) rope->rotate_exact(k.data(), t);
      double dot = 0;
      for (index_t c = 0; c < dim; ++c) dot += static_cast<double>(q(qh, c)) * k[static_cast<std::size_t>(c)];
      s[static_cast<std::size_t>(t)] = dot * scale;
      mx = std::max(mx, s[static_cast<std::size_t>(t)]);
    }
    double total = 0;
    for (index_t t = 0; t < len; ++t) total += (s[static_cast<std::size_t>(t)] = std::exp(s[static_cast<std::size_t>(t)] - mx));
    for (index_t c = 0; c < dim; ++c) {
      double o = 0;
      for (index_t t = 0; t < len; ++t) {
        o += s[static_cast<std::size_t>(t)] * values[static_cast<std::size_t>((t * heads + h) * dim + c)];
      }
      out(qh, c) = static_cast<float>(o / total);
    }
  }
}

}  // namespace kvq::ref
