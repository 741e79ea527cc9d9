// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief llama2.c files: legacy (version 0) float32 checkpoints such as stories260K, and the
///        tokenizer.bin format of their SentencePiece-derived vocabularies.
#pragma once

#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "llm/model.hpp"
#include "llm/tokenizer.hpp"

namespace kvq::llm {

/// Loads a llama2.c legacy checkpoint: 7 int32 (dim, hidden, layers, heads, kv heads, vocab —
/// negative when the classifier is not tied — and seq_len), then float32 tensors in the order
/// token embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, freq_cis (unused),
/// [classifier]. RoPE on adjacent pairs with theta 10000, RMSNorm eps 1e-5. Throws kvq::Error
/// (kIoError, kFormatError) naming the file, the header field or the size expected.
Model load_llama2c(const std::string& path);

/// A llama2.c tokenizer.bin: int32 max_token_length, then per token a float score, an int32
/// length and the bytes. BOS = 1, EOS = 2, byte fallback pieces "<0xNN>" = byte + 3.
class Llama2cTokenizer final : public Tokenizer {
 public:
  static constexpr int kBos = 1;
  static constexpr int kEos = 2;

  static Llama2cTokenizer load(const std::string& path, int vocab_size);

  /// llama2.c's encode() without BOS: a dummy-prefix " " piece, one piece per UTF-8 code point
  /// (byte fallback for code points not in the vocabulary), then repeatedly the adjacent pair
  /// whose concatenation is the best-scoring piece is merged (leftmost on ties).
  std::vector<int> encode(std::string_view text) const override;
  /// llama2.c's decode + safe_printf: a piece after BOS loses its leading space, "<0xNN>" is the
  /// raw byte, and a single byte that is neither printable nor whitespace prints as nothing.
  std::string decode(int previous, int token) const override;

  int vocab_size() const noexcept override { return static_cast<int>(pieces_.size()); }
  int bos() const noexcept override { return kBos; }
  int eos() const noexcept override { return kEos; }
  bool add_bos() const noexcept override { return true; }
  const std::string& piece(int token) const;

 private:
  int id_of(const std::string& piece) const;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> lookup_;
};

}  // namespace kvq::llm
