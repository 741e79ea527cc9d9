// SPDX-License-Identifier: Apache-2.0
// SKVQ channel reordering (calib/channel_reorder.hpp): k-means on 2-D points is deterministic,
// recovers planted clusters and never leaves a cluster empty (duplicates, k == n); the channel
// groups of every scope are valid (check_channel_groups), canonical, and within-head groups keep
// the head layout; on planted-outlier ranges the reordered groupings never cost more range than
// the identity grouping and cost strictly less once outliers sit in several identity groups;
// bad input throws naming the argument.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "kvq/calib/channel_reorder.hpp"
#include "kvq/core/random.hpp"
#include "kvq/quant/matrix.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::index_t;
using kvq::calib::ChannelClustering;
using kvq::calib::KMeansOptions;
using kvq::calib::KMeansResult;
using kvq::calib::ReorderScope;
using Points = std::vector<std::array<double, 2>>;

constexpr ReorderScope kScopes[] = {ReorderScope::kNone, ReorderScope::kCrossHead, ReorderScope::kWithinHead};

struct Shape {
  index_t heads;
  index_t head_dim;
  index_t group;
};

/// The message of check_channel_groups for `c` over `width` channels; empty when valid.
std::string groups_problem(const ChannelClustering& c, index_t width) {
  try {
    kvq::detail::check_channel_groups("test", c.view(), width);
  } catch (const kvq::Error& e) {
    return e.what();
  }
  return {};
}

/// Random channel ranges: min in [-2, 1), max = min + [0, 3).
void random_ranges(kvq::Rng& rng, index_t width, std::vector<float>& lo, std::vector<float>& hi) {
  lo.resize(static_cast<std::size_t>(width));
  hi.resize(static_cast<std::size_t>(width));
  for (std::size_t c = 0; c < lo.size(); ++c) {
    lo[c] = rng.uniform(-2.0f, 1.0f);
    hi[c] = lo[c] + rng.uniform(0.0f, 3.0f);
  }
}

/// Planted outliers: every channel has a centre in [-0.5, 0.5) and a range in [1, 2); `count`
/// distinct random channels get a range 20-100x larger, split unevenly around the centre.
/// Returns the outlier channels.
std::vector<index_t> planted_outliers(kvq::Rng& rng, index_t width, index_t count, std::vector<float>& lo,
                                      std::vector<float>& hi) {
  lo.resize(static_cast<std::size_t>(width));
  hi.resize(static_cast<std::size_t>(width));
  for (std::size_t c = 0; c < lo.size(); ++c) {
    const float centre = rng.uniform(-0.5f, 0.5f);
    const float half = rng.uniform(0.5f, 1.0f);
    lo[c] = centre - half;
    hi[c] = centre + half;
  }
  std::vector<index_t> outliers;
  while (static_cast<index_t>(outliers.size()) < count) {
    const index_t c = rng.below(static_cast<std::uint32_t>(width));
    if (std::find(outliers.begin(), outliers.end(), c) != outliers.end()) continue;
    outliers.push_back(c);
    const std::size_t i = static_cast<std::size_t>(c);
    const float centre = 0.5f * (lo[i] + hi[i]);
    const float range = (hi[i] - lo[i]) * rng.uniform(20.0f, 100.0f);
    const float below = rng.uniform(0.2f, 0.8f);
    lo[i] = centre - below * range;
    hi[i] = centre + (1.0f - below) * range;
  }
  return outliers;
}

/// Every point's center is a nearest one (a Lloyd fixpoint), centers are the means of their
/// points, no cluster is empty, inertia is the sum of squared distances.
void check_kmeans_invariants(const Points& points, int k, const KMeansResult& r) {
  REQUIRE(r.labels.size() == points.size());
  REQUIRE(r.centers.size() == static_cast<std::size_t>(k));
  REQUIRE(r.iterations >= 1);
  std::vector<std::size_t> counts(r.centers.size(), 0);
  std::vector<std::array<double, 2>> sums(r.centers.size(), {0.0, 0.0});
  double inertia = 0.0;
  double scale = 1.0;
  for (const auto& p : points) scale = std::max({scale, std::abs(p[0]), std::abs(p[1])});
  for (std::size_t i = 0; i < points.size(); ++i) {
    REQUIRE(r.labels[i] >= 0);
    REQUIRE(r.labels[i] < k);
    const std::size_t l = static_cast<std::size_t>(r.labels[i]);
    ++counts[l];
    sums[l][0] += points[i][0];
    sums[l][1] += points[i][1];
    auto d2 = [&](std::size_t j) {
      const double dx = points[i][0] - r.centers[j][0], dy = points[i][1] - r.centers[j][1];
      return dx * dx + dy * dy;
    };
    inertia += d2(l);
    double nearest = d2(0);
    for (std::size_t j = 1; j < r.centers.size(); ++j) nearest = std::min(nearest, d2(j));
    CAPTURE(i, nearest, d2(l));
    REQUIRE(d2(l) <= nearest + 1e-9 * scale * scale);
  }
  for (std::size_t j = 0; j < counts.size(); ++j) {
    CAPTURE(j);
    REQUIRE(counts[j] > 0);
    CHECK(std::abs(r.centers[j][0] - sums[j][0] / double(counts[j])) <= 1e-12 * scale);
    CHECK(std::abs(r.centers[j][1] - sums[j][1] / double(counts[j])) <= 1e-12 * scale);
  }
  CHECK(std::abs(r.inertia - inertia) <= 1e-9 * (1.0 + inertia));
}

double identity_cost(const std::vector<float>& lo, const std::vector<float>& hi, const Shape& s) {
  const ChannelClustering none =
      kvq::calib::reorder_channels(lo.data(), hi.data(), s.heads, s.head_dim, s.group, ReorderScope::kNone);
  return kvq::calib::grouping_range_cost(lo.data(), hi.data(), none.view());
}

}  // namespace

TEST_CASE("reorder scopes have labels that parse back; unknown names list the choices", "[calib][reorder]") {
  for (ReorderScope s : kScopes) REQUIRE(kvq::calib::parse_reorder_scope(kvq::calib::scope_label(s)) == s);
  CHECK(kvq::calib::scope_label(ReorderScope::kNone) == "none");
  CHECK(kvq::calib::scope_label(ReorderScope::kCrossHead) == "cross-head");
  CHECK(kvq::calib::scope_label(ReorderScope::kWithinHead) == "within-head");
  REQUIRE_THROWS_WITH(kvq::calib::parse_reorder_scope("per-head", "--key-reorder"),
                      KVQ_CONTAINS("'--key-reorder' = 'per-head'") && KVQ_CONTAINS("'cross-head'") &&
                          KVQ_CONTAINS("'within-head'") && KVQ_CONTAINS("'none'"));
  REQUIRE_THROWS_WITH(kvq::calib::parse_reorder_scope(""), KVQ_CONTAINS("argument 'reorder'"));
}

TEST_CASE("reorder_group_count rounds width / group_size half up and per head for within-head", "[calib][reorder]") {
  using kvq::calib::reorder_group_count;
  struct Row {
    Shape s;
    index_t whole;
    index_t within;
  };
  const Row rows[] = {
      {{3, 64, 128}, 2, 3},  {{3, 64, 64}, 3, 3},    {{3, 64, 32}, 6, 6},  {{8, 128, 128}, 8, 8},
      {{1, 8, 4}, 2, 2},     {{4, 8, 128}, 1, 4},    {{2, 64, 48}, 3, 2},  {{1, 6, 4}, 2, 2},
      {{1, 5, 4}, 1, 1},     {{1, 4096, 1}, 4096, 4096}, {{32, 128, 128}, 32, 32},
  };
  for (const Row& r : rows) {
    CAPTURE(r.s.heads, r.s.head_dim, r.s.group);
    CHECK(reorder_group_count(r.s.heads, r.s.head_dim, r.s.group, ReorderScope::kNone) == r.whole);
    CHECK(reorder_group_count(r.s.heads, r.s.head_dim, r.s.group, ReorderScope::kCrossHead) == r.whole);
    CHECK(reorder_group_count(r.s.heads, r.s.head_dim, r.s.group, ReorderScope::kWithinHead) == r.within);
  }
}

TEST_CASE("reorder_channels gives valid canonical channel groups for every scope and shape", "[calib][reorder]") {
  const Shape shapes[] = {{3, 64, 32}, {3, 64, 64}, {3, 64, 128}, {8, 128, 128}, {1, 8, 4},
                          {4, 8, 128}, {2, 64, 48}, {1, 5, 4},    {2, 3, 1}};
  std::uint64_t index = 0;
  for (const Shape& s : shapes) {
    for (int trial = 0; trial < 3; ++trial) {
      const std::uint64_t seed = kvq_test::case_seed("reorder valid groups", index++);
      INFO("seed " << seed << ", " << s.heads << " x " << s.head_dim << ", G " << s.group);
      kvq::Rng rng(seed);
      const index_t width = s.heads * s.head_dim;
      std::vector<float> lo, hi;
      random_ranges(rng, width, lo, hi);
      for (ReorderScope scope : kScopes) {
        INFO("scope " << kvq::calib::scope_label(scope));
        const ChannelClustering c = kvq::calib::reorder_channels(lo.data(), hi.data(), s.heads, s.head_dim, s.group, scope);
        const std::string problem = groups_problem(c, width);
        CAPTURE(problem);
        REQUIRE(problem.empty());
        REQUIRE(c.groups() == kvq::calib::reorder_group_count(s.heads, s.head_dim, s.group, scope));
        REQUIRE(c.view().permutation.size() == static_cast<std::size_t>(width));
        REQUIRE(c.view().boundaries.size() == static_cast<std::size_t>(c.groups()) + 1);

        // Deterministic: a second call gives the same groups.
        const ChannelClustering again = kvq::calib::reorder_channels(lo.data(), hi.data(), s.heads, s.head_dim, s.group, scope);
        REQUIRE(again.permutation == c.permutation);
        REQUIRE(again.boundaries == c.boundaries);

        if (scope == ReorderScope::kNone) {
          for (index_t p = 0; p < width; ++p) REQUIRE(c.permutation[static_cast<std::size_t>(p)] == p);
          for (index_t g = 0; g <= c.groups(); ++g) {
            REQUIRE(c.boundaries[static_cast<std::size_t>(g)] == g * width / c.groups());
          }
          continue;
        }
        // Canonical: ascending channels inside a group; inside each k-means block, groups by
        // ascending center (max, then min), the center being the mean in channel order.
        const index_t block = scope == ReorderScope::kCrossHead ? width : s.head_dim;
        std::array<double, 2> previous{};
        for (index_t g = 0; g < c.groups(); ++g) {
          const std::size_t b = static_cast<std::size_t>(c.boundaries[static_cast<std::size_t>(g)]);
          const std::size_t e = static_cast<std::size_t>(c.boundaries[static_cast<std::size_t>(g) + 1]);
          std::array<double, 2> centre{0.0, 0.0};
          for (std::size_t p = b; p < e; ++p) {
            if (p > b) REQUIRE(c.permutation[p] > c.permutation[p - 1]);
            centre[0] += lo[static_cast<std::size_t>(c.permutation[p])];
            centre[1] += hi[static_cast<std::size_t>(c.permutation[p])];
          }
          centre[0] /= double(e - b);
          centre[1] /= double(e - b);
          if (static_cast<index_t>(b) % block != 0) {
            CAPTURE(g, previous[0], previous[1], centre[0], centre[1]);
            REQUIRE((previous[1] < centre[1] || (previous[1] == centre[1] && previous[0] <= centre[0])));
          }
          previous = centre;
        }
      }
    }
  }
}

TEST_CASE("within-head groups never cross a head and each head keeps its own channels", "[calib][reorder]") {
  const Shape shapes[] = {{3, 64, 32}, {3, 64, 64}, {3, 64, 128}, {8, 128, 128}, {4, 8, 128}, {2, 64, 48}, {4, 8, 2}};
  std::uint64_t index = 0;
  for (const Shape& s : shapes) {
    const std::uint64_t seed = kvq_test::case_seed("within-head layout", index++);
    INFO("seed " << seed << ", " << s.heads << " x " << s.head_dim << ", G " << s.group);
    kvq::Rng rng(seed);
    std::vector<float> lo, hi;
    if (index % 2 == 0) {
      random_ranges(rng, s.heads * s.head_dim, lo, hi);
    } else {
      planted_outliers(rng, s.heads * s.head_dim, 1 + (s.heads * s.head_dim) / 16, lo, hi);
    }
    const ChannelClustering c =
        kvq::calib::reorder_channels(lo.data(), hi.data(), s.heads, s.head_dim, s.group, ReorderScope::kWithinHead);
    REQUIRE(groups_problem(c, s.heads * s.head_dim).empty());
    for (index_t p = 0; p < s.heads * s.head_dim; ++p) {
      CAPTURE(p);
      REQUIRE(c.permutation[static_cast<std::size_t>(p)] / s.head_dim == p / s.head_dim);
    }
    const index_t per_head = c.groups() / s.heads;
    REQUIRE(per_head * s.heads == c.groups());
    for (index_t g = 0; g < c.groups(); ++g) {
      const index_t b = c.boundaries[static_cast<std::size_t>(g)];
      const index_t e = c.boundaries[static_cast<std::size_t>(g) + 1];
      CAPTURE(g, b, e);
      REQUIRE(b / s.head_dim == (e - 1) / s.head_dim);  // inside one head
      REQUIRE(b / s.head_dim == g / per_head);          // the head's own run of groups
    }
  }
}

TEST_CASE("kmeans_2d is deterministic for a seed and depends on it", "[calib][kmeans]") {
  const std::uint64_t seed = kvq_test::case_seed("kmeans determinism", 0);
  INFO("seed " << seed);
  kvq::Rng rng(seed);
  Points points(300);
  for (auto& p : points) p = {double(rng.uniform(-1.0f, 1.0f)), double(rng.normal())};
  for (int k : {1, 2, 7, 30}) {
    CAPTURE(k);
    const KMeansResult a = kvq::calib::kmeans_2d(points, k);
    const KMeansResult b = kvq::calib::kmeans_2d(points, k);
    REQUIRE(a.labels == b.labels);
    REQUIRE(a.centers == b.centers);
    REQUIRE(a.inertia == b.inertia);
    REQUIRE(a.iterations == b.iterations);
    check_kmeans_invariants(points, k, a);
  }
  // One restart per seed: the k-means++ draw decides the label order, so some seed differs.
  KMeansOptions one;
  one.restarts = 1;
  one.seed = 1;
  const KMeansResult first = kvq::calib::kmeans_2d(points, 7, one);
  bool differs = false;
  for (std::uint64_t s = 2; s < 12 && !differs; ++s) {
    one.seed = s;
    differs = kvq::calib::kmeans_2d(points, 7, one).labels != first.labels;
  }
  REQUIRE(differs);
  // More restarts never end worse than the first restart of the same stream.
  KMeansOptions many = one;
  many.seed = 5;
  many.restarts = 10;
  one.seed = 5;
  REQUIRE(kvq::calib::kmeans_2d(points, 7, many).inertia <= kvq::calib::kmeans_2d(points, 7, one).inertia);
}

TEST_CASE("kmeans_2d recovers well-separated planted clusters", "[calib][kmeans]") {
  for (std::uint64_t trial = 0; trial < 20; ++trial) {
    const std::uint64_t seed = kvq_test::case_seed("kmeans planted clusters", trial);
    INFO("seed " << seed);
    kvq::Rng rng(seed);
    const int k = 2 + static_cast<int>(rng.below(9));  // 2 .. 10 clusters
    CAPTURE(k);
    // Centers on a circle of radius 100 (neighbours >= 62 apart), noise sigma 1.
    std::vector<std::array<double, 2>> centres(static_cast<std::size_t>(k));
    const double turn = rng.uniform(0.0f, 6.28f);
    for (int j = 0; j < k; ++j) {
      const double a = turn + 6.283185307179586 * j / k;
      centres[static_cast<std::size_t>(j)] = {100.0 * std::cos(a), 100.0 * std::sin(a)};
    }
    Points points;
    std::vector<int> truth;
    for (int j = 0; j < k; ++j) {
      const int size = 1 + static_cast<int>(rng.below(30));
      for (int i = 0; i < size; ++i) {
        points.push_back({centres[static_cast<std::size_t>(j)][0] + rng.normal(),
                          centres[static_cast<std::size_t>(j)][1] + rng.normal()});
        truth.push_back(j);
      }
    }
    // Shuffle (Fisher-Yates) so that clusters are not contiguous.
    for (std::size_t i = points.size(); i-- > 1;) {
      const std::size_t j = rng.below(static_cast<std::uint32_t>(i + 1));
      std::swap(points[i], points[j]);
      std::swap(truth[i], truth[j]);
    }
    KMeansOptions options;
    options.seed = seed;
    const KMeansResult r = kvq::calib::kmeans_2d(points, k, options);
    check_kmeans_invariants(points, k, r);
    std::map<int, std::int32_t> label_of;  // planted cluster -> label
    std::map<std::int32_t, int> planted_of;
    for (std::size_t i = 0; i < points.size(); ++i) {
      CAPTURE(i, truth[i], r.labels[i]);
      // emplace keeps the first mapping: a second planted cluster or label contradicts it.
      REQUIRE(label_of.emplace(truth[i], r.labels[i]).first->second == r.labels[i]);
      REQUIRE(planted_of.emplace(r.labels[i], truth[i]).first->second == truth[i]);
    }
    REQUIRE(label_of.size() == static_cast<std::size_t>(k));
  }
}

TEST_CASE("kmeans_2d never leaves a cluster empty", "[calib][kmeans]") {
  const std::uint64_t seed = kvq_test::case_seed("kmeans no empty cluster", 0);
  INFO("seed " << seed);
  kvq::Rng rng(seed);

  SECTION("k == number of points: every point alone, inertia 0") {
    Points points(40);
    for (auto& p : points) p = {double(rng.uniform()), double(rng.uniform())};
    const KMeansResult r = kvq::calib::kmeans_2d(points, 40);
    check_kmeans_invariants(points, 40, r);
    REQUIRE(r.inertia == 0.0);
  }
  SECTION("duplicate points with k between the distinct count and the point count") {
    // 4 distinct points, each repeated 5 times.
    const std::array<double, 2> distinct[] = {{0.0, 0.0}, {1.0, 0.0}, {0.0, 1.0}, {5.0, 5.0}};
    Points points;
    for (int rep = 0; rep < 5; ++rep) {
      for (const auto& p : distinct) points.push_back(p);
    }
    for (int k : {1, 3, 4, 5, 9, 19, 20}) {
      CAPTURE(k);
      const KMeansResult r = kvq::calib::kmeans_2d(points, k);
      check_kmeans_invariants(points, k, r);
      if (k >= 4) {
        REQUIRE(r.inertia == 0.0);  // every cluster is copies of one point
      }
      if (k == 4) {
        // Enough distinct points: copies share a cluster.
        for (std::size_t i = 4; i < points.size(); ++i) REQUIRE(r.labels[i] == r.labels[i % 4]);
      }
    }
  }
  SECTION("all points identical") {
    const Points points(12, std::array<double, 2>{-3.5, 2.25});
    for (int k : {1, 5, 12}) {
      CAPTURE(k);
      const KMeansResult r = kvq::calib::kmeans_2d(points, k);
      check_kmeans_invariants(points, k, r);
      REQUIRE(r.inertia == 0.0);
    }
  }
  SECTION("a single point") {
    const KMeansResult r = kvq::calib::kmeans_2d({{1.0, 2.0}}, 1);
    REQUIRE(r.labels == std::vector<std::int32_t>{0});
    REQUIRE(r.centers[0] == std::array<double, 2>{1.0, 2.0});
  }
  SECTION("reorder with as many groups as channels and duplicate ranges") {
    std::vector<float> lo(8, -1.0f), hi(8, 1.0f);
    lo[3] = -50.0f;
    const ChannelClustering c = kvq::calib::reorder_channels(lo.data(), hi.data(), 2, 4, 1, ReorderScope::kCrossHead);
    REQUIRE(groups_problem(c, 8).empty());
    REQUIRE(c.groups() == 8);
    // All maxima equal: clusters ordered by min (the outlier first), then by lowest channel.
    REQUIRE(c.permutation == std::vector<std::int32_t>{3, 0, 1, 2, 4, 5, 6, 7});
    const ChannelClustering w = kvq::calib::reorder_channels(lo.data(), hi.data(), 2, 4, 1, ReorderScope::kWithinHead);
    REQUIRE(groups_problem(w, 8).empty());
    REQUIRE(w.permutation == std::vector<std::int32_t>{3, 0, 1, 2, 4, 5, 6, 7});
  }
}

TEST_CASE("grouping_range_cost sums each channel's group range", "[calib][reorder]") {
  // Channels: 0 [-1, 1], 1 [0, 4], 2 [-10, 0], 3 [2, 3].
  const float lo[] = {-1.0f, 0.0f, -10.0f, 2.0f};
  const float hi[] = {1.0f, 4.0f, 0.0f, 3.0f};
  const std::vector<std::int32_t> identity{0, 1, 2, 3}, swapped{2, 0, 1, 3};
  const std::vector<std::int32_t> two{0, 2, 4}, one{0, 4}, four{0, 1, 2, 3, 4}, uneven{0, 1, 4};
  auto view = [](const std::vector<std::int32_t>& p, const std::vector<std::int32_t>& b) {
    return kvq::ChannelGroups{{p.data(), p.size()}, {b.data(), b.size()}};
  };
  using kvq::calib::grouping_range_cost;
  CHECK(grouping_range_cost(lo, hi, view(identity, two)) == 2 * 5.0 + 2 * 13.0);
  CHECK(grouping_range_cost(lo, hi, view(identity, one)) == 4 * 14.0);
  CHECK(grouping_range_cost(lo, hi, view(identity, four)) == 2.0 + 4.0 + 10.0 + 1.0);
  CHECK(grouping_range_cost(lo, hi, view(swapped, uneven)) == 10.0 + 3 * 5.0);
  // The k-means grouping of these four channels into two isolates channel 2.
  const ChannelClustering c = kvq::calib::reorder_channels(lo, hi, 1, 4, 2, ReorderScope::kCrossHead);
  CHECK(c.permutation == std::vector<std::int32_t>{2, 0, 1, 3});
  CHECK(c.boundaries == std::vector<std::int32_t>{0, 1, 4});
  CHECK(grouping_range_cost(lo, hi, c.view()) == 25.0);
  CHECK(grouping_range_cost(lo, hi, c.view()) < grouping_range_cost(lo, hi, view(identity, two)));
}

TEST_CASE("reordering never costs more range than the identity on planted outliers", "[calib][reorder]") {
  // k-means minimises squared distances in the (min, max) plane, not the range cost, so the
  // claim needs fewer outliers than clusters in each k-means block (the whole row for
  // cross-head, a head for within-head): with 2 clusters and 2 outliers pointing different
  // ways, k-means may isolate one outlier and lump the other with the normal channels, which
  // can cost more than the identity. Trials rotate between "a few" outliers (fewer than the
  // cross-head clusters, or than the clusters of one head) and "many" (up to width / 16); a
  // block with too many is not asserted.
  const Shape shapes[] = {{3, 64, 32}, {3, 64, 64}, {3, 64, 128}, {8, 128, 128}, {8, 128, 32}, {1, 8, 4}, {4, 8, 128}, {2, 64, 48}};
  std::uint64_t index = 0;
  for (const Shape& s : shapes) {
    const index_t width = s.heads * s.head_dim;
    const index_t none_groups = kvq::calib::reorder_group_count(s.heads, s.head_dim, s.group, ReorderScope::kNone);
    const index_t within_groups = kvq::calib::reorder_group_count(s.heads, s.head_dim, s.group, ReorderScope::kWithinHead);
    const int trials = width >= 1024 ? (s.group < 64 ? 9 : 30) : 99;
    int checked[2] = {0, 0}, strict[2] = {0, 0};
    for (int trial = 0; trial < trials; ++trial) {
      const std::uint64_t seed = kvq_test::case_seed("reorder planted outliers", index++);
      INFO("seed " << seed << ", " << s.heads << " x " << s.head_dim << ", G " << s.group);
      kvq::Rng rng(seed);
      const index_t limit = trial % 3 == 0   ? std::max<index_t>(1, none_groups - 1)
                            : trial % 3 == 1 ? std::max<index_t>(1, within_groups / s.heads - 1)
                                             : std::max<index_t>(2, width / 16);
      const index_t count = 1 + rng.below(static_cast<std::uint32_t>(limit));
      std::vector<float> lo, hi;
      const std::vector<index_t> outliers = planted_outliers(rng, width, count, lo, hi);
      CAPTURE(count);
      // Identity groups and heads that hold an outlier. Group g covers
      // [g * width / groups, (g + 1) * width / groups).
      std::vector<int> in_group(static_cast<std::size_t>(none_groups), 0), in_head(static_cast<std::size_t>(s.heads), 0);
      for (index_t c : outliers) {
        index_t g = 0;
        while ((g + 1) * width / none_groups <= c) ++g;
        ++in_group[static_cast<std::size_t>(g)];
        ++in_head[static_cast<std::size_t>(c / s.head_dim)];
      }
      const bool spread = std::count_if(in_group.begin(), in_group.end(), [](int n) { return n > 0; }) >= 2;
      const double none = identity_cost(lo, hi, s);
      for (ReorderScope scope : {ReorderScope::kCrossHead, ReorderScope::kWithinHead}) {
        const bool cross = scope == ReorderScope::kCrossHead;
        INFO("scope " << kvq::calib::scope_label(scope));
        // Within-head is comparable with the identity when the identity groups nest inside the
        // heads (same group count) or the identity is one group; at 3 x 64, G 128 (3 head
        // groups against 2 identity groups of 96 channels) no order of the costs holds.
        if (!cross && within_groups != none_groups && none_groups != 1) continue;
        const index_t clusters = cross ? none_groups : within_groups / s.heads;  // per k-means block
        const int crowded = cross ? static_cast<int>(count) : *std::max_element(in_head.begin(), in_head.end());
        if (clusters >= 2 && crowded >= clusters) continue;
        const ChannelClustering c = kvq::calib::reorder_channels(lo.data(), hi.data(), s.heads, s.head_dim, s.group, scope);
        const double cost = kvq::calib::grouping_range_cost(lo.data(), hi.data(), c.view());
        CAPTURE(none, cost, spread, clusters, crowded);
        REQUIRE(cost <= none * (1.0 + 1e-12));
        ++checked[cross ? 0 : 1];
        // Strictly lower when an outlier shares an identity group with normal channels that
        // k-means can split off: outliers in several identity groups, or a lone one.
        if (none_groups >= 2 && clusters >= 2 && (spread || count == 1)) {
          REQUIRE(cost < none);
          ++strict[cross ? 0 : 1];
        }
      }
    }
    CAPTURE(s.heads, s.head_dim, s.group, checked[0], checked[1], strict[0], strict[1]);
    CHECK(checked[0] >= trials / 2);
    if (none_groups >= 2) CHECK(strict[0] >= trials / 4);
    if (within_groups == none_groups && within_groups > s.heads) CHECK(strict[1] > 0);
  }
}

TEST_CASE("bad channel ranges and shapes throw naming the argument", "[calib][reorder]") {
  std::vector<float> lo(16, -1.0f), hi(16, 1.0f);
  using kvq::calib::reorder_channels;
  for (ReorderScope scope : kScopes) {
    INFO("scope " << kvq::calib::scope_label(scope));
    std::vector<float> bad = lo;
    bad[5] = 2.0f;  // min > max
    REQUIRE_THROWS_WITH(reorder_channels(bad.data(), hi.data(), 2, 8, 4, scope),
                        KVQ_CONTAINS("kvq::calib::reorder_channels") && KVQ_CONTAINS("'channel_max'") &&
                            KVQ_CONTAINS("channel 5") && KVQ_CONTAINS("min 2 > max 1"));
    bad = lo;
    bad[7] = std::numeric_limits<float>::quiet_NaN();
    REQUIRE_THROWS_WITH(reorder_channels(bad.data(), hi.data(), 2, 8, 4, scope),
                        KVQ_CONTAINS("'channel_min'") && KVQ_CONTAINS("channel 7 = nan") &&
                            KVQ_CONTAINS("finite"));
    bad = hi;
    bad[15] = std::numeric_limits<float>::infinity();
    REQUIRE_THROWS_WITH(reorder_channels(lo.data(), bad.data(), 2, 8, 4, scope),
                        KVQ_CONTAINS("'channel_max'") && KVQ_CONTAINS("channel 15 = inf"));
    REQUIRE_THROWS_WITH(reorder_channels(lo.data(), hi.data(), 2, 8, 0, scope),
                        KVQ_CONTAINS("'group_size' = 0") && KVQ_CONTAINS("group_size > 0"));
    REQUIRE_THROWS_WITH(reorder_channels(lo.data(), hi.data(), 2, 8, -4, scope), KVQ_CONTAINS("'group_size' = -4"));
    REQUIRE_THROWS_WITH(reorder_channels(lo.data(), hi.data(), 2, 0, 4, scope),
                        KVQ_CONTAINS("'head_dim' = 0") && KVQ_CONTAINS("head_dim > 0"));
    REQUIRE_THROWS_WITH(reorder_channels(lo.data(), hi.data(), 2, -8, 4, scope), KVQ_CONTAINS("'head_dim' = -8"));
    REQUIRE_THROWS_WITH(reorder_channels(lo.data(), hi.data(), 0, 8, 4, scope), KVQ_CONTAINS("'num_heads' = 0"));
    REQUIRE_THROWS_WITH(reorder_channels(nullptr, hi.data(), 2, 8, 4, scope), KVQ_CONTAINS("'channel_min' = 'a null pointer'"));
    REQUIRE_THROWS_WITH(reorder_channels(lo.data(), lo.data(), 1, 100000, 4, scope),
                        KVQ_CONTAINS("'num_heads * head_dim'") && KVQ_CONTAINS("65536"));
  }
  REQUIRE_THROWS_WITH(kvq::calib::reorder_group_count(3, 64, 0, ReorderScope::kCrossHead),
                      KVQ_CONTAINS("kvq::calib::reorder_group_count") && KVQ_CONTAINS("'group_size' = 0"));
  REQUIRE_THROWS_WITH(kvq::calib::reorder_group_count(3, 0, 32, ReorderScope::kWithinHead), KVQ_CONTAINS("'head_dim' = 0"));
  // grouping_range_cost validates the groups and the ranges.
  const std::vector<std::int32_t> twice{0, 0, 1, 2}, bounds{0, 2, 4}, empty_group{0, 2, 2, 4}, perm{0, 1, 2, 3};
  REQUIRE_THROWS_WITH(kvq::calib::grouping_range_cost(lo.data(), hi.data(),
                                                      {{twice.data(), twice.size()}, {bounds.data(), bounds.size()}}),
                      KVQ_CONTAINS("kvq::calib::grouping_range_cost") && KVQ_CONTAINS("bijection"));
  REQUIRE_THROWS_WITH(kvq::calib::grouping_range_cost(
                          lo.data(), hi.data(), {{perm.data(), perm.size()}, {empty_group.data(), empty_group.size()}}),
                      KVQ_CONTAINS("strictly increasing"));
  std::vector<float> bad = lo;
  bad[1] = 3.0f;
  REQUIRE_THROWS_WITH(kvq::calib::grouping_range_cost(bad.data(), hi.data(),
                                                      {{perm.data(), perm.size()}, {bounds.data(), bounds.size()}}),
                      KVQ_CONTAINS("'channel_max'") && KVQ_CONTAINS("channel 1"));
}

TEST_CASE("kmeans_2d rejects bad k and points and options", "[calib][kmeans]") {
  using kvq::calib::kmeans_2d;
  const Points points{{0.0, 0.0}, {1.0, 1.0}, {2.0, 0.0}};
  REQUIRE_THROWS_WITH(kmeans_2d(points, 0), KVQ_CONTAINS("kvq::calib::kmeans_2d") && KVQ_CONTAINS("'k' = 0") &&
                                                KVQ_CONTAINS("1..3"));
  REQUIRE_THROWS_WITH(kmeans_2d(points, 4), KVQ_CONTAINS("'k' = 4"));
  REQUIRE_THROWS_WITH(kmeans_2d({}, 1), KVQ_CONTAINS("'points'") && KVQ_CONTAINS("at least one point"));
  Points bad = points;
  bad[2][1] = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_WITH(kmeans_2d(bad, 2), KVQ_CONTAINS("'points'") && KVQ_CONTAINS("point 2") && KVQ_CONTAINS("finite"));
  KMeansOptions o;
  o.restarts = 0;
  REQUIRE_THROWS_WITH(kmeans_2d(points, 2, o), KVQ_CONTAINS("'options.restarts' = 0"));
  o = {};
  o.max_iterations = -1;
  REQUIRE_THROWS_WITH(kmeans_2d(points, 2, o), KVQ_CONTAINS("'options.max_iterations' = -1"));
  o = {};
  o.tolerance = -1.0;
  REQUIRE_THROWS_WITH(kmeans_2d(points, 2, o), KVQ_CONTAINS("'options.tolerance' = -1"));
}
