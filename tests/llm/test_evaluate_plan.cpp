// SPDX-License-Identifier: Apache-2.0
// llm/evaluate.hpp's windows and llm/text.hpp's leading tokens, on a toy tokenizer.
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq_catch.hpp"
#include "llm/evaluate.hpp"
#include "llm/text.hpp"

namespace {

/// One token per byte, except that "ab" is one token: enough for a cut to matter.
class ToyTokenizer final : public kvq::llm::Tokenizer {
 public:
  std::vector<int> encode(std::string_view text) const override {
    std::vector<int> ids;
    for (std::size_t i = 0; i < text.size(); ++i) {
      if (text[i] == 'a' && i + 1 < text.size() && text[i + 1] == 'b') {
        ids.push_back(256);
        ++i;
      } else {
        ids.push_back(static_cast<unsigned char>(text[i]));
      }
    }
    return ids;
  }
  std::string decode(int, int token) const override { return token == 256 ? "ab" : std::string(1, static_cast<char>(token)); }
  int vocab_size() const noexcept override { return 257; }
  int bos() const noexcept override { return -1; }
  int eos() const noexcept override { return -1; }
  bool add_bos() const noexcept override { return false; }
};

}  // namespace

TEST_CASE("make_plan: windows with and without BOS", "[llm][eval]") {
  std::vector<int> text(100);
  for (int i = 0; i < 100; ++i) text[static_cast<std::size_t>(i)] = 10 + i;
  SECTION("BOS: every text token scored once") {
    const kvq::llm::EvalPlan p = kvq::llm::make_plan(text, 50, 21, 1, true);
    REQUIRE(p.windows.size() == 3);  // 20 + 20 + 10 text tokens
    REQUIRE(p.windows[0].size() == 21);
    REQUIRE(p.windows[0][0] == 1);
    REQUIRE(p.windows[0][1] == 10);
    REQUIRE(p.windows[1][1] == 30);
    REQUIRE(p.windows[2].size() == 11);
    REQUIRE(p.scored_tokens() == 50);
    REQUIRE(p.fed_tokens() == 53);
  }
  SECTION("no BOS: the first token of each window is context") {
    const kvq::llm::EvalPlan p = kvq::llm::make_plan(text, 45, 20, -1, false);
    REQUIRE(p.windows.size() == 3);  // 20 + 20 + 5
    REQUIRE(p.windows[2].front() == 50);
    REQUIRE(p.scored_tokens() == 19 + 19 + 4);
  }
  SECTION("bad arguments name the option") {
    REQUIRE_THROWS_WITH(kvq::llm::make_plan(text, 200, 20, -1, false), KVQ_CONTAINS("--tokens"));
    REQUIRE_THROWS_WITH(kvq::llm::make_plan(text, 1, 20, -1, false), KVQ_CONTAINS("--tokens"));
    REQUIRE_THROWS_WITH(kvq::llm::make_plan(text, 20, 1, -1, false), KVQ_CONTAINS("--window"));
  }
}

TEST_CASE("leading_tokens: a prefix gives the ids of the whole text", "[llm][eval]") {
  const std::filesystem::path path = std::filesystem::temp_directory_path() / "kvq_test_leading_tokens.txt";
  std::string text;
  for (int line = 0; line < 3000; ++line) text += (line % 3 == 0 ? "ab ab a\n" : "xab b aab\n");
  {
    std::ofstream out(path, std::ios::binary);
    out << text;
  }
  const ToyTokenizer tok;
  const std::vector<int> all = tok.encode(text);
  for (const int n : {1, 100, 5000, static_cast<int>(all.size())}) {
    const std::vector<int> ids = kvq::llm::leading_tokens(tok, path.string(), n);
    REQUIRE(ids.size() >= static_cast<std::size_t>(n));
    REQUIRE(std::equal(ids.begin(), ids.end(), all.begin()));
  }
  REQUIRE(kvq::llm::leading_tokens(tok, path.string(), 1 << 30).size() == all.size());
  std::filesystem::remove(path);
  REQUIRE_THROWS_AS(kvq::llm::leading_tokens(tok, path.string(), 10), kvq::Error);
}
