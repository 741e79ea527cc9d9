// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief A whole file in memory, or kvq::Error (kIoError) naming it and what it was for.
#pragma once

#include <fstream>
#include <iterator>
#include <string>

#include "kvq/core/error.hpp"

namespace kvq::llm {

/// The bytes of `path`; `what` ("llama2.c checkpoint", "text file", ...) goes into the message.
inline std::string read_file(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw kvq::Error(kvq::Status::kIoError, "cannot open " + what + " '" + path + "'");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw kvq::Error(kvq::Status::kIoError, "cannot read " + what + " '" + path + "'");
  return bytes;
}

}  // namespace kvq::llm
