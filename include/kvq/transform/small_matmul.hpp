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
  // 4 rows x 16 columns per step: 8 accumulators in named registers (an indexed array may be
  // kept on the stack once the function is inlined into a large caller), 6 loads per 8 FMAs.
  const index_t k16 = k - k % 16;
  for (; r0 + 4 <= n; r0 += 4) {
    const float* a0 = a + r0 * lda;
    const float* a1 = a0 + lda;
    const float* a2 = a1 + lda;
    const float* a3 = a2 + lda;
    for (index_t c = 0; c < k16; c += 16) {
      __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
      const float* bp = b + c;
      for (index_t i = 0; i < m; ++i, bp += ldb) {
        const __m256 b0 = _mm256_loadu_ps(bp);
        const __m256 b1 = _mm256_loadu_ps(bp + 8);
        __m256 x = _mm256_broadcast_ss(a0 + i);
        c00 = _mm256_fmadd_ps(x, b0, c00);
        c01 = _mm256_fmadd_ps(x, b1, c01);
        x = _mm256_broadcast_ss(a1 + i);
        c10 = _mm256_fmadd_ps(x, b0, c10);
        c11 = _mm256_fmadd_ps(x, b1, c11);
        x = _mm256_broadcast_ss(a2 + i);
        c20 = _mm256_fmadd_ps(x, b0, c20);
        c21 = _mm256_fmadd_ps(x, b1, c21);
        x = _mm256_broadcast_ss(a3 + i);
        c30 = _mm256_fmadd_ps(x, b0, c30);
        c31 = _mm256_fmadd_ps(x, b1, c31);
      }
      float* o = out + r0 * ldo + c;
      _mm256_storeu_ps(o, c00);
      _mm256_storeu_ps(o + 8, c01);
      _mm256_storeu_ps(o + ldo, c10);
      _mm256_storeu_ps(o + ldo + 8, c11);
      _mm256_storeu_ps(o + 2 * ldo, c20);
      _mm256_storeu_ps(o + 2 * ldo + 8, c21);
      _mm256_storeu_ps(o + 3 * ldo, c30);
      _mm256_storeu_ps(o + 3 * ldo + 8, c31);
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
