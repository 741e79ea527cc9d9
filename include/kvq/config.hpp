// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Version and compiler macros shared by every kvq header.
#pragma once

#define KVQ_VERSION_MAJOR 0
#define KVQ_VERSION_MINOR 1
#define KVQ_VERSION_PATCH 0

/// Functions that run on the host and, when compiled by nvcc, on the device. All quantization
/// math is written once with this marker so that the CPU tests check the code the kernels run.
#if defined(__CUDACC__)
#define KVQ_HOST_DEVICE __host__ __device__ inline
#else
#define KVQ_HOST_DEVICE inline
#endif

/// Host hot-path helpers that must inline into their SIMD loops (GCC and Clang otherwise keep
/// some out of line for size).
#if defined(__GNUC__) || defined(__clang__)
#define KVQ_FORCEINLINE inline __attribute__((always_inline))
#else
#define KVQ_FORCEINLINE inline
#endif

/// True while compiling device code (the device pass of nvcc).
#if defined(__CUDA_ARCH__)
#define KVQ_DEVICE_PASS 1
#else
#define KVQ_DEVICE_PASS 0
#endif
