// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The arguments of kvq's GPU decode attention as plain data, and its split and
///        workspace plan. Host-only header (no CUDA types), so engines can build the struct
///        anywhere; the kernels are in cuda/decode_attention.cuh.
///
/// Shapes: q and out [batch][num_q_heads][head_dim] of fp16 or bf16 (the kernel's query type),
/// query head h attends with kv head h / (num_q_heads / num_kv_heads). Batch entry b reads cache
/// slot slots[b] (slots == nullptr: slot b) through `kv` (layout/paged_params.hpp).
///
/// Work split: each (batch entry, kv head) is cut into `num_splits` pieces of whole blocks plus,
/// for policies with an exact window, window pieces (KIVI: 6 of 64 positions) for the window and
/// the partial blocks; each piece is one thread block. Pieces without work (past a short
/// sequence's blocks, past the window's end) return at once; the others write partial softmax
/// states into the workspace and the last of them to finish merges them and writes `out` (one
/// launch, no combine kernel). The workspace's counters must be zero before the first launch
/// (decode_workspace_clear); every launch leaves them zero again, so a captured graph can be
/// replayed.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kvq/config.hpp"
#include "kvq/layout/paged_params.hpp"

namespace kvq {
namespace cuda {

struct DecodeAttentionArgs {
  PagedKVParams kv{};
  const void* q = nullptr;              ///< device [batch][num_q_heads][head_dim]
  void* out = nullptr;                  ///< device, same shape and type as q
  const std::int32_t* slots = nullptr;  ///< device [batch], or nullptr
  std::int32_t batch = 0;
  std::int32_t num_q_heads = 0;
  float scale = 0.0f;                   ///< softmax scale; 0: 1 / sqrt(head_dim)
  std::int32_t num_splits = 1;          ///< pieces of whole blocks per (entry, kv head); decode_splits()
  void* workspace = nullptr;            ///< device, decode_workspace_bytes() bytes
  std::size_t workspace_bytes = 0;
};

/// Pieces of whole blocks per (entry, kv head) for a batch whose longest sequence holds
/// max_blocks full blocks, so that the splits' thread blocks fill `sm_count` multiprocessors at
/// `ctas_per_sm` once, never starting a second wave: when the window pieces (short thread blocks,
/// first in the grid) fit beside them (the wave holds more than twice their number per item), the
/// splits leave them their share of the wave; otherwise the window pieces run as a short wave of
/// their own before the splits'. At most (max_blocks + 3) / 4 pieces (a block per warp, rounded
/// up) and max_splits. Measured on the H200 (bench/gpu/NOTES.md): KIVI-2 B1 128K best at 43
/// splits (wave 49), B8 32K at 6 (wave 6), MHA 64K at 10-12 (wave 12), B1 4K at 8 (31 blocks).
/// decode_splits_for<Policy>
/// (cuda/decode_attention.cuh) fills in the kernel's window pieces and occupancy.
inline std::int32_t decode_splits(std::int32_t batch, std::int32_t num_kv_heads, std::int32_t max_blocks,
                                  std::int32_t sm_count, std::int32_t ctas_per_sm = 2, std::int32_t max_splits = 64,
                                  std::int32_t window_pieces = 0) {
  const std::int64_t items = static_cast<std::int64_t>(batch) * num_kv_heads;
  // Whole thread blocks per item in one wave (rounded down: one more would start a second wave).
  const std::int64_t wave = std::max<std::int64_t>(1, static_cast<std::int64_t>(sm_count) * ctas_per_sm / items);
  const std::int64_t want = wave > 2 * window_pieces ? wave - window_pieces : wave;
  // No more pieces than give each warp a block: (max_blocks + 3) / 4 (rounded up: rounded down, the
  // last warps of a piece take a second block, the 4K launch's critical path: 13.0 us, 11.8 up).
  const std::int64_t by_work = std::max<std::int64_t>(1, (static_cast<std::int64_t>(max_blocks) + 3) / 4);
  return static_cast<std::int32_t>(std::max<std::int64_t>(1, std::min<std::int64_t>({want, by_work, max_splits})));
}

/// Blocks per split piece when an item's `blocks` full blocks are cut into `splits` pieces (the
/// last pieces may get fewer, or none).
KVQ_HOST_DEVICE std::int32_t blocks_per_split(std::int32_t blocks, std::int32_t splits) {
  return (blocks + splits - 1) / splits;
}
/// Split pieces with at least one block: pieces [0, splits_with_work) of blocks_per_split each.
KVQ_HOST_DEVICE std::int32_t splits_with_work(std::int32_t blocks, std::int32_t per) {
  return per > 0 ? (blocks + per - 1) / per : 0;
}

/// The pieces of one (entry, kv head) that have work (the others return at once: the pieces of
/// a short sequence in a long batch's launch, window pieces past the window's end), and this
/// piece's place among them, which indexes its state in the workspace; `count` of them write
/// states and count the arrivals. With no work anywhere (an empty sequence) piece 0 alone runs,
/// to write the zero output.
struct PieceWork {
  std::int32_t count = 1;   ///< pieces with work, at least 1
  std::int32_t index = -1;  ///< this piece's place among them, -1: no work (return)

  /// Pieces [0, first_run) and [second_begin, second_begin + second_run) have work
  /// (first_run <= second_begin).
  KVQ_HOST_DEVICE static PieceWork of(std::int32_t piece, std::int32_t first_run, std::int32_t second_begin,
                                      std::int32_t second_run) {
    PieceWork w;
    w.count = first_run + second_run;
    if (piece < first_run) {
      w.index = piece;
    } else if (piece >= second_begin && piece < second_begin + second_run) {
      w.index = first_run + (piece - second_begin);
    }
    if (w.count == 0) {
      w.count = 1;
      w.index = piece == 0 ? 0 : -1;
    }
    return w;
  }
};

/// Workspace of a launch: counters [batch][num_kv_heads] int32, then per (entry, query head,
/// piece) the partial max and sum (float2) and the partial output [head_dim] float.
struct DecodeWorkspaceLayout {
  std::size_t counters = 0;   ///< byte offsets
  std::size_t stats = 0;
  std::size_t partials = 0;
  std::size_t bytes = 0;
};
KVQ_HOST_DEVICE DecodeWorkspaceLayout decode_workspace_layout(std::int32_t batch, std::int32_t num_q_heads,
                                                              std::int32_t num_kv_heads, std::int32_t head_dim,
                                                              std::int32_t pieces) {
  auto up = [](std::size_t x) { return (x + 255) / 256 * 256; };
  DecodeWorkspaceLayout w;
  const auto entries = static_cast<std::size_t>(batch);
  w.counters = 0;
  w.stats = up(entries * static_cast<std::size_t>(num_kv_heads) * sizeof(std::int32_t));
  const std::size_t states = entries * static_cast<std::size_t>(num_q_heads) * static_cast<std::size_t>(pieces);
  w.partials = w.stats + up(states * 2 * sizeof(float));
  w.bytes = w.partials + up(states * static_cast<std::size_t>(head_dim) * sizeof(float));
  return w;
}

}  // namespace cuda
}  // namespace kvq
