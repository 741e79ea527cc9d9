// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The shape of a cache (CacheConfig), the per-layer data a calibration gives each
///        stream (CacheCalibration), and their checks against a policy's stream: the cache's
///        first job, done once by its constructor.
///
/// A stream's block layout is fixed for all layers (one StreamLayout); per layer a calibration
/// may set the quantizer's clip ratio and the transform's data:
///   IdentityTransform   nothing
///   ChannelReorder      permutation [width] and boundaries [groups + 1] (SKVQ). The group count
///                       is the same in every layer (it fixes the block layout); a layer without
///                       groups gets equal groups of that count in identity order. Without any
///                       calibration the count is max(1, round(width / group_size)).
///   LatentProjection    factors A [width, rank], B [rank, width] for every layer (CSKV)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/layout/block_codec.hpp"
#include "kvq/layout/stream_layout.hpp"
#include "kvq/policy/spec.hpp"
#include "kvq/quant/matrix.hpp"
#include "kvq/transform/latent.hpp"
#include "kvq/transform/rope.hpp"
#include "kvq/transform/stream_transform.hpp"

namespace kvq {

/// Shape and capacity of a cache.
struct CacheConfig {
  index_t num_layers = 0;
  index_t num_kv_heads = 0;
  index_t head_dim = 0;
  /// Blocks in each of the key and value pools; a block holds Policy::block_tokens tokens of one
  /// layer (all kv heads). QuantizedKVCache::blocks_for_tokens() sizes it.
  index_t num_blocks = 0;
  /// RoPE of the model; used only by policies that store keys before RoPE.
  RopeConfig rope{};
};

/// What a calibration gives one layer of one stream (keys or values); see the file comment for
/// which fields each transform takes.
struct StreamCalibration {
  /// Clip ratio in (0, 1] of the layer's quantized groups; 0: the stream's ClipPermille.
  float clip = 0.0f;
  std::vector<std::int32_t> permutation;  ///< ChannelReorder: [width] (position p holds channel permutation[p])
  std::vector<std::int32_t> boundaries;   ///< ChannelReorder: [groups + 1], 0 .. width, increasing
  LowRankFactor latent;                   ///< LatentProjection: A and B

  bool has_groups() const noexcept { return !permutation.empty() || !boundaries.empty(); }
  ChannelGroups groups() const noexcept {
    return {{permutation.data(), permutation.size()}, {boundaries.data(), boundaries.size()}};
  }
};

/// Per-layer data of a cache's two streams. An empty list gives every layer the defaults
/// (identity order with equal groups, the stream's clip ratio); latent streams need factors.
struct CacheCalibration {
  std::vector<StreamCalibration> keys;    ///< [num_layers] or empty
  std::vector<StreamCalibration> values;  ///< [num_layers] or empty
};

/// Random orthonormal factors (kvq::random_orthonormal_factor, seeded per layer and stream) for
/// every layer of each latent stream of Policy; nothing for other streams. The baseline of CSKV
/// before calibration, and a fixture of tests and benchmarks.
template <class Policy>
CacheCalibration random_latent_calibration(const CacheConfig& config, std::uint64_t seed) {
  CacheCalibration c;
  const index_t width = config.num_kv_heads * config.head_dim;
  auto fill = [&](auto stream, std::vector<StreamCalibration>& layers, std::uint64_t stream_seed) {
    using S = decltype(stream);
    if constexpr (S::transform::kind == TransformKind::kLatentProjection) {
      const index_t rank = config.num_kv_heads * stored_head_width<S>(config.head_dim);
      layers.resize(static_cast<std::size_t>(config.num_layers));
      for (index_t l = 0; l < config.num_layers; ++l) {
        layers[static_cast<std::size_t>(l)].latent =
            random_orthonormal_factor(width, rank, stream_seed + 2 * static_cast<std::uint64_t>(l));
      }
    }
  };
  fill(typename Policy::KeyStream{}, c.keys, seed);
  fill(typename Policy::ValueStream{}, c.values, seed + 1);
  return c;
}

namespace detail {

/// Channel groups of `count` groups over `width` channels in identity order, sizes differing by
/// at most one (boundary g = g * width / count).
inline void set_equal_groups(StreamCalibration& s, index_t width, index_t count) {
  s.permutation.resize(static_cast<std::size_t>(width));
  for (index_t c = 0; c < width; ++c) s.permutation[static_cast<std::size_t>(c)] = static_cast<std::int32_t>(c);
  s.boundaries.clear();
  for (index_t g = 0; g <= count; ++g) s.boundaries.push_back(static_cast<std::int32_t>(g * width / count));
}

/// True when the groups are the identity order with groups of exactly `group` channels (the
/// quantizer's uniform path reads them without a permutation).
inline bool is_uniform_identity(const StreamCalibration& s, index_t group) {
  for (std::size_t c = 0; c < s.permutation.size(); ++c) {
    if (s.permutation[c] != static_cast<std::int32_t>(c)) return false;
  }
  for (std::size_t g = 0; g < s.boundaries.size(); ++g) {
    if (s.boundaries[g] != static_cast<std::int32_t>(static_cast<index_t>(g) * group)) return false;
  }
  return true;
}

inline void check_config(const char* where, const CacheConfig& config) {
  if (config.num_layers <= 0) throw_argument_error(where, "num_layers", config.num_layers, "num_layers > 0");
  if (config.num_kv_heads <= 0) throw_argument_error(where, "num_kv_heads", config.num_kv_heads, "num_kv_heads > 0");
  if (config.head_dim <= 0 || config.head_dim % 2 != 0) {
    throw_argument_error(where, "head_dim", config.head_dim, "a positive even head_dim");
  }
  if (config.num_blocks < 0 || config.num_blocks > std::numeric_limits<std::int32_t>::max()) {
    throw_argument_error(where, "num_blocks", config.num_blocks, "0 <= num_blocks < 2^31");
  }
}

/// One stream of a cache as the cache uses it: the block layout (fixed for every layer) and
/// each layer's checked calibration with the defaults filled in.
struct StreamSetup {
  TransformKind kind = TransformKind::kIdentity;
  index_t width = 0;  ///< model row: num_kv_heads * head_dim
  StreamLayout layout;
  const BlockCodec* codec = nullptr;  ///< quantized streams: the codec of their format
  std::vector<StreamCalibration> layers;  ///< [num_layers]; reorder streams: empty groups = uniform
  std::vector<char> uniform;              ///< [num_layers] reorder streams: groups are uniform identity

  /// The run-time transform of a layer: views into `layers`.
  StreamTransform transform(index_t layer) const noexcept {
    const StreamCalibration& s = layers[static_cast<std::size_t>(layer)];
    StreamTransform t;
    t.kind = kind;
    t.width = width;
    t.stored_width = layout.width;
    if (kind == TransformKind::kChannelReorder && !uniform[static_cast<std::size_t>(layer)]) t.groups = s.groups();
    if (kind == TransformKind::kLatentProjection) {
      t.down = s.latent.down.data();
      t.up = s.latent.up.data();
    }
    t.clip = s.clip;
    return t;
  }
};

/// Checks a stream's calibration against its spec and the config and builds its setup.
/// Throws kvq::Error naming "calibration.keys" / "calibration.values" and the layer.
template <class Stream>
StreamSetup make_stream_setup(const CacheConfig& config, index_t block_tokens, std::vector<StreamCalibration> given,
                              bool is_key, const std::string& policy) {
  constexpr const char* where = "kvq::QuantizedKVCache";
  using Transform = typename Stream::transform;
  const std::string arg_name = is_key ? "calibration.keys" : "calibration.values";
  const char* arg = arg_name.c_str();
  const char* which = is_key ? "key" : "value";
  const index_t layers = config.num_layers;
  const index_t width = config.num_kv_heads * config.head_dim;
  const index_t stored = config.num_kv_heads * stored_head_width<Stream>(config.head_dim);
  if (!given.empty() && given.size() != static_cast<std::size_t>(layers)) {
    throw_argument_error(where, arg, concat(given.size(), " layers"), concat("none or one per layer (", layers, ")"));
  }
  given.resize(static_cast<std::size_t>(layers));
  StreamSetup setup;
  setup.kind = Transform::kind;
  setup.width = width;

  // The clip ratio: only quantized streams have one.
  for (std::size_t l = 0; l < given.size(); ++l) {
    StreamCalibration& s = given[l];
    if constexpr (Stream::quantized) {
      if (s.clip == 0.0f) s.clip = Stream::clip;
      if (!(s.clip > 0.0f && s.clip <= 1.0f)) {
        throw_argument_error(where, arg, concat("layer ", l, ": clip ", s.clip), "a clip ratio in (0, 1] (0: the policy's)");
      }
    } else if (s.clip != 0.0f) {
      throw_argument_error(where, arg, concat("layer ", l, ": clip ", s.clip),
                           concat("no clip ratio: the ", which, "s of ", policy, " are stored exactly"));
    }
  }

  // The transform's data.
  for (std::size_t l = 0; l < given.size(); ++l) {
    const StreamCalibration& s = given[l];
    if (Transform::kind != TransformKind::kChannelReorder && s.has_groups()) {
      throw_argument_error(where, arg, concat("layer ", l, ": channel groups"),
                           concat("none: the ", which, "s of ", policy, " do not reorder channels"));
    }
    if (Transform::kind != TransformKind::kLatentProjection && !s.latent.empty()) {
      throw_argument_error(where, arg, concat("layer ", l, ": latent factors"),
                           concat("none: the ", which, "s of ", policy, " are not a latent (CSKV) projection"));
    }
  }
  if constexpr (Transform::kind == TransformKind::kLatentProjection) {
    for (std::size_t l = 0; l < given.size(); ++l) {
      const LowRankFactor& f = given[l].latent;
      const auto expect = static_cast<std::size_t>(width * stored);
      if (f.width != width || f.rank != stored || f.down.size() != expect || f.up.size() != expect) {
        throw_argument_error(
            where, arg,
            concat("layer ", l, ": factors of width ", f.width, " and rank ", f.rank, " with ", f.down.size(), "/",
                   f.up.size(), " floats"),
            concat("latent factors for each of the ", layers, " layers: width ", width, ", rank ", stored,
                   " (A [width, rank] and B [rank, width]; ", policy, " keeps ", Transform::percent,
                   "% of each head's channels)"));
      }
      for (const auto* m : {&f.down, &f.up}) {
        for (float x : *m) {
          if (!std::isfinite(x)) {
            throw_argument_error(where, arg, concat("layer ", l, ": a factor entry ", x), "finite factors",
                                 Status::kNonFiniteInput);
          }
        }
      }
    }
  }

  if constexpr (!Stream::quantized) {
    setup.layout = make_exact_layout(block_tokens, stored, sizeof(typename Stream::value_type));
  } else {
    MatrixQuantSpec spec;
    spec.bits = Stream::bits;
    spec.axis = Stream::axis;
    spec.clip = Stream::clip;
    spec.meta = Stream::meta;
    spec.group_size = Stream::group_size == kGroupPerHead ? stored / config.num_kv_heads : Stream::group_size;
    if constexpr (Transform::kind == TransformKind::kChannelReorder) {
      // The group count: the first calibrated layer's, else round(width / group_size).
      index_t count = std::max<index_t>(1, (stored + spec.group_size / 2) / spec.group_size);
      index_t from = -1;
      for (std::size_t l = 0; l < given.size(); ++l) {
        if (given[l].has_groups()) {
          count = std::max<index_t>(1, static_cast<index_t>(given[l].boundaries.size()) - 1);
          from = static_cast<index_t>(l);
          break;
        }
      }
      setup.uniform.assign(given.size(), 0);
      for (std::size_t l = 0; l < given.size(); ++l) {
        StreamCalibration& s = given[l];
        if (!s.has_groups()) {
          set_equal_groups(s, stored, count);
        } else if (static_cast<index_t>(s.boundaries.size()) - 1 != count) {
          throw_argument_error(where, arg, concat("layer ", l, ": ", static_cast<index_t>(s.boundaries.size()) - 1, " groups"),
                               concat(count, " groups (layer ", from,
                                      "'s count: one block layout serves every layer of a stream)"));
        }
        MatrixQuantSpec check = spec;
        check.channel_groups = s.groups();
        try {
          plan_matrix(1, stored, check);  // validates the permutation and boundaries
        } catch (const Error& e) {
          throw_argument_error(where, arg, concat("layer ", l, ": ", e.what()),
                               concat("channel groups of the layer row (", stored, " channels)"), e.status());
        }
        setup.uniform[l] = stored % spec.group_size == 0 && stored / spec.group_size == count &&
                           is_uniform_identity(s, spec.group_size);
      }
      spec.channel_groups = given.front().groups();
    } else {
      const index_t line = Stream::axis == GroupAxis::kTokens ? block_tokens : stored;
      if (spec.group_size <= 0 || line % spec.group_size != 0) {
        throw_argument_error(where, "head_dim", config.head_dim,
                             concat("a layer row (num_kv_heads * head_dim = ", width, ") whose ", which,
                                    " groups of ", spec.group_size, " channels divide it"));
      }
    }
    setup.layout = make_quantized_layout(block_tokens, stored, spec);
    setup.codec = &kBlockCodec<Stream::bits, meta_type_t<Stream::meta>>;
  }
  setup.layers = std::move(given);
  return setup;
}

}  // namespace detail
}  // namespace kvq
