// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Launchers of kvq's GPU decode attention: Fp16Policy (fp16, bf16) and KiviPolicy (2- and
///        4-bit, group 32 / 64 / 128, residual 128), head_dim 64 and 128, up to 8 query heads per
///        kv head. nvcc only.
///
/// Rules (DESIGN.md §6): a launcher takes the plain-data arguments (cuda/decode_args.hpp) and a
/// stream, checks them on the host without reading device memory, launches one kernel and
/// returns a Status; it never allocates and never synchronises, so it can be captured in a CUDA
/// graph. decode_check() says in words what is wrong with arguments a launcher rejects.
/// Several host threads may launch at once on different streams with different workspaces.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "kvq/core/error.hpp"
#include "kvq/core/status.hpp"
#include "kvq/cuda/decode_args.hpp"
#include "kvq/cuda/exact_decode.cuh"
#include "kvq/cuda/kivi_decode.cuh"
#include "kvq/cuda/status.cuh"
#include "kvq/policy/baselines.hpp"
#include "kvq/policy/kivi.hpp"

namespace kvq {
namespace cuda {

namespace detail {

template <class Policy>
struct DecodeKernelOf {
  static constexpr bool supported = false;
};
template <class T>
struct DecodeKernelOf<Fp16Policy<T>> {
  static constexpr bool supported = std::is_same_v<T, Float16> || std::is_same_v<T, BFloat16>;
  using exact = std::conditional_t<std::is_same_v<T, BFloat16>, __nv_bfloat16, __half>;
  static constexpr int window_pieces = 0;
  template <class TQ, int D>
  static void* kernel() {
    return reinterpret_cast<void*>(&exact_decode_kernel<exact, D>);
  }
  template <int D>
  static constexpr int smem() { return ExactTile<D>::kSmem; }
};
template <Bits KB, Bits VB, int G, int R>
struct DecodeKernelOf<KiviPolicy<KB, VB, G, R>> {
  static constexpr int kb = static_cast<int>(KB), vb = static_cast<int>(VB);
  static constexpr bool supported = R == 128 && (kb == 2 || kb == 4) && (vb == 2 || vb == 4) && (G == 32 || G == 64 || G == 128);
  using exact = __half;
  static constexpr int window_pieces = KiviTile<2, 2, 128, 128, 128>::kTailPieces;
  template <class TQ, int D>
  static void* kernel() {
    return reinterpret_cast<void*>(&kivi_decode_kernel<TQ, kb, vb, G, G, D>);
  }
  template <int D>
  static constexpr int smem() { return KiviTile<kb, vb, G, G, D>::kSmem; }
};

}  // namespace detail

/// Thread blocks per (batch entry, kv head) of a launch with a.num_splits pieces of blocks.
template <class Policy>
constexpr std::int32_t decode_pieces(std::int32_t num_splits) noexcept {
  return num_splits + detail::DecodeKernelOf<Policy>::window_pieces;
}

namespace detail {
/// The kernel of decode_attention<Policy, TQ> for head_dim D, its dynamic shared memory allowed
/// (once per process); nullptr when that fails.
template <class Policy, class TQ, int D>
void* configured_kernel() {
  using K = DecodeKernelOf<Policy>;
  void* kernel = K::template kernel<TQ, D>();
  static const cudaError_t configured =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, K::template smem<D>());
  return configured == cudaSuccess ? kernel : nullptr;
}
}  // namespace detail

/// num_splits for decode_attention<Policy, TQ> on the current device (decode_splits with this
/// device's multiprocessors and the kernel's occupancy and window pieces). Host only; reads
/// device attributes, launches nothing (may be called while a stream is being captured).
/// Returns 1 when the device cannot be queried.
template <class Policy, class TQ = typename detail::DecodeKernelOf<Policy>::exact>
std::int32_t decode_splits_for(std::int32_t batch, std::int32_t num_kv_heads, std::int32_t head_dim, std::int32_t max_blocks) {
  using K = detail::DecodeKernelOf<Policy>;
  if constexpr (!K::supported) {
    return 1;
  } else {
    int device = 0, sms = 0, ctas = 0;
    if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return 1;
    }
    auto occupancy = [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      void* kernel = detail::configured_kernel<Policy, TQ, D>();
      if (kernel == nullptr ||
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, detail::kDecodeThreads, K::template smem<D>()) != cudaSuccess) {
        ctas = 1;
      }
    };
    if (head_dim == 64) {
      occupancy(std::integral_constant<int, 64>{});
    } else {
      occupancy(std::integral_constant<int, 128>{});
    }
    return decode_splits(batch, num_kv_heads, max_blocks, sms, std::max(ctas, 1), 64, K::window_pieces);
  }
}

/// Workspace bytes of decode attention with these shapes.
template <class Policy>
std::size_t decode_workspace_bytes(std::int32_t batch, std::int32_t num_q_heads, std::int32_t num_kv_heads,
                                   std::int32_t head_dim, std::int32_t num_splits) {
  return decode_workspace_layout(batch, num_q_heads, num_kv_heads, head_dim, decode_pieces<Policy>(num_splits)).bytes;
}

/// Zeroes the workspace's counters (once, before its first launch; launches leave them zero).
inline Status decode_workspace_clear(void* workspace, std::size_t bytes, cudaStream_t stream) {
  return to_status(cudaMemsetAsync(workspace, 0, bytes, stream));
}

/// Empty when a launch of decode_attention<Policy, TQ> with `a` is valid, else what is wrong
/// (argument, value, expectation).
template <class Policy, class TQ = __half>
std::string decode_check(const DecodeAttentionArgs& a) {
  using K = detail::DecodeKernelOf<Policy>;
  using kvq::detail::concat;
  if constexpr (!K::supported) {
    return concat("Policy = ", Policy::name(), ": GPU decode attention supports Fp16Policy<Float16 | BFloat16> and "
                  "KiviPolicy with 2- or 4-bit codes, group 32, 64 or 128 and residual 128");
  } else {
    const PagedKVParams& kv = a.kv;
    if (kv.head_dim != 64 && kv.head_dim != 128) return concat("kv.head_dim = ", kv.head_dim, ": expected 64 or 128");
    if (kv.num_kv_heads < 1) return concat("kv.num_kv_heads = ", kv.num_kv_heads, ": expected >= 1");
    if (a.num_q_heads < kv.num_kv_heads || a.num_q_heads % kv.num_kv_heads != 0 || a.num_q_heads / kv.num_kv_heads > 8) {
      return concat("num_q_heads = ", a.num_q_heads, ": expected 1 to 8 times num_kv_heads (", kv.num_kv_heads, ")");
    }
    if (a.batch < 1 || a.batch > 65535) return concat("batch = ", a.batch, ": expected 1 .. 65535");
    if (a.num_splits < 1 || a.num_splits > 1024) return concat("num_splits = ", a.num_splits, ": expected 1 .. 1024");
    if (!a.q || !a.out || !kv.lengths || !kv.keys.pool || !kv.values.pool || !kv.keys.block_table || !kv.values.block_table ||
        !kv.keys.quantized_tokens || !kv.values.quantized_tokens) {
      return "q, out, kv.lengths and the pools, block tables and counts of kv.keys and kv.values: expected device pointers, got a null pointer";
    }
    if (kv.exact_bytes != 2) return concat("kv.exact_bytes = ", kv.exact_bytes, ": expected 2 (fp16 / bf16 exact rows)");
    const std::size_t need = decode_workspace_bytes<Policy>(a.batch, a.num_q_heads, kv.num_kv_heads, kv.head_dim, a.num_splits);
    if (decode_pieces<Policy>(a.num_splits) > 1 && (!a.workspace || a.workspace_bytes < need)) {
      return concat("workspace_bytes = ", a.workspace_bytes, ": expected a workspace of at least ", need,
                    " bytes (decode_workspace_bytes)");
    }
    const int width = kv.num_kv_heads * kv.head_dim;
    if constexpr (K::window_pieces > 0) {
      const auto line = static_cast<std::uint32_t>(Policy::block_tokens * static_cast<int>(Policy::KeyStream::bits) / 8);
      if (kv.keys.block_tokens != 128 || kv.keys.block.line_bytes != line || kv.keys.block.lines != width) {
        return concat("kv.keys.block: expected KIVI key blocks of 128 tokens, ", width, " lines of ", line, " bytes");
      }
      const auto vline = static_cast<std::uint32_t>(width * static_cast<int>(Policy::ValueStream::bits) / 8);
      if (kv.values.block_tokens != 128 || kv.values.block.line_bytes != vline) {
        return concat("kv.values.block: expected KIVI value blocks of 128 token lines of ", vline, " bytes");
      }
      if (Policy::group_size < kv.head_dim ? kv.head_dim % Policy::group_size != 0 : Policy::group_size % kv.head_dim != 0) {
        return concat("kv.head_dim = ", kv.head_dim, ": value groups of ", Policy::group_size, " channels must tile the heads");
      }
      if (kv.keys.sinks != 0 || kv.values.sinks != 0) return "kv.keys.sinks / kv.values.sinks: expected 0 (KIVI has no sinks)";
    } else {
      if (kv.keys.block_tokens != 16 || kv.keys.block_bytes < static_cast<std::uint64_t>(16 * width * 2)) {
        return concat("kv.keys.block_tokens = ", kv.keys.block_tokens, ": expected exact blocks of 16 rows of ", width, " numbers");
      }
    }
    return {};
  }
}

/// Decode attention of one layer for a batch (see cuda/decode_args.hpp). TQ: __half or
/// __nv_bfloat16 queries and outputs (Fp16Policy: the cache's type).
/// Returns kOk, kInvalidArgument (decode_check says why; nothing launched) or kCudaError.
template <class Policy, class TQ = typename detail::DecodeKernelOf<Policy>::exact>
Status decode_attention(const DecodeAttentionArgs& a, cudaStream_t stream) {
  using K = detail::DecodeKernelOf<Policy>;
  if constexpr (!K::supported) {
    return Status::kInvalidArgument;
  } else {
    if (!decode_check<Policy, TQ>(a).empty()) return Status::kInvalidArgument;
    const dim3 grid(static_cast<unsigned>(a.kv.num_kv_heads), static_cast<unsigned>(decode_pieces<Policy>(a.num_splits)),
                    static_cast<unsigned>(a.batch));
    auto launch = [&](auto dim) -> Status {
      constexpr int D = decltype(dim)::value;
      void* kernel = detail::configured_kernel<Policy, TQ, D>();
      constexpr int smem = K::template smem<D>();
      if (kernel == nullptr) return Status::kCudaError;
      DecodeAttentionArgs copy = a;
      void* params[] = {&copy};
      return to_status(cudaLaunchKernel(kernel, grid, dim3(detail::kDecodeThreads), params, smem, stream));
    };
    return a.kv.head_dim == 64 ? launch(std::integral_constant<int, 64>{}) : launch(std::integral_constant<int, 128>{});
  }
}

}  // namespace cuda
}  // namespace kvq
