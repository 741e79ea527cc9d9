// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The cases of the golden block vectors (tests/golden/README.md): each policy's shape,
///        schedule and calibration, its input rows, and its record from the CPU cache. Included
///        by the CPU test, the writer and (for the policies DeviceKVCache implements) the GPU test.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "golden_blocks.hpp"
#include "kvq/kvq.hpp"

namespace kvq_golden {

using kvq::Bits;

using Fp16 = kvq::Fp16Policy<kvq::Float16>;
using Bf16 = kvq::Fp16Policy<kvq::BFloat16>;
using Kivi2g32 = kvq::KiviPolicy<Bits::k2, Bits::k2, 32, 128>;
using Kivi4g128 = kvq::KiviPolicy<Bits::k4, Bits::k4, 128, 128>;
using Skvq = kvq::SkvqPolicy<Bits::k2, Bits::kTernary, 32, 128, 5>;  // fp8 metadata, clip 0.92, pre-RoPE
using Cskv = kvq::CskvPolicy<Bits::k4, Bits::k4, 50, 50, 32>;

/// Shapes and schedules: exact baselines cross 3 blocks of 16 and end in a partial one; the
/// others flush in the prefill and again in decode steps (KIVI's keys after 106 steps, values
/// and SKVQ one token a step, CSKV a chunk of 32 every 32 steps).
template <class P>
struct Schedule;
template <> struct Schedule<Fp16> { static constexpr index_t heads = 1, dim = 64, prefill = 37, decode = 12; };
template <> struct Schedule<Bf16> { static constexpr index_t heads = 1, dim = 64, prefill = 37, decode = 12; };
template <> struct Schedule<Kivi2g32> { static constexpr index_t heads = 1, dim = 64, prefill = 150, decode = 120; };
// g128 per-token value groups span two heads of 64 (as in the device cache tests).
template <> struct Schedule<Kivi4g128> { static constexpr index_t heads = 2, dim = 64, prefill = 150, decode = 120; };
template <> struct Schedule<Skvq> { static constexpr index_t heads = 1, dim = 64, prefill = 150, decode = 120; };
template <> struct Schedule<Cskv> { static constexpr index_t heads = 1, dim = 64, prefill = 150, decode = 120; };

template <class P>
Case case_of() {
  using S = Schedule<P>;
  return {P::name(), S::heads, S::dim, S::prefill, S::decode};
}

/// A one-layer config of the case's shape with room for its tokens.
template <class P>
kvq::CacheConfig config_of() {
  using S = Schedule<P>;
  kvq::CacheConfig cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = S::heads;
  cfg.head_dim = S::dim;
  cfg.num_blocks = kvq::QuantizedKVCache<P>::blocks_for_tokens(1, S::prefill + S::decode, 1);
  return cfg;
}

/// The calibration of the case, from formulas (no randomness, no rounding): SKVQ a channel
/// permutation c -> (29 c + 3) mod W (keys) or (13 c + 7) mod W (values) with three groups of
/// 20, 21 and W - 41 channels and clip ratios 0.9 / 0.95; CSKV factors with entries in
/// {0, +-1/8, 1/4, 1/2}, so the projection of the inputs is exact in float on any compiler.
template <class P>
kvq::CacheCalibration calibration_of(const kvq::CacheConfig& cfg) {
  kvq::CacheCalibration cal;
  const index_t width = cfg.num_kv_heads * cfg.head_dim;
  if constexpr (std::is_same_v<P, Skvq>) {
    for (int stream = 0; stream < 2; ++stream) {
      kvq::StreamCalibration s;
      for (index_t c = 0; c < width; ++c) {
        s.permutation.push_back(static_cast<std::int32_t>(stream == 0 ? (29 * c + 3) % width : (13 * c + 7) % width));
      }
      s.boundaries = {0, 20, 41, static_cast<std::int32_t>(width)};
      s.clip = stream == 0 ? 0.9f : 0.95f;
      (stream == 0 ? cal.keys : cal.values).push_back(std::move(s));
    }
  } else if constexpr (std::is_same_v<P, Cskv>) {
    const index_t ranks[2] = {cfg.num_kv_heads * kvq::stored_head_width<typename P::KeyStream>(cfg.head_dim),
                              cfg.num_kv_heads * kvq::stored_head_width<typename P::ValueStream>(cfg.head_dim)};
    for (int stream = 0; stream < 2; ++stream) {
      const index_t rank = ranks[stream];
      kvq::StreamCalibration s;
      s.latent.width = width;
      s.latent.rank = rank;
      s.latent.down.assign(static_cast<std::size_t>(width * rank), 0.0f);
      s.latent.up.assign(static_cast<std::size_t>(rank * width), 0.0f);
      for (index_t c = 0; c < width; ++c) {
        for (index_t j = 0; j < rank; ++j) {
          float a = 0.0f;
          if (c == 2 * j) a = 0.5f;
          else if (c == 2 * j + 1) a = 0.25f;
          else if ((c * 7 + j * 3 + stream) % 11 == 0) a = -0.125f;
          s.latent.down[static_cast<std::size_t>(c * rank + j)] = a;
          s.latent.up[static_cast<std::size_t>(j * width + c)] = a;
        }
      }
      (stream == 0 ? cal.keys : cal.values).push_back(std::move(s));
    }
  }
  return cal;
}

/// Input rows [t0, t0 + n) of a stream as the cache's exact type E (from_float of input()).
template <class E>
std::vector<E> input_rows(int stream, index_t t0, index_t n, index_t width) {
  std::vector<E> rows(static_cast<std::size_t>(n * width));
  for (index_t t = 0; t < n; ++t) {
    for (index_t c = 0; c < width; ++c) rows[static_cast<std::size_t>(t * width + c)] = kvq::from_float<E>(input(stream, t0 + t, c));
  }
  return rows;
}

/// The case run on the CPU cache: its record (sequence slot 0 of cache.paged(0)).
template <class P>
Record cpu_record() {
  using E = typename P::exact_type;
  using S = Schedule<P>;
  const kvq::CacheConfig cfg = config_of<P>();
  kvq::QuantizedKVCache<P> cache(cfg, calibration_of<P>(cfg));
  const kvq::SequenceId seq = cache.add_sequence();
  const index_t width = cache.width();
  cache.append(seq, 0, input_rows<E>(0, 0, S::prefill, width).data(), input_rows<E>(1, 0, S::prefill, width).data(), S::prefill);
  for (index_t t = S::prefill; t < S::prefill + S::decode; ++t) {
    cache.append(seq, 0, input_rows<E>(0, t, 1, width).data(), input_rows<E>(1, t, 1, width).data(), 1);
  }
  const kvq::HostPagedTables tables = cache.paged(0);
  return record_of(case_of<P>(), tables.params(), seq);
}

}  // namespace kvq_golden
