// SPDX-License-Identifier: Apache-2.0
#include "llm/bpe_tokenizer.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <fmt/format.h>
#include <pcre2.h>

#include <array>
#include <climits>
#include <functional>
#include <mutex>
#include <queue>
#include <unordered_map>
#include <utility>

#include "kvq/core/error.hpp"
#include "llm/gguf.hpp"

namespace kvq::llm {
namespace {

/// The GPT-2 regex `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// with \s spelled as Unicode White_Space, as Hugging Face `tokenizers` and llama.cpp classify it:
/// PCRE2's UCP \s also matches U+180E (a format character since Unicode 6.3).
std::string gpt2_pattern() {
  const std::string ws =
      R"(\t-\r\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";
  return R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^)" + ws + R"(\p{L}\p{N}]+|[)" + ws +
         "]+(?![^" + ws + "])|[" + ws + "]+";
}
constexpr const char* kDigitPattern = R"(\p{N})";
/// Word results kept for reuse; the cache is emptied when it grows past this many words.
constexpr std::size_t kMaxCachedWords = std::size_t{1} << 18;

void append_utf8(std::string& out, char32_t cp) {
  const auto c = static_cast<std::uint32_t>(cp);
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

/// Length of the valid UTF-8 sequence at s[i] (RFC 3629: no overlongs, surrogates or code
/// points past U+10FFFF), or 0 when the bytes there are not one.
std::size_t utf8_sequence_length(std::string_view s, std::size_t i) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = byte(i);
  if (c < 0x80) return 1;
  std::size_t n = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  if (byte(i + 1) < lo || byte(i + 1) > hi) return 0;
  for (std::size_t k = 2; k < n; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) return 0;
  }
  return n;
}

void validate_utf8(std::string_view text) {
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t n = utf8_sequence_length(text, i);
    if (n == 0) {
      throw kvq::Error(
          kvq::Status::kInvalidArgument,
          fmt::format(
              "kvq::llm::BpeTokenizer::encode: argument 'text' has invalid UTF-8 at byte offset "
              "{} (byte 0x{:02x}); expected UTF-8 text",
              i, static_cast<unsigned char>(text[i])));
    }
    i += n;
  }
}

/// The code point at s[i] (any bytes: an invalid sequence yields its first byte alone, as a
/// code point >= 0x110000 that no table maps).
char32_t next_code_point(std::string_view s, std::size_t& i) {
  const std::size_t n = utf8_sequence_length(s, i);
  const auto c = static_cast<unsigned char>(s[i]);
  if (n <= 1) {
    ++i;
    return n == 1 ? static_cast<char32_t>(c) : static_cast<char32_t>(0x110000 + c);
  }
  std::uint32_t cp = c & (0xFF >> (n + 1));
  for (std::size_t k = 1; k < n; ++k)
    cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3Fu);
  i += n;
  return static_cast<char32_t>(cp);
}

std::string show(std::string_view s) {
  constexpr std::size_t kMax = 60;
  std::string out = "'";
  for (std::size_t i = 0; i < s.size() && i < kMax; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x20 || c == 0x7F) {
      out += fmt::format("\\x{:02x}", c);
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  if (s.size() > kMax) out += "...";
  return out + "'";
}

/// A compiled PCRE2 pattern (UTF + UCP, JIT when available).
class Regex {
 public:
  explicit Regex(const std::string& pattern) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
    if (code_ == nullptr) {
      throw kvq::Error(kvq::Status::kUnsupported,
                       fmt::format("kvq::llm::BpeTokenizer: PCRE2 cannot compile {} "
                                   "(error {} at offset {}); expected a PCRE2 build with "
                                   "Unicode support",
                                   show(pattern), error_text(error), offset));
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex() { pcre2_code_free(code_); }

  pcre2_match_data* new_match_data() const {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    if (md == nullptr) throw std::bad_alloc();
    return md;
  }

  /// Calls piece(std::string_view) for every match of the pattern in `text` and for the text
  /// between matches, in order. `text` must be valid UTF-8.
  template <class Piece>
  void split(std::string_view text, pcre2_match_data* md, const Piece& piece) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    const PCRE2_SIZE length = text.size();
    PCRE2_SIZE start = 0;
    PCRE2_SIZE emitted = 0;
    while (start < length) {
      const int rc =
          jit_ ? pcre2_jit_match(code_, subject, length, start, 0, md, nullptr)
               : pcre2_match(code_, subject, length, start, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        throw kvq::Error(
            kvq::Status::kUnsupported,
            fmt::format(
                "kvq::llm::BpeTokenizer::encode: PCRE2 failed at byte {} of a {}-byte piece: {}",
                start, length, error_text(rc)));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const PCRE2_SIZE begin = ov[0], end = ov[1];
      if (end == begin) {
        start = begin + 1;
        while (start < length && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) ++start;
        continue;
      }
      if (begin > emitted) piece(text.substr(emitted, begin - emitted));
      piece(text.substr(begin, end - begin));
      emitted = start = end;
    }
    if (emitted < length) piece(text.substr(emitted));
  }

 private:
  static std::string error_text(int code) {
    std::array<PCRE2_UCHAR, 256> buffer{};
    const int n = pcre2_get_error_message(code, buffer.data(), buffer.size());
    if (n < 0) return "PCRE2 error " + std::to_string(code);
    return std::string(reinterpret_cast<const char*>(buffer.data()), static_cast<std::size_t>(n));
  }

  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

struct MatchData {
  explicit MatchData(const Regex& r) : md(r.new_match_data()) {}
  MatchData(const MatchData&) = delete;
  MatchData& operator=(const MatchData&) = delete;
  ~MatchData() { pcre2_match_data_free(md); }
  pcre2_match_data* md;
};

std::array<char32_t, 256> make_byte_map() {
  std::array<char32_t, 256> map{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable =
        (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    map[static_cast<std::size_t>(b)] = printable ? static_cast<char32_t>(b) : next++;
  }
  return map;
}

const std::array<char32_t, 256>& byte_map() {
  static const std::array<char32_t, 256> map = make_byte_map();
  return map;
}

/// Inverse of byte_map(): code point (< 324) -> byte, -1 where none.
const std::array<int, 324>& inverse_byte_map() {
  static const std::array<int, 324> inverse = [] {
    std::array<int, 324> inv{};
    inv.fill(-1);
    for (int b = 0; b < 256; ++b) inv[byte_map()[static_cast<std::size_t>(b)]] = b;
    return inv;
  }();
  return inverse;
}

std::uint64_t pair_key(int left, int right) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(left)) << 32) |
         static_cast<std::uint32_t>(right);
}

}  // namespace

char32_t byte_to_unicode(std::uint8_t byte) noexcept { return byte_map()[byte]; }

struct BpeTokenizer::Impl {
  struct Merge {
    int rank;
    int result;
  };

  std::string source;
  std::vector<std::string> tokens;
  std::vector<std::int32_t> types;
  std::vector<std::string> decoded;  // bytes each token prints as
  std::unordered_map<std::string, int> ids;
  std::unordered_map<std::uint64_t, Merge> merges;
  std::array<int, 256> byte_ids{};
  std::string pre;
  bool split_digits = false;
  int bos = -1;
  int eos = -1;
  bool add_bos = false;
  Regex words{gpt2_pattern()};
  Regex digits{kDigitPattern};
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int>> cache;

  void check_id(int id, const char* where) const {
    if (id < 0 || static_cast<std::size_t>(id) >= tokens.size()) {
      throw kvq::Error(
          kvq::Status::kInvalidArgument,
          fmt::format("kvq::llm::BpeTokenizer::{}: token id {} is out of range; expected 0..{}",
                      where, id, tokens.size() - 1));
    }
  }

  /// Appends the BPE tokens of one pre-tokenized piece.
  void encode_piece(std::string_view piece, std::vector<int>& out) const {
    {
      const std::lock_guard<std::mutex> lock(cache_mutex);
      const auto it = cache.find(std::string(piece));
      if (it != cache.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int> result = merge_piece(piece);
    out.insert(out.end(), result.begin(), result.end());
    const std::lock_guard<std::mutex> lock(cache_mutex);
    if (cache.size() >= kMaxCachedWords) cache.clear();
    cache.emplace(std::string(piece), std::move(result));
  }

  std::vector<int> merge_piece(std::string_view piece) const {
    const std::size_t n = piece.size();
    std::vector<int> sym(n);
    for (std::size_t i = 0; i < n; ++i) {
      const auto b = static_cast<unsigned char>(piece[i]);
      sym[i] = byte_ids[b];
      if (sym[i] < 0) {
        std::string text;
        append_utf8(text, byte_map()[b]);
        throw kvq::Error(
            kvq::Status::kFormatError,
            fmt::format("{}: byte 0x{:02x} has no token (its byte-level symbol '{}' is not in the "
                        "vocabulary); expected a vocabulary holding all 256 byte symbols",
                        source, b, text));
      }
    }
    if (n < 2) return sym;

    struct Candidate {
      int rank;
      int left;
      int left_id;
      int right_id;
      bool operator>(const Candidate& o) const {
        return rank != o.rank ? rank > o.rank : left > o.left;
      }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
    const int count = static_cast<int>(n);
    std::vector<int> prev(n), next(n);
    std::vector<bool> alive(n, true);
    for (int i = 0; i < count; ++i) {
      prev[static_cast<std::size_t>(i)] = i - 1;
      next[static_cast<std::size_t>(i)] = i + 1 < count ? i + 1 : -1;
    }
    const auto at = [](std::vector<int>& v, int i) -> int& {
      return v[static_cast<std::size_t>(i)];
    };
    const auto consider = [&](int left) {
      if (left < 0) return;
      const int right = at(next, left);
      if (right < 0) return;
      const auto it = merges.find(pair_key(at(sym, left), at(sym, right)));
      if (it != merges.end()) queue.push({it->second.rank, left, at(sym, left), at(sym, right)});
    };
    for (int i = 0; i + 1 < count; ++i) consider(i);
    while (!queue.empty()) {
      const Candidate c = queue.top();
      queue.pop();
      if (!alive[static_cast<std::size_t>(c.left)]) continue;
      const int right = at(next, c.left);
      if (right < 0 || at(sym, c.left) != c.left_id || at(sym, right) != c.right_id) continue;
      at(sym, c.left) = merges.find(pair_key(c.left_id, c.right_id))->second.result;
      alive[static_cast<std::size_t>(right)] = false;
      at(next, c.left) = at(next, right);
      if (at(next, right) >= 0) at(prev, at(next, right)) = c.left;
      consider(at(prev, c.left));
      consider(c.left);
    }
    std::vector<int> out;
    for (int i = 0; i >= 0; i = at(next, i)) out.push_back(at(sym, i));
    return out;
  }
};

BpeTokenizer::BpeTokenizer(BpeVocab vocab, std::string source) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.source = std::move(source);
  if (vocab.tokens.empty() || vocab.tokens.size() > static_cast<std::size_t>(INT_MAX)) {
    throw kvq::Error(kvq::Status::kFormatError,
                     fmt::format("{}: tokenizer.ggml.tokens has {} entries; expected 1..{}",
                                 m.source, vocab.tokens.size(), INT_MAX));
  }
  const std::size_t n = vocab.tokens.size();
  if (vocab.token_types.empty()) vocab.token_types.assign(n, kNormal);
  if (vocab.token_types.size() != n) {
    throw kvq::Error(
        kvq::Status::kFormatError,
        fmt::format("{}: tokenizer.ggml.token_type has {} entries; expected one per token ({})",
                    m.source, vocab.token_types.size(), n));
  }
  for (const auto& [name, id] :
       {std::pair<const char*, int>{"bos", vocab.bos}, {"eos", vocab.eos}}) {
    if (id < -1 || id >= static_cast<int>(n)) {
      throw kvq::Error(
          kvq::Status::kFormatError,
          fmt::format("{}: tokenizer.ggml.{}_token_id = {}; expected a token id in 0..{}", m.source,
                      name, id, n - 1));
    }
  }
  if (vocab.pre == "smollm") {
    m.split_digits = true;
  } else if (vocab.pre != "gpt2" && vocab.pre != "default") {
    throw kvq::Error(
        kvq::Status::kUnsupported,
        fmt::format("{}: tokenizer.ggml.pre = {}; expected 'smollm', 'gpt2' or 'default'", m.source,
                    show(vocab.pre)));
  }
  m.pre = std::move(vocab.pre);
  m.bos = vocab.bos;
  m.eos = vocab.eos;
  m.add_bos = vocab.add_bos;

  m.ids.reserve(n);
  for (std::size_t i = 0; i < n; ++i) m.ids.emplace(vocab.tokens[i], static_cast<int>(i));
  for (std::size_t b = 0; b < 256; ++b) {
    std::string text;
    append_utf8(text, byte_map()[b]);
    const auto it = m.ids.find(text);
    m.byte_ids[b] = it == m.ids.end() ? -1 : it->second;
  }

  if (vocab.merges.size() > static_cast<std::size_t>(INT_MAX)) {
    throw kvq::Error(kvq::Status::kFormatError,
                     fmt::format("{}: tokenizer.ggml.merges has {} entries; expected at "
                                 "most {}",
                                 m.source, vocab.merges.size(), INT_MAX));
  }
  m.merges.reserve(vocab.merges.size());
  std::string joined;
  for (std::size_t rank = 0; rank < vocab.merges.size(); ++rank) {
    const std::string& text = vocab.merges[rank];
    const std::size_t space = text.size() < 2 ? std::string::npos : text.find(' ', 1);
    const auto fail = [&](const std::string& why) {
      throw kvq::Error(
          kvq::Status::kFormatError,
          fmt::format(
              "{}: tokenizer.ggml.merges[{}] = {} {}; expected 'left right' with both parts and "
              "their concatenation in the vocabulary",
              m.source, rank, show(text), why));
    };
    if (space == std::string::npos || space + 1 >= text.size()) fail("has no separating space");
    const std::string_view left = std::string_view(text).substr(0, space);
    const std::string_view right = std::string_view(text).substr(space + 1);
    const auto l = m.ids.find(std::string(left));
    const auto r = m.ids.find(std::string(right));
    joined.assign(left);
    joined.append(right);
    const auto j = m.ids.find(joined);
    if (l == m.ids.end()) fail("has a left part that is not a token");
    if (r == m.ids.end()) fail("has a right part that is not a token");
    if (j == m.ids.end()) fail("merges into " + show(joined) + ", which is not a token");
    m.merges.emplace(pair_key(l->second, r->second),
                     Impl::Merge{static_cast<int>(rank), j->second});
  }

  const auto& inverse = inverse_byte_map();
  m.decoded.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    const std::string& text = vocab.tokens[i];
    const std::int32_t type = vocab.token_types[i];
    if (type == kControl) continue;
    if (type == kUserDefined) {
      m.decoded[i] = text;
      continue;
    }
    std::string& out = m.decoded[i];
    for (std::size_t k = 0; k < text.size();) {
      const std::size_t begin = k;
      const char32_t cp = next_code_point(text, k);
      if (cp < inverse.size() && inverse[cp] >= 0) {
        out.push_back(static_cast<char>(static_cast<unsigned char>(inverse[cp])));
      } else {
        out.append(text, begin, k - begin);
      }
    }
  }
  m.tokens = std::move(vocab.tokens);
  m.types = std::move(vocab.token_types);
}

BpeTokenizer::BpeTokenizer(BpeTokenizer&&) noexcept = default;
BpeTokenizer& BpeTokenizer::operator=(BpeTokenizer&&) noexcept = default;
BpeTokenizer::~BpeTokenizer() = default;

BpeTokenizer BpeTokenizer::from_gguf(const GgufFile& file) {
  const std::string source = "GGUF file '" + file.name() + "'";
  const std::string& model = file.get_string("tokenizer.ggml.model");
  if (model != "gpt2") {
    throw kvq::Error(kvq::Status::kUnsupported,
                     fmt::format("{}: tokenizer.ggml.model = {}; expected 'gpt2' (byte-level BPE)",
                                 source, show(model)));
  }
  BpeVocab vocab;
  vocab.tokens = file.get_string_array("tokenizer.ggml.tokens");
  if (file.has("tokenizer.ggml.token_type"))
    vocab.token_types = file.get_i32_array("tokenizer.ggml.token_type");
  vocab.merges = file.get_string_array("tokenizer.ggml.merges");
  vocab.pre = file.find_string("tokenizer.ggml.pre").value_or("default");
  const auto id = [&](const char* key) {
    const auto v = file.find_u32(key);
    if (!v) return -1;
    if (*v >= vocab.tokens.size()) {
      throw kvq::Error(kvq::Status::kFormatError,
                       fmt::format("{}: {} = {}; expected a token id in 0..{}", source, key, *v,
                                   vocab.tokens.size() - 1));
    }
    return static_cast<int>(*v);
  };
  vocab.bos = id("tokenizer.ggml.bos_token_id");
  vocab.eos = id("tokenizer.ggml.eos_token_id");
  vocab.add_bos = file.find_bool("tokenizer.ggml.add_bos_token").value_or(false);
  return BpeTokenizer(std::move(vocab), source);
}

std::vector<int> BpeTokenizer::encode(std::string_view text) const {
  validate_utf8(text);
  const Impl& m = *impl_;
  std::vector<int> out;
  out.reserve(text.size() / 3 + 1);
  MatchData word_md(m.words);
  const auto word = [&](std::string_view piece) { m.encode_piece(piece, out); };
  if (m.split_digits) {
    MatchData digit_md(m.digits);
    m.digits.split(text, digit_md.md,
                   [&](std::string_view piece) { m.words.split(piece, word_md.md, word); });
  } else {
    m.words.split(text, word_md.md, word);
  }
  return out;
}

std::string BpeTokenizer::decode(int /*previous*/, int token) const {
  impl_->check_id(token, "decode");
  return impl_->decoded[static_cast<std::size_t>(token)];
}

int BpeTokenizer::vocab_size() const noexcept { return static_cast<int>(impl_->tokens.size()); }
int BpeTokenizer::bos() const noexcept { return impl_->bos; }
int BpeTokenizer::eos() const noexcept { return impl_->eos; }
bool BpeTokenizer::add_bos() const noexcept { return impl_->add_bos; }

const std::string& BpeTokenizer::token_text(int id) const {
  impl_->check_id(id, "token_text");
  return impl_->tokens[static_cast<std::size_t>(id)];
}

std::int32_t BpeTokenizer::token_type(int id) const {
  impl_->check_id(id, "token_type");
  return impl_->types[static_cast<std::size_t>(id)];
}

int BpeTokenizer::token_id(std::string_view text) const {
  const auto it = impl_->ids.find(std::string(text));
  return it == impl_->ids.end() ? -1 : it->second;
}

const std::string& BpeTokenizer::pre() const noexcept { return impl_->pre; }

}  // namespace kvq::llm
