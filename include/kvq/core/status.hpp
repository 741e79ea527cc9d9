// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Status codes returned by host-device code (which cannot throw).
#pragma once

#include <cstdint>

#include "kvq/config.hpp"

namespace kvq {

/// Outcome of an operation. Host APIs turn a failing status into a kvq::Error that carries it;
/// host-device functions and CUDA launchers return it directly.
enum class Status : std::uint8_t {
  kOk = 0,
  kInvalidArgument,   ///< an argument is outside its documented domain
  kNonFiniteInput,    ///< NaN or Inf in data that is about to be quantized
  kMetadataOverflow,  ///< a scale or zero-point does not fit the metadata format
  kOutOfCapacity,     ///< a pool or buffer is too small for the request
  kIoError,           ///< a file could not be opened, read or written
  kFormatError,       ///< a file's contents do not follow its format
  kUnsupported,       ///< a valid request that this build does not implement
  kCudaError,         ///< the CUDA runtime reported an error
  kRankFailure,       ///< a sharded run's collective failed: NCCL, another rank's error or exit, a timeout
};

/// Stable lower-case name of a status, for messages and logs.
KVQ_HOST_DEVICE constexpr const char* status_name(Status s) noexcept {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kNonFiniteInput: return "non-finite input";
    case Status::kMetadataOverflow: return "metadata overflow";
    case Status::kOutOfCapacity: return "out of capacity";
    case Status::kIoError: return "i/o error";
    case Status::kFormatError: return "format error";
    case Status::kUnsupported: return "unsupported";
    case Status::kCudaError: return "cuda error";
    case Status::kRankFailure: return "rank failure";
  }
  return "unknown status";
}

}  // namespace kvq
