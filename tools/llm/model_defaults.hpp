// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Where `kvq eval` and `kvq generate` look when no model or text is given.
#pragma once

#include <cstdlib>
#include <string>

namespace kvq::llm {

/// scripts/fetch_model.sh puts SmolLM2-135M-Instruct here: $KVQ_MODEL_CACHE, else
/// $XDG_CACHE_HOME/kvq, else $HOME/.cache/kvq.
inline std::string default_model_path() {
  std::string dir;
  if (const char* c = std::getenv("KVQ_MODEL_CACHE"); c != nullptr && *c != '\0') {
    dir = c;
  } else if (const char* x = std::getenv("XDG_CACHE_HOME"); x != nullptr && *x != '\0') {
    dir = std::string(x) + "/kvq";
  } else if (const char* h = std::getenv("HOME"); h != nullptr && *h != '\0') {
    dir = std::string(h) + "/.cache/kvq";
  } else {
    dir = ".cache/kvq";
  }
  return dir + "/SmolLM2-135M-Instruct.Q4_1.gguf";
}

/// English text from Debian's dasher-data package (scripts/setup.sh installs it).
inline constexpr const char* kDefaultTextPath = "/usr/share/dasher/training_english_GB.txt";

}  // namespace kvq::llm
