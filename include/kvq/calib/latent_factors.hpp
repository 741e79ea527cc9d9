// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief CSKV low-rank factors of one projection weight by three methods: plain SVD, ASVD (CSKV's
///        default init, ALGORITHMS.md §3.1) and an activation-aware closed-form refit; streaming
///        activation statistics that ASVD and the refit need; reconstruction errors. Host only;
///        needs Eigen.
///
/// ## Convention (k-space)
/// A layer's key row k = x · W (x [hidden], W [hidden, width], width = num_kv_heads * head_dim) is
/// stored as the latent c = k · A [rank] and reconstructed as k^ = c · B, with A [width, rank]
/// ("down") and B [rank, width] ("up"), as in kvq/transform/latent.hpp. Every method below picks
/// a rank-r orthonormal basis V_r [width, r] of a subspace of k-space and positive weights
/// s_1 >= ... >= s_r, and sets
///
///     A = V_r · diag(s)^(-1/2),   B = diag(s)^(1/2) · V_r^T,
///
/// so A · B = V_r V_r^T (k^ is the orthogonal projection of k onto the subspace) and the latent
/// c = x · W · V_r · diag(s)^(-1/2). The methods differ only in the subspace and in s:
///
/// - **kSvd** (CSKV's plain init). W = U Σ V^T; V_r = top-r right singular vectors, s = Σ_r.
///   Since W V_r = U_r Σ_r, c = x U_r Σ_r Σ_r^(-1/2) = x · (U_r Σ_r^(1/2)): CSKV's A applied to x.
/// - **kAsvd** (CSKV's default init). S = diag(m^α), m_i = mean |x_i| over the calibration rows,
///   α = asvd_alpha (0.5 in CSKV). S · W = U Σ V^T; CSKV sets A_cskv = S^(-1) U_r Σ_r^(1/2),
///   B = Σ_r^(1/2) V_r^T. From S W V_r = U_r Σ_r: S^(-1) U_r = W V_r Σ_r^(-1), so
///   x · A_cskv = x W V_r Σ_r^(-1/2) = k · A and x · A_cskv · B = x W V_r V_r^T. Hence: V_r = top-r
///   right singular vectors of S · W, s = Σ_r (of S · W, not of W). The k-space form needs no
///   S^(-1), so a channel with m_i = 0 (where CSKV would divide by zero) is harmless here: its
///   row of S · W is zero, and it carries no calibration activation anyway.
/// - **kRefit** (activation-aware closed form). Minimise ||X W − X M||_F over M [hidden, width] of
///   rank <= r, X [n, hidden] the calibration activations. X M has rank <= r, so by Eckart–Young
///   the optimum is at least ||X W − (X W)_r||_F with (X W)_r = U_r Σ_r V_r^T from X W = U Σ V^T;
///   M = W V_r V_r^T attains it (X W V_r V_r^T = U Σ V^T V_r V_r^T = U_r Σ_r V_r^T). So V_r = top-r
///   right singular vectors of X W = top-r eigenvectors of (X W)^T (X W) = W^T C W, C = X^T X
///   (ActivationStats::second_moment), and s_i = σ_i(X W) / sqrt(n) = sqrt(λ_i(W^T C W) / n), so
///   that s does not grow with n. This is the layer-wise reconstruction optimum that CSKV's
///   training (§3.3, MSE of K on calibration data, before RoPE) approximates by gradient descent.
///   Latent scale: channel i of c = x W v_i s_i^(-1/2) has RMS over the calibration rows
///   ||X W v_i|| / sqrt(n) / sqrt(s_i) = s_i / sqrt(s_i) = sqrt(s_i), and the latent channels
///   are uncorrelated over the calibration rows (v_i are eigenvectors of W^T C W).
///
/// Optimality (each in exact arithmetic): kSvd minimises ||W − W A B||_F (Eckart–Young) and kRefit
/// minimises ||X W − X W A B||_F over all rank-r factors; kAsvd is neither optimum, it weights
/// the rows of W by a diagonal activation scale instead of the full second moment.
///
/// Directions with s_i <= 1e-6 · s_1 (beyond the numerical rank) get zero columns of A and zero
/// rows of B; so do directions i >= min(hidden, width) for kSvd/kAsvd.
/// Each basis vector's sign is fixed (its entry of largest magnitude, the first one on ties, is
/// positive), so the factors are a deterministic function of the inputs.
///
/// The functions that run Eigen's decompositions and products are templates (a defaulted
/// `int` parameter) only so that they are compiled in the translation units that call them, not
/// in every one that includes this header.
#pragma once

#include <Eigen/Dense>
#include <Eigen/Eigenvalues>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "kvq/core/bits.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/status.hpp"
#include "kvq/transform/latent.hpp"

namespace kvq::calib {

namespace factors_detail {

using RowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using FloatRowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Rows of the float input converted to double per block, so that temporaries stay bounded.
constexpr index_t kRowBlock = 256;

/// W [rows, cols] row-major float as a double matrix.
template <int = 0>
RowMatrix load(const float* data, index_t rows, index_t cols) {
  return Eigen::Map<const FloatRowMatrix>(data, rows, cols).cast<double>();
}

}  // namespace factors_detail

/// Streaming statistics of the input hidden state x [dim] of a layer's k/v projections over
/// `count` calibration rows: the per-channel sum of |x_i| (for ASVD's mean |x|) and the second
/// moment C = X^T X = Σ_rows x^T x (for the refit and the activation-weighted error), both in
/// double. Memory is bounded (dim + dim·dim doubles) whatever the number of rows; add_rows costs
/// O(n · dim²), through an Eigen symmetric rank update over blocks of rows. Statistics of
/// disjoint row sets combine exactly with merge (up to summation order).
///
/// Invariants: sum_abs().size() == dim, second_moment().size() == dim · dim, second_moment() is
/// symmetric with both triangles filled, count() >= 0.
class ActivationStats {
 public:
  /// Empty statistics (count 0) of rows of `dim` channels; dim >= 0 (0 only as a placeholder:
  /// such statistics accept no rows).
  explicit ActivationStats(index_t dim = 0) : dim_(dim) {
    if (dim < 0) {
      kvq::detail::throw_argument_error("kvq::calib::ActivationStats", "dim", dim, "dim >= 0");
    }
    sum_abs_.assign(static_cast<std::size_t>(dim), 0.0);
    second_.assign(static_cast<std::size_t>(dim * dim), 0.0);
  }

  /// Adds the rows x [n, dim] (row r at x + r · stride, stride >= dim floats). n == 0 is a
  /// no-op (x may then be null). Throws kvq::Error (kNonFiniteInput) naming the first row and
  /// channel if any entry is NaN or Inf, before changing anything.
  template <int = 0>
  void add_rows(const float* x, index_t n, index_t stride) {
    constexpr const char* where = "kvq::calib::ActivationStats::add_rows";
    if (n < 0) kvq::detail::throw_argument_error(where, "n", n, "a row count >= 0");
    if (n == 0) return;
    if (dim_ == 0) {
      kvq::detail::throw_argument_error(where, "n", n, "0 rows for statistics of dim 0");
    }
    if (x == nullptr) kvq::detail::throw_argument_error(where, "x", "null", "rows [n, dim]");
    if (stride < dim_) {
      kvq::detail::throw_argument_error(where, "stride", stride,
                                        kvq::detail::concat("a row stride >= dim (", dim_, ")"));
    }
    for (index_t r = 0; r < n; ++r) {
      const float* row = x + r * stride;
      for (index_t c = 0; c < dim_; ++c) {
        if (!std::isfinite(row[c])) {
          kvq::detail::throw_argument_error(where, "x", kvq::detail::concat("x[", r, ", ", c, "] = ", row[c]),
                                            "finite activations", Status::kNonFiniteInput);
        }
      }
    }
    using factors_detail::FloatRowMatrix;
    using factors_detail::RowMatrix;
    Eigen::Map<const FloatRowMatrix, 0, Eigen::OuterStride<>> rows(x, n, dim_, Eigen::OuterStride<>(stride));
    Eigen::Map<RowMatrix> second(second_.data(), dim_, dim_);
    Eigen::Map<Eigen::VectorXd> sum_abs(sum_abs_.data(), dim_);
    for (index_t r0 = 0; r0 < n; r0 += factors_detail::kRowBlock) {
      const index_t m = std::min(factors_detail::kRowBlock, n - r0);
      const RowMatrix block = rows.middleRows(r0, m).cast<double>();
      sum_abs += block.cwiseAbs().colwise().sum().transpose();
      second.selfadjointView<Eigen::Lower>().rankUpdate(block.transpose());  // C += X_b^T X_b
    }
    fill_upper();
    count_ += n;
  }

  /// Adds the statistics of other (rows disjoint from this one's); other.dim() == dim().
  void merge(const ActivationStats& other) {
    if (other.dim_ != dim_) {
      kvq::detail::throw_argument_error("kvq::calib::ActivationStats::merge", "other.dim()", other.dim_,
                                        kvq::detail::concat("the same dim as this (", dim_, ")"));
    }
    for (std::size_t i = 0; i < sum_abs_.size(); ++i) sum_abs_[i] += other.sum_abs_[i];
    for (std::size_t i = 0; i < second_.size(); ++i) second_[i] += other.second_[i];
    count_ += other.count_;
  }

  /// Channels per row.
  index_t dim() const noexcept { return dim_; }
  /// Rows added so far.
  std::int64_t count() const noexcept { return count_; }
  /// Σ_rows |x_i| [dim].
  const std::vector<double>& sum_abs() const noexcept { return sum_abs_; }
  /// mean |x_i| = sum_abs / count [dim]; all zero while count() == 0.
  std::vector<double> mean_abs() const {
    std::vector<double> m(sum_abs_.size(), 0.0);
    if (count_ > 0) {
      for (std::size_t i = 0; i < m.size(); ++i) m[i] = sum_abs_[i] / static_cast<double>(count_);
    }
    return m;
  }
  /// C = X^T X = Σ_rows x^T x [dim, dim] row-major, full symmetric (not divided by count).
  const std::vector<double>& second_moment() const noexcept { return second_; }

 private:
  /// Copies the lower triangle (what the rank update writes) onto the upper one.
  void fill_upper() {
    for (index_t i = 0; i < dim_; ++i) {
      for (index_t j = i + 1; j < dim_; ++j) {
        second_[static_cast<std::size_t>(i * dim_ + j)] = second_[static_cast<std::size_t>(j * dim_ + i)];
      }
    }
  }

  index_t dim_ = 0;
  std::int64_t count_ = 0;
  std::vector<double> sum_abs_;  // [dim]
  std::vector<double> second_;   // [dim, dim] row-major
};

/// How the subspace of a low-rank factor is chosen (see the file comment).
enum class FactorMethod : std::uint8_t {
  kSvd,    ///< top right singular vectors of W (CSKV plain init)
  kAsvd,   ///< top right singular vectors of diag(mean|x|^α) · W (CSKV default init)
  kRefit,  ///< top right singular vectors of X · W (minimises the calibration reconstruction error)
};

/// "svd", "asvd" or "refit".
inline std::string factor_method_label(FactorMethod m) {
  switch (m) {
    case FactorMethod::kSvd: return "svd";
    case FactorMethod::kAsvd: return "asvd";
    case FactorMethod::kRefit: return "refit";
  }
  return "unknown(" + std::to_string(static_cast<int>(m)) + ")";
}

/// Parses "svd", "asvd" or "refit"; `argument` names the option in the error message.
inline FactorMethod parse_factor_method(const std::string& text, const char* argument = "factors") {
  if (text == "svd") return FactorMethod::kSvd;
  if (text == "asvd") return FactorMethod::kAsvd;
  if (text == "refit") return FactorMethod::kRefit;
  kvq::detail::throw_argument_error("kvq::calib::parse_factor_method", argument, text,
                                    "one of svd, asvd, refit");
}

/// The factors themselves are kvq::LowRankFactor (kvq/transform/latent.hpp: width, rank, down =
/// A [width, rank], up = B [rank, width], row-major float), what the cache's latent projection
/// consumes; also spelled kvq::calib::LowRankFactor here.
using kvq::LowRankFactor;

namespace factors_detail {

/// Flips each column of v so that its entry of largest magnitude (first on ties) is positive.
template <int = 0>
void fix_signs(Eigen::MatrixXd& v) {
  for (Eigen::Index j = 0; j < v.cols(); ++j) {
    Eigen::Index arg = 0;
    for (Eigen::Index i = 1; i < v.rows(); ++i) {
      if (std::abs(v(i, j)) > std::abs(v(arg, j))) arg = i;
    }
    if (v(arg, j) < 0) v.col(j) = -v.col(j);
  }
}

/// Right singular vectors [width, width] and singular values (descending) of m, from the
/// symmetric eigendecomposition of m^T m (SelfAdjointEigenSolver, the solver the refit uses
/// too; one decomposition code path compiles much faster than Eigen's SVDs). Squaring puts a
/// relative error of ~1e-16 · (s_1 / s_i)² on the small s_i, far below the 1e-6 cut; directions
/// beyond min(rows, width) come out with s ~ 0 and are dropped by it.
template <int = 0>
void right_singular(const RowMatrix& m, const char* where, const char* argument,
                    Eigen::MatrixXd& basis, Eigen::VectorXd& s) {
  Eigen::MatrixXd g = m.transpose() * m;
  g = (0.5 * (g + g.transpose())).eval();
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(g);
  if (eig.info() != Eigen::Success) {
    kvq::detail::throw_argument_error(where, argument, "a matrix whose Gram matrix did not decompose",
                                      "a finite, decomposable matrix");
  }
  basis = eig.eigenvectors().rowwise().reverse();
  s = eig.eigenvalues().reverse().cwiseMax(0.0).cwiseSqrt();
}

}  // namespace factors_detail

/// Rank-`rank` factors of the projection weight W [hidden, width] row-major (k = x · W) by
/// `method` (see the file comment for the subspace and the weights s of each).
///
/// - rank in 1..width; weight finite.
/// - stats: required for kAsvd and kRefit (stats->dim() == hidden, stats->count() > 0), ignored
///   (may be null) for kSvd.
/// - asvd_alpha: the exponent α of ASVD's S = diag(mean|x|^α); finite and >= 0 (0 gives kSvd);
///   used by kAsvd only.
///
/// Returns width, rank, down [width · rank] and up [rank · width]; column i of A and row i of B
/// are zero for a dropped direction (s_i <= 1e-6 · s_1); factor_scales() recovers s.
///
/// Computation in double, results rounded to float; deterministic. Cost: kSvd/kAsvd the Gram
/// matrix W^T W (O(hidden · width²)) and a symmetric eigendecomposition of [width, width];
/// kRefit the products W^T (C W) (O(hidden² · width)) and the same eigendecomposition (the rows X
/// are never kept, only C, and width is usually well below hidden). C and W^T C W hold squared singular
/// values, so the refit's s_i carries a relative error of ~1e-16 · (s_1 / s_i)² (1e-4 at the
/// 1e-6 cut) and its latent channels are uncorrelated to the same order; the subspace, and so
/// the reconstruction error, is not affected at any level that matters.
template <int = 0>
LowRankFactor low_rank_factor(const float* weight, index_t hidden, index_t width, index_t rank,
                                     FactorMethod method, const ActivationStats* stats,
                                     double asvd_alpha = 0.5) {
  constexpr const char* where = "kvq::calib::low_rank_factor";
  using factors_detail::RowMatrix;
  if (hidden <= 0) kvq::detail::throw_argument_error(where, "hidden", hidden, "hidden > 0");
  if (width <= 0) kvq::detail::throw_argument_error(where, "width", width, "width > 0");
  if (rank <= 0 || rank > width) {
    kvq::detail::throw_argument_error(where, "rank", rank, kvq::detail::concat("a rank in 1..", width));
  }
  if (method != FactorMethod::kSvd && method != FactorMethod::kAsvd && method != FactorMethod::kRefit) {
    kvq::detail::throw_argument_error(where, "method", static_cast<int>(method), "kSvd, kAsvd or kRefit");
  }
  if (weight == nullptr) kvq::detail::throw_argument_error(where, "weight", "null", "W [hidden, width]");
  for (index_t i = 0; i < hidden * width; ++i) {
    if (!std::isfinite(weight[i])) {
      kvq::detail::throw_argument_error(
          where, "weight", kvq::detail::concat("weight[", i / width, ", ", i % width, "] = ", weight[i]),
          "finite weights", Status::kNonFiniteInput);
    }
  }
  if (method != FactorMethod::kSvd) {
    const std::string needs = kvq::detail::concat("activation statistics (required by ", factor_method_label(method), ")");
    if (stats == nullptr) kvq::detail::throw_argument_error(where, "stats", "null", needs);
    if (stats->dim() != hidden) {
      kvq::detail::throw_argument_error(where, "stats->dim()", stats->dim(),
                                        kvq::detail::concat("the weight's hidden size (", hidden, ")"));
    }
    if (stats->count() <= 0) {
      kvq::detail::throw_argument_error(where, "stats->count()", stats->count(), "at least one calibration row");
    }
  }
  if (method == FactorMethod::kAsvd && !(std::isfinite(asvd_alpha) && asvd_alpha >= 0)) {
    kvq::detail::throw_argument_error(where, "asvd_alpha", asvd_alpha, "a finite exponent >= 0");
  }

  RowMatrix w = factors_detail::load(weight, hidden, width);
  Eigen::MatrixXd basis;  // [width, k], columns by descending s
  Eigen::VectorXd s;      // [k]
  switch (method) {
    case FactorMethod::kSvd:
      factors_detail::right_singular(w, where, "weight", basis, s);
      break;
    case FactorMethod::kAsvd: {
      const std::vector<double> m = stats->mean_abs();
      for (index_t i = 0; i < hidden; ++i) w.row(i) *= std::pow(m[static_cast<std::size_t>(i)], asvd_alpha);
      if (!w.allFinite()) {
        kvq::detail::throw_argument_error(where, "asvd_alpha", asvd_alpha,
                                          "an exponent for which mean|x|^alpha · W stays finite");
      }
      factors_detail::right_singular(w, where, "stats", basis, s);
      break;
    }
    case FactorMethod::kRefit: {
      const Eigen::Map<const RowMatrix> c(stats->second_moment().data(), hidden, hidden);
      const RowMatrix cw = c * w;                                // [hidden, width]
      Eigen::MatrixXd g = w.transpose() * cw;                    // W^T C W [width, width]
      g = (0.5 / static_cast<double>(stats->count())) * (g + g.transpose()).eval();  // symmetric, / n
      Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(g);
      if (eig.info() != Eigen::Success) {
        kvq::detail::throw_argument_error(where, "stats", "statistics whose W^T C W did not decompose",
                                          "finite activation statistics");
      }
      // Ascending eigenvalues: reverse into descending order; s = sqrt(λ) (λ of W^T C W / n).
      basis = eig.eigenvectors().rowwise().reverse();
      s = eig.eigenvalues().reverse().cwiseMax(0.0).cwiseSqrt();
      break;
    }
  }
  factors_detail::fix_signs(basis);

  LowRankFactor f;
  f.width = width;
  f.rank = rank;
  f.down.assign(static_cast<std::size_t>(width * rank), 0.0f);
  f.up.assign(static_cast<std::size_t>(rank * width), 0.0f);
  const double floor = (s.size() > 0 ? s(0) : 0.0) * 1e-6;  // beyond the numerical rank: zero factors
  for (index_t i = 0; i < rank; ++i) {
    const double si = i < s.size() ? s(i) : 0.0;
    if (si <= floor) continue;
    const double root = std::sqrt(si);
    for (index_t c = 0; c < width; ++c) {
      f.down[static_cast<std::size_t>(c * rank + i)] = static_cast<float>(basis(c, i) / root);
      f.up[static_cast<std::size_t>(i * width + c)] = static_cast<float>(basis(c, i) * root);
    }
  }
  return f;
}

/// The weights s_1..s_rank of a factor built as A = V_r diag(s)^(-1/2), B = diag(s)^(1/2) V_r^T
/// with orthonormal V_r (every factor of low_rank_factor): s_i = ||row i of B|| / ||column i of
/// A|| (= ||B_i||² = 1 / ||A^(i)||² in exact arithmetic), 0 for a dropped (zero) direction.
/// Units of the method: σ_i(W) (kSvd), σ_i(S·W) (kAsvd), σ_i(X·W) / sqrt(n) (kRefit, where
/// latent channel i has RMS sqrt(s_i) over the calibration rows). Requires consistent sizes.
template <int = 0>
std::vector<double> factor_scales(const LowRankFactor& factor) {
  constexpr const char* where = "kvq::calib::factor_scales";
  const auto entries = static_cast<std::size_t>(factor.width * factor.rank);
  if (factor.width <= 0 || factor.rank <= 0 || factor.down.size() != entries || factor.up.size() != entries) {
    kvq::detail::throw_argument_error(
        where, "factor",
        kvq::detail::concat("width ", factor.width, ", rank ", factor.rank, ", down of ", factor.down.size(),
                            " and up of ", factor.up.size(), " floats"),
        "width > 0, rank > 0 and width x rank floats in each of down and up");
  }
  std::vector<double> s(static_cast<std::size_t>(factor.rank), 0.0);
  for (index_t i = 0; i < factor.rank; ++i) {
    double down = 0, up = 0;
    for (index_t c = 0; c < factor.width; ++c) {
      const double a = factor.down[static_cast<std::size_t>(c * factor.rank + i)];
      const double b = factor.up[static_cast<std::size_t>(i * factor.width + c)];
      down += a * a;
      up += b * b;
    }
    if (down > 0 && up > 0) s[static_cast<std::size_t>(i)] = std::sqrt(up / down);
  }
  return s;
}

/// Reconstruction errors of a factor against its weight (both relative, >= 0):
/// - weight_relative = ||W − W·A·B||_F / ||W||_F;
/// - activation_relative = sqrt(tr(D^T C D) / tr(W^T C W)) with D = W − W·A·B, which equals
///   ||X·W − X·W·A·B||_F / ||X·W||_F on the calibration rows of stats (the relative error of the
///   reconstructed keys k^ = c·B on the calibration data); NaN when stats is null.
/// A zero denominator (W = 0, or X·W = 0) gives 0 (the numerator is then 0 as well).
struct FactorError {
  double weight_relative = 0;
  double activation_relative = 0;
};

/// Errors of `factor` for the weight W [hidden, width] row-major; factor.width == width and its
/// vectors of the sizes its rank implies; stats optional (stats->dim() == hidden, count > 0).
/// Cost O(hidden² · width + hidden · width² + width³) in double (one C · W product).
template <int = 0>
FactorError factor_error(const float* weight, index_t hidden, index_t width, const LowRankFactor& factor,
                                const ActivationStats* stats) {
  constexpr const char* where = "kvq::calib::factor_error";
  using factors_detail::RowMatrix;
  if (hidden <= 0) kvq::detail::throw_argument_error(where, "hidden", hidden, "hidden > 0");
  if (width <= 0) kvq::detail::throw_argument_error(where, "width", width, "width > 0");
  if (weight == nullptr) kvq::detail::throw_argument_error(where, "weight", "null", "W [hidden, width]");
  if (factor.width != width) {
    kvq::detail::throw_argument_error(where, "factor.width", factor.width,
                                      kvq::detail::concat("the weight's width (", width, ")"));
  }
  if (factor.rank <= 0 || factor.rank > width) {
    kvq::detail::throw_argument_error(where, "factor.rank", factor.rank, kvq::detail::concat("a rank in 1..", width));
  }
  const auto entries = static_cast<std::size_t>(width * factor.rank);
  if (factor.down.size() != entries || factor.up.size() != entries) {
    kvq::detail::throw_argument_error(
        where, "factor", kvq::detail::concat("down of ", factor.down.size(), " and up of ", factor.up.size(), " floats"),
        kvq::detail::concat(entries, " floats each (width ", width, " x rank ", factor.rank, ")"));
  }
  for (index_t i = 0; i < hidden * width; ++i) {
    if (!std::isfinite(weight[i])) {
      kvq::detail::throw_argument_error(
          where, "weight", kvq::detail::concat("weight[", i / width, ", ", i % width, "] = ", weight[i]),
          "finite weights", Status::kNonFiniteInput);
    }
  }
  for (std::size_t i = 0; i < entries; ++i) {
    if (!std::isfinite(factor.down[i]) || !std::isfinite(factor.up[i])) {
      kvq::detail::throw_argument_error(where, "factor", kvq::detail::concat("entry ", i, " not finite"),
                                        "finite factors", Status::kNonFiniteInput);
    }
  }
  if (stats != nullptr) {
    if (stats->dim() != hidden) {
      kvq::detail::throw_argument_error(where, "stats->dim()", stats->dim(),
                                        kvq::detail::concat("the weight's hidden size (", hidden, ")"));
    }
    if (stats->count() <= 0) {
      kvq::detail::throw_argument_error(where, "stats->count()", stats->count(), "at least one calibration row");
    }
  }

  const RowMatrix w = factors_detail::load(weight, hidden, width);
  const RowMatrix a = factors_detail::load(factor.down.data(), width, factor.rank);
  const RowMatrix b = factors_detail::load(factor.up.data(), factor.rank, width);
  // D = W · E with E = I − A·B [width, width].
  const RowMatrix e_mat = RowMatrix::Identity(width, width) - a * b;
  FactorError e;
  const double wn = w.norm();
  e.weight_relative = wn > 0 ? (w * e_mat).norm() / wn : 0.0;
  if (stats == nullptr) {
    e.activation_relative = std::numeric_limits<double>::quiet_NaN();
  } else {
    // G = W^T C W = (X W)^T (X W): tr(W^T C W) = tr(G), tr(D^T C D) = tr(E^T G E).
    const Eigen::Map<const RowMatrix> c(stats->second_moment().data(), hidden, hidden);
    const RowMatrix cw = c * w;
    const RowMatrix g = w.transpose() * cw;
    const double den = g.trace();                           // ||X W||_F^2
    const double num = e_mat.cwiseProduct(g * e_mat).sum();  // ||X W E||_F^2
    e.activation_relative = den > 0 ? std::sqrt(std::max(num, 0.0) / den) : 0.0;
  }
  return e;
}

}  // namespace kvq::calib
