// SPDX-License-Identifier: Apache-2.0
// calib/latent_factors.hpp: ActivationStats against a direct computation (streamed in chunks,
// merged, strided); the three factor methods against their optimality properties on random
// weights and anisotropic activations with outlier channels (refit has the smallest activation
// error, SVD the smallest weight error); exact reconstruction when the rank suffices; SVD equal
// to an independent SVD; ASVD equal to SVD under constant activations; the latents equal to CSKV's
// x·A for SVD and ASVD; the documented latent scale of the refit (RMS of channel i = sqrt(s_i));
// bad input errors.
#include <Eigen/Dense>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "kvq/calib/latent_factors.hpp"
#include "kvq/core/random.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::index_t;
using kvq::calib::ActivationStats;
using kvq::calib::FactorMethod;
using kvq::calib::LowRankFactor;
using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// What rounding the factors to float can move a relative error by (observed: <= 5e-8).
constexpr double kRoundingFloor = 5e-7;

/// The largest error that the optimal method may show when another method shows `other`:
/// 1e-9 relative slack; the cut of directions with s_i <= 1e-6 · s_1 (each dropped direction
/// adds at most (1e-6)^2 to the squared relative error, and at most `rank` are dropped); and
/// kRoundingFloor for the float factors.
double optimum_bound(double other, index_t rank) {
  const double slack = other * (1 + 1e-9);
  return std::sqrt(slack * slack + static_cast<double>(rank) * 1e-12) + kRoundingFloor;
}

constexpr FactorMethod kMethods[] = {FactorMethod::kSvd, FactorMethod::kAsvd, FactorMethod::kRefit};

index_t pick(kvq::Rng& rng, index_t lo, index_t hi) {  // uniform in [lo, hi]
  return lo + static_cast<index_t>(rng.below(static_cast<std::uint32_t>(hi - lo + 1)));
}

std::size_t sz(index_t n) { return static_cast<std::size_t>(n); }

Mat to_mat(const std::vector<float>& v, index_t rows, index_t cols, index_t stride = -1) {
  if (stride < 0) stride = cols;
  Mat m(rows, cols);
  for (index_t r = 0; r < rows; ++r) {
    for (index_t c = 0; c < cols; ++c) m(r, c) = v[sz(r * stride + c)];
  }
  return m;
}

std::vector<float> random_weight(kvq::Rng& rng, index_t hidden, index_t width) {
  std::vector<float> w(sz(hidden * width));
  for (float& x : w) x = rng.normal() * 0.1f;
  return w;
}

/// Activations [n, dim] (row stride `stride`, padding filled with NaN that must never be read):
/// per-channel scales log-uniform over e^±1.5, per-channel offsets, two shared factors (so that
/// X^T X is far from diagonal) and, if `outliers`, 1..3 channels scaled by 8..30.
std::vector<float> random_activations(kvq::Rng& rng, index_t n, index_t dim, index_t stride, bool outliers) {
  std::vector<double> scale(sz(dim)), offset(sz(dim)), load1(sz(dim)), load2(sz(dim));
  for (index_t i = 0; i < dim; ++i) {
    scale[sz(i)] = std::exp(rng.uniform(-1.5f, 1.5f));
    offset[sz(i)] = 0.5 * rng.normal();
    load1[sz(i)] = rng.normal();
    load2[sz(i)] = 0.5 * rng.normal();
  }
  if (outliers) {
    const index_t count = pick(rng, 1, std::min<index_t>(3, dim));
    for (index_t k = 0; k < count; ++k) scale[sz(pick(rng, 0, dim - 1))] *= rng.uniform(8.0f, 30.0f);
  }
  std::vector<float> x(sz(n * stride), std::numeric_limits<float>::quiet_NaN());
  for (index_t r = 0; r < n; ++r) {
    const double f1 = rng.normal(), f2 = rng.normal();
    for (index_t i = 0; i < dim; ++i) {
      const double v = rng.normal() + offset[sz(i)] + load1[sz(i)] * f1 + load2[sz(i)] * f2;
      x[sz(r * stride + i)] = static_cast<float>(scale[sz(i)] * v);
    }
  }
  return x;
}

ActivationStats stats_of(const std::vector<float>& x, index_t n, index_t dim) {
  ActivationStats s(dim);
  s.add_rows(x.data(), n, dim);
  return s;
}

/// A · B [width, width] of a factor, in double.
Mat projector(const LowRankFactor& f) {
  return to_mat(f.down, f.width, f.rank) * to_mat(f.up, f.rank, f.width);
}

double max_abs(const Mat& m) { return m.cwiseAbs().maxCoeff(); }

double max_rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0, mag = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    mag = std::max(mag, std::abs(b[i]));
  }
  return mag > 0 ? diff / mag : diff;
}

/// Whether a latent column c (c_r = k_r · a, a rounded to float) equals ref up to sign and the
/// float rounding of a: |c_r ∓ ref_r| <= 1e-6 · ||k_r|| · ||a|| for every row r.
bool latent_matches(const Eigen::VectorXd& c, const Eigen::VectorXd& ref, const Mat& k, const Eigen::VectorXd& a) {
  const double sign = ref.dot(c) < 0 ? -1.0 : 1.0;
  for (Eigen::Index r = 0; r < c.size(); ++r) {
    const double bound = 1e-6 * k.row(r).norm() * a.norm();
    if (!(std::abs(c(r) - sign * ref(r)) <= bound)) {
      std::fprintf(stderr, "latent row %lld: %.9g vs %.9g (bound %.3g)\n", static_cast<long long>(r), c(r),
                   sign * ref(r), bound);
      return false;
    }
  }
  return true;
}

/// The kvq::Error status thrown by f (kOk if none).
template <class F>
kvq::Status status_of(F&& f) {
  try {
    f();
  } catch (const kvq::Error& e) {
    return e.status();
  }
  return kvq::Status::kOk;
}

}  // namespace

TEST_CASE("ActivationStats: chunked, merged and strided streaming equal a direct computation", "[calib][latent_factors]") {
  for (std::uint64_t index = 0; index < 24; ++index) {
    const std::uint64_t seed = kvq_test::case_seed("activation_stats", index);
    kvq::Rng rng(seed);
    const index_t dim = pick(rng, 1, 40);
    const index_t n = pick(rng, 1, index % 4 == 0 ? 700 : 80);  // some cross the 256-row blocks
    const index_t stride = dim + pick(rng, 0, 3);
    INFO("seed " << seed << ", dim " << dim << ", n " << n << ", stride " << stride);
    const std::vector<float> x = random_activations(rng, n, dim, stride, rng.below(2) == 1);

    // Direct computation in long double.
    std::vector<double> mean(sz(dim)), second(sz(dim * dim));
    for (index_t i = 0; i < dim; ++i) {
      long double s = 0;
      for (index_t r = 0; r < n; ++r) s += std::abs(static_cast<long double>(x[sz(r * stride + i)]));
      mean[sz(i)] = static_cast<double>(s / static_cast<long double>(n));
      for (index_t j = 0; j < dim; ++j) {
        long double p = 0;
        for (index_t r = 0; r < n; ++r) {
          p += static_cast<long double>(x[sz(r * stride + i)]) * static_cast<long double>(x[sz(r * stride + j)]);
        }
        second[sz(i * dim + j)] = static_cast<double>(p);
      }
    }

    ActivationStats whole(dim);
    whole.add_rows(x.data(), n, stride);
    REQUIRE(whole.dim() == dim);
    REQUIRE(whole.count() == n);
    REQUIRE(whole.sum_abs().size() == sz(dim));
    REQUIRE(whole.second_moment().size() == sz(dim * dim));
    CHECK(max_rel_diff(whole.mean_abs(), mean) <= 1e-12);
    CHECK(max_rel_diff(whole.second_moment(), second) <= 1e-12);
    bool symmetric = true;
    for (index_t i = 0; i < dim; ++i) {
      for (index_t j = 0; j < dim; ++j) {
        symmetric = symmetric && whole.second_moment()[sz(i * dim + j)] == whole.second_moment()[sz(j * dim + i)];
      }
    }
    CHECK(symmetric);

    // Chunks of random sizes (zero-row chunks included, x null for them).
    ActivationStats chunked(dim);
    for (index_t r = 0; r < n;) {
      const index_t m = std::min(n - r, pick(rng, 0, 40));
      chunked.add_rows(m == 0 ? nullptr : x.data() + r * stride, m, stride);
      r += m;
    }
    REQUIRE(chunked.count() == n);
    CHECK(max_rel_diff(chunked.sum_abs(), whole.sum_abs()) <= 1e-12);
    CHECK(max_rel_diff(chunked.second_moment(), whole.second_moment()) <= 1e-12);

    // Merge of two halves equals sequential adds; merging empty statistics changes nothing.
    const index_t split = pick(rng, 0, n);
    ActivationStats first(dim), second_half(dim), sequential(dim);
    first.add_rows(x.data(), split, stride);
    second_half.add_rows(x.data() + split * stride, n - split, stride);
    sequential.add_rows(x.data(), split, stride);
    sequential.add_rows(x.data() + split * stride, n - split, stride);
    first.merge(second_half);
    first.merge(ActivationStats(dim));
    REQUIRE(first.count() == n);
    CHECK(max_rel_diff(first.sum_abs(), sequential.sum_abs()) <= 1e-12);
    CHECK(max_rel_diff(first.second_moment(), sequential.second_moment()) <= 1e-12);
    CHECK(max_rel_diff(first.second_moment(), whole.second_moment()) <= 1e-12);
  }
  const ActivationStats empty(5);
  CHECK(empty.count() == 0);
  CHECK(empty.mean_abs() == std::vector<double>(5, 0.0));
}

TEST_CASE("low_rank_factor: refit minimises the activation error, SVD the weight error", "[calib][latent_factors]") {
  const bool verbose = std::getenv("KVQ_TEST_VERBOSE") != nullptr;
  std::vector<double> ratio_svd, ratio_asvd, weight_ratio_asvd, weight_ratio_refit;
  for (std::uint64_t index = 0; index < 80; ++index) {
    const std::uint64_t seed = kvq_test::case_seed("factor_optimality", index);
    kvq::Rng rng(seed);
    const index_t hidden = pick(rng, 2, 40);
    const index_t width = pick(rng, 2, 40);
    const index_t rank = pick(rng, 1, width);
    // Mostly n >= hidden; some cases with fewer rows than channels (rank-deficient X).
    const index_t n = index % 5 == 0 ? pick(rng, 1, hidden) : pick(rng, hidden, 4 * hidden + 20);
    INFO("seed " << seed << ", hidden " << hidden << ", width " << width << ", rank " << rank << ", n " << n);
    const std::vector<float> w = random_weight(rng, hidden, width);
    const std::vector<float> x = random_activations(rng, n, hidden, hidden, true);
    const ActivationStats stats = stats_of(x, n, hidden);

    kvq::calib::FactorError err[3];
    for (int m = 0; m < 3; ++m) {
      const LowRankFactor f = kvq::calib::low_rank_factor(w.data(), hidden, width, rank, kMethods[m], &stats);
      REQUIRE(f.width == width);
      REQUIRE(f.rank == rank);
      REQUIRE(f.down.size() == sz(width * rank));
      REQUIRE(f.up.size() == sz(rank * width));
      REQUIRE(kvq::calib::factor_scales(f).size() == sz(rank));
      err[m] = kvq::calib::factor_error(w.data(), hidden, width, f, &stats);
      CAPTURE(m, err[m].weight_relative, err[m].activation_relative);
      CHECK(err[m].weight_relative >= 0);
      CHECK(err[m].weight_relative <= 1.0 + 1e-9);  // a projection never increases the norm
      CHECK(err[m].activation_relative >= 0);
      CHECK(err[m].activation_relative <= 1.0 + 1e-9);
    }
    const auto& svd = err[0];
    const auto& asvd = err[1];
    const auto& refit = err[2];
    CAPTURE(svd.activation_relative, asvd.activation_relative, refit.activation_relative);
    CAPTURE(svd.weight_relative, asvd.weight_relative, refit.weight_relative);
    CHECK(refit.activation_relative <= optimum_bound(svd.activation_relative, rank));
    CHECK(refit.activation_relative <= optimum_bound(asvd.activation_relative, rank));
    CHECK(svd.weight_relative <= optimum_bound(asvd.weight_relative, rank));
    CHECK(svd.weight_relative <= optimum_bound(refit.weight_relative, rank));
    // Typical ratios, reported with KVQ_TEST_VERBOSE: only where the rank truncates X·W.
    if (n >= hidden && rank < std::min(hidden, width)) {
      ratio_svd.push_back(svd.activation_relative / refit.activation_relative);
      ratio_asvd.push_back(asvd.activation_relative / refit.activation_relative);
      weight_ratio_asvd.push_back(asvd.weight_relative / svd.weight_relative);
      weight_ratio_refit.push_back(refit.weight_relative / svd.weight_relative);
    }
    if (verbose) {
      std::fprintf(stderr, "h %2lld w %2lld r %2lld n %3lld | act svd %.4f asvd %.4f refit %.4f | weight svd %.4f asvd %.4f refit %.4f\n",
                   static_cast<long long>(hidden), static_cast<long long>(width), static_cast<long long>(rank),
                   static_cast<long long>(n), svd.activation_relative, asvd.activation_relative,
                   refit.activation_relative, svd.weight_relative, asvd.weight_relative, refit.weight_relative);
    }
  }
  if (verbose && !ratio_svd.empty()) {
    const auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    const auto minimum = [](const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); };
    std::fprintf(stderr,
                 "%zu truncating cases: activation error / refit's: svd median %.3f (min %.3f), asvd median %.3f (min %.3f); "
                 "weight error / svd's: asvd median %.4f (min %.6f), refit median %.4f (min %.6f)\n",
                 ratio_svd.size(), median(ratio_svd), minimum(ratio_svd), median(ratio_asvd), minimum(ratio_asvd),
                 median(weight_ratio_asvd), minimum(weight_ratio_asvd), median(weight_ratio_refit),
                 minimum(weight_ratio_refit));
  }
}

TEST_CASE("low_rank_factor: exact when the rank covers W", "[calib][latent_factors]") {
  for (std::uint64_t index = 0; index < 24; ++index) {
    const std::uint64_t seed = kvq_test::case_seed("factor_exact", index);
    kvq::Rng rng(seed);
    const bool low_rank_weight = index % 2 == 1;
    const index_t hidden = pick(rng, 2, 36);
    const index_t width = pick(rng, 2, 36);
    const index_t n = pick(rng, hidden, 3 * hidden + 10);  // full-rank X: refit sees all of W
    std::vector<float> w;
    index_t rank = width;
    if (low_rank_weight) {  // W = P Q with inner size q <= rank < width (when width > 1)
      rank = pick(rng, 1, width);
      const index_t q = pick(rng, 1, rank);
      const Mat p = to_mat(random_weight(rng, hidden, q), hidden, q);
      const Mat qm = to_mat(random_weight(rng, q, width), q, width);
      const Mat pq = p * qm;
      for (index_t r = 0; r < hidden; ++r) {
        for (index_t c = 0; c < width; ++c) w.push_back(static_cast<float>(pq(r, c)));
      }
    } else {
      w = random_weight(rng, hidden, width);
    }
    INFO("seed " << seed << ", hidden " << hidden << ", width " << width << ", rank " << rank << ", n " << n);
    const std::vector<float> x = random_activations(rng, n, hidden, hidden, false);
    const ActivationStats stats = stats_of(x, n, hidden);
    const Mat wm = to_mat(w, hidden, width);
    for (const FactorMethod method : kMethods) {
      CAPTURE(kvq::calib::factor_method_label(method));
      const LowRankFactor f = kvq::calib::low_rank_factor(w.data(), hidden, width, rank, method, &stats);
      const double rel = max_abs(wm * projector(f) - wm) / max_abs(wm);
      CAPTURE(rel);
      CHECK(rel <= 1e-6);
      const kvq::calib::FactorError e = kvq::calib::factor_error(w.data(), hidden, width, f, &stats);
      CHECK(e.weight_relative <= 1e-6);
      CHECK(e.activation_relative <= 1e-6);
      // Deterministic: the same call gives the same bits.
      const LowRankFactor again = kvq::calib::low_rank_factor(w.data(), hidden, width, rank, method, &stats);
      CHECK(again.down == f.down);
      CHECK(again.up == f.up);
    }
  }
}

TEST_CASE("low_rank_factor: SVD projects onto the top right singular vectors of W, and its latent is CSKV's x·U_r S_r^(1/2)", "[calib][latent_factors]") {
  for (std::uint64_t index = 0; index < 16; ++index) {
    const std::uint64_t seed = kvq_test::case_seed("factor_svd", index);
    kvq::Rng rng(seed);
    const index_t hidden = pick(rng, 2, 40);
    const index_t width = pick(rng, 2, 40);
    const index_t rank = pick(rng, 1, width);
    INFO("seed " << seed << ", hidden " << hidden << ", width " << width << ", rank " << rank);
    const std::vector<float> wk = random_weight(rng, hidden, width);
    const LowRankFactor f = kvq::calib::low_rank_factor(wk.data(), hidden, width, rank, FactorMethod::kSvd, nullptr);
    const std::vector<double> scales = kvq::calib::factor_scales(f);
    // A·B = V_r V_r^T with V_r from an independent (Jacobi) SVD of W.
    const Mat wm = to_mat(wk, hidden, width);
    Eigen::JacobiSVD<Mat> svd(wm, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const index_t kept = std::min<index_t>(rank, svd.singularValues().size());
    const Mat v = svd.matrixV().leftCols(kept);
    CHECK(max_abs(projector(f) - v * v.transpose()) <= 1e-5);

    // c = k·A equals x·U_r S_r^(1/2) for k = x·W, column by column up to sign.
    const Mat xs = to_mat(random_activations(rng, 8, hidden, hidden, false), 8, hidden);
    const Mat k = xs * wm;
    const Mat a = to_mat(f.down, width, rank);
    const Mat c = k * a;
    for (index_t i = 0; i < kept; ++i) {
      const double si = svd.singularValues()(i);
      CHECK(std::abs(scales[sz(i)] - si) <= 1e-6 * si);  // float factors
      const Eigen::VectorXd ref = xs * svd.matrixU().col(i) * std::sqrt(si);
      CHECK(latent_matches(c.col(i), ref, k, a.col(i)));
    }
    for (index_t i = kept; i < rank; ++i) CHECK(scales[sz(i)] == 0.0);
  }
}

TEST_CASE("low_rank_factor: ASVD is SVD under constant activations or alpha 0, and its latent is CSKV's x·A", "[calib][latent_factors]") {
  for (std::uint64_t index = 0; index < 16; ++index) {
    const std::uint64_t seed = kvq_test::case_seed("factor_asvd", index);
    kvq::Rng rng(seed);
    const index_t hidden = pick(rng, 2, 40);
    const index_t width = pick(rng, 2, 40);
    const index_t rank = pick(rng, 1, width);
    const index_t n = pick(rng, 1, 60);
    INFO("seed " << seed << ", hidden " << hidden << ", width " << width << ", rank " << rank << ", n " << n);
    const std::vector<float> w = random_weight(rng, hidden, width);
    const Mat wm = to_mat(w, hidden, width);
    const LowRankFactor svd = kvq::calib::low_rank_factor(w.data(), hidden, width, rank, FactorMethod::kSvd, nullptr);
    const Mat w_svd = wm * projector(svd);

    // |x_i| = 0.37 everywhere (random signs): S = 0.37^alpha · I.
    std::vector<float> constant(sz(n * hidden));
    for (float& v : constant) v = rng.below(2) == 1 ? 0.37f : -0.37f;
    const ActivationStats flat = stats_of(constant, n, hidden);
    const LowRankFactor asvd = kvq::calib::low_rank_factor(w.data(), hidden, width, rank, FactorMethod::kAsvd, &flat);
    CHECK(max_abs(wm * projector(asvd) - w_svd) <= 1e-6 * max_abs(wm));

    // alpha = 0: S = I exactly, so the factors are the SVD's bit for bit.
    const std::vector<float> x = random_activations(rng, n, hidden, hidden, true);
    const ActivationStats stats = stats_of(x, n, hidden);
    const LowRankFactor alpha0 = kvq::calib::low_rank_factor(w.data(), hidden, width, rank, FactorMethod::kAsvd, &stats, 0.0);
    CHECK(alpha0.down == svd.down);
    CHECK(alpha0.up == svd.up);

    // Latent equals CSKV's x · A_cskv = x · S^(-1) U_r Σ_r^(1/2) with S·W = U Σ V^T (alpha 0.5).
    const LowRankFactor f = kvq::calib::low_rank_factor(w.data(), hidden, width, rank, FactorMethod::kAsvd, &stats);
    const std::vector<double> scales = kvq::calib::factor_scales(f);
    const std::vector<double> m = stats.mean_abs();
    Eigen::VectorXd sdiag(hidden);
    for (index_t i = 0; i < hidden; ++i) sdiag(i) = std::sqrt(m[sz(i)]);
    const Mat sw = sdiag.asDiagonal() * wm;
    Eigen::JacobiSVD<Mat> sv(sw, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const index_t kept = std::min<index_t>(rank, sv.singularValues().size());
    const Mat xs = to_mat(x, n, hidden);
    const Mat k = xs * wm;
    const Mat a = to_mat(f.down, width, rank);
    const Mat c = k * a;
    for (index_t i = 0; i < kept; ++i) {
      const double si = sv.singularValues()(i);
      CHECK(std::abs(scales[sz(i)] - si) <= 1e-6 * si);  // float factors
      const Eigen::VectorXd a_cskv = sdiag.cwiseInverse().asDiagonal() * sv.matrixU().col(i) * std::sqrt(si);
      const Eigen::VectorXd ref = xs * a_cskv;
      CHECK(latent_matches(c.col(i), ref, k, a.col(i)));
    }
  }
}

TEST_CASE("low_rank_factor: refit latent channel i has RMS sqrt(s_i) over the calibration rows, uncorrelated", "[calib][latent_factors]") {
  for (std::uint64_t index = 0; index < 16; ++index) {
    const std::uint64_t seed = kvq_test::case_seed("factor_scale", index);
    kvq::Rng rng(seed);
    const index_t hidden = pick(rng, 2, 40);
    const index_t width = pick(rng, 2, 40);
    const index_t rank = pick(rng, 1, width);
    const index_t n = pick(rng, 1, 4 * hidden + 20);
    INFO("seed " << seed << ", hidden " << hidden << ", width " << width << ", rank " << rank << ", n " << n);
    const std::vector<float> w = random_weight(rng, hidden, width);
    const std::vector<float> x = random_activations(rng, n, hidden, hidden, true);
    const ActivationStats stats = stats_of(x, n, hidden);
    const LowRankFactor f = kvq::calib::low_rank_factor(w.data(), hidden, width, rank, FactorMethod::kRefit, &stats);
    const std::vector<double> scales = kvq::calib::factor_scales(f);

    const Mat xw = to_mat(x, n, hidden) * to_mat(w, hidden, width);
    Eigen::JacobiSVD<Mat> svd(xw / std::sqrt(static_cast<double>(n)));
    const Eigen::VectorXd& s = svd.singularValues();
    const Mat c = xw * to_mat(f.down, width, rank);           // latents of the calibration rows
    const Mat gram = c.transpose() * c / static_cast<double>(n);  // [rank, rank]
    for (index_t i = 0; i < rank; ++i) {
      const double si = i < s.size() ? s(i) : 0.0;
      CAPTURE(i, si, scales[sz(i)]);
      if (scales[sz(i)] == 0.0) {  // beyond the numerical rank (s_i <= 1e-6 s_1): dropped
        CHECK(si <= 1.01e-6 * s(0));
        CHECK(c.col(i).cwiseAbs().maxCoeff() == 0.0);
        continue;
      }
      CHECK(si >= 0.99e-6 * s(0));
      // s_i (float factors: 2^-24 relative; the squared condition of W^T C W: ~1e-16 (s_1/s_i)²
      // relative) and the RMS of channel i = sqrt(s_i), up to also the float rounding δ of A
      // (||G^(1/2) δ_i|| <= s_1 ε ||a_i|| = s_1 ε / sqrt(s_i), relative to sqrt(s_i): ε s_1 / s_i).
      const double spread = s(0) / si;
      CHECK(std::abs(scales[sz(i)] - si) <= si * (1e-6 + 1e-13 * spread * spread));
      const double rms = std::sqrt(gram(i, i));
      CHECK(std::abs(rms - std::sqrt(si)) <= std::sqrt(si) * (1e-6 + 3e-7 * spread + 1e-13 * spread * spread));
      // Uncorrelated up to (1) the float rounding δ of A: gram(i, j) ≈ δ_i^T G a_j + a_i^T G δ_j
      // with G = W^T C W / n = V diag(s²) V^T, so |gram(i, j)| / sqrt(s_i s_j) <= ε (s_i/s_j +
      // s_j/s_i); (2) the eigenvectors being exact for G + E, ||E|| ~ u·s_1² (double rounding of
      // the squared matrix): |v_i^T G v_j| <= ||E||, i.e. u s_1² / (s_i s_j) relative.
      for (index_t j = 0; j < i; ++j) {
        const double sj = scales[sz(j)];
        if (sj == 0.0) continue;
        CAPTURE(j, sj, s(0), gram(i, j));
        const double bound = 1e-6 * (si / sj + sj / si) + 1e-14 * s(0) * s(0) / (si * sj);
        CHECK(std::abs(gram(i, j)) <= bound * std::sqrt(gram(i, i) * gram(j, j)));
      }
    }
  }
}

TEST_CASE("factor methods: labels round-trip, bad inputs are reported", "[calib][latent_factors]") {
  for (const FactorMethod m : kMethods) {
    CHECK(kvq::calib::parse_factor_method(kvq::calib::factor_method_label(m)) == m);
  }
  CHECK(kvq::calib::factor_method_label(FactorMethod::kRefit) == "refit");
  REQUIRE_THROWS_WITH(kvq::calib::parse_factor_method("pca"),
                      KVQ_CONTAINS("kvq::calib::parse_factor_method: argument 'factors' = 'pca'; expected one of svd, asvd, refit"));
  REQUIRE_THROWS_WITH(kvq::calib::parse_factor_method("SVD", "--key-factors"), KVQ_CONTAINS("argument '--key-factors' = 'SVD'"));

  kvq::Rng rng(kvq_test::case_seed("factor_errors", 0));
  const index_t hidden = 12, width = 8;
  std::vector<float> w = random_weight(rng, hidden, width);
  const std::vector<float> x = random_activations(rng, 20, hidden, hidden, true);
  const ActivationStats stats = stats_of(x, 20, hidden);
  const ActivationStats wrong_dim = stats_of(x, 10, 18);  // x holds 240 floats
  const ActivationStats empty(hidden);
  using kvq::calib::low_rank_factor;

  REQUIRE_THROWS_WITH(low_rank_factor(w.data(), hidden, width, 0, FactorMethod::kSvd, nullptr),
                      KVQ_CONTAINS("kvq::calib::low_rank_factor: argument 'rank' = 0; expected a rank in 1..8"));
  REQUIRE_THROWS_WITH(low_rank_factor(w.data(), hidden, width, 9, FactorMethod::kRefit, &stats),
                      KVQ_CONTAINS("argument 'rank' = 9; expected a rank in 1..8"));
  REQUIRE_THROWS_WITH(low_rank_factor(w.data(), 0, width, 2, FactorMethod::kSvd, nullptr),
                      KVQ_CONTAINS("argument 'hidden' = 0; expected hidden > 0"));
  REQUIRE_THROWS_WITH(low_rank_factor(w.data(), hidden, width, 2, FactorMethod::kRefit, nullptr),
                      KVQ_CONTAINS("argument 'stats' = 'null'; expected activation statistics (required by refit)"));
  REQUIRE_THROWS_WITH(low_rank_factor(w.data(), hidden, width, 2, FactorMethod::kAsvd, nullptr),
                      KVQ_CONTAINS("(required by asvd)"));
  REQUIRE_THROWS_WITH(low_rank_factor(w.data(), hidden, width, 2, FactorMethod::kRefit, &wrong_dim),
                      KVQ_CONTAINS("argument 'stats->dim()' = 18; expected the weight's hidden size (12)"));
  REQUIRE_THROWS_WITH(low_rank_factor(w.data(), hidden, width, 2, FactorMethod::kAsvd, &empty),
                      KVQ_CONTAINS("argument 'stats->count()' = 0; expected at least one calibration row"));
  REQUIRE_THROWS_WITH(low_rank_factor(w.data(), hidden, width, 2, FactorMethod::kAsvd, &stats,
                                      std::numeric_limits<double>::quiet_NaN()),
                      KVQ_CONTAINS("argument 'asvd_alpha' = nan; expected a finite exponent >= 0"));
  REQUIRE_THROWS_WITH(low_rank_factor(w.data(), hidden, width, 2, static_cast<FactorMethod>(7), nullptr),
                      KVQ_CONTAINS("argument 'method' = 7"));
  // kSvd ignores stats, even mismatched ones.
  CHECK(low_rank_factor(w.data(), hidden, width, 2, FactorMethod::kSvd, &wrong_dim).rank == 2);

  w[sz(3 * width + 5)] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_WITH(low_rank_factor(w.data(), hidden, width, 2, FactorMethod::kSvd, nullptr),
                      KVQ_CONTAINS("argument 'weight' = 'weight[3, 5] = nan'; expected finite weights"));
  CHECK(status_of([&] { low_rank_factor(w.data(), hidden, width, 2, FactorMethod::kSvd, nullptr); }) ==
        kvq::Status::kNonFiniteInput);
  w[sz(3 * width + 5)] = 0.5f;

  // factor_error.
  const LowRankFactor f = low_rank_factor(w.data(), hidden, width, 3, FactorMethod::kRefit, &stats);
  CHECK(std::isnan(kvq::calib::factor_error(w.data(), hidden, width, f, nullptr).activation_relative));
  CHECK(kvq::calib::factor_error(w.data(), hidden, width, f, nullptr).weight_relative > 0);
  REQUIRE_THROWS_WITH(kvq::calib::factor_error(w.data(), hidden, width - 1, f, nullptr),
                      KVQ_CONTAINS("kvq::calib::factor_error: argument 'factor.width' = 8; expected the weight's width (7)"));
  REQUIRE_THROWS_WITH(kvq::calib::factor_error(w.data(), hidden, width, f, &wrong_dim),
                      KVQ_CONTAINS("argument 'stats->dim()' = 18"));
  LowRankFactor broken = f;
  broken.up.pop_back();
  REQUIRE_THROWS_WITH(kvq::calib::factor_error(w.data(), hidden, width, broken, nullptr),
                      KVQ_CONTAINS("expected 24 floats each (width 8 x rank 3)"));
  REQUIRE_THROWS_WITH(kvq::calib::factor_scales(broken),
                      KVQ_CONTAINS("kvq::calib::factor_scales: argument 'factor' = 'width 8, rank 3, down of 24 and up of 23 floats'"));

  // ActivationStats.
  ActivationStats s(hidden);
  std::vector<float> rows = x;
  rows[sz(1 * hidden + 2)] = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(s.add_rows(rows.data(), 3, hidden),
                      KVQ_CONTAINS("kvq::calib::ActivationStats::add_rows: argument 'x' = 'x[1, 2] = inf'; expected finite activations"));
  CHECK(status_of([&] { s.add_rows(rows.data(), 3, hidden); }) == kvq::Status::kNonFiniteInput);
  CHECK(s.count() == 0);  // nothing was added by the failed calls
  CHECK(s.sum_abs() == std::vector<double>(sz(hidden), 0.0));
  REQUIRE_THROWS_WITH(s.add_rows(x.data(), 2, hidden - 1), KVQ_CONTAINS("argument 'stride' = 11; expected a row stride >= dim (12)"));
  REQUIRE_THROWS_WITH(s.add_rows(x.data(), -1, hidden), KVQ_CONTAINS("argument 'n' = -1"));
  REQUIRE_THROWS_WITH(s.add_rows(nullptr, 2, hidden), KVQ_CONTAINS("argument 'x' = 'null'"));
  REQUIRE_THROWS_WITH(s.merge(wrong_dim), KVQ_CONTAINS("argument 'other.dim()' = 18; expected the same dim as this (12)"));
  REQUIRE_THROWS_WITH(ActivationStats(-1), KVQ_CONTAINS("argument 'dim' = -1; expected dim >= 0"));
  ActivationStats placeholder;
  REQUIRE_THROWS_WITH(placeholder.add_rows(x.data(), 1, hidden), KVQ_CONTAINS("expected 0 rows for statistics of dim 0"));
}
