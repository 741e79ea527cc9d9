// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Fused split-KV decode attention on exact blocks (Fp16Policy: fp16 or bf16 rows,
///        16-token blocks [16][num_kv_heads * head_dim]), tensor cores, one launch. nvcc only.
///
/// Grid (num_kv_heads, pieces, batch), 128 threads. Each piece takes an equal run of the
/// sequence's blocks; warp w of a piece takes every 4th block and streams its kv head's 16 key and
/// value rows through a three-stage cp.async ring (16-byte chunks XOR-swizzled by row so that
/// ldmatrix reads are conflict-free). Scores S [16 tokens][8 heads] = K Q^T, O^T += V^T P^T with
/// ldmatrix (.trans for V) A fragments, P from the score fragments by movmatrix.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kvq/cuda/decode_common.cuh"
#include "kvq/layout/paged_params.hpp"

namespace kvq {
namespace cuda {
namespace detail {

template <int D>
struct ExactTile {
  static constexpr int kTokens = 16;
  static constexpr int kRow = D * 2;             ///< bytes of one token's head row
  static constexpr int kChunksPerRow = kRow / 16;
  static constexpr int kRows = kTokens * kRow;   ///< bytes of 16 rows
  static constexpr int kStage = 2 * kRows;       ///< keys then values
  static constexpr int kStages = 3;
  static constexpr int kSmem = [] {
    const int s = kDecodeWarps * kStages * kStage;
    return s > static_cast<int>(sizeof(WarpMergeSmem<D>)) ? s : static_cast<int>(sizeof(WarpMergeSmem<D>));
  }();
  /// Byte offset of 16-byte chunk `chunk` of row `row` in a stage's key or value rows.
  static __device__ __forceinline__ int at(int row, int chunk) { return row * kRow + 16 * (chunk ^ (row & 7)); }
};

template <class T, int D>
__device__ __forceinline__ void issue_exact_stage(std::uint8_t* st, const std::uint8_t* block, int rows, int head,
                                                  std::size_t row_bytes, int lane) {
  using Tile = ExactTile<D>;
  const std::uint8_t* keys = block + static_cast<std::size_t>(head) * Tile::kRow;
  for (int c = lane; c < Tile::kTokens * Tile::kChunksPerRow; c += 32) {
    const int row = c / Tile::kChunksPerRow, chunk = c % Tile::kChunksPerRow;
    const std::uint32_t bytes = row < rows ? 16u : 0u;  // rows past the end are zero-filled
    const std::uint8_t* src = keys + static_cast<std::size_t>(row < rows ? row : 0) * row_bytes + 16 * chunk;
    ptx::cp_async_16(st + Tile::at(row, chunk), src, bytes);
  }
}

template <class T, int D>
__global__ void __launch_bounds__(kDecodeThreads) exact_decode_kernel(const DecodeAttentionArgs args) {
  using Tile = ExactTile<D>;
  constexpr int KC = D / 16;
  extern __shared__ __align__(128) std::uint8_t smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int head = blockIdx.x, piece = blockIdx.y, entry = blockIdx.z;
  const int pieces = gridDim.y;
  const PagedKVParams& kv = args.kv;
  const int slot = args.slots ? args.slots[entry] : entry;
  const int length = kv.lengths[slot];
  const int group = args.num_q_heads / kv.num_kv_heads;
  const std::size_t row_bytes = kv.exact_row_bytes();

  const float qscale = (args.scale > 0.0f ? args.scale : rsqrtf(static_cast<float>(D))) * kLog2e;
  const T* q = static_cast<const T*>(args.q) + (static_cast<std::size_t>(entry) * args.num_q_heads + head * group + g) * D;
  const bool valid = g < group;
  std::uint32_t qb[KC][2];
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
    load_query_pair<T, T>(q, valid, 16 * kc + 2 * t, 16 * kc + 2 * t + 1, 1.0f, qb[kc][0]);
    load_query_pair<T, T>(q, valid, 16 * kc + 2 * t + 8, 16 * kc + 2 * t + 9, 1.0f, qb[kc][1]);
  }
  // (The queries' loads above are issued before this piece waits for its length.)
  const int blocks = (length + Tile::kTokens - 1) / Tile::kTokens;
  const int per = blocks_per_split(blocks, pieces);
  const PieceWork work = PieceWork::of(piece, splits_with_work(blocks, per), pieces, 0);
  if (work.index < 0) return;  // no block of this piece: the pieces with work merge without it
  SoftmaxLanes<KC> sm;

  const int first = piece * per, last = min(blocks, first + per);
  std::uint8_t* ring = smem + warp * Tile::kStages * Tile::kStage;
  auto issue = [&](int blk, int s) {
    if (blk < last) {
      const std::uint8_t* kb = kv.keys.block_at(slot, blk);
      const std::uint8_t* vb = kv.values.block_at(slot, blk);
      const int rows = min(Tile::kTokens, length - blk * Tile::kTokens);
      issue_exact_stage<T, D>(ring + s * Tile::kStage, kb, rows, head, row_bytes, lane);
      issue_exact_stage<T, D>(ring + s * Tile::kStage + Tile::kRows, vb, rows, head, row_bytes, lane);
    }
    ptx::cp_async_commit();
  };
  int blk = first + warp;
  issue(blk, 0);
  issue(blk + kDecodeWarps, 1);
  for (int s = 0; blk < last; blk += kDecodeWarps, s = s == Tile::kStages - 1 ? 0 : s + 1) {
    issue(blk + 2 * kDecodeWarps, s == 0 ? 2 : s - 1);
    ptx::cp_async_wait<2>();
    __syncwarp();
    const std::uint8_t* ks = ring + s * Tile::kStage;
    const std::uint8_t* vs = ks + Tile::kRows;
    float s4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int m = lane / 8, r = lane % 8;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      std::uint32_t a[4];
      ptx::ldmatrix_x4(a, ks + Tile::at(r + 8 * (m & 1), 2 * kc + (m >> 1)));
      ptx::mma_16816<T>(s4, a, qb[kc]);
    }
#pragma unroll
    for (int x = 0; x < 4; ++x) s4[x] *= qscale;  // in fp32: the queries enter the mma unrounded
    std::uint32_t pb[2];
    softmax_tile<T>(sm, s4, blk * Tile::kTokens, g, length, pb);
#pragma unroll
    for (int j = 0; j < KC; ++j) {
      std::uint32_t a[4];
      ptx::ldmatrix_x4_trans(a, vs + Tile::at(r + 8 * (m >> 1), 2 * j + (m & 1)));
      ptx::mma_16816<T>(sm.acc[j], a, pb);
    }
    __syncwarp();
  }
  ptx::cp_async_wait<0>();
  finish_piece<T, D, KC>(args, sm, smem, entry, head, work, pieces, group,
                         [](int lg, int j, int h) { return 16 * j + lg + 8 * h; });
}

}  // namespace detail
}  // namespace cuda
}  // namespace kvq
