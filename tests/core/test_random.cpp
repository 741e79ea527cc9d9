// SPDX-License-Identifier: Apache-2.0
#include <cmath>
#include <cstdint>

#include "kvq/core/random.hpp"
#include "kvq_catch.hpp"

TEST_CASE("Rng is reproducible and its uniforms and normals have the right moments", "[core][random]") {
  kvq::Rng a(42), b(42), c(43);
  bool differs = false;
  for (int i = 0; i < 100; ++i) {
    const std::uint64_t x = a.next_u64();
    REQUIRE(x == b.next_u64());
    differs = differs || x != c.next_u64();
  }
  REQUIRE(differs);

  kvq::Rng r(7);
  double sum = 0, sum2 = 0, nsum = 0, nsum2 = 0;
  const int n = 200000;
  std::uint32_t bins[10] = {};
  for (int i = 0; i < n; ++i) {
    const float u = r.uniform();
    REQUIRE(u >= 0.0f);
    REQUIRE(u < 1.0f);
    sum += u;
    sum2 += double(u) * u;
    const float g = r.normal();
    nsum += g;
    nsum2 += double(g) * g;
    const std::uint32_t k = r.below(10);
    REQUIRE(k < 10);
    ++bins[k];
  }
  REQUIRE(std::abs(sum / n - 0.5) < 0.005);
  REQUIRE(std::abs(sum2 / n - 1.0 / 3.0) < 0.005);
  REQUIRE(std::abs(nsum / n) < 0.01);
  REQUIRE(std::abs(nsum2 / n - 1.0) < 0.02);
  for (std::uint32_t count : bins) REQUIRE(std::abs(double(count) - n / 10.0) < 0.05 * n / 10.0);
}
