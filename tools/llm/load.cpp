// SPDX-License-Identifier: Apache-2.0
#include "llm/load.hpp"

#include <cstring>
#include <filesystem>
#include <fstream>

#include "kvq/core/error.hpp"
#include "llm/gguf_model.hpp"
#include "llm/llama2c.hpp"

namespace kvq::llm {

LoadedModel load_model(const std::string& model_path, const std::string& tokenizer_path) {
  char magic[4] = {};
  {
    std::ifstream in(model_path, std::ios::binary);
    if (!in) throw kvq::Error(kvq::Status::kIoError, "cannot open model file '" + model_path + "'");
    in.read(magic, 4);
  }
  LoadedModel loaded;
  if (std::memcmp(magic, "GGUF", 4) == 0) {
    if (!tokenizer_path.empty()) {
      throw kvq::Error(kvq::Status::kInvalidArgument,
                       "argument '--tokenizer' = '" + tokenizer_path + "'; expected none for the GGUF model '" +
                           model_path + "', which carries its own tokenizer");
    }
    LoadedGguf g = load_gguf_model(model_path);
    loaded.model = std::move(g.model);
    loaded.tokenizer = std::move(g.tokenizer);
    return loaded;
  }
  loaded.model = load_llama2c(model_path);
  std::string tok = tokenizer_path;
  if (tok.empty()) {
    const std::filesystem::path dir = std::filesystem::path(model_path).parent_path();
    for (const std::string& name : {"tok" + std::to_string(loaded.model.config.vocab_size) + ".bin",
                                   std::string("tokenizer.bin")}) {
      if (std::filesystem::exists(dir / name)) {
        tok = (dir / name).string();
        break;
      }
    }
    if (tok.empty()) {
      throw kvq::Error(kvq::Status::kInvalidArgument,
                       "argument '--tokenizer' is missing; the llama2.c model '" + model_path +
                           "' needs its tokenizer.bin (none found as tok" +
                           std::to_string(loaded.model.config.vocab_size) + ".bin or tokenizer.bin beside it)");
    }
  }
  loaded.tokenizer = std::make_unique<Llama2cTokenizer>(Llama2cTokenizer::load(tok, loaded.model.config.vocab_size));
  return loaded;
}

}  // namespace kvq::llm
