// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Pieces shared by kvq's decode-attention kernels: the per-warp online-softmax state in
///        the tensor-core layout of decode (tokens in mma M, the query heads of one GQA group in
///        N), the merge of a thread block's warps, and the merge of a row's pieces through the
///        workspace by the last piece to finish. nvcc only; device code.
///
/// Layout (lane = 4g + t): a warp's scores tile S [16 tokens][8 heads] is an mma C fragment, so
/// lane (g, t) holds heads 2t and 2t + 1; the output accumulator is O^T [head_dim][8 heads] as
/// head_dim / 16 C fragments (rows = channels in the kernel's channel order), again heads 2t and
/// 2t + 1 per lane. Scores are in log2 units (the softmax scale times log2 e is folded into the
/// queries), so probabilities are exp2(s - m).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kvq/cuda/decode_args.hpp"
#include "kvq/cuda/ptx.cuh"

namespace kvq {
namespace cuda {
namespace detail {

inline constexpr int kDecodeWarps = 4;
inline constexpr int kDecodeThreads = 32 * kDecodeWarps;
inline constexpr float kLog2e = 1.4426950408889634f;

/// Running softmax of one lane: max m and (lane-partial) sum l of heads 2t and 2t + 1, and the
/// lane's part of the output accumulator (CT channel tiles).
template <int CT>
struct SoftmaxLanes {
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
  float zsum[2] = {0.0f, 0.0f};  ///< sum of p * zero-point of folded value groups (added to every channel)
  float acc[CT][4] = {};

  /// Folds a new tile's column maxima (already reduced over the warp) into m and rescales (skipped,
  /// bit for bit the same, when no lane's maximum grew: the factors would be exp2(0) = 1). Warp-uniform.
  __device__ __forceinline__ void rescale(float mx0, float mx1) {
    const float n0 = fmaxf(m[0], mx0), n1 = fmaxf(m[1], mx1);
    if (__all_sync(0xffffffffu, n0 == m[0] && n1 == m[1])) return;
    const float c0 = ptx::exp2_approx(m[0] - n0), c1 = ptx::exp2_approx(m[1] - n1);
    m[0] = n0;
    m[1] = n1;
    l[0] *= c0;
    l[1] *= c1;
    zsum[0] *= c0;
    zsum[1] *= c1;
#pragma unroll
    for (int j = 0; j < CT; ++j) {
      acc[j][0] *= c0;
      acc[j][1] *= c1;
      acc[j][2] *= c0;
      acc[j][3] *= c1;
    }
  }
};

/// Maximum over the 8 lanes of one t (the rows of a C fragment).
__device__ __forceinline__ float max_over_rows(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 8));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 16));
}
__device__ __forceinline__ float sum_over_rows(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  return x + __shfl_xor_sync(0xffffffffu, x, 16);
}

/// Calls f(std::integral_constant<int, I>{}) for I = 0 .. N-1 (fragment indices must be
/// compile-time constants to stay in registers).
template <int N, class F, int I = 0>
__device__ __forceinline__ void static_for(F&& f) {
  if constexpr (I < N) {
    f(std::integral_constant<int, I>{});
    static_for<N, F, I + 1>(static_cast<F&&>(f));
  }
}

/// One 16-token score tile s4 (C fragment, log2 units) through the softmax: masks rows at
/// positions >= length (row g at position row0 + g, row g + 8 at row0 + g + 8), rescales the
/// state, adds the probabilities to l and returns P^T as the two B-fragment registers of the
/// value mma.
template <class T, int CT>
__device__ __forceinline__ void softmax_tile(SoftmaxLanes<CT>& sm, float (&s4)[4], int row0, int g, int length,
                                             std::uint32_t (&pb)[2]) {
  if (row0 + g >= length) s4[0] = s4[1] = -INFINITY;
  if (row0 + g + 8 >= length) s4[2] = s4[3] = -INFINITY;
  sm.rescale(max_over_rows(fmaxf(s4[0], s4[2])), max_over_rows(fmaxf(s4[1], s4[3])));
  const float p0 = ptx::exp2_approx(s4[0] - sm.m[0]), p1 = ptx::exp2_approx(s4[1] - sm.m[1]);
  const float p2 = ptx::exp2_approx(s4[2] - sm.m[0]), p3 = ptx::exp2_approx(s4[3] - sm.m[1]);
  sm.l[0] += p0 + p2;
  sm.l[1] += p1 + p3;
  pb[0] = ptx::movmatrix_trans(ptx::MmaType<T>::pack(p0, p1));
  pb[1] = ptx::movmatrix_trans(ptx::MmaType<T>::pack(p2, p3));
}

/// Shared memory of the block merge: per warp the max and sum of 8 heads and O [8][D].
template <int D>
struct WarpMergeSmem {
  float m[kDecodeWarps][8];
  float l[kDecodeWarps][8];
  float o[kDecodeWarps][8][D];
};

/// Output element type conversions.
template <class T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <class T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

/// The merge of all `count` pieces' states of one (entry, kv head) by the last piece to finish:
/// per head the maximum and the rescaled sum over the states (a warp per head, its lanes over the
/// pieces), then per head and 4 channels the rescaled partial outputs (float4 loads, 8 pieces in
/// flight per thread). State p of head h at stats / partials index first + h * stride + p (p <
/// count <= stride); out points at the group's first head. Must be called by every thread of the block.
template <class TO, int D>
__device__ void merge_pieces(const float2* stats, const float* partials, TO* out, std::size_t first, int stride,
                             int count, int group) {
  __shared__ float head_max[8], head_inv[8];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int h = warp; h < group; h += kDecodeWarps) {
    const float2* st = stats + first + static_cast<std::size_t>(h) * stride;
    // The states of pieces lane and lane + 32 stay in registers for the sum (one round trip to
    // L2 for up to 64 pieces); any further ones are loaded again.
    constexpr int kHeld = 2;
    float2 held[kHeld];
#pragma unroll
    for (int k = 0; k < kHeld; ++k) {
      const int p = lane + 32 * k;
      held[k] = p < count ? __ldcg(&st[p]) : make_float2(-INFINITY, 0.0f);
    }
    float mx = fmaxf(held[0].x, held[1].x);
    for (int p = lane + 32 * kHeld; p < count; p += 32) mx = fmaxf(mx, __ldcg(&st[p].x));
#pragma unroll
    for (int x = 16; x > 0; x /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
    float sum = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int k = 0; k < kHeld; ++k) {
        if (lane + 32 * k < count) sum += held[k].y * ptx::exp2_approx(held[k].x - mx);
      }
      for (int p = lane + 32 * kHeld; p < count; p += 32) {
        const float2 s = __ldcg(&st[p]);
        sum += s.y * ptx::exp2_approx(s.x - mx);
      }
    }
#pragma unroll
    for (int x = 16; x > 0; x /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, x);
    if (lane == 0) {
      head_max[h] = mx;
      head_inv[h] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < group * (D / 4); e += blockDim.x) {
    const int h = e / (D / 4), c = 4 * (e % (D / 4));
    const float mx = head_max[h];
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (mx != -INFINITY) {
      const std::size_t at = first + static_cast<std::size_t>(h) * stride;
      const float2* st = stats + at;
      const float* part = partials + at * D + c;
#pragma unroll 8
      for (int p = 0; p < count; ++p) {
        const float f = ptx::exp2_approx(__ldcg(&st[p].x) - mx);
        const float4 v = __ldcg(reinterpret_cast<const float4*>(part + static_cast<std::size_t>(p) * D));
        o.x = fmaf(v.x, f, o.x);
        o.y = fmaf(v.y, f, o.y);
        o.z = fmaf(v.z, f, o.z);
        o.w = fmaf(v.w, f, o.w);
      }
    }
    const float inv = head_inv[h];
    TO* dst = out + static_cast<std::size_t>(h) * D + c;
    dst[0] = from_f32<TO>(o.x * inv);
    dst[1] = from_f32<TO>(o.y * inv);
    dst[2] = from_f32<TO>(o.z * inv);
    dst[3] = from_f32<TO>(o.w * inv);
  }
}

/// Ends a piece with work (`work`, of the launch's `pieces` per (entry, kv head)): merges the
/// warps of the block, then either writes the output (the only piece with work) or the piece's
/// partial state, and the last of them to finish merges all. channel_of(g, j, h) is the channel
/// of row g + 8h of channel tile j in the kernel's order. Must be called by every thread of the block.
template <class TO, int D, int CT, class ChannelOf>
__device__ void finish_piece(const DecodeAttentionArgs& a, SoftmaxLanes<CT>& st, void* smem_raw, int entry, int kv_head,
                             PieceWork work, int pieces, int group, ChannelOf channel_of) {
  auto& sm = *reinterpret_cast<WarpMergeSmem<D>*>(smem_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  float l0 = sum_over_rows(st.l[0]), l1 = sum_over_rows(st.l[1]);
  const float z0 = sum_over_rows(st.zsum[0]), z1 = sum_over_rows(st.zsum[1]);
  __syncthreads();  // the caller's shared memory is free from here on
#pragma unroll
  for (int j = 0; j < CT; ++j) {
    const int c0 = channel_of(g, j, 0), c1 = channel_of(g, j, 1);
    sm.o[warp][2 * t][c0] = st.acc[j][0] + z0;
    sm.o[warp][2 * t + 1][c0] = st.acc[j][1] + z1;
    sm.o[warp][2 * t][c1] = st.acc[j][2] + z0;
    sm.o[warp][2 * t + 1][c1] = st.acc[j][3] + z1;
  }
  if (g == 0) {
    sm.m[warp][2 * t] = st.m[0];
    sm.m[warp][2 * t + 1] = st.m[1];
    sm.l[warp][2 * t] = l0;
    sm.l[warp][2 * t + 1] = l1;
  }
  __syncthreads();

  const int hq0 = kv_head * group;
  const std::size_t row_stride = static_cast<std::size_t>(a.num_q_heads) * D;
  TO* out = static_cast<TO*>(a.out) + static_cast<std::size_t>(entry) * row_stride;
  const DecodeWorkspaceLayout ws =
      decode_workspace_layout(a.batch, a.num_q_heads, a.kv.num_kv_heads, D, pieces);
  auto* base = static_cast<std::uint8_t*>(a.workspace);
  auto* stats = reinterpret_cast<float2*>(base + ws.stats);
  auto* partials = reinterpret_cast<float*>(base + ws.partials);
  auto state_index = [&](int h, int p) {
    return (static_cast<std::size_t>(entry) * a.num_q_heads + hq0 + h) * pieces + p;
  };
  for (int e = threadIdx.x; e < group * D; e += blockDim.x) {
    const int h = e / D, c = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, sm.m[w][h]);
    float sum = 0.0f, o = 0.0f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) {
        const float f = ptx::exp2_approx(sm.m[w][h] - mx);
        sum += sm.l[w][h] * f;
        o += sm.o[w][h][c] * f;
      }
    }
    if (work.count == 1) {
      out[static_cast<std::size_t>(hq0 + h) * D + c] = from_f32<TO>(sum > 0.0f ? o / sum : 0.0f);
    } else {
      partials[state_index(h, work.index) * D + c] = o;
      if (c == 0) stats[state_index(h, work.index)] = make_float2(mx, sum);
    }
  }
  if (work.count == 1) return;

  __shared__ int last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    auto* counters = reinterpret_cast<int*>(base + ws.counters);
    int* counter = counters + static_cast<std::size_t>(entry) * a.kv.num_kv_heads + kv_head;
    last = atomicAdd(counter, 1) == work.count - 1;
    if (last) *counter = 0;  // every other piece has arrived: ready for the next launch
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  merge_pieces<TO, D>(stats, partials, out + static_cast<std::size_t>(hq0) * D, state_index(0, 0), pieces, work.count,
                      group);
}

/// Loads the raw query of head g of a GQA group (zero for g >= group) for channels ch[0..3] of
/// k-chunk kc, as the two B-fragment registers, each number times `scale`.
template <class TQ, class TM>
__device__ __forceinline__ void load_query_pair(const TQ* q, bool valid, int c0, int c1, float scale, std::uint32_t& r) {
  const float x0 = valid ? to_f32(q[c0]) * scale : 0.0f;
  const float x1 = valid ? to_f32(q[c1]) * scale : 0.0f;
  r = ptx::MmaType<TM>::pack(x0, x1);
}

}  // namespace detail
}  // namespace cuda
}  // namespace kvq
