// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Owners of CUDA resources for kvq's host code (device memory, pinned memory, an event;
///        freed with their owner) and check_cuda (cudaError_t -> kvq::Error(kCudaError) naming the
///        call). nvcc only.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "kvq/core/error.hpp"
#include "kvq/core/status.hpp"

namespace kvq {
namespace cuda {
namespace detail {

[[noreturn]] inline void throw_cuda(const char* where, const char* what, cudaError_t err) {
  throw Error(Status::kCudaError, kvq::detail::concat(where, ": ", what, " failed: ", cudaGetErrorName(err), " (",
                                                      cudaGetErrorString(err), ")"));
}
inline void check_cuda(const char* where, const char* what, cudaError_t err) {
  if (err != cudaSuccess) throw_cuda(where, what, err);
}

/// Device memory of `bytes` bytes, freed on destruction.
class DeviceBytes {
 public:
  DeviceBytes() = default;
  DeviceBytes(const char* where, std::size_t bytes) : bytes_(bytes) {
    if (bytes == 0) return;
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
      throw Error(Status::kCudaError, kvq::detail::concat(where, ": cudaMalloc of ", bytes, " bytes failed: ",
                                                          cudaGetErrorString(err)));
    }
    ptr_ = p;
  }
  DeviceBytes(const DeviceBytes&) = delete;
  DeviceBytes& operator=(const DeviceBytes&) = delete;
  DeviceBytes(DeviceBytes&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBytes& operator=(DeviceBytes&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~DeviceBytes() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  template <class T = std::uint8_t>
  T* get() const noexcept {
    return static_cast<T*>(ptr_);
  }
  std::size_t bytes() const noexcept { return bytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

/// Pinned host memory, freed on destruction.
class PinnedBytes {
 public:
  PinnedBytes() = default;
  PinnedBytes(const char* where, std::size_t bytes) : bytes_(bytes) {
    void* p = nullptr;
    const cudaError_t err = cudaMallocHost(&p, bytes > 0 ? bytes : 1);
    if (err != cudaSuccess) {
      throw Error(Status::kCudaError, kvq::detail::concat(where, ": cudaMallocHost of ", bytes, " bytes failed: ",
                                                          cudaGetErrorString(err)));
    }
    ptr_ = p;
  }
  PinnedBytes(const PinnedBytes&) = delete;
  PinnedBytes& operator=(const PinnedBytes&) = delete;
  PinnedBytes(PinnedBytes&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  PinnedBytes& operator=(PinnedBytes&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~PinnedBytes() {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
  }
  template <class T = std::uint8_t>
  T* get() const noexcept {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

/// A CUDA event without timing, destroyed with its owner.
class Event {
 public:
  Event() = default;
  explicit Event(const char* where) {
    check_cuda(where, "cudaEventCreateWithFlags", cudaEventCreateWithFlags(&e_, cudaEventDisableTiming));
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  Event(Event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  Event& operator=(Event&& o) noexcept {
    std::swap(e_, o.e_);
    return *this;
  }
  ~Event() {
    if (e_ != nullptr) cudaEventDestroy(e_);
  }
  cudaEvent_t get() const noexcept { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

}  // namespace detail
}  // namespace cuda
}  // namespace kvq
