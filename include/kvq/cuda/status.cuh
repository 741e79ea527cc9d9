// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief CUDA error handling for kvq's launchers: cudaError_t -> kvq::Status, and a macro
///        that returns early from a launcher when a runtime call fails. nvcc only.
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

/// Evaluates a CUDA runtime call; on failure returns kvq::Status::kCudaError from the
/// enclosing function (which must return kvq::Status).
#define KVQ_CUDA_TRY(expr)                                     \
  do {                                                         \
    const cudaError_t kvq_cuda_err_ = (expr);                  \
    if (kvq_cuda_err_ != cudaSuccess) return ::kvq::Status::kCudaError; \
  } while (0)
