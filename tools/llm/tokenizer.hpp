// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief What the runtime needs of a tokenizer: raw text to ids, ids back to bytes.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace kvq::llm {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  /// Token ids of raw text: no BOS, no chat template; special-token text such as "<|im_end|>"
  /// is encoded as ordinary text. Throws kvq::Error on text the tokenizer cannot represent.
  virtual std::vector<int> encode(std::string_view text) const = 0;

  /// The bytes `token` contributes when printed after `previous` (-1 at the start); what a
  /// streaming generator writes. Control tokens (BOS, EOS) print as nothing.
  virtual std::string decode(int previous, int token) const = 0;

  virtual int vocab_size() const noexcept = 0;
  virtual int bos() const noexcept = 0;  ///< -1 when the model has none
  virtual int eos() const noexcept = 0;  ///< -1 when the model has none
  /// Whether a sequence starts with BOS (llama2.c: yes; SmolLM2's GGUF: add_bos_token = false).
  virtual bool add_bos() const noexcept = 0;
};

}  // namespace kvq::llm
