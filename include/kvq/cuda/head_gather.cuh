// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief interleave_heads: the ranks' attention outputs, gathered rank by rank, into the
///        unsharded output's order. nvcc only; no NCCL (cuda/head_comm.cuh gathers).
///
/// An all-gather leaves gathered [world][batch][num_q_heads / world][head_dim] (each rank's
/// output of its query heads, cache/head_shard.hpp); decode attention's output is
/// out [batch][num_q_heads][head_dim], where rank r's heads of batch entry b are one contiguous
/// run of chunk = (num_q_heads / world) * head_dim elements at (b * world + r) * chunk. So the
/// reorder is a [world][batch] -> [batch][world] transpose of chunks: one cudaMemcpy2DAsync per
/// rank (device to device, graph-capturable, no kernel), none for batch 1 when gathered == out.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kvq/core/status.hpp"
#include "kvq/cuda/status.cuh"

namespace kvq {
namespace cuda {

/// Bytes of gathered / out for a batch: world * batch * chunk_bytes.
/// chunk_bytes: one rank's output of one batch entry, (num_q_heads / world) * head_dim * element size.
constexpr std::size_t gathered_bytes(std::int32_t world, std::int32_t batch, std::size_t chunk_bytes) noexcept {
  return static_cast<std::size_t>(world) * static_cast<std::size_t>(batch) * chunk_bytes;
}

/// out [batch][world][chunk] = gathered [world][batch][chunk] (device memory, not overlapping
/// unless gathered == out with batch 1). Enqueued on `stream`; kInvalidArgument for a
/// non-positive world, batch or chunk, null pointers, or gathered == out with batch > 1;
/// kCudaError from the runtime.
inline Status interleave_heads(const void* gathered, void* out, std::int32_t world, std::int32_t batch, std::size_t chunk_bytes,
                               cudaStream_t stream) noexcept {
  if (world < 1 || batch < 1 || chunk_bytes == 0 || gathered == nullptr || out == nullptr) return Status::kInvalidArgument;
  if (batch == 1 || world == 1) {
    if (gathered == out) return Status::kOk;
    return to_status(cudaMemcpyAsync(out, gathered, gathered_bytes(world, batch, chunk_bytes), cudaMemcpyDeviceToDevice, stream));
  }
  if (gathered == out) return Status::kInvalidArgument;
  const auto* src = static_cast<const std::uint8_t*>(gathered);
  auto* dst = static_cast<std::uint8_t*>(out);
  for (std::int32_t r = 0; r < world; ++r) {
    // Rank r's rows: batch chunks, contiguous in gathered, every world-th chunk in out.
    const cudaError_t err = cudaMemcpy2DAsync(dst + static_cast<std::size_t>(r) * chunk_bytes, static_cast<std::size_t>(world) * chunk_bytes,
                                              src + static_cast<std::size_t>(r) * static_cast<std::size_t>(batch) * chunk_bytes,
                                              chunk_bytes, chunk_bytes, static_cast<std::size_t>(batch), cudaMemcpyDeviceToDevice, stream);
    if (err != cudaSuccess) return to_status(err);
  }
  return Status::kOk;
}

}  // namespace cuda
}  // namespace kvq
