// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief y = x · Wᵀ for a chunk of tokens, with every output element summed in one fixed order.
///
/// Each y[t, o] is computed by the same instruction sequence whatever the number of tokens, the
/// tile a token falls in, or the number of threads: eight lanes accumulate w[o, k]·x[t, k] for
/// k ≡ lane (mod 8) with fused multiply-adds over k < 8·⌊in/8⌋, the lanes are added pairwise in
/// a fixed tree, then the tail k ≥ 8·⌊in/8⌋ is added in order with fused multiply-adds. So a
/// chunk of n tokens gives bit for bit the rows that n one-token calls give: the batched
/// evaluator equals step-by-step decoding exactly (tests/llm/test_runtime.cpp). (Eigen's product
/// switches to a matrix-vector kernel, with another summation order, for a single column.)
#pragma once

#include "kvq/core/thread_pool.hpp"
#include "llm/model.hpp"

namespace kvq::llm {

/// y [n, w.rows] (row stride y_stride) = x [n, w.cols] (row stride x_stride) · wᵀ.
/// Rows of W are split across the pool's threads (nullptr: the calling thread).
void linear(const Matrix& w, const float* x, int n, int x_stride, float* y, int y_stride,
            kvq::ThreadPool* pool);

}  // namespace kvq::llm
