// SPDX-License-Identifier: Apache-2.0
// main() of GPU test executables: exits 77 (CTest: Skipped) when no CUDA device is usable,
// otherwise runs the Catch2 session. Executables built with KVQ_TEST_DATA_DIR (test_data_dir.hpp)
// also exit 77 when their data folder is absent.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <filesystem>
#include <system_error>

#include "test_data_dir.hpp"

#if __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no usable CUDA device (%s)\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "device count is 0");
    return 77;
  }
#ifdef KVQ_TEST_DATA_DIR
  std::error_code ec;
  const std::string dir = kvq_test::test_data_dir();
  if (!std::filesystem::is_directory(dir, ec)) {
#ifdef KVQ_TEST_DATA_ENV
    std::printf("SKIPPED: the data folder '%s' is absent (set the environment variable %s to its path)\n", dir.c_str(),
                KVQ_TEST_DATA_ENV);
#else
    std::printf("SKIPPED: the data folder '%s' is absent\n", dir.c_str());
#endif
    return 77;
  }
#endif
  return Catch::Session().run(argc, argv);
}
