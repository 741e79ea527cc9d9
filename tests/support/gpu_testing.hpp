// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Helpers of the GPU tests (CUDA runtime, host code): a device buffer that fails the test
///        on a CUDA error, and the row error every attention comparison reports.
#pragma once

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "kvq/core/float_types.hpp"
#include "kvq/core/bits.hpp"
#include "kvq_catch.hpp"

namespace kvq_test {

/// n elements of T in device memory (at least one allocated), freed with the object.
template <class T>
struct Device {
  T* ptr = nullptr;
  explicit Device(std::size_t n) { REQUIRE(cudaMalloc(&ptr, sizeof(T) * std::max<std::size_t>(n, 1)) == cudaSuccess); }
  explicit Device(const std::vector<T>& v) : Device(v.size()) { upload(v); }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  ~Device() { cudaFree(ptr); }
  void upload(const std::vector<T>& v) {
    REQUIRE(cudaMemcpy(ptr, v.data(), sizeof(T) * v.size(), cudaMemcpyHostToDevice) == cudaSuccess);
  }
};

/// Max over rows r < rows of ||got[r] - ref[r]|| / ||ref[r]|| (L2 over the `dim` numbers of a row;
/// rows contiguous). G: float or a kvq 16-bit type.
template <class G>
double max_row_error(const G* got, const float* ref, kvq::index_t rows, kvq::index_t dim) {
  double worst = 0.0;
  for (kvq::index_t r = 0; r < rows; ++r) {
    double err2 = 0.0, ref2 = 0.0;
    for (kvq::index_t c = 0; c < dim; ++c) {
      const auto i = static_cast<std::size_t>(r * dim + c);
      const double d = static_cast<double>(kvq::to_float(got[i])) - ref[i];
      err2 += d * d;
      ref2 += static_cast<double>(ref[i]) * ref[i];
    }
    worst = std::max(worst, std::sqrt(err2 / std::max(ref2, 1e-30)));
  }
  return worst;
}

}  // namespace kvq_test
