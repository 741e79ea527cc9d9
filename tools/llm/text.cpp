// SPDX-License-Identifier: Apache-2.0
#include "llm/text.hpp"

#include "kvq/core/error.hpp"
#include "llm/read_file.hpp"

namespace kvq::llm {

TextPart parse_text_part(const std::string& text, const char* argument) {
  if (text == "all") return TextPart::kAll;
  if (text == "first") return TextPart::kFirstHalf;
  if (text == "second") return TextPart::kSecondHalf;
  kvq::detail::throw_argument_error("kvq", argument, text,
                                    "'all', 'first' or 'second' (the halves split at the line break after the middle)");
}

const char* text_part_label(TextPart part) noexcept {
  return part == TextPart::kAll ? "all" : part == TextPart::kFirstHalf ? "first half" : "second half";
}

std::string_view text_part(std::string_view text, TextPart part) noexcept {
  if (part == TextPart::kAll) return text;
  std::size_t mid = text.find('\n', text.size() / 2);
  mid = mid == std::string_view::npos ? text.size() : mid + 1;
  return part == TextPart::kFirstHalf ? text.substr(0, mid) : text.substr(mid);
}

std::vector<int> leading_tokens(const Tokenizer& tokenizer, const std::string& path, int tokens, TextPart part) {
  const std::string file = read_file(path, "text file");
  const std::string_view text = text_part(file, part);
  constexpr std::size_t kUnsafeTail = 64;  // tokens near a cut that a longer prefix may merge differently
  for (std::size_t bytes = static_cast<std::size_t>(tokens) * 6 + 4096; bytes < text.size(); bytes *= 2) {
    const std::size_t cut = text.rfind('\n', bytes);
    if (cut == std::string::npos || cut == 0) continue;
    std::vector<int> ids = tokenizer.encode(text.substr(0, cut));
    if (ids.size() >= static_cast<std::size_t>(tokens) + kUnsafeTail) {
      ids.resize(ids.size() - kUnsafeTail);
      return ids;
    }
  }
  return tokenizer.encode(text);
}

}  // namespace kvq::llm
