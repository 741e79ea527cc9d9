// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief kvq::Error, the exception thrown by host APIs, and helpers that build its message.
///
/// Every message names the function, the argument, the value received and what was expected:
///   "kvq::quantize_matrix: argument 'group_size' = 0; expected a positive divisor of 4096"
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "kvq/core/status.hpp"

namespace kvq {

/// Exception thrown by every host API on bad input, exhausted capacity or unreadable files.
/// A call that throws leaves the objects it was given unchanged.
class Error : public std::runtime_error {
 public:
  Error(Status status, const std::string& message)
      : std::runtime_error(message), status_(status) {}

  /// The category of the failure (never Status::kOk).
  Status status() const noexcept { return status_; }

 private:
  Status status_;
};

namespace detail {

template <class T>
void append_value(std::ostringstream& os, const T& value) {
  if constexpr (std::is_convertible_v<const T&, std::string>) {
    os << '\'' << std::string(value) << '\'';
  } else if constexpr (std::is_same_v<T, char>) {
    os << '\'' << value << '\'';
  } else if constexpr (std::is_integral_v<T> && sizeof(T) == 1) {
    os << static_cast<int>(value);
  } else {
    os << value;
  }
}

/// Builds "<where>: argument '<argument>' = <value>; expected <expected>".
template <class T>
std::string argument_message(const char* where, const char* argument, const T& value,
                             const std::string& expected) {
  std::ostringstream os;
  os.precision(9);
  os << where << ": argument '" << argument << "' = ";
  append_value(os, value);
  os << "; expected " << expected;
  return os.str();
}

/// Throws kvq::Error(status) naming the argument, its value and the expectation.
template <class T>
[[noreturn]] void throw_argument_error(const char* where, const char* argument, const T& value,
                                       const std::string& expected,
                                       Status status = Status::kInvalidArgument) {
  throw Error(status, argument_message(where, argument, value, expected));
}

/// Concatenates the stream representations of all arguments.
template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  os.precision(9);
  (os << ... << parts);
  return os.str();
}

}  // namespace detail
}  // namespace kvq
