// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The three products of CPU decode attention on float tiles, for all query heads of a
///        GQA group at once, with AVX2/FMA kernels and portable fallbacks:
///   scores_rows:        s[j][t] = q[j] · k[t]          keys token-major   k [n, stride]
///   scores_columns:     s[j][t] = sum_c q[j][c] kt[c][t]  keys channel-major kt [d, stride]
///   accumulate_rows:    acc[j] += sum_t p[j][t] v[t]   values token-major v [n, stride]
/// q [g, d] (row stride d), s and p [g, s_stride], acc [g, acc_stride].
#pragma once

#include <cstdint>

#include "kvq/attention/softmax_math.hpp"
#include "kvq/core/bits.hpp"
#include "kvq/quant/decode_affine.hpp"
#include "kvq/transform/small_matmul.hpp"

namespace kvq::detail {

#if KVQ_HAVE_AVX2
/// The 8 horizontal sums of a[0..7] as one vector (lane i = sum of a[i]).
inline __m256 sum8(const __m256* a) noexcept {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]);
  const __m256 t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]);
  const __m256 t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

#if KVQ_HAVE_AVX2
/// J heads (J <= 4) x 2 tokens of scores_rows: 2J accumulators reduced together by sum8.
template <int J>
inline void scores_rows_block(const float* q, const float* k, index_t k_stride, index_t n,
                              index_t d, float* s, index_t s_stride) noexcept {
  index_t t = 0;
  for (; t + 2 <= n; t += 2) {
    __m256 acc[8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    const float* k0 = k + t * k_stride;
    const float* k1 = k0 + k_stride;
    for (index_t c = 0; c < d; c += 8) {
      const __m256 x0 = _mm256_loadu_ps(k0 + c);
      const __m256 x1 = _mm256_loadu_ps(k1 + c);
      for (int j = 0; j < J; ++j) {
        const __m256 qj = _mm256_loadu_ps(q + j * d + c);
        acc[2 * j] = _mm256_fmadd_ps(qj, x0, acc[2 * j]);
        acc[2 * j + 1] = _mm256_fmadd_ps(qj, x1, acc[2 * j + 1]);
      }
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, sum8(acc));
    for (int j = 0; j < J; ++j) {
      s[j * s_stride + t] = sums[2 * j];
      s[j * s_stride + t + 1] = sums[2 * j + 1];
    }
  }
  for (; t < n; ++t) {
    for (int j = 0; j < J; ++j) s[j * s_stride + t] = dot(q + j * d, k + t * k_stride, d);
  }
}
#endif

inline void scores_rows(const float* q, index_t g, const float* k, index_t k_stride, index_t n,
                        index_t d, float* s, index_t s_stride) noexcept {
#if KVQ_HAVE_AVX2
  if (d % 8 == 0) {
    // Blocks of 4 heads x 2 tokens (6 loads per 8 FMAs), then 2 or 1 remaining heads.
    index_t j = 0;
    for (; j + 4 <= g; j += 4) scores_rows_block<4>(q + j * d, k, k_stride, n, d, s + j * s_stride, s_stride);
    if (g - j >= 2) {
      scores_rows_block<2>(q + j * d, k, k_stride, n, d, s + j * s_stride, s_stride);
      j += 2;
    }
    if (j < g) scores_rows_block<1>(q + j * d, k, k_stride, n, d, s + j * s_stride, s_stride);
    return;
  }
#endif
  for (index_t j = 0; j < g; ++j) {
    for (index_t t = 0; t < n; ++t) s[j * s_stride + t] = dot(q + j * d, k + t * k_stride, d);
  }
}

inline void scores_columns(const float* q, index_t g, const float* kt, index_t kt_stride,
                           index_t n, index_t d, float* s, index_t s_stride) noexcept {
  small_matmul(q, g, d, d, kt, kt_stride, n, s, s_stride);
}

#if KVQ_HAVE_AVX2
/// J heads (J <= 2) x 32 channels of accumulate_rows, over all n tokens.
template <int J>
inline void accumulate_rows_block(const float* p, index_t p_stride, const float* v, index_t v_stride,
                                  index_t n, index_t d, float* acc, index_t acc_stride) noexcept {
  for (index_t c = 0; c < d; c += 32) {
    __m256 a[8];
    for (int j = 0; j < J; ++j) {
      for (int k = 0; k < 4; ++k) a[4 * j + k] = _mm256_loadu_ps(acc + j * acc_stride + c + 8 * k);
    }
    for (index_t t = 0; t < n; ++t) {
      const float* row = v + t * v_stride + c;
      const __m256 x0 = _mm256_loadu_ps(row);
      const __m256 x1 = _mm256_loadu_ps(row + 8);
      const __m256 x2 = _mm256_loadu_ps(row + 16);
      const __m256 x3 = _mm256_loadu_ps(row + 24);
      for (int j = 0; j < J; ++j) {
        const __m256 w = _mm256_broadcast_ss(p + j * p_stride + t);
        a[4 * j] = _mm256_fmadd_ps(w, x0, a[4 * j]);
        a[4 * j + 1] = _mm256_fmadd_ps(w, x1, a[4 * j + 1]);
        a[4 * j + 2] = _mm256_fmadd_ps(w, x2, a[4 * j + 2]);
        a[4 * j + 3] = _mm256_fmadd_ps(w, x3, a[4 * j + 3]);
      }
    }
    for (int j = 0; j < J; ++j) {
      for (int k = 0; k < 4; ++k) _mm256_storeu_ps(acc + j * acc_stride + c + 8 * k, a[4 * j + k]);
    }
  }
}
#endif

inline void accumulate_rows(const float* p, index_t g, index_t p_stride, const float* v,
                            index_t v_stride, index_t n, index_t d, float* acc,
                            index_t acc_stride) noexcept {
#if KVQ_HAVE_AVX2
  if (d % 32 == 0) {
    // Blocks of 2 heads x 32 channels: 8 accumulators, 6 loads per 8 FMAs.
    index_t j = 0;
    for (; j + 2 <= g; j += 2) {
      accumulate_rows_block<2>(p + j * p_stride, p_stride, v, v_stride, n, d, acc + j * acc_stride, acc_stride);
    }
    if (j < g) accumulate_rows_block<1>(p + j * p_stride, p_stride, v, v_stride, n, d, acc + j * acc_stride, acc_stride);
    return;
  }
#endif
  for (index_t j = 0; j < g; ++j) {
    for (index_t t = 0; t < n; ++t) axpy(acc + j * acc_stride, p[j * p_stride + t], v + t * v_stride, d);
  }
}

}  // namespace kvq::detail
