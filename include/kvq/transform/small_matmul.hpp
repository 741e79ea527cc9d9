// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief out [n, k] = a [n, m] · b [m, k] for the small products of latent projection and
///        attention scoring (row-major, explicit strides), with an AVX2/FMA kernel.
#pragma once

#include "kvq/core/bits.hpp"
#include "kvq/quant/decode_affine.hpp"  // KVQ_HAVE_AVX2 and <immintrin.h>

namespace kvq {

/// out[r][c] = sum_i a[r * lda + i] * b[i * ldb + c] for r < n, c < k, i < m.
inline void small_matmul(const float* a, index_t n, index_t m, index_t lda, const float* b,
                         index_t ldb, index_t k, float* out, index_t ldo) noexcept {
  index_t r0 = 0;
  index_t c_done = 0;
#if KVQ_HAVE_AVX2
  // 4 rows x 16 columns per step: 8 accumulators, 6 loads per 8 FMAs.
  const index_t k16 = k - k % 16;
  for (; r0 + 4 <= n; r0 += 4) {
    for (index_t c = 0; c < k16; c += 16) {
      __m256 acc[8];
      for (auto& x : acc) x = _mm256_setzero_ps();
      for (index_t i = 0; i < m; ++i) {
        const __m256 b0 = _mm256_loadu_ps(b + i * ldb + c);
        const __m256 b1 = _mm256_loadu_ps(b + i * ldb + c + 8);
        for (int r = 0; r < 4; ++r) {
          const __m256 ar = _mm256_broadcast_ss(a + (r0 + r) * lda + i);
          acc[2 * r] = _mm256_fmadd_ps(ar, b0, acc[2 * r]);
          acc[2 * r + 1] = _mm256_fmadd_ps(ar, b1, acc[2 * r + 1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        _mm256_storeu_ps(out + (r0 + r) * ldo + c, acc[2 * r]);
        _mm256_storeu_ps(out + (r0 + r) * ldo + c + 8, acc[2 * r + 1]);
      }
    }
  }
  c_done = r0 > 0 ? k16 : 0;
#endif
  // Rows the kernel did not take (all columns) and the kernel rows' remaining columns.
  for (index_t r = 0; r < n; ++r) {
    const index_t c_begin = r < r0 ? c_done : 0;
    float* o = out + r * ldo;
    for (index_t c = c_begin; c < k; ++c) o[c] = 0.0f;
    for (index_t i = 0; i < m; ++i) {
      const float x = a[r * lda + i];
      const float* brow = b + i * ldb;
      for (index_t c = c_begin; c < k; ++c) o[c] += x * brow[c];
    }
  }
}

}  // namespace kvq
