// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The first tokens of a text file (or of one half of it), without tokenizing all of it.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "llm/tokenizer.hpp"

namespace kvq::llm {

/// Which part of a text file: all of it, or one of its halves, split at the first line break
/// at or after the middle byte (so that calibration and evaluation can use disjoint text).
enum class TextPart { kAll, kFirstHalf, kSecondHalf };

/// "all", "first" or "second"; kvq::Error naming `argument` otherwise.
TextPart parse_text_part(const std::string& text, const char* argument);
/// "all", "first half", "second half".
const char* text_part_label(TextPart part) noexcept;

/// The bytes of `part` of `text`.
std::string_view text_part(std::string_view text, TextPart part) noexcept;

/// Reads `path` (throws kvq::Error kIoError naming it) and returns at least `tokens` leading
/// token ids of `part` of its contents when it has that many (fewer otherwise). Only a prefix is
/// encoded: growing prefixes ending at a line break, of which the last 64 tokens are dropped so
/// that a cut cannot change the ids kept; the whole part when the prefixes fall short.
std::vector<int> leading_tokens(const Tokenizer& tokenizer, const std::string& path, int tokens,
                                TextPart part = TextPart::kAll);

}  // namespace kvq::llm
