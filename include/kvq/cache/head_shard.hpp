// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Tensor-parallel sharding of a cache by kv heads: which heads a rank holds (HeadShard),
///        the rank's CacheConfig and CacheCalibration, and the head slices of rows.
///
/// Engines shard attention by kv heads over the GPUs of a node: rank r of world_size holds the
/// kv heads [r * H / world_size, (r + 1) * H / world_size) of every layer, with the query heads of
/// their GQA groups (groups never split), appends and attends them locally, and a collective
/// joins the outputs (cuda/head_gather.cuh). Every piece of kvq's cache is per kv head (keys
/// quantized per channel, values per token within groups that tile the heads, windows and sinks
/// per row), so a rank's cache is an ordinary cache of num_kv_heads / world_size heads fed the
/// slices of the rows: its blocks hold exactly the bytes of those heads' parts of the unsharded
/// cache's blocks, and its attention outputs are those of the same heads, bit for bit.
///
/// Rows here are [..., num_kv_heads, head_dim] (or num_q_heads): a shard's slice is the
/// contiguous run of its heads in the last two dimensions.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "kvq/cache/cache_config.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/view.hpp"
#include "kvq/policy/policy_traits.hpp"

namespace kvq {

/// The heads rank `rank` of `world_size` holds (indices into the model's heads).
struct HeadShard {
  index_t world_size = 1;
  index_t rank = 0;
  index_t first_kv_head = 0;
  index_t num_kv_heads = 0;  ///< of this rank
  index_t first_q_head = 0;
  index_t num_q_heads = 0;   ///< of this rank
  index_t head_dim = 0;

  /// First channel and channel count of the rank's slice of a [num_kv_heads * head_dim] row.
  index_t first_kv_channel() const noexcept { return first_kv_head * head_dim; }
  index_t kv_width() const noexcept { return num_kv_heads * head_dim; }
};

namespace detail {

/// Per-token streams quantize groups of group_size channels along a row: the shard's edges must
/// not cut one.
template <class S>
void check_shard_groups(const char* where, const char* stream, index_t local_width) {
  if constexpr (S::quantized) {
    if (S::axis == GroupAxis::kChannels && local_width % S::group_size != 0) {
      throw_argument_error(where, "world_size", concat(local_width, " channels per rank"),
                           concat("a shard width that is a multiple of the ", stream, " stream's group of ", S::group_size,
                                  " channels (its per-token groups would be cut between ranks)"));
    }
  }
}

}  // namespace detail

/// The heads of rank `rank` of `world_size` for a model of num_q_heads query and num_kv_heads
/// kv heads of head_dim channels, under Policy. Throws kvq::Error(kInvalidArgument) naming the
/// argument when world_size < 1, rank is outside 0 .. world_size - 1, num_kv_heads is not a
/// multiple of world_size, num_q_heads is not a multiple of num_kv_heads, or a rank's width would
/// cut one of Policy's per-token quantization groups.
template <class Policy>
HeadShard shard_heads(index_t num_q_heads, index_t num_kv_heads, index_t head_dim, index_t world_size, index_t rank) {
  constexpr const char* where = "kvq::shard_heads";
  using detail::concat;
  using detail::throw_argument_error;
  if (num_kv_heads < 1) throw_argument_error(where, "num_kv_heads", num_kv_heads, "at least 1");
  if (head_dim < 1) throw_argument_error(where, "head_dim", head_dim, "at least 1");
  if (num_q_heads < num_kv_heads || num_q_heads % num_kv_heads != 0) {
    throw_argument_error(where, "num_q_heads", num_q_heads, concat("a multiple of num_kv_heads (", num_kv_heads, ")"));
  }
  if (world_size < 1 || num_kv_heads % world_size != 0) {
    throw_argument_error(where, "world_size", world_size,
                         concat("a divisor of num_kv_heads (", num_kv_heads, "): each rank holds whole GQA groups"));
  }
  if (rank < 0 || rank >= world_size) throw_argument_error(where, "rank", rank, concat("0 .. ", world_size - 1));
  HeadShard s;
  s.world_size = world_size;
  s.rank = rank;
  s.head_dim = head_dim;
  s.num_kv_heads = num_kv_heads / world_size;
  s.first_kv_head = rank * s.num_kv_heads;
  const index_t group = num_q_heads / num_kv_heads;
  s.num_q_heads = s.num_kv_heads * group;
  s.first_q_head = s.first_kv_head * group;
  detail::check_shard_groups<typename policy_traits<Policy>::KeyStream>(where, "key", s.kv_width());
  detail::check_shard_groups<typename policy_traits<Policy>::ValueStream>(where, "value", s.kv_width());
  return s;
}

/// The rank's cache shape: `model`'s with the rank's kv heads. num_blocks is kept (a block of the
/// rank's cache holds its heads' part of a block, so the same count holds the same tokens).
inline CacheConfig shard_config(const CacheConfig& model, const HeadShard& shard) {
  if (model.num_kv_heads != shard.world_size * shard.num_kv_heads || model.head_dim != shard.head_dim) {
    detail::throw_argument_error("kvq::shard_config", "model", detail::concat(model.num_kv_heads, " kv heads of ", model.head_dim),
                                 detail::concat("the shard's model: ", shard.world_size * shard.num_kv_heads, " kv heads of ",
                                                shard.head_dim));
  }
  CacheConfig c = model;
  c.num_kv_heads = shard.num_kv_heads;
  return c;
}

namespace detail {

inline StreamCalibration shard_stream_calibration(const char* where, const StreamCalibration& s, const HeadShard& shard,
                                                  const char* name, std::size_t layer) {
  StreamCalibration out;
  out.clip = s.clip;
  const index_t c0 = shard.first_kv_channel(), c1 = c0 + shard.kv_width();
  const std::string arg = concat("calibration.", name, "[", layer, "]");
  if (!s.latent.empty()) {
    throw_argument_error(where, arg.c_str(), "a latent projection",
                         "no latent factors: a latent projection (CSKV) mixes the channels of all heads, so it is not "
                         "sharded by heads");
  }
  if (!s.permutation.empty()) {
    for (index_t p = c0; p < c1; ++p) {
      const std::int32_t ch = s.permutation[static_cast<std::size_t>(p)];
      if (ch < c0 || ch >= c1) {
        throw_argument_error(where, arg.c_str(), concat("permutation[", p, "] = ", ch),
                             concat("a channel order that keeps rank ", shard.rank, "'s channels ", c0, " .. ", c1 - 1,
                                    " among its positions"));
      }
      out.permutation.push_back(ch - static_cast<std::int32_t>(c0));
    }
  }
  if (!s.boundaries.empty()) {
    bool has_first = false, has_last = false;
    for (const std::int32_t b : s.boundaries) {
      has_first = has_first || b == c0;
      has_last = has_last || b == c1;
      if (b >= c0 && b <= c1) out.boundaries.push_back(b - static_cast<std::int32_t>(c0));
    }
    if (!has_first || !has_last) {
      throw_argument_error(where, arg.c_str(), "boundaries without the shard's edges",
                           concat("group boundaries at channels ", c0, " and ", c1, " (rank ", shard.rank, "'s edges)"));
    }
  }
  return out;
}

}  // namespace detail

/// The rank's calibration: clip ratios as they are, channel orders and group boundaries cut to
/// the rank's channels (renumbered from 0). Throws kvq::Error(kInvalidArgument) naming the layer
/// when an order moves channels across the rank's edges, a group crosses them, or a stream has
/// latent factors (CSKV's projection mixes every head's channels).
inline CacheCalibration shard_calibration(const CacheCalibration& model, const HeadShard& shard) {
  constexpr const char* where = "kvq::shard_calibration";
  CacheCalibration c;
  for (std::size_t l = 0; l < model.keys.size(); ++l) {
    c.keys.push_back(detail::shard_stream_calibration(where, model.keys[l], shard, "keys", l));
  }
  for (std::size_t l = 0; l < model.values.size(); ++l) {
    c.values.push_back(detail::shard_stream_calibration(where, model.values[l], shard, "values", l));
  }
  return c;
}

/// The shard's heads of rows [..., heads, head_dim]: a view of the same memory. `heads` is the
/// view's extent(Rank - 2): num_kv_heads * world_size for K/V rows (the rank's kv heads) or the
/// model's query heads (the rank's query heads).
template <class T, int Rank>
StridedView<T, Rank> shard_rows(StridedView<T, Rank> rows, const HeadShard& shard) {
  static_assert(Rank >= 2, "kvq: shard_rows takes [..., heads, head_dim] views");
  constexpr const char* where = "kvq::shard_rows";
  const index_t heads = rows.extent(Rank - 2);
  const index_t kv_heads = shard.world_size * shard.num_kv_heads;
  const index_t q_heads = shard.world_size * shard.num_q_heads;
  if (rows.extent(Rank - 1) != shard.head_dim || (heads != kv_heads && heads != q_heads)) {
    detail::throw_argument_error(where, "rows", detail::concat("[..., ", heads, ", ", rows.extent(Rank - 1), "]"),
                                 detail::concat("[..., ", kv_heads, " or ", q_heads, ", ", shard.head_dim, "]"));
  }
  const bool kv = heads == kv_heads;
  const index_t first = kv ? shard.first_kv_head : shard.first_q_head;
  const index_t count = kv ? shard.num_kv_heads : shard.num_q_heads;
  index_t extents[Rank], strides[Rank];
  for (int d = 0; d < Rank; ++d) {
    extents[d] = rows.extent(d);
    strides[d] = rows.stride(d);
  }
  extents[Rank - 2] = count;
  return StridedView<T, Rank>(rows.data() + first * rows.stride(Rank - 2), extents, strides);
}

}  // namespace kvq
