// SPDX-License-Identifier: Apache-2.0
// Byte-level BPE: hand-derived ids on a small vocabulary (all 256 byte symbols and a few
// merges) for both pre-tokenizers, decode(encode(s)) == s on random UTF-8, clear errors on
// invalid input and vocabularies.
// (SmolLM2's real vocabulary against Hugging Face `tokenizers`: tests/llm/test_smollm2.cpp.)
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq_catch.hpp"
#include "llm/bpe_tokenizer.hpp"
#include "llm/gguf.hpp"
#include "llm/gguf_model.hpp"
#include "require_error.hpp"
#include "seeds.hpp"

namespace {

using kvq::llm::BpeTokenizer;
using kvq::llm::BpeVocab;

std::string utf8(char32_t cp) {
  const auto c = static_cast<std::uint32_t>(cp);
  std::string s;
  if (c < 0x80) {
    s.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    s.push_back(static_cast<char>(0xC0 | (c >> 6)));
    s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    s.push_back(static_cast<char>(0xE0 | (c >> 12)));
    s.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    s.push_back(static_cast<char>(0xF0 | (c >> 18)));
    s.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
  return s;
}

/// Token 0 "<|endoftext|>" (control); tokens 1 + b: the byte-level symbol of byte b; then one
/// token per merge (257.. in merge order); 272 "Ġz" (user-defined); 273 "▁y" (normal).
const std::vector<std::string> kMerges{"Ġ t", "h e", "Ġt he", "i n", "Ġ Ġ", "Ċ Ċ", "' t",  "l l",
                                       "Ã ©", "o n", "d on",  "1 2", "Ġ 1", "a a", "aa aa"};

BpeVocab small_vocab(const std::string& pre) {
  BpeVocab v;
  v.tokens.push_back("<|endoftext|>");
  for (int b = 0; b < 256; ++b)
    v.tokens.push_back(utf8(kvq::llm::byte_to_unicode(static_cast<std::uint8_t>(b))));
  for (const std::string& m : kMerges)
    v.tokens.push_back(m.substr(0, m.find(' ')) + m.substr(m.find(' ') + 1));
  v.tokens.push_back("Ġz");
  v.tokens.push_back("▁y");
  v.token_types.assign(v.tokens.size(), BpeTokenizer::kNormal);
  v.token_types[0] = BpeTokenizer::kControl;
  v.token_types[272] = BpeTokenizer::kUserDefined;
  v.merges = kMerges;
  v.pre = pre;
  v.bos = 0;
  v.eos = 0;
  return v;
}

std::string decode_all(const kvq::llm::Tokenizer& t, const std::vector<int>& ids) {
  std::string s;
  int previous = -1;
  for (int id : ids) {
    s += t.decode(previous, id);
    previous = id;
  }
  return s;
}


/// Random valid UTF-8: ASCII (words, digits, apostrophes, whitespace) most of the time, then
/// Latin-1, other whitespace, CJK, any BMP scalar and astral code points.
std::string random_utf8(std::mt19937_64& rng, std::size_t code_points) {
  static const std::vector<char32_t> whitespace{U'\n',  U'\t',  U'\r',  U' ', 0xA0,
                                                0x3000, 0x2028, 0x2009, 0x85};
  static const std::string ascii =
      "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 '\".,;:!?-_()<>|{}$%&*+=/\\";
  std::string s;
  for (std::size_t i = 0; i < code_points; ++i) {
    const auto kind = rng() % 10;
    if (kind < 5) {
      s.push_back(ascii[rng() % ascii.size()]);
    } else if (kind == 5) {
      s += utf8(whitespace[rng() % whitespace.size()]);
    } else if (kind == 6) {
      s += utf8(static_cast<char32_t>(0x80 + rng() % 0x180));
    } else if (kind == 7) {
      s += utf8(static_cast<char32_t>(0x4E00 + rng() % 0x5000));
    } else if (kind == 8) {
      char32_t cp = static_cast<char32_t>(1 + rng() % 0xFFFF);
      if (cp >= 0xD800 && cp <= 0xDFFF) cp = U'x';
      s += utf8(cp);
    } else {
      s += utf8(static_cast<char32_t>(0x10000 + rng() % 0x100000));
    }
  }
  return s;
}

}  // namespace

TEST_CASE("byte-level BPE gives hand-derived ids", "[llm][bpe]") {
  const BpeTokenizer smollm(small_vocab("smollm"));
  const BpeTokenizer gpt2(small_vocab("gpt2"));
  REQUIRE(smollm.vocab_size() == 274);
  REQUIRE(smollm.pre() == "smollm");
  REQUIRE(smollm.token_text(259) == "Ġthe");
  REQUIRE(smollm.token_id("Ġthe") == 259);
  REQUIRE(smollm.token_id("nope") == -1);

  // Ids: byte b -> 1 + b ('a' = 98, ' ' = 33, '\n' = 11); merges 257.. as in kMerges.
  struct Case {
    std::string text;
    std::vector<int> smollm;
    std::vector<int> gpt2;
  };
  const std::vector<Case> cases{
      // "the" + " the": h e -> he; Ġ t -> Ġt; Ġt he -> Ġthe
      {"the the", {117, 258, 259}, {117, 258, 259}},
      // "don" + "'t": o n -> on, d on -> don
      {"don't", {267, 263}, {267, 263}},
      // "we" + "'ll": l l -> ll
      {"we'll", {120, 102, 40, 264}, {120, 102, 40, 264}},
      // smollm: "x ", "1", "2", "3" (digits never merge); gpt2: "x", " 123" -> Ġ 12 3
      {"x 123", {121, 33, 50, 51, 52}, {121, 33, 268, 52}},
      {"12", {50, 51}, {268}},
      // "a", "  \n\n" (whitespace not followed by non-space), " b": Ġ Ġ before Ċ Ċ by rank
      {"a  \n\n b", {98, 261, 262, 33, 99}, {98, 261, 262, 33, 99}},
      // é = C3 A9 -> Ã © -> 265; — = E2 80 94; 日 = E6 97 A5; 本 = E6 9C AC
      {"café — 日本",
       {100, 98, 103, 265, 33, 227, 129, 149, 33, 231, 152, 166, 231, 157, 173},
       {100, 98, 103, 265, 33, 227, 129, 149, 33, 231, 152, 166, 231, 157, 173}},
      // special-token text is ordinary text: "<|", "im", "_", "end", "|>"
      {"<|im_end|>",
       {61, 125, 106, 110, 96, 102, 111, 101, 125, 63},
       {61, 125, 106, 110, 96, 102, 111, 101, 125, 63}},
      {"thin", {117, 105, 260}, {117, 105, 260}},
      // equal ranks merge leftmost first: (aa)(a)(a)(a) -> (aa)(aa)(a) -> (aaaa)(a)
      {"aaaaa", {271, 98}, {271, 98}},
      {"", {}, {}},
  };
  for (const Case& c : cases) {
    CAPTURE(c.text);
    REQUIRE(smollm.encode(c.text) == c.smollm);
    REQUIRE(gpt2.encode(c.text) == c.gpt2);
    REQUIRE(decode_all(smollm, c.smollm) == c.text);
  }
  // The cache returns what a fresh encode computes.
  REQUIRE(smollm.encode("the the the") == std::vector<int>{117, 258, 259, 259});
}

TEST_CASE("decode maps byte symbols back to bytes", "[llm][bpe]") {
  const BpeTokenizer t(small_vocab("gpt2"));
  REQUIRE(t.decode(-1, 0).empty());  // control
  REQUIRE(t.decode(-1, 259) == " the");
  REQUIRE(t.decode(259, 259) == " the");
  REQUIRE(t.decode(-1, 1 + 0x0A) == "\n");
  REQUIRE(t.decode(-1, 1 + 0xFF) == "\xFF");  // a lone byte of a multi-byte character
  REQUIRE(t.decode(-1, 265) == "é");
  REQUIRE(t.decode(-1, 272) == "Ġz");  // user-defined: its text as is
  REQUIRE(t.decode(-1, 273) == "▁y");  // a code point outside the byte map passes through
  REQUIRE(t.token_type(0) == BpeTokenizer::kControl);
  REQUIRE(t.bos() == 0);
  REQUIRE(t.eos() == 0);
  REQUIRE_FALSE(t.add_bos());
  kvq_test::require_error([&] { (void)t.decode(-1, 274); }, {"decode", "token id 274", "0..273"});
  kvq_test::require_error([&] { (void)t.decode(-1, -1); }, {"token id -1"});
  kvq_test::require_error([&] { (void)t.token_text(1000); }, {"token id 1000"});
}

TEST_CASE("decode(encode(s)) == s on random UTF-8", "[llm][bpe]") {
  const BpeTokenizer smollm(small_vocab("smollm"));
  const BpeTokenizer gpt2(small_vocab("gpt2"));
  for (std::uint64_t i = 0; i < 200; ++i) {
    const std::uint64_t seed = kvq_test::case_seed("bpe round trip", i);
    CAPTURE(seed);
    std::mt19937_64 rng(seed);
    const std::string s = random_utf8(rng, 1 + rng() % 300);
    REQUIRE(decode_all(smollm, smollm.encode(s)) == s);
    REQUIRE(decode_all(gpt2, gpt2.encode(s)) == s);
  }
}

TEST_CASE("invalid UTF-8 is rejected with its byte offset", "[llm][bpe]") {
  const BpeTokenizer t(small_vocab("smollm"));
  const auto rejects = [&](const std::string& text, const std::string& offset,
                           const std::string& byte) {
    CAPTURE(text);
    kvq_test::require_error([&] { (void)t.encode(text); }, {"invalid UTF-8", "byte offset " + offset, byte});
    try {
      (void)t.encode(text);
    } catch (const kvq::Error& e) {
      REQUIRE(e.status() == kvq::Status::kInvalidArgument);
    }
  };
  rejects(
      "ab\xFF"
      "cd",
      "2", "0xff");
  rejects("日本\xE6\x97", "6", "0xe6");      // truncated at the end
  rejects("x\xC0\xAF", "1", "0xc0");         // overlong '/'
  rejects("x\xED\xA0\x80y", "1", "0xed");    // surrogate U+D800
  rejects("\xF4\x90\x80\x80", "0", "0xf4");  // past U+10FFFF
  rejects("ok \x80", "3", "0x80");           // stray continuation byte
  REQUIRE(t.encode(std::string("a\0b", 3)) == std::vector<int>{98, 1, 99});  // NUL is text
}

TEST_CASE("BpeTokenizer rejects inconsistent vocabularies", "[llm][bpe]") {
  {
    BpeVocab v = small_vocab("llama3");
    kvq_test::require_error([&] { BpeTokenizer t(v, "voc"); },
                  {"voc", "tokenizer.ggml.pre = 'llama3'", "'smollm'"});
  }
  {
    BpeVocab v = small_vocab("gpt2");
    v.merges.push_back("nospace");
    kvq_test::require_error([&] { BpeTokenizer t(v, "voc"); },
                  {"tokenizer.ggml.merges[15] = 'nospace'", "separating space"});
  }
  {
    BpeVocab v = small_vocab("gpt2");
    v.merges.push_back("q u");
    kvq_test::require_error([&] { BpeTokenizer t(v, "voc"); },
                  {"tokenizer.ggml.merges[15] = 'q u'", "'qu', which is not a token"});
  }
  {
    BpeVocab v = small_vocab("gpt2");
    v.merges.push_back("zz y");
    kvq_test::require_error([&] { BpeTokenizer t(v, "voc"); }, {"merges[15]", "left part"});
  }
  {
    BpeVocab v = small_vocab("gpt2");
    v.eos = 274;
    kvq_test::require_error([&] { BpeTokenizer t(v, "voc"); }, {"tokenizer.ggml.eos_token_id = 274"});
  }
  {
    BpeVocab v = small_vocab("gpt2");
    v.token_types.pop_back();
    kvq_test::require_error([&] { BpeTokenizer t(v, "voc"); }, {"token_type has 273 entries", "274"});
  }
  {
    BpeVocab v;
    kvq_test::require_error([&] { BpeTokenizer t(v, "voc"); }, {"tokenizer.ggml.tokens has 0 entries"});
  }
  {
    // A vocabulary without the symbol of byte 0x04 ('Ą') cannot encode that byte.
    BpeVocab v = small_vocab("gpt2");
    v.tokens[1 + 0x04] = "<unused>";
    const BpeTokenizer t(std::move(v), "voc");
    REQUIRE(t.encode("ab") == std::vector<int>{98, 99});
    kvq_test::require_error([&] { (void)t.encode("a\x04"); }, {"voc", "byte 0x04 has no token", "'Ą'"});
  }
}

TEST_CASE("concurrent encodes agree", "[llm][bpe]") {
  const BpeTokenizer t(small_vocab("smollm"));
  std::mt19937_64 rng(kvq_test::case_seed("bpe threads", 0));
  const std::string text = random_utf8(rng, 20000);
  const std::vector<int> expected = t.encode(text);
  std::vector<std::vector<int>> results(4);
  std::vector<std::thread> threads;
  for (std::size_t k = 0; k < results.size(); ++k) {
    threads.emplace_back([&, k] { results[k] = t.encode(text); });
  }
  for (std::thread& th : threads) th.join();
  for (const auto& r : results) REQUIRE(r == expected);
}
