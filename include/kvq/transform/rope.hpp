// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Rotary position embedding (RoPE) of key rows, for caches that store keys before RoPE.
///
/// Pair i of a head (i in [0, head_dim / 2)) is rotated by the angle pos * theta^(-2i / head_dim):
///   kHalfSplit:     pairs (i, i + head_dim / 2)   (Hugging Face Llama, SmolLM)
///   kAdjacentPairs: pairs (2i, 2i + 1)            (Meta Llama, llama2.c)
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kvq/core/bits.hpp"
#include "kvq/core/error.hpp"

namespace kvq {

/// Which channels of a head form a rotation pair.
enum class RopeStyle : std::uint8_t { kHalfSplit, kAdjacentPairs };

/// RoPE parameters of a model.
struct RopeConfig {
  double theta = 10000.0;
  RopeStyle style = RopeStyle::kHalfSplit;
};

/// "half" or "adjacent".
inline RopeStyle parse_rope_style(const std::string& text, const char* argument = "rope") {
  if (text == "half") return RopeStyle::kHalfSplit;
  if (text == "adjacent") return RopeStyle::kAdjacentPairs;
  detail::throw_argument_error("kvq::parse_rope_style", argument, text,
                               "'half' (pairs i, i + d/2) or 'adjacent' (pairs 2i, 2i + 1)");
}

/// Rotates rows of keys by their positions. Angles are pos * inv_freq[i], evaluated as
/// (p0 + t) * f = p0 * f + t * f by the angle-addition formula from an exact (double) sin/cos of
/// the tile start p0 and a table for offsets t < tile_tokens: two products per element instead
/// of a sin/cos, with float-rounding accuracy.
class RopeRotator {
 public:
  /// Largest head_dim / 2 supported (head_dim <= 1024).
  static constexpr index_t kMaxHalf = 512;

  RopeRotator() = default;
  RopeRotator(index_t head_dim, RopeConfig config, index_t tile_tokens)
      : head_dim_(head_dim), config_(config) {
    if (head_dim <= 0 || head_dim % 2 != 0 || head_dim > 2 * kMaxHalf) {
      detail::throw_argument_error("kvq::RopeRotator", "head_dim", head_dim,
                                   "a positive even head dimension <= 1024");
    }
    if (!(config.theta > 1.0) || !std::isfinite(config.theta)) {
      detail::throw_argument_error("kvq::RopeRotator", "theta", config.theta,
                                   "a finite base > 1 (10000 for Llama 2, 100000 for SmolLM2)");
    }
    const index_t half = head_dim / 2;
    inv_freq_.resize(static_cast<std::size_t>(half));
    for (index_t i = 0; i < half; ++i) {
      inv_freq_[static_cast<std::size_t>(i)] =
          std::pow(config.theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
    }
    offset_cos_.resize(static_cast<std::size_t>(tile_tokens * half));
    offset_sin_.resize(offset_cos_.size());
    for (index_t t = 0; t < tile_tokens; ++t) {
      for (index_t i = 0; i < half; ++i) {
        const double a = static_cast<double>(t) * inv_freq_[static_cast<std::size_t>(i)];
        offset_cos_[static_cast<std::size_t>(t * half + i)] = std::cos(a);
        offset_sin_[static_cast<std::size_t>(t * half + i)] = std::sin(a);
      }
    }
  }

  /// The head dimension and the longest run rotate() takes (0 for a default-constructed rotator).
  index_t head_dim() const noexcept { return head_dim_; }
  index_t tile_tokens() const noexcept {
    return head_dim_ > 0 ? static_cast<index_t>(offset_cos_.size()) / (head_dim_ / 2) : 0;
  }

  /// Rotates rows [n, heads * head_dim] (row stride `stride`), row t at position pos0 + t;
  /// n <= tile_tokens. `base` is scratch of head_dim doubles.
  void rotate(float* rows, index_t n, index_t stride, index_t heads, index_t pos0,
              double* base) const noexcept {
    const index_t half = head_dim_ / 2;
    double* base_cos = base;
    double* base_sin = base + half;
    for (index_t i = 0; i < half; ++i) {
      const double a = static_cast<double>(pos0) * inv_freq_[static_cast<std::size_t>(i)];
      base_cos[i] = std::cos(a);
      base_sin[i] = std::sin(a);
    }
    const bool adjacent = config_.style == RopeStyle::kAdjacentPairs;
    float cos_t[kMaxHalf];
    float sin_t[kMaxHalf];
    for (index_t t = 0; t < n; ++t) {
      const double* oc = offset_cos_.data() + t * half;
      const double* os = offset_sin_.data() + t * half;
      for (index_t i = 0; i < half; ++i) {
        cos_t[i] = static_cast<float>(base_cos[i] * oc[i] - base_sin[i] * os[i]);
        sin_t[i] = static_cast<float>(base_sin[i] * oc[i] + base_cos[i] * os[i]);
      }
      for (index_t h = 0; h < heads; ++h) {
        float* x = rows + t * stride + h * head_dim_;
        if (adjacent) {
          for (index_t i = 0; i < half; ++i) {
            const float x0 = x[2 * i];
            const float x1 = x[2 * i + 1];
            x[2 * i] = x0 * cos_t[i] - x1 * sin_t[i];
            x[2 * i + 1] = x0 * sin_t[i] + x1 * cos_t[i];
          }
        } else {
          float* y = x + half;
          for (index_t i = 0; i < half; ++i) {
            const float x0 = x[i];
            const float x1 = y[i];
            x[i] = x0 * cos_t[i] - x1 * sin_t[i];
            y[i] = x0 * sin_t[i] + x1 * cos_t[i];
          }
        }
      }
    }
  }

  /// The rotation of one head vector x [head_dim] at position pos, in double (the reference).
  void rotate_exact(double* x, index_t pos) const noexcept {
    const index_t half = head_dim_ / 2;
    const bool adjacent = config_.style == RopeStyle::kAdjacentPairs;
    for (index_t i = 0; i < half; ++i) {
      const double a = static_cast<double>(pos) * inv_freq_[static_cast<std::size_t>(i)];
      const double c = std::cos(a);
      const double s = std::sin(a);
      const index_t ia = adjacent ? 2 * i : i;
      const index_t ib = adjacent ? 2 * i + 1 : i + half;
      const double x0 = x[ia];
      const double x1 = x[ib];
      x[ia] = x0 * c - x1 * s;
      x[ib] = x0 * s + x1 * c;
    }
  }

 private:
  index_t head_dim_ = 0;
  RopeConfig config_{};
  std::vector<double> inv_freq_;
  std::vector<double> offset_cos_;  // [tile_tokens, head_dim / 2]
  std::vector<double> offset_sin_;
};

}  // namespace kvq
