// SPDX-License-Identifier: Apache-2.0
// llm/linear.hpp: every output element is summed in one order, whatever the chunk, tile or
// thread count, and agrees with a double-precision product.
#include <cmath>
#include <cstring>
#include <vector>

#include "kvq/core/random.hpp"
#include "kvq/core/thread_pool.hpp"
#include "kvq_catch.hpp"
#include "llm/linear.hpp"
#include "seeds.hpp"

namespace {

using kvq::llm::Matrix;

Matrix random_matrix(kvq::Rng& rng, int rows, int cols) {
  Matrix m;
  m.rows = rows;
  m.cols = cols;
  m.data.resize(static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols));
  for (float& x : m.data) x = rng.normal();
  return m;
}

}  // namespace

TEST_CASE("linear: a chunk gives bit for bit the rows of one-token calls, on any thread count", "[llm][linear]") {
  kvq::ThreadPool two(2);
  kvq::ThreadPool three(3);
  std::uint64_t index = 0;
  for (const int cols : {1, 7, 8, 9, 64, 172, 576}) {
    for (const int rows : {1, 3, 4, 5, 13, 64}) {
      const std::uint64_t seed = kvq_test::case_seed("linear_chunk", index++);
      INFO("seed " << seed << ", W [" << rows << ", " << cols << "]");
      kvq::Rng rng(seed);
      const Matrix w = random_matrix(rng, rows, cols);
      const int n = 1 + static_cast<int>(rng.below(11));
      const int x_stride = cols + static_cast<int>(rng.below(3));
      const int y_stride = rows + static_cast<int>(rng.below(3));
      std::vector<float> x(static_cast<std::size_t>(n) * static_cast<std::size_t>(x_stride));
      for (float& v : x) v = rng.normal();
      std::vector<float> chunk(static_cast<std::size_t>(n) * static_cast<std::size_t>(y_stride), -1.0f);
      kvq::llm::linear(w, x.data(), n, x_stride, chunk.data(), y_stride, nullptr);
      for (kvq::ThreadPool* pool : {static_cast<kvq::ThreadPool*>(nullptr), &two, &three}) {
        std::vector<float> chunk_pool(chunk.size(), -1.0f);
        kvq::llm::linear(w, x.data(), n, x_stride, chunk_pool.data(), y_stride, pool);
        REQUIRE(std::memcmp(chunk.data(), chunk_pool.data(), chunk.size() * sizeof(float)) == 0);
        for (int t = 0; t < n; ++t) {
          std::vector<float> one(static_cast<std::size_t>(rows), -2.0f);
          kvq::llm::linear(w, x.data() + static_cast<std::size_t>(t) * x_stride, 1, x_stride, one.data(), rows, pool);
          REQUIRE(std::memcmp(one.data(), chunk.data() + static_cast<std::size_t>(t) * y_stride,
                              one.size() * sizeof(float)) == 0);
        }
      }
      for (int t = 0; t < n; ++t) {
        for (int r = 0; r < rows; ++r) {
          double exact = 0.0, magnitude = 0.0;
          for (int k = 0; k < cols; ++k) {
            const double p = static_cast<double>(w.row(r)[k]) * x[static_cast<std::size_t>(t) * x_stride + k];
            exact += p;
            magnitude += std::fabs(p);
          }
          const float got = chunk[static_cast<std::size_t>(t) * y_stride + r];
          REQUIRE(std::fabs(got - exact) <= 1e-6 * magnitude + 1e-30);
        }
      }
    }
  }
}

TEST_CASE("linear: padding between rows is left alone", "[llm][linear]") {
  kvq::Rng rng(kvq_test::case_seed("linear_padding", 0));
  const Matrix w = random_matrix(rng, 6, 16);
  std::vector<float> x(3 * 16);
  for (float& v : x) v = rng.normal();
  std::vector<float> y(3 * 9, 7.0f);
  kvq::llm::linear(w, x.data(), 3, 16, y.data(), 9, nullptr);
  for (int t = 0; t < 3; ++t) {
    for (int c = 6; c < 9; ++c) REQUIRE(y[static_cast<std::size_t>(t) * 9 + c] == 7.0f);
  }
}
