// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Byte-level BPE (GPT-2 style, as llama.cpp and Hugging Face `tokenizers` run it) over a
///        GGUF vocabulary: tokenizer.ggml.model = "gpt2".
///
/// encode: the text (UTF-8) is split into pieces by Unicode regexes (PCRE2, UTF + UCP), chosen
/// by tokenizer.ggml.pre:
///   "smollm":           `\p{N}` first (every digit its own piece, the text between digits kept as
///                       pieces), then the GPT-2 regex inside every piece;
///   "gpt2", "default":  the GPT-2 regex
///                       `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
///                       ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
/// Text between matches is kept as pieces too. Every byte of a piece becomes the vocabulary
/// symbol of its GPT-2 bytes_to_unicode character (printable Latin-1 bytes map to themselves,
/// the other 68 bytes to U+0100.. in byte order: ' ' -> 'Ġ', '\n' -> 'Ċ'); then the adjacent
/// pair with the lowest merge rank (leftmost on ties) is merged until no pair has a merge.
/// Special-token text such as "<|im_end|>" is ordinary text.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "llm/tokenizer.hpp"

namespace kvq::llm {

class GgufFile;

/// The vocabulary of a byte-level BPE tokenizer, as GGUF stores it.
struct BpeVocab {
  std::vector<std::string> tokens;        ///< token text in byte-level form ("Ġthe"); id = index
  std::vector<std::int32_t> token_types;  ///< llama.cpp token types per token; empty: all normal
  std::vector<std::string>
      merges;  ///< "left right" (split at the first space after the first byte); rank = index
  std::string pre = "gpt2";  ///< pre-tokenizer: "smollm", "gpt2" or "default"
  int bos = -1;              ///< -1: none
  int eos = -1;              ///< -1: none
  bool add_bos = false;
};

class BpeTokenizer final : public Tokenizer {
 public:
  /// llama.cpp's token types (tokenizer.ggml.token_type).
  enum TokenType : std::int32_t {
    kNormal = 1,
    kUnknown = 2,
    kControl = 3,      ///< decodes to nothing (BOS, EOS, <|im_end|>, ...)
    kUserDefined = 4,  ///< decodes to its text as is
    kUnused = 5,
    kByte = 6,
  };

  /// Throws kvq::Error naming `source` (kFormatError: a merge whose parts or result are not
  /// tokens, bad ids or array lengths; kUnsupported: an unknown pre-tokenizer).
  explicit BpeTokenizer(BpeVocab vocab, std::string source = "kvq::llm::BpeTokenizer");
  /// Reads tokenizer.ggml.{model (must be "gpt2"), tokens, token_type, merges, pre,
  /// bos_token_id, eos_token_id, add_bos_token (default false)}.
  static BpeTokenizer from_gguf(const GgufFile& file);

  BpeTokenizer(BpeTokenizer&&) noexcept;
  BpeTokenizer& operator=(BpeTokenizer&&) noexcept;
  ~BpeTokenizer() override;

  /// kvq::Error (kInvalidArgument) naming the byte offset on invalid UTF-8; kFormatError when a
  /// byte has no token (impossible with a complete byte-level vocabulary). Thread-safe.
  std::vector<int> encode(std::string_view text) const override;
  /// The token's bytes: its text mapped back through the inverse byte map (control tokens:
  /// nothing; user-defined tokens: their text as is). `previous` does not matter for byte-level
  /// BPE. kvq::Error (kInvalidArgument) naming `token` when it is out of range.
  std::string decode(int previous, int token) const override;

  int vocab_size() const noexcept override;
  int bos() const noexcept override;
  int eos() const noexcept override;
  bool add_bos() const noexcept override;

  /// The token's text in byte-level form ("Ġthe"); kvq::Error when `id` is out of range.
  const std::string& token_text(int id) const;
  /// The token's type (TokenType values); kvq::Error when `id` is out of range.
  std::int32_t token_type(int id) const;
  /// The id of a byte-level token text, or -1.
  int token_id(std::string_view text) const;
  const std::string& pre() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// GPT-2's bytes_to_unicode: the code point standing for `byte` in byte-level token text.
char32_t byte_to_unicode(std::uint8_t byte) noexcept;

}  // namespace kvq::llm
