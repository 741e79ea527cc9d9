// SPDX-License-Identifier: Apache-2.0
// kvq policies [--kv-heads H] [--head-dim D] [--tokens N] [--long-tokens M] [--seed S]
//
// Lists the registered policies (kvq/policy/registry.hpp) with their nominal and measured bits
// per element.
//   nominal  = mean over keys and values of  fraction * (code_bits + 2 * meta_bits / group)
//              (kvq::nominal_bits_per_element: code bits as labelled, 1.5 for ternary; a scale
//              and a zero-point per group; fraction = latent rank / head_dim for CSKV, else 1;
//              exact streams 16 or 32). Sinks, windows and padding are not counted.
//   measured = QuantizedKVCache::bits_per_element(): bytes actually allocated (blocks, padding,
//              sinks and windows) * 8 / (2 * tokens * kv_heads * head_dim), after appending
//              random tokens to a one-layer cache of the given shape; "long run" is the same ratio
//              for the bytes added by ~1024 further tokens (the limit for long sequences).
#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "commands.hpp"
#include "kvq/cache/quantized_kv_cache.hpp"
#include "kvq/core/random.hpp"
#include "kvq/policy/registry.hpp"
#include "policy_info.hpp"

namespace kvq_tool {
namespace {

struct PoliciesOptions {
  kvq::index_t kv_heads = 8;
  kvq::index_t head_dim = 128;
  kvq::index_t tokens = 4096;
  kvq::index_t long_tokens = 0;
  std::uint64_t seed = 1;
};

/// Random K and V rows that every policy's cache is fed, [chunk, kv_heads * head_dim] each.
struct Feed {
  kvq::index_t chunk = 0;
  std::vector<float> keys;
  std::vector<float> values;
};

Feed make_feed(const PoliciesOptions& o) {
  Feed f;
  f.chunk = std::min<kvq::index_t>(4096, std::max({o.tokens, o.long_tokens, kvq::index_t{1024}}));
  const auto n = static_cast<std::size_t>(f.chunk * o.kv_heads * o.head_dim);
  kvq::Rng rng(o.seed);
  f.keys.resize(n);
  f.values.resize(n);
  for (float& x : f.keys) x = rng.normal();
  for (float& x : f.values) x = rng.normal();
  return f;
}

/// Appends `tokens` tokens of the feed to layer 0 of `seq`, in prefill chunks of at most
/// feed.chunk tokens.
template <class Cache>
void fill(Cache& cache, kvq::SequenceId seq, const Feed& feed, kvq::index_t tokens) {
  for (kvq::index_t done = 0; done < tokens;) {
    const kvq::index_t n = std::min(feed.chunk, tokens - done);
    cache.append(seq, 0, feed.keys.data(), feed.values.data(), n);
    done += n;
  }
}

struct Measured {
  double at_tokens = 0;  ///< bits_per_element() after o.tokens tokens
  double long_run = 0;   ///< bits per element of the tokens appended after that
  double at_long = 0;    ///< bits_per_element() after o.long_tokens tokens (when > 0)
};

/// Tokens appended after o.tokens for the long-run figure: a multiple of the block size and of
/// both flush chunks (the cache's state is then periodic), at least 1024.
template <class P>
kvq::index_t long_run_tokens() {
  const kvq::index_t period =
      std::lcm(std::lcm<kvq::index_t>(P::block_tokens, P::KeyWindow::chunk), P::ValueWindow::chunk);
  return period * ((1024 + period - 1) / period);
}

/// Measurements of one-layer caches of policy P filled with the feed (one sequence).
template <class P>
Measured measure(const PoliciesOptions& o, const Feed& feed) {
  using Cache = kvq::QuantizedKVCache<P>;
  const kvq::CacheCalibration calibration =
      default_calibration<P>(1, o.kv_heads, o.head_dim, o.seed);
  const double width = static_cast<double>(o.kv_heads * o.head_dim);
  const kvq::index_t extra = long_run_tokens<P>();
  auto make = [&](kvq::index_t tokens) {
    kvq::CacheConfig config;
    config.num_layers = 1;
    config.num_kv_heads = o.kv_heads;
    config.head_dim = o.head_dim;
    config.num_blocks = Cache::blocks_for_tokens(1, tokens);
    return Cache(config, calibration);
  };
  Measured m;
  {
    Cache cache = make(o.tokens + extra);
    const kvq::SequenceId seq = cache.add_sequence();
    fill(cache, seq, feed, o.tokens);
    m.at_tokens = cache.bits_per_element();
    const auto before = static_cast<double>(cache.memory_bytes());
    fill(cache, seq, feed, extra);
    m.long_run = 8.0 * (static_cast<double>(cache.memory_bytes()) - before) /
                 (2.0 * static_cast<double>(extra) * width);
  }
  if (o.long_tokens > 0) {
    Cache cache = make(o.long_tokens);
    const kvq::SequenceId seq = cache.add_sequence();
    fill(cache, seq, feed, o.long_tokens);
    m.at_long = cache.bits_per_element();
  }
  return m;
}

struct Row {
  std::vector<std::string> cells;
};

int run_policies(const PoliciesOptions& o) {
  constexpr const char* where = "kvq policies";
  if (o.kv_heads < 1)
    kvq::detail::throw_argument_error(where, "--kv-heads", o.kv_heads, "at least 1");
  if (o.head_dim < 2 || o.head_dim % 2 != 0) {
    kvq::detail::throw_argument_error(where, "--head-dim", o.head_dim, "a positive even number");
  }
  if (o.tokens < 1) kvq::detail::throw_argument_error(where, "--tokens", o.tokens, "at least 1");
  if (o.long_tokens < 0) {
    kvq::detail::throw_argument_error(where, "--long-tokens", o.long_tokens, "0 (skip) or more");
  }
  const Feed feed = make_feed(o);
  const bool long_column = o.long_tokens > 0;

  std::vector<Row> rows;
  rows.push_back({{"policy", "bits K/V", "groups K / V", "meta", "latent K/V",
                   "exact: sinks + window", "nominal", fmt::format("@{}", o.tokens), "long run"}});
  if (long_column) rows.back().cells.push_back(fmt::format("@{}", o.long_tokens));
  kvq::for_each_policy([&](auto tag) {
    using P = typename decltype(tag)::type;
    using K = typename P::KeyStream;
    using V = typename P::ValueStream;
    const std::string k_groups = stream_grouping<K>(stream_head_width<P>(o.head_dim, true));
    const std::string v_groups = stream_grouping<V>(stream_head_width<P>(o.head_dim, false));
    Row r{{P::name(), stream_bits_label<K>() + "/" + stream_bits_label<V>(),
           k_groups == "exact" && v_groups == "exact" ? "-" : k_groups + " / " + v_groups,
           meta_text<P>(), latent_text<P>(), exact_tokens_text<P>(),
           fmt::format("{:.3f}", kvq::nominal_bits_per_element<P>(o.head_dim))}};
    const Measured m = measure<P>(o, feed);
    r.cells.push_back(fmt::format("{:.3f}", m.at_tokens));
    r.cells.push_back(fmt::format("{:.3f}", m.long_run));
    if (long_column) r.cells.push_back(fmt::format("{:.3f}", m.at_long));
    rows.push_back(std::move(r));
  });

  std::vector<std::size_t> width(rows.front().cells.size(), 0);
  for (const Row& r : rows) {
    for (std::size_t c = 0; c < r.cells.size(); ++c)
      width[c] = std::max(width[c], r.cells[c].size());
  }
  fmt::print(
      "kvq policies: {} registered; measured on one layer of {} kv heads x head_dim {}, "
      "random N(0,1) K/V, one sequence\n\n",
      rows.size() - 1, o.kv_heads, o.head_dim);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    std::string line;
    for (std::size_t c = 0; c < rows[i].cells.size(); ++c) {
      const bool numeric = c == 1 || c >= 6;  // bits and bits/element: right-aligned
      line += numeric ? fmt::format("{:>{}}", rows[i].cells[c], width[c])
                      : fmt::format("{:<{}}", rows[i].cells[c], width[c]);
      if (c + 1 < rows[i].cells.size()) line += "  ";
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    fmt::print("{}\n", line);
  }
  fmt::print(
      "\nexact:   \"5 + 128\": 5 sinks and a window of 128 tokens that leave one at a time; "
      "\"<128 (by 128)\": the last\n"
      "         (length mod 128) tokens, which leave in chunks of 128.\n"
      "nominal: mean over K and V of fraction * (code bits + 2 * metadata bits / group), "
      "code bits as labelled\n"
      "         (1.5 for ternary), fraction = latent rank / head_dim (CSKV) or 1; no sinks, "
      "windows or padding.\n"
      "@N:      measured bits/element = allocated bytes * 8 / (2 * N * kv_heads * head_dim) after "
      "appending N tokens\n"
      "         (blocks incl. padding, sinks and window storage; ternary codes pack 5 per byte "
      "= 1.6 bits).\n"
      "long run: measured bits/element of the next ~1024 tokens appended after that (bytes added * "
      "8 "
      "/ their elements):\n"
      "         the value @N approaches as sequences grow (sinks and windows are a fixed cost).\n");
  return 0;
}

}  // namespace

Command add_policies(CLI::App& app) {
  auto o = std::make_shared<PoliciesOptions>();
  CLI::App* sub = app.add_subcommand(
      "policies",
      "List the compiled-in cache policies with their nominal and measured bits per element");
  sub->footer(
      "nominal bits/element = mean over keys and values of\n"
      "    fraction * (code_bits + 2 * meta_bits / group_size)\n"
      "  code_bits as labelled (1.5 for ternary), one scale and one zero-point of meta_bits (16 "
      "for\n"
      "  fp16/bf16, 8 for fp8) per group, fraction = latent rank / head_dim for CSKV (else 1); "
      "exact\n"
      "  streams count 16 or 32. Sinks, windows and block padding are not counted.\n"
      "measured bits/element = QuantizedKVCache::bits_per_element(): the bytes the cache "
      "allocated\n"
      "  (blocks with padding, sinks, windows) * 8 / (2 * tokens * kv_heads * head_dim), after\n"
      "  appending --tokens (and --long-tokens) random tokens to a one-layer cache.\n"
      "long run = the bytes the cache adds for the next ~1024 tokens * 8 / their elements: the\n"
      "  measured value for a long sequence, where the fixed sinks and windows no longer count.");
  sub->add_option("--kv-heads", o->kv_heads, "kv heads of the measured cache (default 8)");
  sub->add_option("--head-dim", o->head_dim, "head dimension of the measured cache (default 128)");
  sub->add_option("--tokens", o->tokens,
                  "tokens appended for the first measurement (default 4096)");
  sub->add_option("--long-tokens", o->long_tokens,
                  "also measure after this many tokens, e.g. 32768 (slower: CSKV projects every "
                  "token); default 0 = skip");
  sub->add_option("--seed", o->seed, "seed of the random K/V and CSKV factors (default 1)");
  return [o] { return run_policies(*o); };
}

}  // namespace kvq_tool
