// SPDX-License-Identifier: Apache-2.0
// main() of test executables that read ../shared/realdata: exits 77 (CTest: Skipped) with a
// message when the folder named by KVQ_REALDATA_DIR is absent, otherwise runs the Catch2 session.
#include <cstdio>
#include <filesystem>
#include <system_error>

#if __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#ifndef KVQ_REALDATA_DIR
#error "KVQ_REALDATA_DIR must name the real-data folder (tests/realdata/CMakeLists.txt sets it)"
#endif

int main(int argc, char** argv) {
  std::error_code ec;
  if (!std::filesystem::is_directory(KVQ_REALDATA_DIR, ec)) {
    std::printf("SKIPPED: the real-data folder '%s' is absent (configure with "
                "-DKVQ_REALDATA_DIR=<path to shared/realdata> to run these tests)\n",
                KVQ_REALDATA_DIR);
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
