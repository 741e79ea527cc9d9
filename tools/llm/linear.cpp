// SPDX-License-Identifier: Apache-2.0
#include "llm/linear.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVQ_LLM_AVX2 1
#else
#define KVQ_LLM_AVX2 0
#endif

namespace kvq::llm {
namespace {

/// Rows of W per tile; a thread's share of W is a whole number of tiles.
constexpr int kTileRows = 4;

#if KVQ_LLM_AVX2
/// The fixed reduction of the eight lanes: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
inline float sum_lanes(__m256 v) noexcept {
  const __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  const __m128 s4 = _mm_add_ps(lo, hi);                    // l0+l4, l1+l5, l2+l6, l3+l7
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));  // (l0+l4)+(l2+l6), (l1+l5)+(l3+l7)
  const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
  return _mm_cvtss_f32(s1);
}

/// y[t, o] for R rows of W starting at `w` and T tokens starting at `x`.
template <int R, int T>
void tile(const float* w, std::size_t w_stride, const float* x, std::size_t x_stride, float* y,
          std::size_t y_stride, int in) noexcept {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  const int body = in / 8 * 8;
  for (int k = 0; k < body; k += 8) {
    __m256 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + static_cast<std::size_t>(t) * x_stride + k);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + static_cast<std::size_t>(r) * w_stride + k);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* wr = w + static_cast<std::size_t>(r) * w_stride;
    for (int t = 0; t < T; ++t) {
      const float* xt = x + static_cast<std::size_t>(t) * x_stride;
      float s = sum_lanes(acc[r][t]);
      for (int k = body; k < in; ++k) s = std::fma(wr[k], xt[k], s);
      y[static_cast<std::size_t>(t) * y_stride + static_cast<std::size_t>(r)] = s;
    }
  }
}

template <int R>
void rows_tile(const float* w, std::size_t w_stride, const float* x, std::size_t x_stride, float* y,
               std::size_t y_stride, int in, int n) noexcept {
  int t = 0;
  for (; t + 3 <= n; t += 3) {
    tile<R, 3>(w, w_stride, x + static_cast<std::size_t>(t) * x_stride, x_stride,
               y + static_cast<std::size_t>(t) * y_stride, y_stride, in);
  }
  if (n - t == 2) {
    tile<R, 2>(w, w_stride, x + static_cast<std::size_t>(t) * x_stride, x_stride,
               y + static_cast<std::size_t>(t) * y_stride, y_stride, in);
  } else if (n - t == 1) {
    tile<R, 1>(w, w_stride, x + static_cast<std::size_t>(t) * x_stride, x_stride,
               y + static_cast<std::size_t>(t) * y_stride, y_stride, in);
  }
}
#endif

/// y[:, rows [r0, r1)] of the product.
void linear_rows(const Matrix& w, const float* x, int n, int x_stride, float* y, int y_stride, int r0,
                 int r1) noexcept {
  const int in = w.cols;
  const auto xs = static_cast<std::size_t>(x_stride);
  const auto ys = static_cast<std::size_t>(y_stride);
#if KVQ_LLM_AVX2
  const auto ws = static_cast<std::size_t>(in);
  int r = r0;
  for (; r + kTileRows <= r1; r += kTileRows) {
    rows_tile<kTileRows>(w.row(r), ws, x, xs, y + r, ys, in, n);
  }
  for (; r < r1; ++r) rows_tile<1>(w.row(r), ws, x, xs, y + r, ys, in, n);
#else
  // Portable: the same per-element order (eight running sums, the fixed tree, then the tail).
  for (int t = 0; t < n; ++t) {
    const float* xt = x + static_cast<std::size_t>(t) * xs;
    for (int r = r0; r < r1; ++r) {
      const float* wr = w.row(r);
      float lane[8] = {};
      const int body = in / 8 * 8;
      for (int k = 0; k < body; k += 8) {
        for (int l = 0; l < 8; ++l) lane[l] = std::fma(wr[k + l], xt[k + l], lane[l]);
      }
      float s = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
      for (int k = body; k < in; ++k) s = std::fma(wr[k], xt[k], s);
      y[static_cast<std::size_t>(t) * ys + static_cast<std::size_t>(r)] = s;
    }
  }
#endif
}

}  // namespace

void linear(const Matrix& w, const float* x, int n, int x_stride, float* y, int y_stride,
            kvq::ThreadPool* pool) {
  if (n <= 0 || w.rows == 0) return;
  const int threads = pool == nullptr ? 1 : pool->size();
  // Parts of whole tiles; a few more parts than threads balance uneven rows.
  const int tiles = (w.rows + kTileRows - 1) / kTileRows;
  const int parts = std::min(tiles, threads == 1 ? 1 : 4 * threads);
  if (parts <= 1) {
    linear_rows(w, x, n, x_stride, y, y_stride, 0, w.rows);
    return;
  }
  pool->parallel_for(parts, [&](kvq::index_t p) {
    const int t0 = static_cast<int>(p) * tiles / parts;
    const int t1 = static_cast<int>(p + 1) * tiles / parts;
    linear_rows(w, x, n, x_stride, y, y_stride, t0 * kTileRows, std::min(w.rows, t1 * kTileRows));
  });
}

}  // namespace kvq::llm
