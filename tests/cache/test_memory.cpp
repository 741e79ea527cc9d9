// SPDX-License-Identifier: Apache-2.0
// Memory accounting: memory_bytes() is the blocks in use plus the exact storage of live
// sequences (computed here from the policy's documented window sizes); bits per element of
// KIVI-2 g32 r128 from an independent byte count; fork shares full blocks and copies partial
// ones (fork + append reads exactly like a sequence rebuilt from scratch); free returns blocks.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cache_testing.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::Bits;
using kvq::index_t;
using kvq::MetaFormat;
using kvq_test::Expect;

using namespace kvq_test::policies;  // KiviK2, SkvqSmall, ...

/// Exact bytes of one live sequence: per layer and stream, sinks plus the window ring (the
/// method's settled window, plus one row for KIVI's pending decode token), num_kv_heads *
/// head_dim numbers of the exact type.
template <class P>
std::size_t exact_bytes_per_sequence(index_t layers, index_t width) {
  using X = Expect<P>;
  const kvq_test::StreamModel k = X::key_model(), v = X::value_model();
  const index_t rows = k.sink_cap + k.ring_rows() + v.sink_cap + v.ring_rows();
  return static_cast<std::size_t>(layers * rows * width) * sizeof(typename X::exact_type);
}

template <class P>
std::size_t live_sequences(const kvq::QuantizedKVCache<P>& cache) {
  std::size_t n = 0;
  for (int id = 0; id < 64; ++id) n += cache.is_live(id) ? 1 : 0;
  return n;
}

template <class P>
void require_accounting(const kvq::QuantizedKVCache<P>& cache) {
  const kvq::CacheConfig& cfg = cache.config();
  const std::size_t exact = live_sequences(cache) * exact_bytes_per_sequence<P>(cfg.num_layers, cfg.num_kv_heads * cfg.head_dim);
  REQUIRE(cache.memory_bytes() == cache.key_pool().used_bytes() + cache.value_pool().used_bytes() + exact);
  const kvq::MemoryUsage u = cache.memory_usage();
  REQUIRE(u.exact_bytes == exact);
  REQUIRE(u.key_block_bytes == static_cast<std::size_t>(cache.key_pool().used_blocks()) * cache.key_pool().block_bytes());
  REQUIRE(u.total() == cache.memory_bytes());
  REQUIRE(cache.reserved_bytes() == static_cast<std::size_t>(cfg.num_blocks) * (cache.key_pool().block_bytes() + cache.value_pool().block_bytes()));
  // bits_per_element = 8 * memory / (2 * sum of lengths * W).
  double elements = 0;
  for (int id = 0; id < 64; ++id) {
    if (!cache.is_live(id)) continue;
    for (index_t l = 0; l < cfg.num_layers; ++l) elements += 2.0 * static_cast<double>(cache.length(id, l) * cache.width());
  }
  REQUIRE(cache.stored_elements() == elements);
  if (elements > 0) REQUIRE(cache.bits_per_element() == 8.0 * static_cast<double>(cache.memory_bytes()) / elements);
}

/// An append history: (layer, chunk) pairs with their data, replayable onto another sequence.
struct Op {
  index_t layer;
  index_t n;
  std::vector<float> k, v;
};

template <class P>
void apply(kvq::QuantizedKVCache<P>& cache, kvq::SequenceId seq, const Op& op) {
  const kvq::CacheConfig& c = cache.config();
  cache.append(seq, op.layer, kvq_test::rows_view(op.k.data(), op.n, c.num_kv_heads, c.head_dim),
               kvq_test::rows_view(op.v.data(), op.n, c.num_kv_heads, c.head_dim));
}

template <class P>
bool same_contents(const kvq::QuantizedKVCache<P>& cache, kvq::SequenceId a, kvq::SequenceId b) {
  for (index_t l = 0; l < cache.config().num_layers; ++l) {
    if (cache.length(a, l) != cache.length(b, l)) return false;
    const auto ka = cache.key_counts(a, l), kb = cache.key_counts(b, l);
    const auto va = cache.value_counts(a, l), vb = cache.value_counts(b, l);
    if (ka.quantized != kb.quantized || va.quantized != vb.quantized) return false;
    const auto n = static_cast<std::size_t>(cache.length(a, l) * cache.width());
    std::vector<float> x(n), y(n);
    cache.read_keys(a, l, x.data());
    cache.read_keys(b, l, y.data());
    if (n > 0 && std::memcmp(x.data(), y.data(), n * sizeof(float)) != 0) return false;
    cache.read_values(a, l, x.data());
    cache.read_values(b, l, y.data());
    if (n > 0 && std::memcmp(x.data(), y.data(), n * sizeof(float)) != 0) return false;
  }
  return true;
}

/// Blocks with fewer than block_tokens quantized rows, over all layers and both streams.
template <class P>
index_t partial_blocks(const kvq::QuantizedKVCache<P>& cache, kvq::SequenceId seq, bool keys) {
  index_t n = 0;
  for (index_t l = 0; l < cache.config().num_layers; ++l) {
    const index_t q = keys ? cache.key_counts(seq, l).quantized : cache.value_counts(seq, l).quantized;
    n += q % P::block_tokens != 0;
  }
  return n;
}

template <class P>
void fork_free_case(const char* label) {
  const index_t layers = 2, heads = 2, dim = 16;
  for (std::uint64_t trial = 0; trial < 6; ++trial) {
    const std::uint64_t seed = kvq_test::case_seed(label, trial);
    CAPTURE(P::name(), seed);
    kvq::Rng rng(seed);
    auto cache = kvq_test::make_cache<P>(layers, heads, dim, 400);
    std::vector<std::vector<float>> kb, vb;
    for (index_t l = 0; l < layers; ++l) {
      kb.push_back(kvq_test::make_bias(rng, heads * dim));
      vb.push_back(kvq_test::make_bias(rng, heads * dim));
    }
    auto make_op = [&](index_t layer, index_t n) {
      Op op{layer, n, kvq_test::make_rows(rng, n, kb[static_cast<std::size_t>(layer)]),
            kvq_test::make_rows(rng, n, vb[static_cast<std::size_t>(layer)])};
      return op;
    };
    // History of the source: a prefill and some decode steps of random lengths per layer.
    std::vector<Op> history;
    for (index_t l = 0; l < layers; ++l) {
      history.push_back(make_op(l, static_cast<index_t>(rng.below(150))));
      const auto steps = static_cast<index_t>(rng.below(40));
      for (index_t s = 0; s < steps; ++s) history.push_back(make_op(l, 1));
    }
    const auto src = cache.add_sequence();
    for (const Op& op : history) apply(cache, src, op);
    require_accounting(cache);
    const index_t used_k = cache.key_pool().used_blocks(), used_v = cache.value_pool().used_blocks();
    const std::size_t before = cache.memory_bytes();
    const index_t pk = partial_blocks(cache, src, true), pv = partial_blocks(cache, src, false);

    const auto fork = cache.fork(src);
    REQUIRE(fork != src);
    REQUIRE(cache.is_live(fork));
    // Full blocks are shared; only partial blocks are copied.
    REQUIRE(cache.key_pool().used_blocks() == used_k + pk);
    REQUIRE(cache.value_pool().used_blocks() == used_v + pv);
    REQUIRE(cache.memory_bytes() == before + static_cast<std::size_t>(pk) * cache.key_pool().block_bytes() +
                                        static_cast<std::size_t>(pv) * cache.value_pool().block_bytes() +
                                        exact_bytes_per_sequence<P>(layers, heads * dim));
    require_accounting(cache);
    REQUIRE(same_contents(cache, src, fork));

    // Diverge: each gets its own continuation; each must read exactly like a sequence built
    // from scratch with the same appends (so neither wrote into the other's blocks).
    std::vector<Op> tail_src, tail_fork;
    for (int i = 0; i < 30; ++i) {
      const auto l = static_cast<index_t>(rng.below(static_cast<std::uint32_t>(layers)));
      const auto n = static_cast<index_t>(rng.below(5) == 0 ? 1 + rng.below(40) : 1);
      tail_src.push_back(make_op(l, n));
      tail_fork.push_back(make_op(l, n));
    }
    for (std::size_t i = 0; i < tail_src.size(); ++i) {
      apply(cache, src, tail_src[i]);
      apply(cache, fork, tail_fork[i]);
    }
    require_accounting(cache);
    const auto replay_src = cache.add_sequence();
    const auto replay_fork = cache.add_sequence();
    for (const Op& op : history) {
      apply(cache, replay_src, op);
      apply(cache, replay_fork, op);
    }
    for (std::size_t i = 0; i < tail_src.size(); ++i) {
      apply(cache, replay_src, tail_src[i]);
      apply(cache, replay_fork, tail_fork[i]);
    }
    REQUIRE(same_contents(cache, src, replay_src));
    REQUIRE(same_contents(cache, fork, replay_fork));
    require_accounting(cache);

    // Free returns blocks: freeing the replays and the source leaves the fork's blocks only.
    cache.free(replay_src);
    cache.free(replay_fork);
    cache.free(src);
    REQUIRE(!cache.is_live(src));
    require_accounting(cache);
    index_t fork_blocks_k = 0, fork_blocks_v = 0;
    for (index_t l = 0; l < layers; ++l) {
      fork_blocks_k += (cache.key_counts(fork, l).quantized + P::block_tokens - 1) / P::block_tokens;
      fork_blocks_v += (cache.value_counts(fork, l).quantized + P::block_tokens - 1) / P::block_tokens;
    }
    REQUIRE(cache.key_pool().used_blocks() == fork_blocks_k);
    REQUIRE(cache.value_pool().used_blocks() == fork_blocks_v);
    // The fork still reads what it read before its source was freed.
    const auto again = cache.add_sequence();
    REQUIRE(again == src);  // ids are reused
    for (const Op& op : history) apply(cache, again, op);
    for (const Op& op : tail_fork) apply(cache, again, op);
    REQUIRE(same_contents(cache, fork, again));
    cache.free(again);
    cache.free(fork);
    REQUIRE(cache.key_pool().used_blocks() == 0);
    REQUIRE(cache.value_pool().used_blocks() == 0);
    REQUIRE(cache.memory_bytes() == 0);
    REQUIRE(cache.bits_per_element() == 0.0);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("memory_bytes is blocks in use plus exact storage of live sequences, through appends, forks and frees",
                   "[cache][memory]", KiviSmall, SkvqSmall, CskvSmall, PerTokenSmall, Fp16, Fp32, KiviK2, SkvqK2V15,
                   CskvK2V4) {
  const std::uint64_t seed = kvq_test::case_seed("memory interleaved", 0);
  CAPTURE(TestType::name(), seed);
  kvq::Rng rng(seed);
  const index_t layers = 2, heads = 2, dim = 64, w = heads * dim;
  auto cache = kvq_test::make_cache<TestType>(layers, heads, dim, kvq::QuantizedKVCache<TestType>::blocks_for_tokens(layers, 3 * 1500, 3));
  require_accounting(cache);
  REQUIRE(cache.memory_bytes() == 0);
  const auto bias = kvq_test::make_bias(rng, w);
  std::vector<kvq::SequenceId> seqs;
  for (int i = 0; i < 3; ++i) seqs.push_back(cache.add_sequence());
  require_accounting(cache);
  REQUIRE(cache.memory_bytes() == 3 * exact_bytes_per_sequence<TestType>(layers, w));
  for (int step = 0; step < 120; ++step) {
    const auto s = seqs[rng.below(3)];
    const auto l = static_cast<index_t>(rng.below(2));
    const auto n = static_cast<index_t>(rng.below(6) == 0 ? rng.below(100) : 1);
    const auto x = kvq_test::make_rows(rng, n, bias);
    cache.append(s, l, kvq_test::rows_view(x.data(), n, heads, dim), kvq_test::rows_view(x.data(), n, heads, dim));
    require_accounting(cache);
    // Without forks every sequence owns ceil(quantized / T) blocks per layer and stream.
    index_t k = 0, v = 0;
    for (auto id : seqs) {
      if (!cache.is_live(id)) continue;
      for (index_t ll = 0; ll < layers; ++ll) {
        k += (cache.key_counts(id, ll).quantized + TestType::block_tokens - 1) / TestType::block_tokens;
        v += (cache.value_counts(id, ll).quantized + TestType::block_tokens - 1) / TestType::block_tokens;
      }
    }
    REQUIRE(cache.key_pool().used_blocks() == k);
    REQUIRE(cache.value_pool().used_blocks() == v);
    if (step == 60) {
      cache.free(seqs[1]);
      require_accounting(cache);
      seqs[1] = cache.add_sequence();
    }
  }
}

TEST_CASE("bits per element of KIVI-2 g32 r128 is 3.0 bits for quantized tokens plus the window share",
          "[cache][memory][kivi]") {
  // Independent byte count (ALGORITHMS.md §1.2: B + 2 * 16 / G = 3.0 bits at B = 2, G = 32):
  //   key block:   128 tokens x W channels x 2 bits + W x (128 / 32) groups x (fp16 scale + zero)
  //   value block: 128 tokens x W channels x 2 bits + 128 x (W / 32) groups x (fp16 scale + zero)
  // both = 3.0 bits x 128 x W / 8 bytes (no padding: a multiple of 64 bytes for W = 128);
  // exact storage per layer: key ring of R = 128 rows + value ring of R + 1 = 129 rows, fp16.
  const index_t heads = 2, dim = 64, w = heads * dim, r = 128;
  const double block_bytes = 3.0 * 128.0 * static_cast<double>(w) / 8.0;
  const double exact_bytes = static_cast<double>((r + r + 1) * w * 2);
  const std::uint64_t seed = kvq_test::case_seed("kivi bits", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  const auto bias = kvq_test::make_bias(rng, w);
  const std::vector<index_t> lengths = {1, 127, 128, 129, 256, 300, 1000, 4096, 16384};
  const auto longest = kvq_test::make_rows(rng, lengths.back(), bias);
  for (index_t len : lengths) {
    CAPTURE(len);
    auto cache = kvq_test::make_cache<KiviK2>(1, heads, dim, kvq::QuantizedKVCache<KiviK2>::blocks_for_tokens(1, len));
    REQUIRE(cache.key_pool().block_bytes() == static_cast<std::size_t>(block_bytes));
    REQUIRE(cache.value_pool().block_bytes() == static_cast<std::size_t>(block_bytes));
    const auto seq = cache.add_sequence();
    cache.append(seq, 0, longest.data(), longest.data(), len);
    // Prefill (§1.4): keys quantized L - L mod R, values L - R when L > R.
    const index_t qk = len - len % r;
    const index_t qv = len > r ? len - r : 0;
    const double blocks = static_cast<double>((qk + 127) / 128 + (qv + 127) / 128);
    const double elements = 2.0 * static_cast<double>(len * w);
    const double expected = 8.0 * (blocks * block_bytes + exact_bytes) / elements;
    REQUIRE(cache.bits_per_element() == expected);
    // Decomposition: 3.0 bits on quantized-token blocks + window share (+ the unused part of
    // partially filled blocks); tends to 3.0 + window share.
    const double window_share = 8.0 * exact_bytes / elements;
    const double quantized_share = 3.0 * static_cast<double>(qk + qv) / static_cast<double>(2 * len);
    const double padding_share = 3.0 * (blocks * 128.0 - static_cast<double>(qk + qv)) / static_cast<double>(2 * len);
    REQUIRE(std::abs(cache.bits_per_element() - (quantized_share + window_share + padding_share)) < 1e-12);
    if (len >= 4096) {
      // Long sequences: within 3 * R / L of 3.0 + window share (the R exact value tokens).
      REQUIRE(std::abs(cache.bits_per_element() - (3.0 + window_share)) <= 3.0 * static_cast<double>(r) / static_cast<double>(len));
    }
  }
  // The last length: 3.0 + a window share of 8 * 257 * 128 * 2 / (2 * 16384 * 128) ~= 0.125.
  auto cache = kvq_test::make_cache<KiviK2>(1, heads, dim, 300);
  const auto seq = cache.add_sequence();
  cache.append(seq, 0, longest.data(), longest.data(), 16384);
  REQUIRE(cache.bits_per_element() > 3.0);
  REQUIRE(cache.bits_per_element() < 3.0 + 0.126 + 3.0 * 128.0 / 16384.0);
}

TEST_CASE("blocks_for_tokens sizes a pool that holds that many tokens per sequence", "[cache][memory]") {
  const std::uint64_t seed = kvq_test::case_seed("blocks for tokens", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  const index_t layers = 3, heads = 1, dim = 32;
  const auto bias = kvq_test::make_bias(rng, heads * dim);
  for (index_t tokens : {1, 7, 64, 65, 200}) {
    CAPTURE(tokens);
    const index_t blocks = kvq::QuantizedKVCache<PerTokenSmall>::blocks_for_tokens(layers, 2 * tokens, 2);
    auto cache = kvq_test::make_cache<PerTokenSmall>(layers, heads, dim, blocks);
    const auto rows = kvq_test::make_rows(rng, tokens, bias);
    for (int s = 0; s < 2; ++s) {
      const auto seq = cache.add_sequence();
      for (index_t l = 0; l < layers; ++l) cache.append(seq, l, rows.data(), rows.data(), tokens);
    }
    require_accounting(cache);
    REQUIRE(cache.key_pool().free_blocks() >= 0);
  }
}

TEST_CASE("fork shares full blocks, copies partial ones, and diverges cleanly; free returns blocks",
          "[cache][memory][fork]") {
  fork_free_case<KiviSmall>("fork kivi");
  fork_free_case<SkvqSmall>("fork skvq");
  fork_free_case<CskvSmall>("fork cskv");
  fork_free_case<PerTokenSmall>("fork pertoken");
  fork_free_case<Fp16>("fork fp16");
}
