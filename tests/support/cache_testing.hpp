// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Helpers of the policy, cache and attention tests: an independent model of every
///        method's state machine written from ALGORITHMS.md (never from cache/window_schedule),
///        what each policy type must store (from its template arguments and ALGORITHMS.md),
///        test data, and snapshots of a cache's visible state.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "kvq/kvq.hpp"

namespace kvq_test {

using kvq::Bits;
using kvq::GroupAxis;
using kvq::index_t;
using kvq::MetaFormat;

// ---- policies the cache tests share --------------------------------------------------------

/// Small parameters (many flushes in few tokens) and the registry's defaults.
namespace policies {
using kvq::Bits;
using KiviSmall = kvq::KiviPolicy<Bits::k2, Bits::k2, 4, 8>;
using KiviSmall34 = kvq::KiviPolicy<Bits::k3, Bits::k4, 4, 12>;
using SkvqSmall = kvq::SkvqPolicy<Bits::k2, Bits::kTernary, 8, 6, 3>;
using CskvSmall = kvq::CskvPolicy<Bits::k4, Bits::k2, 50, 75, 4>;
using PerTokenSmall = kvq::PerTokenPolicy<Bits::k2, Bits::k4, 8>;
using Fp16 = kvq::Fp16Policy<kvq::Float16>;
using Bf16 = kvq::Fp16Policy<kvq::BFloat16>;
using Fp32 = kvq::Fp16Policy<float>;
using KiviK2 = kvq::KiviPolicy<Bits::k2, Bits::k2, 32, 128>;
using KiviK4 = kvq::KiviPolicy<Bits::k4, Bits::k4, 32, 128>;
using SkvqK2V15 = kvq::SkvqPolicy<Bits::k2, Bits::kTernary, 128, 128, 5>;
using SkvqK2V2 = kvq::SkvqPolicy<Bits::k2, Bits::k2, 128, 128, 5>;
using SkvqK2V15G32 = kvq::SkvqPolicy<Bits::k2, Bits::kTernary, 32, 128, 5>;
using SkvqK2V2G32 = kvq::SkvqPolicy<Bits::k2, Bits::k2, 32, 128, 5>;
using SkvqK2V15G8 = kvq::SkvqPolicy<Bits::k2, Bits::kTernary, 8, 128, 5>;
using SkvqK2V2G8 = kvq::SkvqPolicy<Bits::k2, Bits::k2, 8, 128, 5>;
using CskvK4V4 = kvq::CskvPolicy<Bits::k4, Bits::k4, 50, 50, 32>;
using CskvK2V4 = kvq::CskvPolicy<Bits::k2, Bits::k4, 25, 75, 32>;
using CskvFp16Small = kvq::CskvFp16Policy<50, 25, 4>;
using CskvK4V4R25 = kvq::CskvPolicy<Bits::k4, Bits::k4, 25, 75, 32>;
using CskvK4V4R10 = kvq::CskvPolicy<Bits::k4, Bits::k4, 10, 30, 32>;
using CskvFp16R25 = kvq::CskvFp16Policy<25, 75, 32>;
using CskvFp16R10 = kvq::CskvFp16Policy<10, 30, 32>;
using PerTokenK2 = kvq::PerTokenPolicy<Bits::k2, Bits::k2, 32>;
using PerTokenK4 = kvq::PerTokenPolicy<Bits::k4, Bits::k4, 32>;
}  // namespace policies

// ---- the state machines of ALGORITHMS.md --------------------------------------------------

/// Which rule of ALGORITHMS.md moves a stream's tokens out of its full-precision window.
enum class Method {
  kKiviKeys,    ///< §1.4: residual K_r of < R tokens; flushed in chunks of R after the step's attention
  kKiviValues,  ///< §1.4: residual V_r of R tokens; oldest popped after the step's attention
  kSkvq,        ///< §2.6: S sinks, window of W, oldest quantized before the step's attention
  kCskv,        ///< §3.2: window of (length mod M), chunks of M quantized before attention
  kImmediate,   ///< baselines: every token goes to the block store at once (no window)
};

/// Token counts of one stream, advanced by the rules of ALGORITHMS.md as written there.
struct StreamModel {
  Method method = Method::kImmediate;
  index_t sink_cap = 0;  ///< S (SKVQ); 0 otherwise
  index_t param = 0;     ///< R (KIVI), W (SKVQ), M (CSKV)
  index_t length = 0;
  index_t quantized = 0;

  index_t sinks() const { return std::min(length, sink_cap); }
  index_t window() const { return length - sinks() - quantized; }

  /// 0 = sink, 1 = quantized, 2 = window (the order of kvq::Segment).
  int segment(index_t p) const {
    if (p < sinks()) return 0;
    return p < sinks() + quantized ? 1 : 2;
  }

  /// Appends n tokens in one call (n == 1: a decode step; n > 1: a prefill chunk).
  void append(index_t n) {
    if (n <= 0) return;  // an empty append is not a step
    switch (method) {
      case Method::kKiviKeys: {
        const index_t r = param;
        // Step 3 of the previous decode step: |K_r| reached R; flushed after that step's
        // attention, i.e. before anything else happens to the cache.
        if (window() == r) quantized += r;
        length += n;
        // Prefill: the first L - (L mod R) tokens are quantized, L mod R stay in K_r (the same
        // rule for a chunk appended to a non-empty residual: whole chunks of R leave).
        if (n > 1) quantized += window() - window() % r;
        break;
      }
      case Method::kKiviValues: {
        const index_t r = param;
        // Step 6 of the previous decode step: |V_r| == R + 1 pops the oldest value token.
        if (window() == r + 1) quantized += 1;
        length += n;
        // Prefill: L <= R stays in V_r; else the first L - R tokens are quantized.
        if (n > 1 && window() > r) quantized += window() - r;
        break;
      }
      case Method::kSkvq: {
        const index_t s = sink_cap, w = param;
        if (length == 0) {
          // Prefill: n_q = L - S - W; > 0: [0,S) sinks, [S, L-W) quantized, [L-W, L) window.
          const index_t nq = n - s - w;
          length = n;
          quantized = nq > 0 ? nq : 0;
          break;
        }
        for (index_t i = 0; i < n; ++i) {  // decode rule, one token at a time
          if (sinks() < s) {
            ++length;  // the sink is not full yet
          } else if (window() < w) {
            ++length;
          } else {
            ++quantized;  // quantize the oldest window token, then append
            ++length;
          }
        }
        break;
      }
      case Method::kCskv: {
        const index_t m = param;
        if (length == 0) {
          length = n;
          quantized = n - n % m;  // floor(L / M) * M latents stored, L mod M exact
          break;
        }
        for (index_t i = 0; i < n; ++i) {
          ++length;
          if (length % m == 0) quantized += m;  // the chunk is full: quantize it, drop the exact copy
        }
        break;
      }
      case Method::kImmediate:
        length += n;
        quantized = length;
        break;
    }
  }

  /// The largest window the method holds between steps (ALGORITHMS.md): KIVI keys R - 1,
  /// KIVI values R, SKVQ W, CSKV M - 1, baselines 0.
  index_t settled_max_window() const {
    switch (method) {
      case Method::kKiviKeys: return param - 1;
      case Method::kKiviValues: return param;
      case Method::kSkvq: return param;
      case Method::kCskv: return param - 1;
      case Method::kImmediate: return 0;
    }
    return 0;
  }

  /// Window rows the cache must reserve: the settled window, plus KIVI's pending token (a decode
  /// step holds R keys or R + 1 values until its flush after attention).
  index_t ring_rows() const {
    const bool pending = method == Method::kKiviKeys || method == Method::kKiviValues;
    return settled_max_window() + (pending ? 1 : 0);
  }
};

// ---- what a policy type must store --------------------------------------------------------

/// How one stream must be stored: quantized with `spec` (group size resolved for the shape) or
/// exact with elements of `exact_bytes` bytes.
struct StreamExpect {
  bool quantized = false;
  kvq::MatrixQuantSpec spec{};
  bool reorders = false;  ///< SKVQ channel groups (ChannelReorder transform)
  std::size_t exact_bytes = 0;
};

inline kvq::MatrixQuantSpec make_spec(Bits b, GroupAxis axis, index_t group, float clip, MetaFormat meta) {
  kvq::MatrixQuantSpec s;
  s.bits = b;
  s.axis = axis;
  s.group_size = group;
  s.clip = clip;
  s.meta = meta;
  return s;
}

/// Expectations of a policy type, written from its template arguments and ALGORITHMS.md.
/// G and R name the lengths the state-machine tests probe (G - 1, G, R - 1, R, R + 1, 3R + 5).
template <class P>
struct Expect;

template <Bits KB, Bits VB, int G, int R>
struct Expect<kvq::KiviPolicy<KB, VB, G, R>> {
  using exact_type = kvq::Float16;
  static constexpr bool pre_rope = false;
  static constexpr bool latent = false;
  static index_t key_rank(index_t heads, index_t dim) { return heads * dim; }
  static index_t value_rank(index_t heads, index_t dim) { return heads * dim; }
  static constexpr index_t group = G;
  static constexpr index_t residual = R;
  static std::string name() {
    return "kivi-k" + kvq::bits_label(KB) + "v" + kvq::bits_label(VB) + "-g" + std::to_string(G) + "-r" + std::to_string(R);
  }
  static StreamModel key_model() { return {Method::kKiviKeys, 0, R}; }
  static StreamModel value_model() { return {Method::kKiviValues, 0, R}; }
  // §1.3: keys per channel (groups of G tokens), values per token (groups of G channels); fp16
  // scales and zeros, plain min/max.
  static StreamExpect key_stream(index_t, index_t) {
    return {true, make_spec(KB, GroupAxis::kTokens, G, 1.0f, MetaFormat::kFp16), false, 0};
  }
  static StreamExpect value_stream(index_t, index_t) {
    return {true, make_spec(VB, GroupAxis::kChannels, G, 1.0f, MetaFormat::kFp16), false, 0};
  }
  static std::vector<index_t> extra_lengths() { return {}; }
};

template <Bits KB, Bits VB, int G, int W, int S, int Clip, MetaFormat Meta, bool PreRope>
struct Expect<kvq::SkvqPolicy<KB, VB, G, W, S, Clip, Meta, PreRope>> {
  using exact_type = kvq::Float16;
  static constexpr bool pre_rope = PreRope;
  static constexpr bool latent = false;
  static index_t key_rank(index_t heads, index_t dim) { return heads * dim; }
  static index_t value_rank(index_t heads, index_t dim) { return heads * dim; }
  static constexpr index_t group = G;
  static constexpr index_t residual = W;
  static std::string name() {
    std::string n = "skvq-k" + kvq::bits_label(KB) + "v" + kvq::bits_label(VB) + "-g" + std::to_string(G) + "-w" +
                    std::to_string(W) + "-s" + std::to_string(S);
    if (Clip != 920) n += "-c" + std::to_string(Clip);
    if (Meta != MetaFormat::kFp8E4M3) n += "-" + kvq::meta_label(Meta);
    if (!PreRope) n += "-postrope";
    return n;
  }
  static StreamModel key_model() { return {Method::kSkvq, S, W}; }
  static StreamModel value_model() { return {Method::kSkvq, S, W}; }
  // §2.4: both streams per token over the (reordered) layer row, clipped, metadata in Meta.
  static StreamExpect key_stream(index_t, index_t) {
    return {true, make_spec(KB, GroupAxis::kChannels, G, static_cast<float>(Clip) / 1000.0f, Meta), true, 0};
  }
  static StreamExpect value_stream(index_t, index_t) {
    return {true, make_spec(VB, GroupAxis::kChannels, G, static_cast<float>(Clip) / 1000.0f, Meta), true, 0};
  }
  static std::vector<index_t> extra_lengths() {
    std::vector<index_t> v = {S, S + 1, S + W - 1, S + W, S + W + 1};
    if (S > 0) v.push_back(S - 1);
    return v;
  }
};

/// CSKV latent rank of a stream: percent% of head_dim per head (at least 1), times the heads.
inline index_t cskv_rank(index_t heads, index_t dim, int percent) {
  return heads * std::max<index_t>(1, (dim * percent + 50) / 100);
}

template <Bits KB, Bits VB, int KP, int VP, int M>
struct Expect<kvq::CskvPolicy<KB, VB, KP, VP, M>> {
  using exact_type = kvq::Float16;
  static constexpr bool pre_rope = true;
  static constexpr bool latent = true;
  static constexpr index_t group = M;
  static constexpr index_t residual = M;
  static std::string name() {
    return "cskv-k" + kvq::bits_label(KB) + "v" + kvq::bits_label(VB) + "-r" + std::to_string(KP) + "-" +
           std::to_string(VP) + "-w" + std::to_string(M);
  }
  static StreamModel key_model() { return {Method::kCskv, 0, M}; }
  static StreamModel value_model() { return {Method::kCskv, 0, M}; }
  static index_t key_rank(index_t heads, index_t dim) { return cskv_rank(heads, dim, KP); }
  static index_t value_rank(index_t heads, index_t dim) { return cskv_rank(heads, dim, VP); }
  // §3.4 --use_window: key latents per channel over groups of M tokens; value latents per
  // token with one group per head's latent slice. fp16 metadata.
  static StreamExpect key_stream(index_t, index_t) {
    return {true, make_spec(KB, GroupAxis::kTokens, M, 1.0f, MetaFormat::kFp16), false, 0};
  }
  static StreamExpect value_stream(index_t heads, index_t dim) {
    return {true, make_spec(VB, GroupAxis::kChannels, value_rank(heads, dim) / heads, 1.0f, MetaFormat::kFp16), false, 0};
  }
  static std::vector<index_t> extra_lengths() { return {2 * M - 1, 2 * M, 2 * M + 1}; }
};

template <int KP, int VP, int M>
struct Expect<kvq::CskvFp16Policy<KP, VP, M>> {
  using exact_type = kvq::Float16;
  static constexpr bool pre_rope = true;
  static constexpr bool latent = true;
  static constexpr index_t group = M;
  static constexpr index_t residual = M;
  static std::string name() {
    return "cskv-fp16-r" + std::to_string(KP) + "-" + std::to_string(VP) + "-w" + std::to_string(M);
  }
  static StreamModel key_model() { return {Method::kCskv, 0, M}; }
  static StreamModel value_model() { return {Method::kCskv, 0, M}; }
  static index_t key_rank(index_t heads, index_t dim) { return cskv_rank(heads, dim, KP); }
  static index_t value_rank(index_t heads, index_t dim) { return cskv_rank(heads, dim, VP); }
  // Latents stored exactly in fp16 (channel shrinking without quantization).
  static StreamExpect key_stream(index_t, index_t) { return {false, {}, false, 2}; }
  static StreamExpect value_stream(index_t, index_t) { return {false, {}, false, 2}; }
  static std::vector<index_t> extra_lengths() { return {2 * M - 1, 2 * M, 2 * M + 1}; }
};

template <class T>
struct Expect<kvq::Fp16Policy<T>> {
  using exact_type = T;
  static constexpr bool pre_rope = false;
  static constexpr bool latent = false;
  static index_t key_rank(index_t heads, index_t dim) { return heads * dim; }
  static index_t value_rank(index_t heads, index_t dim) { return heads * dim; }
  static constexpr index_t group = 16;
  static constexpr index_t residual = 16;
  static std::string name() {
    return std::is_same_v<T, kvq::Float16> ? "fp16" : std::is_same_v<T, kvq::BFloat16> ? "bf16" : "fp32";
  }
  static StreamModel key_model() { return {Method::kImmediate, 0, 0}; }
  static StreamModel value_model() { return {Method::kImmediate, 0, 0}; }
  static StreamExpect key_stream(index_t, index_t) { return {false, {}, false, sizeof(T)}; }
  static StreamExpect value_stream(index_t, index_t) { return {false, {}, false, sizeof(T)}; }
  static std::vector<index_t> extra_lengths() { return {}; }
};

template <Bits KB, Bits VB, int G>
struct Expect<kvq::PerTokenPolicy<KB, VB, G>> {
  using exact_type = kvq::Float16;
  static constexpr bool pre_rope = false;
  static constexpr bool latent = false;
  static index_t key_rank(index_t heads, index_t dim) { return heads * dim; }
  static index_t value_rank(index_t heads, index_t dim) { return heads * dim; }
  static constexpr index_t group = G;
  static constexpr index_t residual = 64;
  static std::string name() {
    return "pertoken-k" + kvq::bits_label(KB) + "v" + kvq::bits_label(VB) + "-g" + std::to_string(G);
  }
  static StreamModel key_model() { return {Method::kImmediate, 0, 0}; }
  static StreamModel value_model() { return {Method::kImmediate, 0, 0}; }
  static StreamExpect key_stream(index_t, index_t) {
    return {true, make_spec(KB, GroupAxis::kChannels, G, 1.0f, MetaFormat::kFp16), false, 0};
  }
  static StreamExpect value_stream(index_t, index_t) {
    return {true, make_spec(VB, GroupAxis::kChannels, G, 1.0f, MetaFormat::kFp16), false, 0};
  }
  static std::vector<index_t> extra_lengths() { return {}; }
};

/// Prefill lengths of the state-machine tests: 0, 1, G - 1, G, R - 1, R, R + 1, 3R + 5 and the
/// policy's own boundaries, sorted and unique.
template <class P>
std::vector<index_t> probe_lengths() {
  using X = Expect<P>;
  std::vector<index_t> v = {0, 1, X::group - 1, X::group, X::residual - 1, X::residual, X::residual + 1,
                            3 * X::residual + 5};
  for (index_t e : X::extra_lengths()) v.push_back(e);
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  v.erase(std::remove_if(v.begin(), v.end(), [](index_t x) { return x < 0; }), v.end());
  return v;
}

/// Packed bytes of n codes (ALGORITHMS.md §2.5 / DESIGN.md: dense ternary 5 codes per byte;
/// otherwise B bits each, rounded up to bytes).
inline std::size_t code_bytes(Bits b, index_t n) {
  const auto un = static_cast<std::size_t>(n);
  return b == Bits::kTernary ? (un + 4) / 5 : (un * static_cast<std::size_t>(b) + 7) / 8;
}
inline std::size_t meta_size(MetaFormat m) { return m == MetaFormat::kFp8E4M3 ? 1 : 2; }

/// Bytes of one block of `tokens` rows of `width` numbers, padded to 64 bytes: codes plus a
/// scale and a zero per group (stream_layout.hpp).
inline std::size_t expected_block_bytes(const StreamExpect& s, index_t tokens, index_t width) {
  std::size_t bytes;
  if (!s.quantized) {
    bytes = static_cast<std::size_t>(tokens * width) * s.exact_bytes;
  } else if (s.spec.axis == GroupAxis::kTokens) {
    bytes = static_cast<std::size_t>(width) * code_bytes(s.spec.bits, tokens) +
            2 * static_cast<std::size_t>(width * (tokens / s.spec.group_size)) * meta_size(s.spec.meta);
  } else {
    const index_t groups = std::max<index_t>(1, (width + s.spec.group_size / 2) / s.spec.group_size);
    bytes = static_cast<std::size_t>(tokens) * code_bytes(s.spec.bits, width) +
            2 * static_cast<std::size_t>(tokens * groups) * meta_size(s.spec.meta);
  }
  return (bytes + 63) / 64 * 64;
}

// ---- data --------------------------------------------------------------------------------

/// Rows [n, heads, dim] like real keys/values: a per-channel bias, unit noise and a few outlier
/// channels (x8), all scaled by `scale`. `bias` [heads * dim] is drawn once per stream.
inline std::vector<float> make_bias(kvq::Rng& rng, index_t width, float scale = 1.0f) {
  std::vector<float> b(static_cast<std::size_t>(width));
  for (index_t c = 0; c < width; ++c) {
    b[static_cast<std::size_t>(c)] = scale * (c % 7 == 3 ? 8.0f : 1.0f) * rng.normal();
  }
  return b;
}
inline std::vector<float> make_rows(kvq::Rng& rng, index_t n, const std::vector<float>& bias, float scale = 1.0f) {
  const auto width = static_cast<index_t>(bias.size());
  std::vector<float> x(static_cast<std::size_t>(n * width));
  for (index_t t = 0; t < n; ++t) {
    for (index_t c = 0; c < width; ++c) {
      x[static_cast<std::size_t>(t * width + c)] =
          bias[static_cast<std::size_t>(c)] + scale * (c % 7 == 3 ? 4.0f : 1.0f) * rng.normal();
    }
  }
  return x;
}

/// x rounded to T and back (what an exact row of type T holds).
template <class T>
float round_to(float x) {
  return kvq::to_float(kvq::from_float<T>(x));
}

/// Rows [n, W] as the view append() takes.
inline kvq::StridedView<const float, 3> rows_view(const float* data, index_t n, index_t heads, index_t dim) {
  return kvq::StridedView<const float, 3>(data, {n, heads, dim});
}

/// The cache of policy P, with random orthonormal CSKV factors when P is latent.
template <class P>
kvq::QuantizedKVCache<P> make_cache(index_t layers, index_t heads, index_t dim, index_t blocks,
                                    std::uint64_t factor_seed = 1, kvq::RopeConfig rope = {}) {
  kvq::CacheConfig cfg;
  cfg.num_layers = layers;
  cfg.num_kv_heads = heads;
  cfg.head_dim = dim;
  cfg.num_blocks = blocks;
  cfg.rope = rope;
  return kvq::QuantizedKVCache<P>(cfg, kvq::random_latent_calibration<P>(cfg, factor_seed));
}

// ---- snapshots -----------------------------------------------------------------------------

/// Everything a caller can observe of a cache: memory, pool use, and per live sequence and
/// layer the counts and the keys and values read back.
struct CacheSnapshot {
  struct Layer {
    kvq::StreamCounts key, value;
    std::vector<float> keys, values;
  };
  std::size_t memory = 0;
  std::size_t key_block_bytes = 0, value_block_bytes = 0, exact_bytes = 0;
  index_t key_used = 0, value_used = 0;
  std::vector<int> live;  // per id 0..max_id
  std::vector<std::vector<Layer>> layers;
};

template <class P>
CacheSnapshot snapshot(const kvq::QuantizedKVCache<P>& cache, int max_id = 16) {
  CacheSnapshot s;
  s.memory = cache.memory_bytes();
  const kvq::MemoryUsage u = cache.memory_usage();
  s.key_block_bytes = u.key_block_bytes;
  s.value_block_bytes = u.value_block_bytes;
  s.exact_bytes = u.exact_bytes;
  s.key_used = cache.key_pool().used_blocks();
  s.value_used = cache.value_pool().used_blocks();
  for (int id = 0; id < max_id; ++id) {
    s.live.push_back(cache.is_live(id) ? 1 : 0);
    std::vector<CacheSnapshot::Layer> ls;
    if (cache.is_live(id)) {
      for (index_t l = 0; l < cache.config().num_layers; ++l) {
        CacheSnapshot::Layer x;
        x.key = cache.key_counts(id, l);
        x.value = cache.value_counts(id, l);
        x.keys.resize(static_cast<std::size_t>(cache.length(id, l) * cache.width()));
        x.values.resize(x.keys.size());
        cache.read_keys(id, l, x.keys.data());
        cache.read_values(id, l, x.values.data());
        ls.push_back(std::move(x));
      }
    }
    s.layers.push_back(std::move(ls));
  }
  return s;
}

/// Empty string when equal; otherwise what differs (bitwise comparison of contents).
inline std::string diff(const CacheSnapshot& a, const CacheSnapshot& b) {
  if (a.memory != b.memory) return "memory_bytes " + std::to_string(a.memory) + " -> " + std::to_string(b.memory);
  if (a.key_block_bytes != b.key_block_bytes || a.value_block_bytes != b.value_block_bytes ||
      a.exact_bytes != b.exact_bytes) {
    return "memory_usage differs";
  }
  if (a.key_used != b.key_used || a.value_used != b.value_used) return "used blocks differ";
  if (a.live != b.live) return "live sequences differ";
  for (std::size_t id = 0; id < a.layers.size(); ++id) {
    for (std::size_t l = 0; l < a.layers[id].size(); ++l) {
      const auto& x = a.layers[id][l];
      const auto& y = b.layers[id][l];
      const std::string where = "seq " + std::to_string(id) + " layer " + std::to_string(l) + ": ";
      if (x.key.length != y.key.length || x.key.quantized != y.key.quantized) return where + "key counts";
      if (x.value.length != y.value.length || x.value.quantized != y.value.quantized) return where + "value counts";
      if (x.keys.size() != y.keys.size() ||
          (!x.keys.empty() && std::memcmp(x.keys.data(), y.keys.data(), x.keys.size() * sizeof(float)) != 0)) {
        return where + "keys";
      }
      if (x.values.size() != y.values.size() ||
          (!x.values.empty() && std::memcmp(x.values.data(), y.values.data(), x.values.size() * sizeof(float)) != 0)) {
        return where + "values";
      }
    }
  }
  return "";
}

// ---- attention ------------------------------------------------------------------------------

/// max |a - b| / max |b| over one attention output (0 when both are 0).
inline double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    den = std::max(den, std::abs(static_cast<double>(b[i])));
  }
  if (!(num == num)) return INFINITY;  // NaN
  return den > 0 ? num / den : num;
}

}  // namespace kvq_test
