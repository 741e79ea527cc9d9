// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief require_error(f, [status,] {fragments}): f must throw kvq::Error (with that status) whose
///        message contains every fragment (the argument, the value, what was expected).
#pragma once

#include <functional>
#include <initializer_list>
#include <string>

#include "kvq/core/error.hpp"
#include "kvq_catch.hpp"

namespace kvq_test {

inline void require_error(const std::function<void()>& f, std::initializer_list<std::string> fragments) {
  try {
    f();
  } catch (const kvq::Error& e) {
    const std::string what = e.what();
    CAPTURE(what);
    for (const std::string& fragment : fragments) {
      CAPTURE(fragment);
      CHECK(what.find(fragment) != std::string::npos);
    }
    return;
  }
  FAIL("no kvq::Error");
}

/// The same, and the error's status must be `status`.
inline void require_error(const std::function<void()>& f, kvq::Status status, std::initializer_list<std::string> fragments) {
  require_error(
      [&] {
        try {
          f();
        } catch (const kvq::Error& e) {
          CHECK(e.status() == status);
          throw;
        }
      },
      fragments);
}

}  // namespace kvq_test
