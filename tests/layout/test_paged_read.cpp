// SPDX-License-Identifier: Apache-2.0
// kvq::paged_key / paged_value (layout/paged_read.hpp), the element reader of the GPU reference
// decode kernel, on a host cache's PagedKVParams (QuantizedKVCache::paged): every number of every
// live sequence equals what the cache reads back (read_keys / read_values), bit for bit, for
// exact, KIVI and per-token policies, ragged sequences across flush boundaries, in every layer.
#include <cstdint>
#include <cstring>
#include <vector>

#include "kvq/kvq.hpp"
#include "kvq/layout/paged_read.hpp"
#include "cache_testing.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::index_t;

template <class P>
void check_reader(std::uint64_t seed, index_t heads, index_t dim, const std::vector<index_t>& lengths) {
  static_assert(kvq::is_paged_readable_v<P>);
  kvq::Rng rng(seed);
  constexpr index_t layers = 2;
  index_t total = 0;
  for (index_t n : lengths) total += n;
  auto cache = kvq_test::make_cache<P>(layers, heads, dim,
                                       kvq::QuantizedKVCache<P>::blocks_for_tokens(layers, total, static_cast<index_t>(lengths.size())) + 4);
  const index_t width = heads * dim;
  const std::vector<float> kb = kvq_test::make_bias(rng, width), vb = kvq_test::make_bias(rng, width);
  std::vector<kvq::SequenceId> seqs;
  for (index_t n : lengths) {
    const kvq::SequenceId s = cache.add_sequence();
    seqs.push_back(s);
    // a prefill chunk, then one-token steps (flushes of the windows in between)
    const index_t prefill = std::max<index_t>(1, n - 41);
    for (index_t done = 0; done < n;) {
      const index_t step = done == 0 ? prefill : 1;
      for (index_t l = 0; l < layers; ++l) {
        const std::vector<float> k = kvq_test::make_rows(rng, step, kb), v = kvq_test::make_rows(rng, step, vb);
        cache.append(s, l, k.data(), v.data(), step);
      }
      done += step;
    }
  }
  for (index_t l = 0; l < layers; ++l) {
    const kvq::HostPagedTables tables = cache.paged(l);
    const kvq::PagedKVParams kv = tables.params();
    for (const kvq::SequenceId s : seqs) {
      const index_t n = cache.key_counts(s, l).length;
      REQUIRE(kv.lengths[s] == n);
      std::vector<float> keys(static_cast<std::size_t>(n * width)), values(keys.size());
      cache.read_keys(s, l, keys.data());
      cache.read_values(s, l, values.data());
      std::size_t key_diffs = 0, value_diffs = 0;
      for (index_t p = 0; p < n; ++p) {
        for (index_t c = 0; c < width; ++c) {
          const std::size_t i = static_cast<std::size_t>(p * width + c);
          const float k = kvq::paged_key<P>(kv, static_cast<std::int32_t>(s), static_cast<std::int32_t>(p), static_cast<std::int32_t>(c));
          const float v = kvq::paged_value<P>(kv, static_cast<std::int32_t>(s), static_cast<std::int32_t>(p), static_cast<std::int32_t>(c));
          key_diffs += std::memcmp(&k, &keys[i], sizeof(float)) != 0 ? 1 : 0;
          value_diffs += std::memcmp(&v, &values[i], sizeof(float)) != 0 ? 1 : 0;
        }
      }
      CAPTURE(P::name(), heads, dim, l, s, n);
      CHECK(key_diffs == 0);
      CHECK(value_diffs == 0);
    }
  }
}

}  // namespace

TEST_CASE("paged_key / paged_value read every number of a host cache's PagedKVParams as the cache does",
          "[layout][paged]") {
  const std::uint64_t seed = kvq_test::case_seed("paged_read", 0);
  const std::vector<index_t> ragged = {1, 17, 130, 300};
  const std::vector<index_t> flushes = {127, 128, 129, 255, 256, 257};
  check_reader<kvq::Fp16Policy<kvq::Float16>>(seed, 2, 64, ragged);
  check_reader<kvq::Fp16Policy<kvq::BFloat16>>(seed + 1, 3, 8, ragged);
  check_reader<kvq::Fp16Policy<float>>(seed + 2, 4, 8, flushes);
  check_reader<kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 128>>(seed + 3, 4, 8, flushes);  // stories260K's rows
  check_reader<kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 128>>(seed + 4, 3, 64, ragged);  // SmolLM2's rows
  check_reader<kvq::KiviPolicy<kvq::Bits::k4, kvq::Bits::k4, 64, 128>>(seed + 5, 3, 64, flushes);
  check_reader<kvq::KiviPolicy<kvq::Bits::k4, kvq::Bits::k2, 128, 128>>(seed + 6, 2, 128, flushes);
  check_reader<kvq::KiviPolicy<kvq::Bits::k3, kvq::Bits::k8, 32, 128>>(seed + 7, 2, 32, ragged);
  check_reader<kvq::PerTokenPolicy<kvq::Bits::k2, kvq::Bits::k4, 32>>(seed + 8, 2, 64, ragged);
}
