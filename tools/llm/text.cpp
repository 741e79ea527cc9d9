// SPDX-License-Identifier: Apache-2.0
#include "llm/text.hpp"

#include "llm/read_file.hpp"

namespace kvq::llm {

std::vector<int> leading_tokens(const Tokenizer& tokenizer, const std::string& path, int tokens) {
  const std::string text = read_file(path, "text file");
  constexpr std::size_t kUnsafeTail = 64;  // tokens near a cut that a longer prefix may merge differently
  for (std::size_t bytes = static_cast<std::size_t>(tokens) * 6 + 4096; bytes < text.size(); bytes *= 2) {
    const std::size_t cut = text.rfind('\n', bytes);
    if (cut == std::string::npos || cut == 0) continue;
    std::vector<int> ids = tokenizer.encode(std::string_view(text).substr(0, cut));
    if (ids.size() >= static_cast<std::size_t>(tokens) + kUnsafeTail) {
      ids.resize(ids.size() - kUnsafeTail);
      return ids;
    }
  }
  return tokenizer.encode(text);
}

}  // namespace kvq::llm
