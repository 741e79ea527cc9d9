// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief What the GPU benchmarks share: KVQ_CHECK (exit on a CUDA error), a hash for synthetic
///        data, fill_halves (random fp16 in [-1, 1]) and copy_bandwidth (the device-to-device
///        copy in bytes read + written per second, the limit the results are set against).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define KVQ_CHECK(x)                                                                      \
  do {                                                                                    \
    const cudaError_t e_ = (x);                                                           \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

inline __device__ std::uint32_t hash32(std::uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return static_cast<std::uint32_t>(x);
}

/// x[i] = a hash of (seed, i) as fp16 in [-1, 1).
__global__ void fill_halves_kernel(__half* x, std::uint64_t n, std::uint64_t seed) {
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  for (std::uint64_t i = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float u = static_cast<float>(hash32(seed * 0x9E3779B97F4A7C15ULL + i) >> 8) * (1.0f / 16777216.0f);
    x[i] = __float2half_rn(2.0f * u - 1.0f);
  }
}
inline void fill_halves(void* x, std::uint64_t n, std::uint64_t seed, cudaStream_t stream = nullptr) {
  fill_halves_kernel<<<1024, 256, 0, stream>>>(static_cast<__half*>(x), n, seed);
  KVQ_CHECK(cudaGetLastError());
}

inline double copy_bandwidth(void* a, void* b, std::size_t bytes) {
  cudaEvent_t e0, e1;
  KVQ_CHECK(cudaEventCreate(&e0));
  KVQ_CHECK(cudaEventCreate(&e1));
  std::vector<float> times;
  for (int i = 0; i < 20; ++i) {
    KVQ_CHECK(cudaEventRecord(e0));
    KVQ_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice));
    KVQ_CHECK(cudaEventRecord(e1));
    KVQ_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    KVQ_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    times.push_back(ms);
  }
  std::nth_element(times.begin(), times.begin() + 10, times.end());
  return 2.0 * static_cast<double>(bytes) / (times[10] * 1e-3);
}
