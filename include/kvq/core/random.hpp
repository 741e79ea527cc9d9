// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Rng: a small, fully specified pseudo-random generator (xoshiro256** seeded through
///        splitmix64) for reproducible test data, demos and random factors. Not cryptographic.
///
/// The integer stream and uniform() are identical on every platform for a given seed (the
/// standard library's distributions are not specified that tightly); normal() goes through
/// std::log and std::cos and may differ in the last bits between C libraries.
#pragma once

#include <cmath>
#include <cstdint>

namespace kvq {

class Rng {
 public:
  explicit Rng(std::uint64_t seed) noexcept {
    for (auto& s : state_) s = splitmix64(seed);
  }

  /// Next 64 random bits.
  std::uint64_t next_u64() noexcept {
    const std::uint64_t result = rotl(state_[1] * 5, 7) * 9;
    const std::uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotl(state_[3], 45);
    return result;
  }

  /// Uniform in [0, 1), a multiple of 2^-24.
  float uniform() noexcept { return static_cast<float>(next_u64() >> 40) * 0x1.0p-24f; }

  /// Uniform in [lo, hi).
  float uniform(float lo, float hi) noexcept { return lo + (hi - lo) * uniform(); }

  /// Uniform integer in [0, n), n > 0 (Lemire's multiply-shift, bias below 2^-32 for n < 2^32).
  std::uint32_t below(std::uint32_t n) noexcept {
    return static_cast<std::uint32_t>(((next_u64() >> 32) * n) >> 32);
  }

  /// Standard normal (Box-Muller).
  float normal() noexcept {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = (static_cast<double>(next_u64() >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
    const double u2 = static_cast<double>(next_u64() >> 11) * 0x1.0p-53;
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double theta = 6.283185307179586 * u2;
    spare_ = static_cast<float>(r * std::sin(theta));
    has_spare_ = true;
    return static_cast<float>(r * std::cos(theta));
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) noexcept { return (x << k) | (x >> (64 - k)); }
  static std::uint64_t splitmix64(std::uint64_t& x) noexcept {
    std::uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }

  std::uint64_t state_[4];
  float spare_ = 0.0f;
  bool has_spare_ = false;
};

}  // namespace kvq
