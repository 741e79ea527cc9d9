// SPDX-License-Identifier: Apache-2.0
// kvq roundtrip --policy NAME --keys K.npy --values V.npy [--out-keys K2.npy --out-values V2.npy]
//               [--rope-theta X --rope-style half|adjacent] [--seed N]
//               [--key-weights WK.npy --value-weights WV.npy]
//
// Appends K and V [tokens, kv_heads, head_dim] one token at a time (decode steps) to a one-layer
// QuantizedKVCache of the named policy, reads them back as attention sees them (quantized
// positions dequantized, sinks and window exact) and reports the error per stream and segment,
// the measured bits per element and the bytes held.
#include "policy_roundtrip.hpp"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include "kvq/cache/quantized_kv_cache.hpp"
#include "kvq/calib/latent_factors.hpp"
#include "kvq/io/npy.hpp"
#include "kvq/policy/registry.hpp"
#include "kvq/transform/rope.hpp"
#include "policy_info.hpp"

namespace kvq_tool {
namespace {

constexpr const char* kWhere = "kvq roundtrip";

/// Error of one group of positions of one stream.
struct ErrorStats {
  kvq::index_t tokens = 0;
  double max_abs = 0;
  double sum_abs = 0;
  double sum_sq_err = 0;
  double sum_sq = 0;
  std::size_t elements = 0;

  void add(const float* x, const float* y, kvq::index_t n) {
    for (kvq::index_t i = 0; i < n; ++i) {
      const double e = std::abs(static_cast<double>(x[i]) - static_cast<double>(y[i]));
      max_abs = std::max(max_abs, e);
      sum_abs += e;
      sum_sq_err += e * e;
      sum_sq += static_cast<double>(x[i]) * static_cast<double>(x[i]);
    }
    elements += static_cast<std::size_t>(n);
  }
  double mean_abs() const { return elements ? sum_abs / static_cast<double>(elements) : 0.0; }
  /// ||x - x'|| / ||x|| over these positions (||x - x'|| when x is all zero).
  double relative_rms() const {
    return sum_sq > 0 ? std::sqrt(sum_sq_err / sum_sq) : std::sqrt(sum_sq_err);
  }
};

/// Errors of one stream: positions in blocks (quantized), exact positions (sinks and window), all.
struct StreamReport {
  ErrorStats quantized, exact, all;
};

StreamReport compare_stream(const std::vector<float>& in, const std::vector<float>& out,
                            kvq::index_t width, const kvq::StreamCounts& counts,
                            const kvq::WindowRule& rule) {
  StreamReport r;
  const kvq::index_t first_q = rule.sink_count(counts);
  const kvq::index_t end_q = first_q + counts.quantized;
  for (kvq::index_t p = 0; p < counts.length; ++p) {
    const float* x = in.data() + p * width;
    const float* y = out.data() + p * width;
    ErrorStats& s = p >= first_q && p < end_q ? r.quantized : r.exact;
    s.add(x, y, width);
    s.tokens += 1;
    r.all.add(x, y, width);
    r.all.tokens += 1;
  }
  return r;
}

struct Result {
  std::vector<float> keys, values;  // [tokens, kv_heads, head_dim] as read back
  StreamReport key_report, value_report;
  kvq::MemoryUsage memory;
  double bits_per_element = 0;
  std::string description;  // the policy in words
  std::string exact_label;  // storage type of exact positions
  std::string factors;      // CSKV: where the factors came from
  bool pre_rope = false;
  std::string key_blocks, value_blocks;  // what the blocks hold: "quantized" or "blocks (fp16)"
};

template <class T>
std::string exact_type_label() {
  return std::is_same_v<T, float> ? "fp32" : std::is_same_v<T, kvq::Float16> ? "fp16" : "bf16";
}

/// Label of the block positions of a stream: "quantized", or "blocks (fp16)" for an exact stream.
template <class S>
std::string block_label() {
  if constexpr (S::quantized) {
    return "quantized";
  } else {
    return "blocks (" + exact_type_label<typename S::value_type>() + ")";
  }
}

/// Reads a projection weight [hidden, width] for CSKV factors.
kvq::NpyArray read_weight(const std::string& path, const char* argument, kvq::index_t width) {
  kvq::NpyArray w = kvq::read_npy(path);
  if (w.shape.size() != 2 || w.shape[1] != width || w.shape[0] < 1) {
    kvq::detail::throw_argument_error(
        kWhere, argument, path + " of shape " + kvq::detail::npy_shape_text(w.shape),
        fmt::format("a 2-D array [hidden, kv_heads * head_dim = {}]", width));
  }
  return w;
}

template <class P>
Result round_trip_policy(const PolicyRoundtripOptions& o, const kvq::NpyArray& k,
                         const kvq::NpyArray& v, const kvq::RopeConfig& rope) {
  using Cache = kvq::QuantizedKVCache<P>;
  using K = typename P::KeyStream;
  using V = typename P::ValueStream;
  const kvq::index_t tokens = k.shape[0], heads = k.shape[1], dim = k.shape[2];
  const kvq::index_t width = heads * dim;

  Result r;
  r.description = fmt::format(
      "K {}-bit {}, V {}-bit {}, metadata {}; exact (sinks + window): {}", stream_bits_label<K>(),
      stream_grouping<K>(stream_head_width<P>(dim, true)), stream_bits_label<V>(),
      stream_grouping<V>(stream_head_width<P>(dim, false)), meta_text<P>(), exact_tokens_text<P>());
  if constexpr (!K::quantized && !V::quantized) {
    r.description = "nothing quantized: keys and values are stored in blocks as " +
                    exact_type_label<typename K::value_type>();
  }
  r.exact_label = exact_type_label<typename Cache::exact_type>();
  r.pre_rope = P::pre_rope;
  r.key_blocks = block_label<K>();
  r.value_blocks = block_label<V>();

  kvq::CacheCalibration calibration;
  if constexpr (kvq::policy_traits<P>::latent) {
    const kvq::index_t key_rank = heads * kvq::stored_head_width<K>(dim);
    const kvq::index_t value_rank = heads * kvq::stored_head_width<V>(dim);
    if (!o.key_weights.empty()) {
      const kvq::NpyArray wk = read_weight(o.key_weights, "--key-weights", width);
      const kvq::NpyArray wv = read_weight(o.value_weights, "--value-weights", width);
      if (wk.shape != wv.shape) {
        kvq::detail::throw_argument_error(
            kWhere, "--value-weights",
            o.value_weights + " of shape " + kvq::detail::npy_shape_text(wv.shape),
            "the shape of --key-weights " + kvq::detail::npy_shape_text(wk.shape));
      }
      calibration.keys.resize(1);
      calibration.values.resize(1);
      calibration.keys[0].latent =
          kvq::calib::low_rank_factor(wk.data.data(), wk.shape[0], width, key_rank, kvq::calib::FactorMethod::kSvd, nullptr);
      calibration.values[0].latent =
          kvq::calib::low_rank_factor(wv.data.data(), wv.shape[0], width, value_rank, kvq::calib::FactorMethod::kSvd, nullptr);
      r.factors = fmt::format("SVD of {} and {} [{}, {}]", o.key_weights, o.value_weights,
                              wk.shape[0], width);
    } else {
      calibration = default_calibration<P>(1, heads, dim, o.seed);
      r.factors = fmt::format("random orthonormal, seed {}", o.seed);
    }
    r.factors = fmt::format("latent ranks K {} / V {} of {} ({}%/{}%), factors: {}", key_rank,
                            value_rank, width, K::transform::percent, V::transform::percent, r.factors);
  }

  kvq::CacheConfig config;
  config.num_layers = 1;
  config.num_kv_heads = heads;
  config.head_dim = dim;
  config.num_blocks = Cache::blocks_for_tokens(1, tokens);
  config.rope = rope;
  Cache cache(config, std::move(calibration));
  const kvq::SequenceId seq = cache.add_sequence();
  for (kvq::index_t t = 0; t < tokens; ++t) {
    try {
      cache.append(seq, 0, k.data.data() + t * width, v.data.data() + t * width, 1);
    } catch (const kvq::Error& e) {
      throw kvq::Error(e.status(),
                       fmt::format("token {} of {} / {}: {}", t, o.keys, o.values, e.what()));
    }
  }
  r.keys.resize(static_cast<std::size_t>(tokens * width));
  r.values.resize(r.keys.size());
  cache.read_keys(seq, 0, r.keys.data());
  cache.read_values(seq, 0, r.values.data());
  r.key_report = compare_stream(k.data, r.keys, width, cache.key_counts(seq, 0), cache.key_rule());
  r.value_report =
      compare_stream(v.data, r.values, width, cache.value_counts(seq, 0), cache.value_rule());
  r.memory = cache.memory_usage();
  r.bits_per_element = cache.bits_per_element();
  return r;
}

const char* dtype_name(kvq::NpyDtype d) {
  return d == kvq::NpyDtype::kFloat32 ? "float32" : "float16";
}

void check_kv_shape(const kvq::NpyArray& a, const std::string& path, const char* argument) {
  if (a.shape.size() != 3 || a.shape[0] < 1 || a.shape[1] < 1 || a.shape[2] < 1) {
    kvq::detail::throw_argument_error(
        kWhere, argument, path + " of shape " + kvq::detail::npy_shape_text(a.shape),
        "a 3-D array [tokens, kv_heads, head_dim] with at least one token");
  }
}

void print_row(const char* stream, const char* positions, const ErrorStats& s) {
  if (s.tokens == 0) {
    fmt::print("  {:<7} {:<22} {:>7}  {:>11}  {:>11}  {:>10}\n", stream, positions, 0, "-", "-",
               "-");
  } else {
    fmt::print("  {:<7} {:<22} {:>7}  {:>11.5g}  {:>11.5g}  {:>10.5g}\n", stream, positions,
               s.tokens, s.max_abs, s.mean_abs(), s.relative_rms());
  }
}

}  // namespace

int run_policy_roundtrip(const PolicyRoundtripOptions& o) {
  // Validate every argument before reading data or writing anything.
  const std::vector<std::string> names = kvq::policy_names();
  if (std::find(names.begin(), names.end(), o.policy) == names.end()) {
    std::string known;
    for (const std::string& n : names) known += (known.empty() ? "" : ", ") + n;
    kvq::detail::throw_argument_error(kWhere, "--policy", o.policy,
                                      "one of " + known + " (see kvq policies)");
  }
  bool latent = false;
  kvq::dispatch_policy(o.policy, [&](auto tag) { latent = kvq::policy_traits<typename decltype(tag)::type>::latent; });
  if (o.key_weights.empty() != o.value_weights.empty()) {
    kvq::detail::throw_argument_error(kWhere,
                                      o.key_weights.empty() ? "--value-weights" : "--key-weights",
                                      o.key_weights.empty() ? o.value_weights : o.key_weights,
                                      "--key-weights and --value-weights together");
  }
  if (!o.key_weights.empty() && !latent) {
    kvq::detail::throw_argument_error(
        kWhere, "--key-weights", o.key_weights,
        "no projection weights: " + o.policy + " is not a latent (CSKV) policy");
  }
  if (!o.out_keys.empty() && o.out_keys == o.out_values) {
    kvq::detail::throw_argument_error(kWhere, "--out-values", o.out_values,
                                      "a path other than --out-keys");
  }
  kvq::RopeConfig rope;
  rope.style = kvq::parse_rope_style(o.rope_style, "--rope-style");
  if (!(o.rope_theta > 1.0) || !std::isfinite(o.rope_theta)) {
    kvq::detail::throw_argument_error(kWhere, "--rope-theta", o.rope_theta,
                                      "a finite base > 1 (10000 for Llama 2, 100000 for SmolLM2)");
  }
  rope.theta = o.rope_theta;

  const kvq::NpyArray k = kvq::read_npy(o.keys);
  check_kv_shape(k, o.keys, "--keys");
  const kvq::NpyArray v = kvq::read_npy(o.values);
  check_kv_shape(v, o.values, "--values");
  if (v.shape != k.shape) {
    kvq::detail::throw_argument_error(
        kWhere, "--values", o.values + " of shape " + kvq::detail::npy_shape_text(v.shape),
        "the shape of --keys " + kvq::detail::npy_shape_text(k.shape));
  }

  Result r;
  kvq::dispatch_policy(o.policy, [&](auto tag) {
    r = round_trip_policy<typename decltype(tag)::type>(o, k, v, rope);
  });

  // Both outputs or neither: a failed second write removes the first.
  if (!o.out_keys.empty()) kvq::write_npy(o.out_keys, r.keys.data(), k.shape, k.dtype);
  if (!o.out_values.empty()) {
    try {
      kvq::write_npy(o.out_values, r.values.data(), v.shape, v.dtype);
    } catch (...) {
      if (!o.out_keys.empty()) std::remove(o.out_keys.c_str());
      throw;
    }
  }

  const kvq::index_t tokens = k.shape[0];
  const kvq::index_t elements = tokens * k.shape[1] * k.shape[2];
  fmt::print(
      "kvq roundtrip --policy {}: {} tokens x {} kv heads x head_dim {}, appended one token at a "
      "time to a one-layer cache\n",
      o.policy, tokens, k.shape[1], k.shape[2]);
  fmt::print("  keys   {} ({}){}\n", o.keys, dtype_name(k.dtype),
             o.out_keys.empty() ? "" : " -> " + o.out_keys);
  fmt::print("  values {} ({}){}\n", o.values, dtype_name(v.dtype),
             o.out_values.empty() ? "" : " -> " + o.out_values);
  fmt::print("  {}\n", r.description);
  if (!r.factors.empty()) fmt::print("  {}\n", r.factors);
  fmt::print("\n  {:<7} {:<22} {:>7}  {:>11}  {:>11}  {:>10}\n", "stream", "positions", "tokens",
             "max |err|", "mean |err|", "rel. RMS");
  const std::string exact = fmt::format("exact ({})", r.exact_label);
  for (const bool key : {true, false}) {
    const char* name = key ? "keys" : "values";
    const StreamReport* rep = key ? &r.key_report : &r.value_report;
    print_row(name, (key ? r.key_blocks : r.value_blocks).c_str(), rep->quantized);
    print_row(name, exact.c_str(), rep->exact);
    print_row(name, "all", rep->all);
  }
  const double fp16_bytes = 2.0 * 2.0 * static_cast<double>(elements);
  fmt::print("\n  memory          {} bytes: key blocks {} + value blocks {} + sinks/windows {}\n",
             r.memory.total(), r.memory.key_block_bytes, r.memory.value_block_bytes,
             r.memory.exact_bytes);
  fmt::print("                  an fp16 cache of these tokens holds {:.0f} bytes ({:.2f}x)\n",
             fp16_bytes, fp16_bytes / static_cast<double>(r.memory.total()));
  fmt::print("  bits / element  {:.4f}  (measured: bytes held * 8 / {} key and value elements)\n",
             r.bits_per_element, 2 * elements);
  fmt::print("  exact positions hold the input rounded to {}\n", r.exact_label);
  if (r.pre_rope) {
    fmt::print(
        "  {} stores keys before RoPE (theta {:g}, {}) and rotates them only inside attention:\n"
        "  give pre-RoPE keys; they are compared as stored, unrotated\n",
        o.policy, rope.theta,
        rope.style == kvq::RopeStyle::kHalfSplit ? "half-split pairs" : "adjacent pairs");
  }
  return 0;
}

}  // namespace kvq_tool
