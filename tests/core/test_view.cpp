// SPDX-License-Identifier: Apache-2.0
#include <string>
#include <vector>

#include "kvq/core/view.hpp"
#include "kvq_catch.hpp"

TEST_CASE("StridedView indexes row-major and strided data", "[core][view]") {
  std::vector<int> data(24);
  for (int i = 0; i < 24; ++i) data[static_cast<std::size_t>(i)] = i;
  kvq::StridedView<int, 3> v(data.data(), {2, 3, 4});
  REQUIRE(v.size() == 24);
  REQUIRE(v.is_contiguous());
  REQUIRE(v(1, 2, 3) == 23);
  REQUIRE(v(0, 1, 2) == 6);
  const auto s = v.slice(1);
  REQUIRE(s.extent(0) == 3);
  REQUIRE(s.extent(1) == 4);
  REQUIRE(s(0, 0) == 12);

  // Transposed view of a [4, 6] matrix: element (i, j) is data[j * 6 + i].
  kvq::StridedView<const int, 2> t(data.data(), {6, 4}, {1, 6});
  REQUIRE_FALSE(t.is_contiguous());
  REQUIRE(t(5, 3) == 23);
  REQUIRE(t(2, 1) == 8);

  kvq::StridedView<const int, 3> c = v;  // to const
  REQUIRE(c(1, 0, 0) == 12);
}

TEST_CASE("check_view names the argument, the shape and the expectation", "[core][view]") {
  std::vector<float> data(12);
  kvq::StridedView<const float, 2> v(data.data(), {3, 4});
  REQUIRE_NOTHROW(kvq::check_view("f", "x", v, {3, 4}));
  REQUIRE_NOTHROW(kvq::check_view("f", "x", v, {-1, 4}));
  try {
    kvq::check_view("kvq::f", "x", v, {3, 5});
    FAIL("no error");
  } catch (const kvq::Error& e) {
    REQUIRE(e.status() == kvq::Status::kInvalidArgument);
    REQUIRE(std::string(e.what()) == "kvq::f: argument 'x' = '[3, 4]'; expected shape [3, 5]");
  }
  kvq::StridedView<const float, 2> null_view(nullptr, {2, 2});
  REQUIRE_THROWS_AS(kvq::check_view("f", "x", null_view, {2, 2}), kvq::Error);
  kvq::StridedView<const float, 2> empty(nullptr, {0, 2});
  REQUIRE_NOTHROW(kvq::check_view("f", "x", empty, {0, 2}));
}

TEST_CASE("Span views contiguous memory", "[core][view]") {
  std::vector<int> data{1, 2, 3};
  kvq::Span<int> s(data.data(), data.size());
  kvq::Span<const int> cs = s;
  int sum = 0;
  for (int x : cs) sum += x;
  REQUIRE(sum == 6);
  REQUIRE(cs[2] == 3);
  REQUIRE(kvq::Span<int>().empty());
}
