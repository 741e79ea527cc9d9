// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief SKVQ channel reordering (ALGORITHMS.md §2.2-2.3): k-means on the per-channel calibration
///        range (min_c, max_c) of a layer row, so that channels of similar range, outliers
///        included, share a quantization group. The result is a permutation plus variable group
///        boundaries (kvq::ChannelGroups). Host only; standard library alone.
///
/// Determinism: kmeans_2d() and reorder_channels() depend only on their arguments (the seed
/// included). They use no unordered containers, no threads, sum in point-index order, and route
/// every product that feeds a sum through std::fma, so that a compiler's FMA contraction
/// (-ffp-contract, -march with FMA) cannot change a rounding: the same inputs give the same labels
/// bit for bit on every platform with IEEE-754 double arithmetic (SSE2/NEON; not x87 extended
/// precision).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "kvq/core/bits.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/random.hpp"
#include "kvq/quant/matrix.hpp"

namespace kvq::calib {

// ---------------------------------------------------------------------------------------------
// k-means on 2-D points
// ---------------------------------------------------------------------------------------------

/// Options of kmeans_2d(). The defaults follow scikit-learn's KMeans(n_init=10), which the
/// official SKVQ calibration uses, except for a tighter tolerance.
struct KMeansOptions {
  /// Independent k-means++ initialisations (scikit-learn's n_init); the run of lowest inertia
  /// wins (the earliest on a tie). >= 1.
  int restarts = 10;
  /// Lloyd iterations per restart at most. >= 1.
  int max_iterations = 300;
  /// A restart stops when its labels no longer change, or when the summed squared movement of
  /// the centers in one iteration is at most tolerance * (mean per-coordinate variance of the
  /// points) (scikit-learn's rule; its default is 1e-4). >= 0 and finite.
  double tolerance = 1e-10;
  /// Seed of the kvq::Rng that drives all restarts (drawn from one stream, restart after
  /// restart).
  std::uint64_t seed = 42;
};

/// Result of kmeans_2d() (the best restart).
struct KMeansResult {
  /// [points]: the cluster of each point, in 0 .. k-1. Every cluster has at least one point.
  std::vector<std::int32_t> labels;
  /// [k]: the mean of each cluster's points, (coordinate 0, coordinate 1).
  std::vector<std::array<double, 2>> centers;
  /// Sum over points of the squared Euclidean distance to their cluster's center.
  double inertia = 0;
  /// Lloyd iterations the best restart ran (1 .. max_iterations).
  int iterations = 0;
};

namespace detail {

using Point2 = std::array<double, 2>;

/// Squared Euclidean distance; the explicit fma fixes the rounding whatever the compiler
/// contracts.
inline double squared_distance(const Point2& a, const Point2& b) noexcept {
  const double dx = a[0] - b[0];
  const double dy = a[1] - b[1];
  return std::fma(dx, dx, dy * dy);
}

/// Uniform double in [0, 1), a multiple of 2^-53.
inline double uniform_double(Rng& rng) noexcept {
  return static_cast<double>(rng.next_u64() >> 11) * 0x1.0p-53;
}

/// Index i drawn with probability w_i / total, where prefix[i] = w_0 + ... + w_i (in index
/// order), all w_i >= 0 and prefix.back() > 0. Never returns a point of weight 0.
inline std::size_t sample_weighted(const std::vector<double>& prefix, Rng& rng) {
  const double total = prefix.back();
  const double target = uniform_double(rng) * total;
  auto it = std::upper_bound(prefix.begin(), prefix.end(), target);
  if (it == prefix.end()) {
    // target rounded up to total: the last point of positive weight.
    it = std::lower_bound(prefix.begin(), prefix.end(), total);
  }
  return static_cast<std::size_t>(it - prefix.begin());
}

/// Greedy k-means++ (scikit-learn's variant): the first center is a uniformly drawn point; each
/// next one is the best, by resulting potential, of 2 + floor(ln k) candidates drawn with
/// probability proportional to D^2 (squared distance to the nearest chosen center). When every
/// point already coincides with a center (fewer distinct points than k), the lowest-index point
/// not yet chosen is taken, so the k centers are always k different points (by index).
inline void kmeans_plus_plus(const std::vector<Point2>& points, std::size_t k, Rng& rng,
                             std::vector<Point2>& centers) {
  const std::size_t n = points.size();
  const std::size_t trials = 2 + static_cast<std::size_t>(std::log(static_cast<double>(k)));
  centers.clear();
  std::vector<char> chosen(n, 0);
  const std::size_t first = rng.below(static_cast<std::uint32_t>(n));
  chosen[first] = 1;
  centers.push_back(points[first]);
  std::vector<double> closest(n);
  for (std::size_t i = 0; i < n; ++i) closest[i] = squared_distance(points[i], points[first]);
  std::vector<double> prefix(n);
  while (centers.size() < k) {
    double total = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      total += closest[i];
      prefix[i] = total;
    }
    std::size_t pick = n;
    if (total > 0.0) {
      double best_potential = std::numeric_limits<double>::infinity();
      for (std::size_t t = 0; t < trials; ++t) {
        const std::size_t candidate = sample_weighted(prefix, rng);
        double potential = 0.0;
        for (std::size_t i = 0; i < n; ++i) {
          potential += std::min(closest[i], squared_distance(points[i], points[candidate]));
        }
        if (potential < best_potential) {
          best_potential = potential;
          pick = candidate;
        }
      }
    } else {
      for (std::size_t i = 0; i < n && pick == n; ++i) {
        if (!chosen[i]) pick = i;
      }
    }
    chosen[pick] = 1;
    centers.push_back(points[pick]);
    for (std::size_t i = 0; i < n; ++i) {
      closest[i] = std::min(closest[i], squared_distance(points[i], points[pick]));
    }
  }
}

/// Lloyd iterations from `centers` (k of them). Assignment: nearest center, the lowest index on
/// a tie. An empty cluster (in ascending cluster order) receives the point farthest from its
/// own center among the points of clusters with at least two points (the lowest index on a
/// tie); since k <= points such a point always exists, so no cluster ends empty. Then every
/// center becomes the mean of its points (summed in point order). Returns the iterations run.
inline int lloyd(const std::vector<Point2>& points, std::vector<Point2>& centers,
                 std::vector<std::int32_t>& labels, int max_iterations, double tolerance) {
  const std::size_t n = points.size();
  const std::size_t k = centers.size();
  labels.assign(n, -1);
  std::vector<std::int32_t> previous(n);
  std::vector<double> own(n);  // squared distance to the assigned center
  std::vector<std::size_t> counts(k);
  std::vector<Point2> sums(k);
  int iterations = 0;
  for (int it = 1; it <= max_iterations; ++it) {
    previous = labels;
    std::fill(counts.begin(), counts.end(), std::size_t{0});
    for (std::size_t i = 0; i < n; ++i) {
      std::size_t best = 0;
      double best_d = squared_distance(points[i], centers[0]);
      for (std::size_t j = 1; j < k; ++j) {
        const double d = squared_distance(points[i], centers[j]);
        if (d < best_d) {
          best_d = d;
          best = j;
        }
      }
      labels[i] = static_cast<std::int32_t>(best);
      own[i] = best_d;
      ++counts[best];
    }
    for (std::size_t j = 0; j < k; ++j) {
      if (counts[j] != 0) continue;
      std::size_t far = n;
      for (std::size_t i = 0; i < n; ++i) {
        if (counts[static_cast<std::size_t>(labels[i])] < 2) continue;
        if (far == n || own[i] > own[far]) far = i;
      }
      --counts[static_cast<std::size_t>(labels[far])];
      labels[far] = static_cast<std::int32_t>(j);
      counts[j] = 1;
      own[far] = 0.0;
      centers[j] = points[far];
    }
    std::fill(sums.begin(), sums.end(), Point2{0.0, 0.0});
    for (std::size_t i = 0; i < n; ++i) {
      Point2& s = sums[static_cast<std::size_t>(labels[i])];
      s[0] += points[i][0];
      s[1] += points[i][1];
    }
    double shift = 0.0;
    for (std::size_t j = 0; j < k; ++j) {
      const double count = static_cast<double>(counts[j]);
      const Point2 mean{sums[j][0] / count, sums[j][1] / count};
      shift += squared_distance(mean, centers[j]);
      centers[j] = mean;
    }
    iterations = it;
    if (labels == previous || shift <= tolerance) break;
  }
  return iterations;
}

/// Sum of squared distances of the points to their centers, in point order.
inline double inertia(const std::vector<Point2>& points, const std::vector<Point2>& centers,
                      const std::vector<std::int32_t>& labels) noexcept {
  double sum = 0.0;
  for (std::size_t i = 0; i < points.size(); ++i) {
    sum += squared_distance(points[i], centers[static_cast<std::size_t>(labels[i])]);
  }
  return sum;
}

}  // namespace detail

/// k-means of 2-D points into k clusters: greedy k-means++ seeding (D^2 sampling driven by a
/// kvq::Rng seeded with options.seed), Lloyd iterations, the best of options.restarts runs by
/// inertia. Deterministic: the same arguments give the same result bit for bit (see the file
/// comment).
///
/// points: [n], finite, 1 <= n <= 2^31 - 1; k: 1 <= k <= n (throws otherwise).
/// No cluster is ever empty: an emptied cluster is re-seeded with the point farthest from its
/// center (deterministically, see detail::lloyd). With fewer distinct points than k, identical
/// points are therefore split over several clusters whose centers coincide (inertia 0 for
/// those); with k == n every point is a cluster of its own. Points that coincide share a cluster
/// whenever there are enough distinct points.
inline KMeansResult kmeans_2d(const std::vector<std::array<double, 2>>& points, int k,
                              const KMeansOptions& options = {}) {
  constexpr const char* where = "kvq::calib::kmeans_2d";
  const std::size_t n = points.size();
  if (n == 0) kvq::detail::throw_argument_error(where, "points", "no points", "at least one point");
  if (n > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max())) {
    kvq::detail::throw_argument_error(where, "points", kvq::detail::concat(n, " points"),
                                      "at most 2^31 - 1 points");
  }
  if (k < 1 || static_cast<std::size_t>(k) > n) {
    kvq::detail::throw_argument_error(where, "k", k,
                                      kvq::detail::concat("a cluster count in 1..", n, " (the number of points)"));
  }
  if (options.restarts < 1) {
    kvq::detail::throw_argument_error(where, "options.restarts", options.restarts, "at least 1");
  }
  if (options.max_iterations < 1) {
    kvq::detail::throw_argument_error(where, "options.max_iterations", options.max_iterations,
                                      "at least 1");
  }
  if (!(options.tolerance >= 0.0) || !std::isfinite(options.tolerance)) {
    kvq::detail::throw_argument_error(where, "options.tolerance", options.tolerance,
                                      "a finite tolerance >= 0");
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (!std::isfinite(points[i][0]) || !std::isfinite(points[i][1])) {
      kvq::detail::throw_argument_error(
          where, "points", kvq::detail::concat("point ", i, " = (", points[i][0], ", ", points[i][1], ")"),
          "finite coordinates", Status::kNonFiniteInput);
    }
  }

  // scikit-learn's tolerance scale: the mean of the per-coordinate variances.
  double mean0 = 0.0, mean1 = 0.0;
  for (const auto& p : points) {
    mean0 += p[0];
    mean1 += p[1];
  }
  mean0 /= static_cast<double>(n);
  mean1 /= static_cast<double>(n);
  double variance = 0.0;
  for (const auto& p : points) variance += detail::squared_distance(p, {mean0, mean1});
  const double tolerance = options.tolerance * variance / (2.0 * static_cast<double>(n));

  Rng rng(options.seed);
  KMeansResult best;
  std::vector<detail::Point2> centers;
  std::vector<std::int32_t> labels;
  for (int r = 0; r < options.restarts; ++r) {
    detail::kmeans_plus_plus(points, static_cast<std::size_t>(k), rng, centers);
    const int iterations = detail::lloyd(points, centers, labels, options.max_iterations, tolerance);
    const double inertia = detail::inertia(points, centers, labels);
    if (r == 0 || inertia < best.inertia) {
      best.labels = labels;
      best.centers = centers;
      best.inertia = inertia;
      best.iterations = iterations;
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// Channel reordering of a layer row
// ---------------------------------------------------------------------------------------------

/// Where reordering may move a channel.
enum class ReorderScope : std::uint8_t {
  kNone,        ///< identity order, equal groups (uncalibrated SKVQ)
  kCrossHead,   ///< k-means over the whole layer row; clusters may mix heads (official SKVQ)
  kWithinHead,  ///< k-means inside each head; the head layout survives (simpler GPU kernels)
};

/// "none", "cross-head" or "within-head", as on the command line.
inline std::string scope_label(ReorderScope scope) {
  switch (scope) {
    case ReorderScope::kNone: return "none";
    case ReorderScope::kCrossHead: return "cross-head";
    case ReorderScope::kWithinHead: return "within-head";
  }
  return "unknown";
}

/// Parses "none", "cross-head" or "within-head"; throws naming `argument` and the choices.
inline ReorderScope parse_reorder_scope(const std::string& text, const char* argument = "reorder") {
  if (text == "none") return ReorderScope::kNone;
  if (text == "cross-head") return ReorderScope::kCrossHead;
  if (text == "within-head") return ReorderScope::kWithinHead;
  kvq::detail::throw_argument_error(
      "kvq::calib::parse_reorder_scope", argument, text,
      "'none' (identity, equal groups), 'cross-head' (k-means over the layer row, official SKVQ) "
      "or 'within-head' (k-means inside each head)");
}

/// The channel groups of one layer row of width = num_heads * head_dim channels.
/// permutation: [width], a bijection: position p of a reordered row holds channel
/// permutation[p]. boundaries: [groups + 1], strictly increasing from 0 to width; group g covers
/// positions [boundaries[g], boundaries[g + 1]). Satisfies kvq::detail::check_channel_groups,
/// and has the layout of the cache's ChannelGroupsData (copy the two vectors).
struct ChannelClustering {
  std::vector<std::int32_t> permutation;
  std::vector<std::int32_t> boundaries;

  /// A non-owning view; valid while this object lives unchanged.
  kvq::ChannelGroups view() const noexcept {
    return {{permutation.data(), permutation.size()}, {boundaries.data(), boundaries.size()}};
  }
  /// Number of groups (0 for a default-constructed object).
  index_t groups() const noexcept {
    return boundaries.empty() ? 0 : static_cast<index_t>(boundaries.size()) - 1;
  }
};

namespace detail {

/// Validates the shape of a layer row; returns width = num_heads * head_dim.
inline index_t check_row_shape(const char* where, index_t num_heads, index_t head_dim,
                               index_t group_size) {
  if (num_heads <= 0) kvq::detail::throw_argument_error(where, "num_heads", num_heads, "num_heads > 0");
  if (head_dim <= 0) kvq::detail::throw_argument_error(where, "head_dim", head_dim, "head_dim > 0");
  if (group_size <= 0) {
    kvq::detail::throw_argument_error(where, "group_size", group_size, "group_size > 0 (channels per group)");
  }
  if (num_heads > kMaxPermutedChannels || head_dim > kMaxPermutedChannels ||
      num_heads * head_dim > kMaxPermutedChannels) {
    kvq::detail::throw_argument_error(where, "num_heads * head_dim",
                                      kvq::detail::concat(num_heads, " * ", head_dim),
                                      kvq::detail::concat("at most ", kMaxPermutedChannels,
                                                          " channels in a layer row"));
  }
  return num_heads * head_dim;
}

/// max(1, round(length / group_size)), rounding half up.
inline index_t rounded_group_count(index_t length, index_t group_size) noexcept {
  const index_t count = (length + group_size / 2) / group_size;
  return count < 1 ? 1 : count;
}

/// Checks channel_min/max [width]: non-null, finite, min <= max; throws naming the channel.
inline void check_channel_ranges(const char* where, const float* channel_min, const float* channel_max,
                                 index_t width) {
  if (channel_min == nullptr) {
    kvq::detail::throw_argument_error(where, "channel_min", "a null pointer",
                                      kvq::detail::concat("an array of ", width, " channel minima"));
  }
  if (channel_max == nullptr) {
    kvq::detail::throw_argument_error(where, "channel_max", "a null pointer",
                                      kvq::detail::concat("an array of ", width, " channel maxima"));
  }
  for (index_t c = 0; c < width; ++c) {
    const float lo = channel_min[c];
    const float hi = channel_max[c];
    if (!std::isfinite(lo)) {
      kvq::detail::throw_argument_error(where, "channel_min", kvq::detail::concat("channel ", c, " = ", lo),
                                        "finite channel minima", Status::kNonFiniteInput);
    }
    if (!std::isfinite(hi)) {
      kvq::detail::throw_argument_error(where, "channel_max", kvq::detail::concat("channel ", c, " = ", hi),
                                        "finite channel maxima", Status::kNonFiniteInput);
    }
    if (lo > hi) {
      kvq::detail::throw_argument_error(where, "channel_max",
                                        kvq::detail::concat("channel ", c, ": min ", lo, " > max ", hi),
                                        "channel_min[c] <= channel_max[c] for every channel");
    }
  }
}

/// Clusters channels [first, first + count) into k groups and appends them, cluster by cluster,
/// to `permutation` and `boundaries` (which already ends with the current position). Clusters
/// are ordered by center (ascending max, then min, then lowest channel); channels inside a
/// cluster by ascending index.
inline void append_clusters(const float* channel_min, const float* channel_max, index_t first,
                            index_t count, index_t k, const KMeansOptions& options,
                            std::vector<std::int32_t>& permutation, std::vector<std::int32_t>& boundaries) {
  const std::size_t n = static_cast<std::size_t>(count);
  std::vector<std::array<double, 2>> points(n);
  for (std::size_t i = 0; i < n; ++i) {
    const index_t c = first + static_cast<index_t>(i);
    points[i] = {static_cast<double>(channel_min[c]), static_cast<double>(channel_max[c])};
  }
  const KMeansResult result = kmeans_2d(points, static_cast<int>(k), options);
  const std::size_t clusters = result.centers.size();
  std::vector<std::size_t> lowest(clusters, n);  // lowest member of each cluster
  for (std::size_t i = n; i-- > 0;) lowest[static_cast<std::size_t>(result.labels[i])] = i;
  std::vector<std::size_t> order(clusters);
  for (std::size_t j = 0; j < clusters; ++j) order[j] = j;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const auto& ca = result.centers[a];
    const auto& cb = result.centers[b];
    if (ca[1] != cb[1]) return ca[1] < cb[1];
    if (ca[0] != cb[0]) return ca[0] < cb[0];
    return lowest[a] < lowest[b];
  });
  std::vector<std::size_t> rank(clusters);
  for (std::size_t r = 0; r < clusters; ++r) rank[order[r]] = r;
  // Counting sort by cluster rank keeps ascending channel order inside each cluster.
  std::vector<std::size_t> start(clusters + 1, 0);
  for (std::size_t i = 0; i < n; ++i) ++start[rank[static_cast<std::size_t>(result.labels[i])] + 1];
  for (std::size_t r = 0; r < clusters; ++r) start[r + 1] += start[r];
  const std::size_t base = permutation.size();
  permutation.resize(base + n);
  std::vector<std::size_t> next(start.begin(), start.end() - 1);
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t r = rank[static_cast<std::size_t>(result.labels[i])];
    permutation[base + next[r]++] = static_cast<std::int32_t>(first + static_cast<index_t>(i));
  }
  for (std::size_t r = 1; r <= clusters; ++r) boundaries.push_back(static_cast<std::int32_t>(base + start[r]));
}

}  // namespace detail

/// Number of channel groups of a layer row (num_heads * head_dim channels) for a target average
/// group size, rounding half up:
///   kNone, kCrossHead: max(1, round(width / group_size)) = max(1, (width + group_size/2) / group_size)
///     (the cache's group count for SKVQ streams);
///   kWithinHead: num_heads * max(1, round(head_dim / group_size)).
/// E.g. 3 x 64 channels: G 128 -> 2 (within-head 3), G 64 -> 3, G 32 -> 6 (within-head 6).
/// Throws unless num_heads, head_dim, group_size > 0 and width <= kMaxPermutedChannels.
inline index_t reorder_group_count(index_t num_heads, index_t head_dim, index_t group_size,
                                   ReorderScope scope) {
  constexpr const char* where = "kvq::calib::reorder_group_count";
  const index_t width = detail::check_row_shape(where, num_heads, head_dim, group_size);
  switch (scope) {
    case ReorderScope::kNone:
    case ReorderScope::kCrossHead: return detail::rounded_group_count(width, group_size);
    case ReorderScope::kWithinHead: return num_heads * detail::rounded_group_count(head_dim, group_size);
  }
  kvq::detail::throw_argument_error(where, "scope", static_cast<int>(scope),
                                    "ReorderScope::kNone, kCrossHead or kWithinHead");
}

/// SKVQ channel groups of one layer row (width = num_heads * head_dim channels, head h owning
/// channels [h * head_dim, (h + 1) * head_dim)) from its calibration ranges, with
/// reorder_group_count(num_heads, head_dim, group_size, scope) groups:
///   kNone: identity permutation, equal groups: boundary g = g * width / groups (integer
///     division; sizes differ by at most one), the rule the cache uses for uncalibrated SKVQ.
///   kCrossHead: kmeans_2d over the points (channel_min[c], channel_max[c]) of all width
///     channels; clusters may mix heads (the official method).
///   kWithinHead: kmeans_2d separately over each head's channels, every head with the same
///     options; positions [h * head_dim, (h + 1) * head_dim) hold exactly head h's channels and
///     no group crosses a head boundary.
/// Inside a k-means block, clusters are laid out by ascending center max, then center min (then
/// lowest channel), channels inside a cluster by ascending index; the result therefore depends
/// only on the partition k-means found. Group sizes vary (average about group_size); every group
/// is non-empty (k <= channels always holds).
/// channel_min, channel_max: [width], finite, channel_min[c] <= channel_max[c] (units of the
/// activations: running min/max over the calibration tokens, pre-RoPE keys or values).
/// Throws kvq::Error naming the argument (and the channel for bad ranges).
inline ChannelClustering reorder_channels(const float* channel_min, const float* channel_max,
                                          index_t num_heads, index_t head_dim, index_t group_size,
                                          ReorderScope scope, const KMeansOptions& options = {}) {
  constexpr const char* where = "kvq::calib::reorder_channels";
  const index_t width = detail::check_row_shape(where, num_heads, head_dim, group_size);
  if (scope != ReorderScope::kNone && scope != ReorderScope::kCrossHead &&
      scope != ReorderScope::kWithinHead) {
    kvq::detail::throw_argument_error(where, "scope", static_cast<int>(scope),
                                      "ReorderScope::kNone, kCrossHead or kWithinHead");
  }
  detail::check_channel_ranges(where, channel_min, channel_max, width);
  const index_t groups = reorder_group_count(num_heads, head_dim, group_size, scope);
  ChannelClustering out;
  out.permutation.reserve(static_cast<std::size_t>(width));
  out.boundaries.reserve(static_cast<std::size_t>(groups) + 1);
  if (scope == ReorderScope::kNone) {
    for (index_t c = 0; c < width; ++c) out.permutation.push_back(static_cast<std::int32_t>(c));
    for (index_t g = 0; g <= groups; ++g) out.boundaries.push_back(static_cast<std::int32_t>(g * width / groups));
    return out;
  }
  out.boundaries.push_back(0);
  if (scope == ReorderScope::kCrossHead) {
    detail::append_clusters(channel_min, channel_max, 0, width, groups, options, out.permutation,
                            out.boundaries);
  } else {
    const index_t per_head = groups / num_heads;
    for (index_t h = 0; h < num_heads; ++h) {
      detail::append_clusters(channel_min, channel_max, h * head_dim, head_dim, per_head, options,
                              out.permutation, out.boundaries);
    }
  }
  return out;
}

/// Total range cost of a grouping: the sum over channels c of the range of c's group, where
/// range(g) = max_{c in g} channel_max[c] - min_{c in g} channel_min[c]; i.e. the sum over
/// groups of size * range. The quantity reordering lowers: the quantization step of every
/// element of a group is proportional to its group's range. Same units as the ranges.
/// groups must satisfy kvq::detail::check_channel_groups for width = permutation size;
/// channel_min/max: [width], finite, min <= max. Throws kvq::Error otherwise.
inline double grouping_range_cost(const float* channel_min, const float* channel_max,
                                  const kvq::ChannelGroups& groups) {
  constexpr const char* where = "kvq::calib::grouping_range_cost";
  const index_t width = static_cast<index_t>(groups.permutation.size());
  kvq::detail::check_channel_groups(where, groups, width);
  detail::check_channel_ranges(where, channel_min, channel_max, width);
  double cost = 0.0;
  for (std::size_t g = 0; g + 1 < groups.boundaries.size(); ++g) {
    const std::size_t begin = static_cast<std::size_t>(groups.boundaries[g]);
    const std::size_t end = static_cast<std::size_t>(groups.boundaries[g + 1]);
    double lo = std::numeric_limits<double>::infinity();
    double hi = -std::numeric_limits<double>::infinity();
    for (std::size_t p = begin; p < end; ++p) {
      const std::int32_t c = groups.permutation[p];
      lo = std::min(lo, static_cast<double>(channel_min[c]));
      hi = std::max(hi, static_cast<double>(channel_max[c]));
    }
    cost = std::fma(static_cast<double>(end - begin), hi - lo, cost);
  }
  return cost;
}

}  // namespace kvq::calib
