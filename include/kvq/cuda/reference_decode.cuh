// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief A reference GPU decode attention for any head_dim and any GQA ratio: one thread block
///        per (query head, batch entry), fp32 math, every key and value number read through
///        layout/paged_read.hpp. Slow and simple, for shapes the fused kernels do not take
///        (cuda/decode_attention.cuh: head_dim 64 and 128, up to 8 query heads per kv head; a model
///        like stories260K has head_dim 8) and as a second opinion in tests. nvcc only.
///
/// It takes the fused kernels' arguments (cuda/decode_args.hpp): q and out [batch][num_q_heads]
/// [head_dim] of TQ (float, __half or __nv_bfloat16), kv a PagedKVParams of device memory,
/// slots (nullptr: slot b for entry b), scale (0: 1 / sqrt(head_dim)); num_splits, workspace and
/// workspace_bytes are ignored (no workspace). Query head h attends with kv head
/// h / (num_q_heads / num_kv_heads) over positions [0, lengths[slot]); a slot of length 0 gets
/// zeros. Policies: those layout/paged_read.hpp reads (Fp16Policy, KiviPolicy, PerTokenPolicy).
///
/// The kernel: 128 threads; the block's query row (pre-scaled) and output accumulator live in
/// shared memory; tiles of 128 positions: each thread scores one position (a dot product over
/// head_dim), the block takes the tile's maximum and sum (an online softmax in fp32 with expf),
/// then each thread accumulates its channels over the tile's values. Launchers follow
/// DESIGN.md §6: they check the arguments on the host, launch one kernel, never allocate or
/// synchronise (graph-capturable) and return a Status.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kvq/core/error.hpp"
#include "kvq/core/status.hpp"
#include "kvq/cuda/decode_args.hpp"
#include "kvq/cuda/status.cuh"
#include "kvq/layout/paged_read.hpp"

namespace kvq {
namespace cuda {

namespace detail {

inline constexpr int kReferenceThreads = 128;
inline constexpr int kReferenceWarps = kReferenceThreads / 32;
/// head_dim the reference kernel takes (its shared memory: 2 * head_dim + 132 floats).
inline constexpr int kReferenceMaxHeadDim = 4096;

template <class T>
struct is_reference_query
    : std::bool_constant<std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>> {};

template <class T>
__device__ __forceinline__ float reference_load(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return *p;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(*p);
  } else {
    return __bfloat162float(*p);
  }
}
template <class T>
__device__ __forceinline__ void reference_store(T* p, float x) {
  if constexpr (std::is_same_v<T, float>) {
    *p = x;
  } else if constexpr (std::is_same_v<T, __half>) {
    *p = __float2half_rn(x);
  } else {
    *p = __float2bfloat16_rn(x);
  }
}

/// The maximum (max = true) or sum of x over the thread block; every thread gets it. `red` is
/// kReferenceWarps floats of shared memory, free again on return.
template <bool Max>
__device__ __forceinline__ float reference_reduce(float x, float* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(0xFFFFFFFFu, x, o);
    x = Max ? fmaxf(x, y) : x + y;
  }
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < kReferenceWarps; ++w) r = Max ? fmaxf(r, red[w]) : r + red[w];
  __syncthreads();
  return r;
}

template <class Policy, class TQ>
__global__ void __launch_bounds__(kReferenceThreads) reference_decode_kernel(const DecodeAttentionArgs a) {
  extern __shared__ float reference_smem[];
  const PagedKVParams& kv = a.kv;
  const int dim = kv.head_dim;
  const int head = static_cast<int>(blockIdx.x), entry = static_cast<int>(blockIdx.y);
  const int tid = static_cast<int>(threadIdx.x);
  const std::int32_t slot = a.slots != nullptr ? a.slots[entry] : entry;
  const std::int32_t length = kv.lengths[slot];
  const int group = a.num_q_heads / kv.num_kv_heads;
  const std::int32_t c0 = static_cast<std::int32_t>(head / group) * dim;  // the kv head's first channel of a row
  float* q = reference_smem;         // [dim], pre-scaled
  float* acc = q + dim;              // [dim]
  float* p = acc + dim;              // [kReferenceThreads] the tile's probabilities
  float* red = p + kReferenceThreads;  // [kReferenceWarps]

  const float scale = a.scale > 0.0f ? a.scale : 1.0f / sqrtf(static_cast<float>(dim));
  const std::size_t row = (static_cast<std::size_t>(entry) * static_cast<std::size_t>(a.num_q_heads) + static_cast<std::size_t>(head)) *
                          static_cast<std::size_t>(dim);
  const TQ* qin = static_cast<const TQ*>(a.q) + row;
  for (int c = tid; c < dim; c += kReferenceThreads) {
    q[c] = reference_load(qin + c) * scale;
    acc[c] = 0.0f;
  }
  __syncthreads();

  float m = -INFINITY, l = 0.0f;  // the same in every thread
  for (std::int32_t t0 = 0; t0 < length; t0 += kReferenceThreads) {
    const std::int32_t t = t0 + tid;
    float s = -INFINITY;
    if (t < length) {
      s = 0.0f;
      for (int c = 0; c < dim; ++c) s = fmaf(q[c], paged_key<Policy>(kv, slot, t, c0 + c), s);
    }
    const float m_new = fmaxf(m, reference_reduce<true>(s, red));
    const float e = t < length ? expf(s - m_new) : 0.0f;
    p[tid] = e;
    const float alpha = expf(m - m_new);  // 0 for the first tile (m = -inf)
    l = l * alpha + reference_reduce<false>(e, red);  // its barriers also publish p
    const int n = min(kReferenceThreads, static_cast<int>(length - t0));
    for (int c = tid; c < dim; c += kReferenceThreads) {
      float x = acc[c] * alpha;
      for (int j = 0; j < n; ++j) x = fmaf(p[j], paged_value<Policy>(kv, slot, t0 + j, c0 + c), x);
      acc[c] = x;
    }
    m = m_new;
    __syncthreads();  // p is read before the next tile writes it
  }
  TQ* out = static_cast<TQ*>(a.out) + row;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int c = tid; c < dim; c += kReferenceThreads) reference_store(out + c, acc[c] * inv);
}

}  // namespace detail

/// Dynamic shared memory of a reference launch with this head_dim, in bytes.
inline std::size_t reference_decode_smem(std::int32_t head_dim) noexcept {
  return (2 * static_cast<std::size_t>(head_dim) + detail::kReferenceThreads + detail::kReferenceWarps) * sizeof(float);
}

/// Empty when reference_decode_attention<Policy, TQ> takes `a`, else what is wrong (argument,
/// value, expectation). Host only; reads no device memory.
template <class Policy, class TQ = float>
std::string reference_decode_check(const DecodeAttentionArgs& a) {
  using kvq::detail::concat;
  static_assert(detail::is_reference_query<TQ>::value, "kvq: reference decode queries are float, __half or __nv_bfloat16");
  if constexpr (!is_paged_readable_v<Policy>) {
    return concat("Policy = ", Policy::name(), ": the reference decode reads streams stored as they come (Fp16Policy, "
                  "KiviPolicy, PerTokenPolicy), keys after RoPE");
  } else {
    const PagedKVParams& kv = a.kv;
    if (kv.head_dim < 1 || kv.head_dim > detail::kReferenceMaxHeadDim) {
      return concat("kv.head_dim = ", kv.head_dim, ": expected 1 .. ", detail::kReferenceMaxHeadDim);
    }
    if (kv.num_kv_heads < 1) return concat("kv.num_kv_heads = ", kv.num_kv_heads, ": expected >= 1");
    if (a.num_q_heads < kv.num_kv_heads || a.num_q_heads % kv.num_kv_heads != 0) {
      return concat("num_q_heads = ", a.num_q_heads, ": expected a positive multiple of num_kv_heads (", kv.num_kv_heads, ")");
    }
    if (a.batch < 1 || a.batch > 65535) return concat("batch = ", a.batch, ": expected 1 .. 65535");
    if (!(a.scale >= 0.0f) || !std::isfinite(a.scale)) return concat("scale = ", a.scale, ": expected a finite scale >= 0");
    if (!a.q || !a.out || !kv.lengths || !kv.keys.pool || !kv.values.pool || !kv.keys.block_table || !kv.values.block_table ||
        !kv.keys.quantized_tokens || !kv.values.quantized_tokens) {
      return "q, out, kv.lengths and the pools, block tables and counts of kv.keys and kv.values: expected device pointers, got a null pointer";
    }
    if (kv.exact_bytes != static_cast<std::int32_t>(sizeof(typename Policy::exact_type))) {
      return concat("kv.exact_bytes = ", kv.exact_bytes, ": expected ", sizeof(typename Policy::exact_type), " (", Policy::name(),
                    "'s exact rows)");
    }
    const std::int32_t width = kv.width();
    if (kv.keys.width != width || kv.values.width != width) {
      return concat("kv.keys.width / kv.values.width = ", kv.keys.width, " / ", kv.values.width, ": expected rows of ", width,
                    " numbers (num_kv_heads * head_dim)");
    }
    if (kv.keys.block_tokens < 1 || kv.values.block_tokens < 1) return "kv.keys.block_tokens / kv.values.block_tokens: expected >= 1";
    return {};
  }
}

/// Decode attention of one layer for a batch (see the file comment) by the reference kernel.
/// Returns kOk, kInvalidArgument (reference_decode_check says why; nothing launched) or kCudaError.
template <class Policy, class TQ = float>
Status reference_decode_attention(const DecodeAttentionArgs& a, cudaStream_t stream) {
  if constexpr (!is_paged_readable_v<Policy>) {
    return Status::kInvalidArgument;
  } else {
    if (!reference_decode_check<Policy, TQ>(a).empty()) return Status::kInvalidArgument;
    const dim3 grid(static_cast<unsigned>(a.num_q_heads), static_cast<unsigned>(a.batch));
    detail::reference_decode_kernel<Policy, TQ>
        <<<grid, detail::kReferenceThreads, reference_decode_smem(a.kv.head_dim), stream>>>(a);
    return to_status(cudaGetLastError());
  }
}

}  // namespace cuda
}  // namespace kvq
