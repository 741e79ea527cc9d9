// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief A progress bar on stderr: redrawn in place on a terminal, a line per quarter otherwise.
#pragma once

#include <fmt/core.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>

namespace kvq_tool {

class ProgressBar {
 public:
  ProgressBar(std::string label, bool enabled)
      : label_(std::move(label)), enabled_(enabled), tty_(isatty(fileno(stderr)) != 0), start_(clock::now()) {}

  /// `done` of `total` units (tokens) finished.
  void update(int done, int total) {
    if (!enabled_ || total <= 0) return;
    const double elapsed = std::chrono::duration<double>(clock::now() - start_).count();
    const double rate = elapsed > 0 ? done / elapsed : 0.0;
    const double eta = rate > 0 ? (total - done) / rate : 0.0;
    if (tty_) {
      if (done < total && elapsed - last_draw_ < 0.2) return;
      last_draw_ = elapsed;
      constexpr int kWidth = 30;
      const int filled = static_cast<int>(static_cast<long long>(kWidth) * done / total);
      fmt::print(stderr, "\r{:<26} [{}{}] {:>5}/{} tokens {:7.1f} tok/s  eta {:4.0f} s ", label_,
                 std::string(static_cast<std::size_t>(filled), '#'),
                 std::string(static_cast<std::size_t>(kWidth - filled), '.'), done, total, rate, eta);
      if (done >= total) fmt::print(stderr, "\n");
    } else {
      const int quarter = static_cast<int>(4LL * done / total);
      if (quarter <= last_quarter_) return;
      last_quarter_ = quarter;
      fmt::print(stderr, "{}: {}/{} tokens, {:.1f} tok/s, {:.0f} s\n", label_, done, total, rate, elapsed);
    }
    std::fflush(stderr);
  }

 private:
  using clock = std::chrono::steady_clock;
  std::string label_;
  bool enabled_;
  bool tty_;
  clock::time_point start_;
  double last_draw_ = -1.0;
  int last_quarter_ = 0;
};

}  // namespace kvq_tool
