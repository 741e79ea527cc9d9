// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief A model file and its tokenizer, whatever the format: GGUF (tokenizer inside) or a
///        llama2.c checkpoint (tokenizer.bin beside it or given).
#pragma once

#include <memory>
#include <string>

#include "llm/model.hpp"
#include "llm/tokenizer.hpp"

namespace kvq::llm {

struct LoadedModel {
  Model model;
  std::unique_ptr<Tokenizer> tokenizer;
};

/// Opens `model_path`: a file starting with "GGUF" is read as GGUF (its own tokenizer; a
/// non-empty `tokenizer_path` is an error), anything else as a llama2.c checkpoint whose
/// tokenizer is `tokenizer_path`, or when that is empty tok<vocab>.bin or tokenizer.bin in the
/// model's folder. Throws kvq::Error naming the file and what was expected.
LoadedModel load_model(const std::string& model_path, const std::string& tokenizer_path = {});

}  // namespace kvq::llm
