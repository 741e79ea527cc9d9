// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The host half of kvq::cuda::DeviceKVCache (kvq/cuda/device_cache.cuh) and the work of
///        its append kernel, without CUDA types: host-only header, so the planning and the
///        kernel's body also compile (and are tested, tests/cache/test_device_append_host.cpp)
///        with the host compiler.
///
/// Host plans, device executes. AppendPlanner keeps the host mirror of a device cache: which
/// slots are live, each (slot, layer)'s StreamCounts and block lists (a SequenceTable without
/// exact storage) and the block ids of both pools (BlockIdAllocator, as BlockPool hands them
/// out, so a device cache and a QuantizedKVCache fed the same operations in the same order use
/// the same ids). plan() advances the mirror by one append of n tokens to a batch of slots in
/// every layer, with the CPU cache's WindowRule, allocates the new blocks and writes the plan:
/// per layer and batch entry (layer-major) one entry of plan_stride(n) int32 words
///
///   [PlanWord header][max_new key block ids][max_new value block ids][padding to 4 words]
///
/// with the slot, the length before, the quantized counts before and after, the table index of
/// the first new block, the number of new blocks and their ids, and the id of the partially
/// filled last block a flush continues (-1 if none) of each stream.
///
/// AppendWork<Policy> is one thread block's share of the append kernel, in three phases that the
/// kernel separates with __syncthreads(): begin (write the plan's block ids and counts into the
/// tables, zero the new blocks and, at a sequence's first append, its exact rows), flush
/// (quantize positions [sinks + before.quantized, sinks + after.quantized) from the window ring
/// (positions < length before) or the input, as StreamWriter::flush does, and check the input
/// for non-finite values) and store (write the positions that stay exact into the sinks and the
/// ring, as StreamWriter::store_exact). A thread block owns the channels [c0, c1) of one batch
/// entry, a whole number of kv heads whose per-token groups it holds entirely: every byte it
/// reads from the ring and writes in a block belongs to it, so thread blocks never wait on each
/// other, and the flush reads ring rows before the store overwrites them (the CPU's order).
/// Quantization is the KVQ_HOST_DEVICE core (quantize_group, BlockLayout::line_codes /
/// store_group), on the device with a warp per group (quantize_group_warp: the same bytes):
/// the bytes are the CPU cache's.
///
/// Threading: AppendPlanner is not thread-safe (one host thread plans); AppendWork functions are
/// called by every thread of a thread block with (tid, threads) and touch disjoint bytes.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "kvq/cache/block_pool.hpp"
#include "kvq/cache/cache_config.hpp"
#include "kvq/cache/paged_export.hpp"
#include "kvq/cache/quantized_kv_cache.hpp"
#include "kvq/cache/sequence_table.hpp"
#include "kvq/cache/window_schedule.hpp"
#include "kvq/config.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/float_types.hpp"
#include "kvq/core/status.hpp"
#include "kvq/layout/paged_params.hpp"
#include "kvq/policy/baselines.hpp"
#include "kvq/policy/kivi.hpp"
#include "kvq/policy/policy_traits.hpp"
#include "kvq/quant/group.hpp"
#include "kvq/quant/meta_format.hpp"
#include "kvq/quant/params.hpp"

namespace kvq {
namespace cuda {

// ---- which policies the device cache implements --------------------------------------------

template <class P>
struct is_device_policy : std::false_type {};
template <>
struct is_device_policy<Fp16Policy<Float16>> : std::true_type {};
template <>
struct is_device_policy<Fp16Policy<BFloat16>> : std::true_type {};
template <Bits K, Bits V, int G>
struct is_device_policy<KiviPolicy<K, V, G, 128>>
    : std::bool_constant<(K == Bits::k2 || K == Bits::k4) && (V == Bits::k2 || V == Bits::k4) &&
                         (G == 32 || G == 64 || G == 128)> {};
/// True for the policies DeviceKVCache implements: Fp16Policy<Float16>, Fp16Policy<BFloat16> and
/// KiviPolicy<k2|k4, k2|k4, 32|64|128, 128>.
template <class P>
inline constexpr bool is_device_policy_v = is_device_policy<P>::value;

/// The sizes a device cache is built for (every array is allocated once, by its constructor).
struct DeviceCacheLimits {
  index_t max_slots = 0;          ///< sequences live at once (slots 0 .. max_slots - 1), at most 2^20
  index_t max_tokens = 0;         ///< positions per sequence (fixes the block tables' width)
  index_t max_batch = 0;          ///< entries of one plan; 0: max_slots
  index_t max_append_tokens = 0;  ///< n of one plan; 0: max_tokens (sizes the plan buffer)
};

// ---- the plan ------------------------------------------------------------------------------

/// The header words of one plan entry (one batch entry of one layer).
enum PlanWord : int {
  kPlanSlot = 0,
  kPlanLength,        ///< positions before the append (both streams)
  kPlanKeyBefore,     ///< key quantized count before / after
  kPlanKeyAfter,
  kPlanValueBefore,
  kPlanValueAfter,
  kPlanKeyBlocks,     ///< key blocks before: the table index of the first new block
  kPlanValueBlocks,
  kPlanKeyNew,        ///< new key blocks (their ids follow the header)
  kPlanValueNew,
  kPlanKeyTail,       ///< the partially filled last key block a flush continues, or -1
  kPlanValueTail,
  kPlanHeaderWords
};

/// One plan entry as the kernel reads it.
struct PlanEntry {
  const std::int32_t* w = nullptr;
  std::int32_t max_new = 0;

  KVQ_HOST_DEVICE std::int32_t operator[](int word) const noexcept { return w[word]; }
  KVQ_HOST_DEVICE std::int32_t before(bool key) const noexcept { return w[key ? kPlanKeyBefore : kPlanValueBefore]; }
  KVQ_HOST_DEVICE std::int32_t after(bool key) const noexcept { return w[key ? kPlanKeyAfter : kPlanValueAfter]; }
  KVQ_HOST_DEVICE std::int32_t blocks(bool key) const noexcept { return w[key ? kPlanKeyBlocks : kPlanValueBlocks]; }
  KVQ_HOST_DEVICE std::int32_t new_blocks(bool key) const noexcept { return w[key ? kPlanKeyNew : kPlanValueNew]; }
  KVQ_HOST_DEVICE std::int32_t tail(bool key) const noexcept { return w[key ? kPlanKeyTail : kPlanValueTail]; }
  KVQ_HOST_DEVICE std::int32_t id(bool key, std::int32_t i) const noexcept {
    return w[kPlanHeaderWords + (key ? 0 : max_new) + i];
  }
};

/// The first failure an append recorded on the device (sticky until check_status()): `first` is
/// the smallest (layer << 52 | slot << 32 | position << 1 | is_value) that failed, `status` the
/// kvq::Status of the first failure recorded (0: none).
struct AppendStatusWord {
  unsigned long long first = ~0ull;
  unsigned int status = 0;
  unsigned int pad = 0;
};

/// One stream of one layer as the append kernel writes it: the PagedStream of its readers plus
/// the writable tables and the quantizer's clip ratio.
struct AppendStream {
  PagedStream s{};
  std::int32_t* table = nullptr;      ///< [max_slots][max_blocks] (s.block_table)
  std::int32_t* quantized = nullptr;  ///< [max_slots] (s.quantized_tokens)
  float clip = 1.0f;
};

/// The arguments of one append launch (one layer, the plan's whole batch), by value.
struct AppendArgs {
  const std::int32_t* plan = nullptr;  ///< this layer's entries [batch][stride]
  std::int32_t stride = 0;             ///< words per entry
  std::int32_t max_new = 0;            ///< id slots per stream of an entry
  std::int32_t batch = 0;
  std::int32_t n = 0;                  ///< tokens per entry
  std::int32_t layer = 0;
  std::int32_t width = 0;              ///< numbers of an exact row (num_kv_heads * head_dim)
  std::int32_t part_width = 0;         ///< channels per thread block (width / parts)
  std::int32_t parts = 0;
  const void* k = nullptr;             ///< [batch][n][width] of the exact type
  const void* v = nullptr;
  AppendStream keys{};
  AppendStream values{};
  std::int32_t* lengths = nullptr;     ///< this layer [max_slots]
  AppendStatusWord* status = nullptr;
};

namespace detail {

KVQ_HOST_DEVICE void record_failure(AppendStatusWord* st, Status s, std::int32_t layer, std::int32_t slot,
                                    std::int32_t position, bool is_value) noexcept {
  const unsigned long long key = (static_cast<unsigned long long>(layer) << 52) |
                                 (static_cast<unsigned long long>(slot) << 32) |
                                 (static_cast<unsigned long long>(position) << 1) | (is_value ? 1ull : 0ull);
#if KVQ_DEVICE_PASS
  atomicMin(&st->first, key);
  atomicCAS(&st->status, 0u, static_cast<unsigned int>(s));
#else
  if (key < st->first) st->first = key;
  if (st->status == 0) st->status = static_cast<unsigned int>(s);
#endif
}

/// Where the rows of a stream's positions are during an append: positions before the append in
/// the window ring (or sinks), later ones in the input.
template <class E>
struct AppendRows {
  const PagedStream* s;
  const E* input;  ///< this entry's [n][width]
  std::int32_t slot;
  std::int32_t length;  ///< positions before the append
  std::int32_t width;
  KVQ_HOST_DEVICE const E* row(std::int32_t p) const noexcept {
    if (p < length) {
      return reinterpret_cast<const E*>(
          s->exact_row(slot, p, static_cast<std::size_t>(width) * sizeof(E)));
    }
    return input + static_cast<std::size_t>(p - length) * static_cast<std::size_t>(width);
  }
};

/// Loads channel c of positions p0, p0 + 1, ...: a per-channel group along tokens.
template <class E>
struct ChannelLoader {
  AppendRows<E> rows;
  std::int32_t p0;
  std::int32_t c;
  KVQ_HOST_DEVICE float operator()(index_t j) const noexcept {
    return to_float(rows.row(p0 + static_cast<std::int32_t>(j))[c]);
  }
};

template <class S>
constexpr bool stream_per_channel() {
  if constexpr (S::quantized) {
    return S::axis == GroupAxis::kTokens;
  } else {
    return false;
  }
}
template <class S>
constexpr bool stream_per_token() {
  if constexpr (S::quantized) {
    return S::axis == GroupAxis::kChannels;
  } else {
    return false;
  }
}

template <class S>
constexpr bool fixed_groups() {
  if constexpr (S::quantized) {
    return S::group_size > 0;
  } else {
    return true;
  }
}

#if KVQ_DEVICE_PASS
/// quantize_group of N values by the 32 lanes of a warp (all call it with the same arguments):
/// lane l loads values N/32 l .. N/32 (l + 1) - 1, all of them before any is used (one round trip
/// to memory), min, max and the non-finite flag are reduced across the warp (exact in any order),
/// every lane makes the same parameters with make_group_params, and each packed byte is made
/// from its codes (each code depends on its value alone) by the lane that holds them, or OR-ed
/// across the lanes that share it: the bytes and parameters of quantize_group. B of 2 or 4 bits
/// (whole codes per byte), N a multiple of 32 and `first` of a byte's first code (the block was
/// zeroed: whole bytes).
template <Bits B, int N, class Meta, class Load>
__device__ Status quantize_group_warp(const Load& load, float clip, std::uint8_t* stream, std::size_t first,
                                      GroupParams<Meta>* params, int lane) noexcept {
  static_assert(B == Bits::k2 || B == Bits::k4, "kvq: quantize_group_warp packs 2- or 4-bit codes");
  static_assert(N >= 32 && N % 32 == 0, "kvq: quantize_group_warp takes groups of a multiple of 32 values");
  constexpr int bits = static_cast<int>(B), per_byte = 8 / bits, per_lane = N / 32;
  float v[per_lane];
#pragma unroll
  for (int k = 0; k < per_lane; ++k) v[k] = load(static_cast<index_t>(lane * per_lane + k));
  std::int32_t key_min = 0x7FFFFFFF, key_max = -0x7FFFFFFF - 1;
  std::uint32_t special = 0;
#pragma unroll
  for (int k = 0; k < per_lane; ++k) {
    const std::uint32_t u = float_to_bits(v[k]);
    special |= (u & 0x7F800000u) + 0x00800000u;
    const std::int32_t key = float_order_key(u);
    key_min = key < key_min ? key : key_min;
    key_max = key > key_max ? key : key_max;
  }
  key_min = __reduce_min_sync(0xffffffffu, key_min);
  key_max = __reduce_max_sync(0xffffffffu, key_max);
  special = __reduce_or_sync(0xffffffffu, special);
  if ((special >> 31) != 0) return Status::kNonFiniteInput;
  const float mn = bits_to_float(static_cast<std::uint32_t>(float_order_key(static_cast<std::uint32_t>(key_min))));
  const float mx = bits_to_float(static_cast<std::uint32_t>(float_order_key(static_cast<std::uint32_t>(key_max))));
  QuantGrid grid{};
  const Status st = make_group_params<Meta>(mn, mx, clip, BitsTraits<B>::max_code, params, &grid);
  if (st != Status::kOk) return st;
  std::uint8_t* out = stream + first / per_byte;
  if constexpr (per_lane >= per_byte) {
#pragma unroll
    for (int b = 0; b < per_lane / per_byte; ++b) {
      unsigned byte = 0;
#pragma unroll
      for (int k = 0; k < per_byte; ++k) byte |= static_cast<unsigned>(quantize_value(v[b * per_byte + k], grid)) << (k * bits);
      out[lane * (per_lane / per_byte) + b] = static_cast<std::uint8_t>(byte);
    }
  } else {
    constexpr int lanes = per_byte / per_lane;  // lanes whose codes share a byte
    unsigned part = 0;
#pragma unroll
    for (int k = 0; k < per_lane; ++k) {
      part |= static_cast<unsigned>(quantize_value(v[k], grid)) << (((lane * per_lane + k) % per_byte) * bits);
    }
#pragma unroll
    for (int x = 1; x < lanes; x *= 2) part |= __shfl_xor_sync(0xffffffffu, part, x);
    if (lane % lanes == 0) out[lane / lanes] = static_cast<std::uint8_t>(part);
  }
  return Status::kOk;
}
#endif

// As constants (device code may not call constexpr host functions).
template <class S>
inline constexpr bool kPerChannel = stream_per_channel<S>();
template <class S>
inline constexpr bool kPerToken = stream_per_token<S>();

}  // namespace detail

/// One thread block's share of an append: entry b of the batch, channels [c0, c1) of part
/// `part`. See the file comment.
template <class Policy>
struct AppendWork {
  using E = typename Policy::exact_type;
  using KeyStream = typename Policy::KeyStream;
  using ValueStream = typename Policy::ValueStream;
  static_assert(KeyStream::transform::kind == TransformKind::kIdentity &&
                    ValueStream::transform::kind == TransformKind::kIdentity,
                "kvq: the device append stores rows as they come (no channel reordering, no latent projection)");
  static_assert(detail::fixed_groups<KeyStream>() && detail::fixed_groups<ValueStream>(),
                "kvq: the device append needs quantization groups of a fixed size (not kGroupPerHead)");

  KVQ_HOST_DEVICE static PlanEntry entry(const AppendArgs& a, std::int32_t b) noexcept {
    return {a.plan + static_cast<std::size_t>(b) * static_cast<std::size_t>(a.stride), a.max_new};
  }
  KVQ_HOST_DEVICE static std::uint8_t* block_at(const PagedStream& s, std::int32_t id) noexcept {
    return s.pool + static_cast<std::size_t>(id) * s.block_bytes;
  }
  /// Index of number c of row r of rows `width` numbers long.
  KVQ_HOST_DEVICE static std::size_t at(std::int32_t r, std::int32_t width, std::int32_t c) noexcept {
    return static_cast<std::size_t>(r) * static_cast<std::size_t>(width) + static_cast<std::size_t>(c);
  }

  // ---- phase 1: tables, zeroing ----------------------------------------------------------------

  KVQ_HOST_DEVICE static void begin(const AppendArgs& a, std::int32_t b, std::int32_t part, int tid, int threads) noexcept {
    const PlanEntry e = entry(a, b);
    const std::int32_t slot = e[kPlanSlot];
    const std::int32_t c0 = part * a.part_width, c1 = c0 + a.part_width;
    if (part == 0) {
      const auto row = static_cast<std::size_t>(slot) * static_cast<std::size_t>(a.keys.s.max_blocks);
      for (std::int32_t i = tid; i < e.new_blocks(true); i += threads) {
        a.keys.table[row + static_cast<std::size_t>(e.blocks(true) + i)] = e.id(true, i);
      }
      for (std::int32_t i = tid; i < e.new_blocks(false); i += threads) {
        a.values.table[row + static_cast<std::size_t>(e.blocks(false) + i)] = e.id(false, i);
      }
      if (tid == 0) {
        a.keys.quantized[slot] = e.after(true);
        a.values.quantized[slot] = e.after(false);
        a.lengths[slot] = e[kPlanLength] + a.n;
      }
    }
    for (std::int32_t i = 0; i < e.new_blocks(true); ++i) {
      zero_block<KeyStream>(a.keys.s, block_at(a.keys.s, e.id(true, i)), c0, c1, part == 0, tid, threads);
    }
    for (std::int32_t i = 0; i < e.new_blocks(false); ++i) {
      zero_block<ValueStream>(a.values.s, block_at(a.values.s, e.id(false, i)), c0, c1, part == 0, tid, threads);
    }
    if (e[kPlanLength] == 0) {  // a new sequence: its rows start zero-filled, as the CPU cache's
      zero_exact(a.keys.s, slot, a.width, c0, c1, tid, threads);
      zero_exact(a.values.s, slot, a.width, c0, c1, tid, threads);
    }
  }

  /// Zeroes the bytes of a block that channels [c0, c1) own (codes, metadata, exact rows); the
  /// first part also the bytes nobody writes (between the arrays, padding).
  template <class S>
  KVQ_HOST_DEVICE static void zero_block(const PagedStream& s, std::uint8_t* block, std::int32_t c0, std::int32_t c1,
                                         bool first, int tid, int threads) noexcept {
    std::size_t covered = 0;  // first byte no line covers
    if constexpr (S::quantized) {
      using Meta = meta_type_t<S::meta>;
      const BlockLayout& l = s.block;
      const GroupParams<Meta> zero{Meta::from_bits(0), Meta::from_bits(0)};
      const auto line_bytes = static_cast<std::size_t>(l.line_bytes);
      covered = static_cast<std::size_t>(l.lines) * line_bytes;
      if constexpr (detail::kPerChannel<S>) {
        // Lines are channels: codes [c0, c1) lines, metadata of their groups.
        const std::size_t from = static_cast<std::size_t>(c0) * line_bytes, to = static_cast<std::size_t>(c1) * line_bytes;
        for (std::size_t i = from + static_cast<std::size_t>(tid); i < to; i += static_cast<std::size_t>(threads)) block[i] = 0;
        const auto gpl = static_cast<std::int32_t>(l.groups_per_line);
        for (std::int32_t i = tid; i < (c1 - c0) * gpl; i += threads) l.store_group<Meta>(block, c0 + i / gpl, i % gpl, zero);
      } else {
        // Lines are token rows: the bytes of channels [c0, c1) of each (the last part: to the
        // line's end), metadata of their groups.
        constexpr int kBits = static_cast<int>(S::bits);
        const std::int32_t from = c0 * kBits / 8;
        const std::int32_t to = c1 == l.width ? static_cast<std::int32_t>(l.line_bytes) : c1 * kBits / 8;
        const std::int32_t lines = static_cast<std::int32_t>(l.lines);
        for (std::int32_t i = tid; i < lines * (to - from); i += threads) {
          l.line_codes(block, i / (to - from))[from + i % (to - from)] = 0;
        }
        const std::int32_t g0 = c0 / S::group_size, groups = (c1 - c0) / S::group_size;
        for (std::int32_t i = tid; i < lines * groups; i += threads) l.store_group<Meta>(block, i / groups, g0 + i % groups, zero);
      }
      if (first) {
        const auto step = static_cast<std::size_t>(threads);
        for (std::size_t i = covered + static_cast<std::size_t>(tid); i < l.scales_offset; i += step) block[i] = 0;
        covered = static_cast<std::size_t>(l.used_bytes());
      }
    } else {
      E* rows = reinterpret_cast<E*>(block);
      const std::int32_t w = c1 - c0;
      for (std::int32_t i = tid; i < s.block_tokens * w; i += threads) {
        rows[at(i / w, s.width, c0 + i % w)] = E{};
      }
      covered = static_cast<std::size_t>(s.block_tokens) * static_cast<std::size_t>(s.width) * sizeof(E);
    }
    if (first) {
      for (std::size_t i = covered + static_cast<std::size_t>(tid); i < s.block_bytes; i += static_cast<std::size_t>(threads)) block[i] = 0;
    }
  }

  /// Zeroes channels [c0, c1) of a slot's sinks and ring rows of one stream of this layer.
  KVQ_HOST_DEVICE static void zero_exact(const PagedStream& s, std::int32_t slot, std::int32_t width, std::int32_t c0,
                                         std::int32_t c1, int tid, int threads) noexcept {
    std::uint8_t* base = s.exact + static_cast<std::size_t>(slot) * s.exact_stride;
    E* sinks = reinterpret_cast<E*>(base + s.sinks_offset);
    E* ring = reinterpret_cast<E*>(base + s.ring_offset);
    const std::int32_t w = c1 - c0;
    for (std::int32_t i = tid; i < (s.sinks + s.ring_capacity) * w; i += threads) {
      const std::int32_t r = i / w;
      E* row = r < s.sinks ? sinks + static_cast<std::size_t>(r) * static_cast<std::size_t>(width)
                           : ring + static_cast<std::size_t>(r - s.sinks) * static_cast<std::size_t>(width);
      row[c0 + i % w] = E{};
    }
  }

  // ---- phase 2: flush, input check -----------------------------------------------------------

  KVQ_HOST_DEVICE static void flush(const AppendArgs& a, std::int32_t b, std::int32_t part, int tid, int threads) noexcept {
    const PlanEntry e = entry(a, b);
    const std::int32_t c0 = part * a.part_width, c1 = c0 + a.part_width;
    const std::size_t input = static_cast<std::size_t>(b) * static_cast<std::size_t>(a.n) * static_cast<std::size_t>(a.width);
    const E* k = static_cast<const E*>(a.k) + input;
    const E* v = static_cast<const E*>(a.v) + input;
    flush_stream<KeyStream>(a, e, true, k, c0, c1, tid, threads);
    flush_stream<ValueStream>(a, e, false, v, c0, c1, tid, threads);
    check_input(a, e, k, v, c0, c1, tid, threads);
  }

  /// The block that holds stored row i (>= before) of a flush of stream `key`.
  KVQ_HOST_DEVICE static std::uint8_t* flush_block(const PagedStream& s, const PlanEntry& e, bool key, std::int32_t i) noexcept {
    const std::int32_t t = s.block_tokens;
    const std::int32_t q0 = e.before(key);
    const std::int32_t bi = i / t;
    if (q0 % t != 0 && bi == q0 / t) return block_at(s, e.tail(key));
    return block_at(s, e.id(key, bi - (q0 + t - 1) / t));
  }

  /// quantize_group, and quantize_group_warp where 32 lanes share each group.
  struct SerialQuantize {
    template <Bits B, int N, class Meta, class Load>
    KVQ_HOST_DEVICE Status run(const Load& load, float clip, std::uint8_t* stream, std::size_t first,
                               GroupParams<Meta>* params) const noexcept {
      return quantize_group<B>(load, N, clip, stream, first, params);
    }
  };
#if KVQ_DEVICE_PASS
  struct WarpQuantize {
    int lane;
    template <Bits B, int N, class Meta, class Load>
    __device__ Status run(const Load& load, float clip, std::uint8_t* stream, std::size_t first,
                          GroupParams<Meta>* params) const noexcept {
      return detail::quantize_group_warp<B, N>(load, clip, stream, first, params, lane);
    }
  };
#endif
  /// Calls body(item, quantize, leader) for items [0, count): on the device a warp per item
  /// (its lanes quantize together, lane 0 is the leader that stores the parameters), on the host
  /// (the lockstep test of this body) a thread per item. Same bytes either way.
  template <class Body>
  KVQ_HOST_DEVICE static void for_each_group(std::int32_t count, int tid, int threads, const Body& body) noexcept {
#if KVQ_DEVICE_PASS
    const int lane = tid % 32;
    for (std::int32_t item = tid / 32; item < count; item += threads / 32) body(item, WarpQuantize{lane}, lane == 0);
#else
    for (std::int32_t item = tid; item < count; item += threads) body(item, SerialQuantize{}, true);
#endif
  }

  template <class S>
  KVQ_HOST_DEVICE static void flush_stream(const AppendArgs& a, const PlanEntry& e, bool key, const E* input, std::int32_t c0,
                                           std::int32_t c1, int tid, int threads) noexcept {
    const AppendStream& st = key ? a.keys : a.values;
    const PagedStream& s = st.s;
    const std::int32_t slot = e[kPlanSlot];
    const std::int32_t q0 = e.before(key), q1 = e.after(key);
    if (q1 <= q0) return;
    const detail::AppendRows<E> rows{&s, input, slot, e[kPlanLength], a.width};
    const std::int32_t t = s.block_tokens;
    const std::int32_t w = c1 - c0;
    if constexpr (detail::kPerChannel<S>) {
      // Groups of G tokens of one channel (q0 and q1 are multiples of G).
      constexpr Bits B = S::bits;
      using Meta = meta_type_t<S::meta>;
      constexpr std::int32_t G = S::group_size;
      const std::int32_t groups = (q1 - q0) / G;
      for_each_group(groups * w, tid, threads, [&](std::int32_t item, auto quantize, bool leader) {
        const std::int32_t i = q0 + (item / w) * G;
        const std::int32_t c = c0 + item % w;
        std::uint8_t* block = flush_block(s, e, key, i);
        const std::int32_t row = i % t;
        const detail::ChannelLoader<E> load{rows, s.sinks + i, c};
        GroupParams<Meta> p{};
        const Status status = quantize.template run<B, G>(load, st.clip, s.block.line_codes(block, c), static_cast<std::size_t>(row), &p);
        if (!leader) return;
        if (status == Status::kOk) {
          s.block.store_group<Meta>(block, c, s.block.token_group(row), p);
        } else {
          detail::record_failure(a.status, status, a.layer, slot, s.sinks + i, !key);
        }
      });
    } else if constexpr (detail::kPerToken<S>) {
      // Groups of G channels of one token row.
      constexpr Bits B = S::bits;
      using Meta = meta_type_t<S::meta>;
      constexpr std::int32_t G = S::group_size;
      const std::int32_t groups = w / G, g0 = c0 / G;
      for_each_group((q1 - q0) * groups, tid, threads, [&](std::int32_t item, auto quantize, bool leader) {
        const std::int32_t i = q0 + item / groups;
        const std::int32_t g = g0 + item % groups;
        std::uint8_t* block = flush_block(s, e, key, i);
        const std::int32_t row = i % t;
        const ContiguousLoader<E> load{rows.row(s.sinks + i) + g * G};
        GroupParams<Meta> p{};
        const Status status = quantize.template run<B, G>(load, st.clip, s.block.line_codes(block, row), static_cast<std::size_t>(g * G), &p);
        if (!leader) return;
        if (status == Status::kOk) {
          s.block.store_group<Meta>(block, row, g, p);
        } else {
          detail::record_failure(a.status, status, a.layer, slot, s.sinks + i, !key);
        }
      });
    } else {
      // Exact blocks [block_tokens][width].
      for (std::int32_t item = tid; item < (q1 - q0) * w; item += threads) {
        const std::int32_t i = q0 + item / w;
        const std::int32_t c = c0 + item % w;
        E* block = reinterpret_cast<E*>(flush_block(s, e, key, i));
        block[at(i % t, s.width, c)] = from_float<E>(to_float(rows.row(s.sinks + i)[c]));
      }
    }
  }

  /// Records the first non-finite input number of channels [c0, c1) of keys k and values v (the
  /// CPU cache rejects them); both loads before either check.
  KVQ_HOST_DEVICE static void check_input(const AppendArgs& a, const PlanEntry& e, const E* k, const E* v, std::int32_t c0,
                                          std::int32_t c1, int tid, int threads) noexcept {
    const std::int32_t w = c1 - c0;
    for (std::int32_t item = tid; item < a.n * w; item += threads) {
      const std::int32_t t = item / w;
      const std::size_t i = at(t, a.width, c0 + item % w);
      const float kx = to_float(k[i]), vx = to_float(v[i]);
      if (!is_finite_value(kx)) {
        detail::record_failure(a.status, Status::kNonFiniteInput, a.layer, e[kPlanSlot], e[kPlanLength] + t, false);
      }
      if (!is_finite_value(vx)) {
        detail::record_failure(a.status, Status::kNonFiniteInput, a.layer, e[kPlanSlot], e[kPlanLength] + t, true);
      }
    }
  }

  // ---- phase 3: exact rows -------------------------------------------------------------------

  KVQ_HOST_DEVICE static void store(const AppendArgs& a, std::int32_t b, std::int32_t part, int tid, int threads) noexcept {
    const PlanEntry e = entry(a, b);
    const std::int32_t c0 = part * a.part_width, c1 = c0 + a.part_width;
    const std::size_t input = static_cast<std::size_t>(b) * static_cast<std::size_t>(a.n) * static_cast<std::size_t>(a.width);
    store_stream(a, e, true, static_cast<const E*>(a.k) + input, c0, c1, tid, threads);
    store_stream(a, e, false, static_cast<const E*>(a.v) + input, c0, c1, tid, threads);
  }

  /// Positions [length, length + n) that stay exact: sinks below rule.sinks, the ring from
  /// sinks + after.quantized on (StreamWriter::store_exact).
  KVQ_HOST_DEVICE static void store_stream(const AppendArgs& a, const PlanEntry& e, bool key, const E* input, std::int32_t c0,
                                           std::int32_t c1, int tid, int threads) noexcept {
    const PagedStream& s = (key ? a.keys : a.values).s;
    const std::int32_t slot = e[kPlanSlot];
    const std::int32_t l0 = e[kPlanLength], l1 = l0 + a.n;
    const std::int32_t w = c1 - c0;
    const std::size_t row_bytes = static_cast<std::size_t>(a.width) * sizeof(E);
    // Two runs of positions: sinks [l0, min(l1, sinks)), window [max(l0, sinks + after), l1).
    const std::int32_t sink_end = l1 < s.sinks ? l1 : s.sinks;
    const std::int32_t window_begin = l0 > s.sinks + e.after(key) ? l0 : s.sinks + e.after(key);
    const std::int32_t sink_count = sink_end > l0 ? sink_end - l0 : 0;
    const std::int32_t window_count = l1 > window_begin ? l1 - window_begin : 0;
    for (std::int32_t item = tid; item < (sink_count + window_count) * w; item += threads) {
      const std::int32_t r = item / w;
      const std::int32_t p = r < sink_count ? l0 + r : window_begin + (r - sink_count);
      const std::int32_t c = c0 + item % w;
      E* dst = reinterpret_cast<E*>(s.exact_row(slot, p, row_bytes));
      dst[c] = from_float<E>(to_float(input[at(p - l0, a.width, c)]));
    }
  }
};

/// Runs an append launch on the host, thread block after thread block (each through its three
/// phases; `reverse`: entries and parts in reverse order): what the kernel computes, for tests
/// of the plan and of AppendWork against QuantizedKVCache without a GPU. Host pointers.
template <class Policy>
void run_append_on_host(const AppendArgs& a, bool reverse = false) {
  for (std::int32_t i = 0; i < a.batch * a.parts; ++i) {
    const std::int32_t j = reverse ? a.batch * a.parts - 1 - i : i;
    const std::int32_t b = j / a.parts, part = j % a.parts;
    AppendWork<Policy>::begin(a, b, part, 0, 1);
    AppendWork<Policy>::flush(a, b, part, 0, 1);
    AppendWork<Policy>::store(a, b, part, 0, 1);
  }
}

// ---- the host mirror and planner --------------------------------------------------------------

/// The host half of a device cache: its shape (layouts, rules, exact rows as the CPU cache of the
/// same config has them), the mirror of its sequences and block ids, and plan(). See the file
/// comment. Throws kvq::Error naming the argument; a call that throws changes nothing.
template <class Policy>
class AppendPlanner {
 public:
  using exact_type = typename Policy::exact_type;
  using KeyStream = typename Policy::KeyStream;
  using ValueStream = typename Policy::ValueStream;
  static constexpr index_t block_tokens = Policy::block_tokens;

  AppendPlanner() = default;
  AppendPlanner(const CacheConfig& config, const DeviceCacheLimits& limits) : config_(config), limits_(limits) {
    constexpr const char* where = "kvq::cuda::DeviceKVCache";
    kvq::detail::check_config(where, config);
    if (config.num_layers >= (1 << 12)) {
      kvq::detail::throw_argument_error(where, "num_layers", config.num_layers, "at most 4095 layers");
    }
    if (limits.max_slots < 1 || limits.max_slots > (1 << 20)) {
      kvq::detail::throw_argument_error(where, "max_slots", limits.max_slots, "1 <= max_slots <= 2^20");
    }
    if (limits.max_tokens < 1 || limits.max_tokens >= (index_t{1} << 30)) {
      kvq::detail::throw_argument_error(where, "max_tokens", limits.max_tokens, "1 <= max_tokens < 2^30");
    }
    if (limits_.max_batch == 0) limits_.max_batch = limits.max_slots;
    if (limits_.max_append_tokens == 0) limits_.max_append_tokens = limits.max_tokens;
    if (limits_.max_batch < 1 || limits_.max_batch > limits.max_slots) {
      kvq::detail::throw_argument_error(where, "max_batch", limits.max_batch,
                                        kvq::detail::concat("0 or 1 .. max_slots (", limits.max_slots, ")"));
    }
    if (limits_.max_append_tokens < 1 || limits_.max_append_tokens > limits.max_tokens) {
      kvq::detail::throw_argument_error(where, "max_append_tokens", limits.max_append_tokens,
                                        kvq::detail::concat("0 or 1 .. max_tokens (", limits.max_tokens, ")"));
    }
    width_ = config.num_kv_heads * config.head_dim;
    keys_ = kvq::detail::make_stream_setup<KeyStream>(config, block_tokens, {}, true, Policy::name());
    values_ = kvq::detail::make_stream_setup<ValueStream>(config, block_tokens, {}, false, Policy::name());
    rows_ = kvq::detail::policy_exact_rows<Policy>(width_);
    max_blocks_ = std::max<index_t>(1, ceil_div<index_t>(limits.max_tokens, block_tokens));
    key_ids_ = BlockIdAllocator(config.num_blocks);
    value_ids_ = BlockIdAllocator(config.num_blocks);
    mirror_ = SequenceTable<exact_type>(config.num_layers, ExactRows{});
    part_width_ = choose_part_width();
  }

  const CacheConfig& config() const noexcept { return config_; }
  const DeviceCacheLimits& limits() const noexcept { return limits_; }
  index_t width() const noexcept { return width_; }
  index_t max_blocks() const noexcept { return max_blocks_; }
  const StreamLayout& key_layout() const noexcept { return keys_.layout; }
  const StreamLayout& value_layout() const noexcept { return values_.layout; }
  float key_clip(index_t layer) const noexcept { return keys_.layers[static_cast<std::size_t>(layer)].clip; }
  float value_clip(index_t layer) const noexcept { return values_.layers[static_cast<std::size_t>(layer)].clip; }
  const WindowRule& key_rule() const noexcept { return key_rule_; }
  const WindowRule& value_rule() const noexcept { return value_rule_; }
  /// Exact rows of a slot per layer; a slot holds num_layers * layer_stride() numbers.
  const ExactRows& exact_rows() const noexcept { return rows_; }
  index_t slot_stride() const noexcept { return config_.num_layers * rows_.layer_stride(); }
  /// Channels per thread block of the append kernel (whole kv heads whose per-token groups it
  /// holds entirely).
  index_t part_width() const noexcept { return part_width_; }
  /// The mirror: live slots, counts and block lists as planned (no exact rows).
  const SequenceTable<exact_type>& sequences() const noexcept { return mirror_; }
  const BlockIdAllocator& key_ids() const noexcept { return key_ids_; }
  const BlockIdAllocator& value_ids() const noexcept { return value_ids_; }

  /// Most new blocks one stream of one entry can take in an append of n tokens (a pending flush
  /// of the window plus the n tokens, each whole or partial block).
  index_t max_new_blocks(index_t n) const noexcept {
    auto bound = [&](const WindowRule& r) { return ceil_div<index_t>(r.max_window + 1 + n, block_tokens) + 1; };
    return std::max(bound(key_rule_), bound(value_rule_));
  }
  /// Words of one plan entry: the header, max_new_blocks(n) ids per stream, padded to 4 words.
  index_t plan_stride(index_t n) const noexcept { return (kPlanHeaderWords + 2 * max_new_blocks(n) + 3) / 4 * 4; }
  /// Words of the plan of an append of n tokens to `batch` sequences (all layers).
  index_t plan_words(index_t batch, index_t n) const noexcept { return config_.num_layers * batch * plan_stride(n); }
  /// Words of the largest plan (the plan buffers' size).
  index_t max_plan_words() const noexcept { return plan_words(limits_.max_batch, limits_.max_append_tokens); }

  /// Starts an empty sequence in the lowest free slot. Throws kOutOfCapacity when max_slots are live.
  SequenceId add_sequence() {
    if (mirror_.live() >= limits_.max_slots) {
      kvq::detail::throw_argument_error("kvq::cuda::DeviceKVCache::add_sequence", "max_slots", limits_.max_slots,
                                        "a free slot: every slot holds a live sequence (free one, or raise "
                                        "DeviceCacheLimits::max_slots)",
                                        Status::kOutOfCapacity);
    }
    return mirror_.add();
  }
  /// Ends a sequence: its block ids return to the free lists (the device's bytes are left; the
  /// next plan may hand the ids out again).
  void free(SequenceId seq) {
    check_live("kvq::cuda::DeviceKVCache::free", "seq", seq);
    mirror_.free(seq, key_ids_, value_ids_);
  }
  bool is_live(SequenceId seq) const noexcept { return mirror_.is_live(seq); }

  /// Advances the mirror by an append of n tokens to slots[0 .. batch) in every layer and writes
  /// the plan (plan_words(batch, n) words) to `out`. Throws kInvalidArgument for a bad batch, n,
  /// slot or a slot named twice and kOutOfCapacity when a sequence would exceed max_tokens or
  /// the pools lack blocks; then nothing changed.
  void plan(const SequenceId* slots, index_t batch, index_t n, std::int32_t* out) {
    constexpr const char* where = "kvq::cuda::DeviceKVCache::plan_append";
    if (batch < 1 || batch > limits_.max_batch) {
      kvq::detail::throw_argument_error(where, "batch", batch, kvq::detail::concat("1 .. max_batch (", limits_.max_batch, ")"));
    }
    if (n < 1 || n > limits_.max_append_tokens) {
      kvq::detail::throw_argument_error(where, "n", n, kvq::detail::concat("1 .. max_append_tokens (", limits_.max_append_tokens, ")"));
    }
    if (slots == nullptr) kvq::detail::throw_argument_error(where, "slots", "nullptr", "batch slot ids");
    std::vector<char> seen(static_cast<std::size_t>(mirror_.slots()), 0);
    index_t key_new = 0, value_new = 0;
    const index_t max_new = max_new_blocks(n);
    for (index_t i = 0; i < batch; ++i) {
      const SequenceId s = slots[i];
      if (!mirror_.is_live(s)) {
        kvq::detail::throw_argument_error(where, "slots", kvq::detail::concat("slots[", i, "] = ", s),
                                          "the ids of live sequences (add_sequence, not freed)");
      }
      if (seen[static_cast<std::size_t>(s)]) {
        kvq::detail::throw_argument_error(where, "slots", kvq::detail::concat("slots[", i, "] = ", s),
                                          "distinct slots (this one is named twice)");
      }
      seen[static_cast<std::size_t>(s)] = 1;
      for (index_t l = 0; l < config_.num_layers; ++l) {
        const LayerState& ls = mirror_.layer(s, l);
        if (ls.key.counts.length + n > limits_.max_tokens) {
          kvq::detail::throw_argument_error(
              where, "n", n,
              kvq::detail::concat("at most ", limits_.max_tokens - ls.key.counts.length, " tokens for sequence ", s, " (it holds ",
                                  ls.key.counts.length, " of DeviceCacheLimits::max_tokens = ", limits_.max_tokens, ")"),
              Status::kOutOfCapacity);
        }
        const index_t kn = new_blocks(key_rule_, ls.key, n), vn = new_blocks(value_rule_, ls.value, n);
        if (kn > max_new || vn > max_new) {  // cannot happen: max_new_blocks bounds it
          kvq::detail::throw_argument_error(where, "n", n, "an append whose new blocks fit the plan entry", Status::kUnsupported);
        }
        key_new += kn;
        value_new += vn;
      }
    }
    if (key_new > key_ids_.free_blocks() || value_new > value_ids_.free_blocks()) {
      const std::string what =
          kvq::detail::concat("an append of ", n, " tokens to ", batch, " sequences in ", config_.num_layers, " layers");
      kvq::detail::throw_argument_error(
          where, "n", n,
          kvq::detail::concat("at most the free blocks of the pools: ", what, " needs ", key_new, " key and ", value_new,
                              " value blocks of ", block_tokens, " tokens; ", key_ids_.free_blocks(), " key and ",
                              value_ids_.free_blocks(), " value blocks are free of ", config_.num_blocks,
                              " (raise CacheConfig::num_blocks or free sequences)"),
          Status::kOutOfCapacity);
    }
    // Nothing can fail from here on.
    const index_t stride = plan_stride(n);
    std::fill_n(out, static_cast<std::size_t>(plan_words(batch, n)), -1);
    for (index_t l = 0; l < config_.num_layers; ++l) {
      for (index_t i = 0; i < batch; ++i) {
        LayerState& ls = mirror_.layer(slots[i], l);
        std::int32_t* e = out + static_cast<std::size_t>((l * batch + i) * stride);
        const StreamCounts key_after = key_rule_.after_append(ls.key.counts, n);
        const StreamCounts value_after = value_rule_.after_append(ls.value.counts, n);
        e[kPlanSlot] = static_cast<std::int32_t>(slots[i]);
        e[kPlanLength] = static_cast<std::int32_t>(ls.key.counts.length);
        write_stream(e, max_new, true, ls.key, key_after, key_ids_);
        write_stream(e, max_new, false, ls.value, value_after, value_ids_);
        ls.key.counts = key_after;
        ls.value.counts = value_after;
      }
    }
  }

  /// Takes the bookkeeping of a host cache of the same config (its sequences, counts, block
  /// lists and block ids). Throws kInvalidArgument / kOutOfCapacity when it does not fit.
  void assign(const QuantizedKVCache<Policy>& host) {
    constexpr const char* where = "kvq::cuda::DeviceKVCache::upload";
    check_host_config(where, host.config());
    const SequenceTable<exact_type>& seqs = host.sequences();
    if (seqs.slots() > limits_.max_slots) {
      kvq::detail::throw_argument_error(where, "host", kvq::detail::concat("a cache with ", seqs.slots(), " slots"),
                                        kvq::detail::concat("at most max_slots (", limits_.max_slots, ") slots"),
                                        Status::kOutOfCapacity);
    }
    for (SequenceId s = 0; s < seqs.slots(); ++s) {
      if (!seqs.is_live(s)) continue;
      for (index_t l = 0; l < config_.num_layers; ++l) {
        if (seqs.layer(s, l).key.counts.length > limits_.max_tokens) {
          kvq::detail::throw_argument_error(where, "host",
                                            kvq::detail::concat("sequence ", s, " with ", seqs.layer(s, l).key.counts.length,
                                                                " tokens in layer ", l),
                                            kvq::detail::concat("at most max_tokens (", limits_.max_tokens, ") tokens a sequence"),
                                            Status::kOutOfCapacity);
        }
      }
    }
    mirror_ = seqs.without_exact();
    key_ids_ = host.key_pool().ids();
    value_ids_ = host.value_pool().ids();
  }

  /// Throws kInvalidArgument (argument "host") unless a host cache's config `c` has this
  /// planner's layers, kv heads, head_dim and num_blocks (upload and download need them equal).
  void check_host_config(const char* where, const CacheConfig& c) const {
    if (c.num_layers != config_.num_layers || c.num_kv_heads != config_.num_kv_heads || c.head_dim != config_.head_dim ||
        c.num_blocks != config_.num_blocks) {
      kvq::detail::throw_argument_error(
          where, "host",
          kvq::detail::concat("a cache of ", c.num_layers, " layers, ", c.num_kv_heads, " kv heads of ", c.head_dim, ", ",
                              c.num_blocks, " blocks"),
          kvq::detail::concat("the device cache's config (", config_.num_layers, " layers, ", config_.num_kv_heads,
                              " kv heads of ", config_.head_dim, ", ", config_.num_blocks, " blocks)"));
    }
  }

  /// The flat tables of the mirror: block tables [num_layers][max_slots][max_blocks] (-1 past a
  /// slot's blocks), quantized counts and lengths [num_layers][max_slots].
  void tables(std::vector<std::int32_t>& key_table, std::vector<std::int32_t>& value_table,
              std::vector<std::int32_t>& key_quantized, std::vector<std::int32_t>& value_quantized,
              std::vector<std::int32_t>& lengths) const {
    const auto slots = static_cast<std::size_t>(limits_.max_slots);
    const auto layers = static_cast<std::size_t>(config_.num_layers);
    const auto blocks = static_cast<std::size_t>(max_blocks_);
    key_table.assign(layers * slots * blocks, -1);
    value_table.assign(layers * slots * blocks, -1);
    key_quantized.assign(layers * slots, 0);
    value_quantized.assign(layers * slots, 0);
    lengths.assign(layers * slots, 0);
    for (SequenceId s = 0; s < mirror_.slots(); ++s) {
      if (!mirror_.is_live(s)) continue;
      for (std::size_t l = 0; l < layers; ++l) {
        const LayerState& ls = mirror_.layer(s, static_cast<index_t>(l));
        const std::size_t at = l * slots + static_cast<std::size_t>(s);
        std::copy(ls.key.blocks.begin(), ls.key.blocks.end(), key_table.begin() + static_cast<std::ptrdiff_t>(at * blocks));
        std::copy(ls.value.blocks.begin(), ls.value.blocks.end(), value_table.begin() + static_cast<std::ptrdiff_t>(at * blocks));
        key_quantized[at] = static_cast<std::int32_t>(ls.key.counts.quantized);
        value_quantized[at] = static_cast<std::int32_t>(ls.value.counts.quantized);
        lengths[at] = static_cast<std::int32_t>(ls.key.counts.length);
      }
    }
  }

  /// The launch arguments of layer `layer` of the plan last written (batch, n) whose entries are
  /// at `plan` (the start of the whole plan), for a cache whose arrays are at the given
  /// addresses (device or host): pools, exact rows [max_slots][slot_stride()], block tables
  /// [num_layers][max_slots][max_blocks], counts [num_layers][max_slots].
  AppendArgs launch_args(index_t layer, index_t batch, index_t n, const std::int32_t* plan, const void* k, const void* v,
                         std::uint8_t* key_pool, std::uint8_t* value_pool, std::uint8_t* exact, std::int32_t* key_table,
                         std::int32_t* value_table, std::int32_t* key_quantized, std::int32_t* value_quantized,
                         std::int32_t* lengths, AppendStatusWord* status) const noexcept {
    AppendArgs a;
    const index_t stride = plan_stride(n);
    a.plan = plan + static_cast<std::size_t>(layer * batch * stride);
    a.stride = static_cast<std::int32_t>(stride);
    a.max_new = static_cast<std::int32_t>(max_new_blocks(n));
    a.batch = static_cast<std::int32_t>(batch);
    a.n = static_cast<std::int32_t>(n);
    a.layer = static_cast<std::int32_t>(layer);
    a.width = static_cast<std::int32_t>(width_);
    a.part_width = static_cast<std::int32_t>(part_width_);
    a.parts = static_cast<std::int32_t>(width_ / part_width_);
    a.k = k;
    a.v = v;
    const PagedKVParams p = paged(layer, key_pool, value_pool, exact, key_table, value_table, key_quantized, value_quantized, lengths);
    a.keys = {p.keys, key_table + table_offset(layer), key_quantized + count_offset(layer), key_clip(layer)};
    a.values = {p.values, value_table + table_offset(layer), value_quantized + count_offset(layer), value_clip(layer)};
    a.lengths = lengths + count_offset(layer);
    a.status = status;
    return a;
  }

  /// PagedKVParams of one layer of a cache whose arrays are at the given addresses (launch_args).
  PagedKVParams paged(index_t layer, std::uint8_t* key_pool, std::uint8_t* value_pool, std::uint8_t* exact,
                      const std::int32_t* key_table, const std::int32_t* value_table, const std::int32_t* key_quantized,
                      const std::int32_t* value_quantized, const std::int32_t* lengths) const noexcept {
    PagedKVParams p;
    p.keys = kvq::detail::paged_stream(keys_.layout, key_pool, rows_, sizeof(exact_type), config_.num_layers, layer, true,
                                       key_rule_, exact);
    p.values = kvq::detail::paged_stream(values_.layout, value_pool, rows_, sizeof(exact_type), config_.num_layers, layer,
                                         false, value_rule_, exact);
    p.keys.block_table = key_table + table_offset(layer);
    p.values.block_table = value_table + table_offset(layer);
    p.keys.max_blocks = p.values.max_blocks = static_cast<std::int32_t>(max_blocks_);
    p.keys.quantized_tokens = key_quantized + count_offset(layer);
    p.values.quantized_tokens = value_quantized + count_offset(layer);
    p.lengths = lengths + count_offset(layer);
    p.num_kv_heads = static_cast<std::int32_t>(config_.num_kv_heads);
    p.head_dim = static_cast<std::int32_t>(config_.head_dim);
    p.exact_bytes = static_cast<std::int32_t>(sizeof(exact_type));
    return p;
  }

  std::size_t table_offset(index_t layer) const noexcept {
    return static_cast<std::size_t>(layer * limits_.max_slots * max_blocks_);
  }
  std::size_t count_offset(index_t layer) const noexcept { return static_cast<std::size_t>(layer * limits_.max_slots); }

  void check_live(const char* where, const char* arg, SequenceId seq) const {
    if (!mirror_.is_live(seq)) {
      kvq::detail::throw_argument_error(where, arg, seq, "the id of a live sequence (add_sequence, not freed)");
    }
  }
  void check_layer(const char* where, index_t layer) const {
    if (layer < 0 || layer >= config_.num_layers) {
      kvq::detail::throw_argument_error(where, "layer", layer, kvq::detail::concat("a layer in 0..", config_.num_layers - 1));
    }
  }

 private:
  index_t blocks_for(index_t quantized) const noexcept { return ceil_div<index_t>(quantized, block_tokens); }
  index_t new_blocks(const WindowRule& rule, const StreamState& st, index_t n) const noexcept {
    return blocks_for(rule.after_append(st.counts, n).quantized) - static_cast<index_t>(st.blocks.size());
  }

  void write_stream(std::int32_t* e, index_t max_new, bool key, StreamState& st, const StreamCounts& after,
                    BlockIdAllocator& ids) {
    const index_t before_blocks = static_cast<index_t>(st.blocks.size());
    const index_t fresh = blocks_for(after.quantized) - before_blocks;
    e[key ? kPlanKeyBefore : kPlanValueBefore] = static_cast<std::int32_t>(st.counts.quantized);
    e[key ? kPlanKeyAfter : kPlanValueAfter] = static_cast<std::int32_t>(after.quantized);
    e[key ? kPlanKeyBlocks : kPlanValueBlocks] = static_cast<std::int32_t>(before_blocks);
    e[key ? kPlanKeyNew : kPlanValueNew] = static_cast<std::int32_t>(fresh);
    e[key ? kPlanKeyTail : kPlanValueTail] =
        st.counts.quantized % block_tokens != 0 ? st.blocks[static_cast<std::size_t>(st.counts.quantized / block_tokens)] : -1;
    std::int32_t* id = e + kPlanHeaderWords + (key ? 0 : max_new);
    for (index_t i = 0; i < fresh; ++i) {
      id[i] = ids.allocate();
      st.blocks.push_back(id[i]);
    }
  }

  /// Channels per thread block: whole kv heads, a multiple of every per-token group (so a group
  /// never spans two thread blocks), the fewest heads that allow it.
  index_t choose_part_width() const noexcept {
    index_t unit = 1;
    auto need = [&](auto stream) {
      using S = decltype(stream);
      if constexpr (detail::stream_per_token<S>()) unit = std::max<index_t>(unit, S::group_size);
    };
    need(KeyStream{});
    need(ValueStream{});
    for (index_t h = 1; h <= config_.num_kv_heads; ++h) {
      const index_t w = h * config_.head_dim;
      if (config_.num_kv_heads % h == 0 && w % unit == 0) return w;
    }
    return width_;
  }

  CacheConfig config_{};
  DeviceCacheLimits limits_{};
  index_t width_ = 0;
  index_t max_blocks_ = 0;
  index_t part_width_ = 0;
  WindowRule key_rule_ = WindowRule::of<typename Policy::KeyWindow>();
  WindowRule value_rule_ = WindowRule::of<typename Policy::ValueWindow>();
  kvq::detail::StreamSetup keys_;
  kvq::detail::StreamSetup values_;
  ExactRows rows_{};
  BlockIdAllocator key_ids_;
  BlockIdAllocator value_ids_;
  SequenceTable<exact_type> mirror_;
};

}  // namespace cuda
}  // namespace kvq
