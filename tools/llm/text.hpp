// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The first tokens of a text file, without tokenizing all of it.
#pragma once

#include <string>
#include <vector>

#include "llm/tokenizer.hpp"

namespace kvq::llm {

/// Reads `path` (throws kvq::Error kIoError naming it) and returns at least `tokens` leading
/// token ids of its contents when the file has that many (fewer otherwise). Only a prefix is
/// encoded: growing prefixes ending at a line break, of which the last 64 tokens are dropped so
/// that a cut cannot change the ids kept; the whole file when the prefixes fall short.
std::vector<int> leading_tokens(const Tokenizer& tokenizer, const std::string& path, int tokens);

}  // namespace kvq::llm
