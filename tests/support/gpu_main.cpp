// SPDX-License-Identifier: Apache-2.0
// main() of GPU test executables: exits 77 (CTest: Skipped) when no CUDA device is usable,
// otherwise runs the Catch2 session.
#include <cuda_runtime_api.h>

#include <cstdio>

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
  return Catch::Session().run(argc, argv);
}
