// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief CUDA error handling for kvq's launchers: cudaError_t -> kvq::Status. nvcc only.
#pragma once

#include <cuda_runtime_api.h>

#include "kvq/core/status.hpp"

namespace kvq {
namespace cuda {

/// Status::kOk for cudaSuccess, Status::kCudaError otherwise (cudaGetErrorString tells more).
inline Status to_status(cudaError_t err) noexcept {
  return err == cudaSuccess ? Status::kOk : Status::kCudaError;
}

}  // namespace cuda
}  // namespace kvq
