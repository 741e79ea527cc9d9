// SPDX-License-Identifier: Apache-2.0
// QuantizedKVCache::paged: the PagedKVParams of a layer address exactly the rows that
// key_view / value_view address (sinks, blocks, window ring) for every live slot, after
// prefills, decode steps across flushes, a fork and a free; free slots read as empty; the layout
// fields are the cache's.
#include <cstdint>
#include <cstring>
#include <vector>

#include "cache_testing.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using kvq::index_t;
using namespace kvq_test::policies;

void require_same_block_layout(const kvq::BlockLayout& a, const kvq::BlockLayout& b) {
  REQUIRE(a.bits == b.bits);
  REQUIRE(a.meta == b.meta);
  REQUIRE(a.axis == b.axis);
  REQUIRE(a.block_tokens == b.block_tokens);
  REQUIRE(a.width == b.width);
  REQUIRE(a.lines == b.lines);
  REQUIRE(a.line_length == b.line_length);
  REQUIRE(a.groups_per_line == b.groups_per_line);
  REQUIRE(a.group_size == b.group_size);
  REQUIRE(a.line_bytes == b.line_bytes);
  REQUIRE(a.meta_line_stride == b.meta_line_stride);
  REQUIRE(a.meta_group_stride == b.meta_group_stride);
  REQUIRE(a.scales_offset == b.scales_offset);
  REQUIRE(a.zeros_offset == b.zeros_offset);
  REQUIRE(a.block_bytes == b.block_bytes);
}

template <class E>
void require_stream_matches(const kvq::PagedKVParams& p, const kvq::PagedStream& s, const kvq::StreamView<E>& view,
                            const kvq::StreamLayout& layout, const kvq::BlockPool& pool, std::int32_t slot) {
  REQUIRE(s.pool == pool.data());
  REQUIRE(s.block_bytes == layout.block_bytes);
  REQUIRE(s.quantized == layout.quantized);
  REQUIRE(s.block_tokens == layout.block_tokens);
  REQUIRE(s.width == layout.width);
  if (layout.quantized) require_same_block_layout(s.block, layout.block);
  REQUIRE(s.sinks == view.rule.sinks);
  REQUIRE(s.ring_capacity == view.ring_capacity);
  REQUIRE(p.lengths[slot] == view.length());
  REQUIRE(s.quantized_tokens[slot] == view.counts.quantized);
  const std::size_t row_bytes = p.exact_row_bytes();
  REQUIRE(row_bytes == static_cast<std::size_t>(view.exact_width) * sizeof(E));
  for (index_t q = 0; q < view.length(); ++q) {
    CAPTURE(q);
    const auto pos = static_cast<std::int32_t>(q);
    switch (view.segment(q)) {
      case kvq::Segment::kQuantized: {
        const index_t i = q - view.sink_count();
        REQUIRE(s.block_of(slot, static_cast<std::int32_t>(i)) ==
                pool.data(view.blocks[static_cast<std::size_t>(i / layout.block_tokens)]));
        break;
      }
      case kvq::Segment::kSink:
        REQUIRE(s.exact_row(slot, pos, row_bytes) == reinterpret_cast<const std::uint8_t*>(view.sinks + q * view.exact_width));
        REQUIRE(s.exact_row(slot, pos, row_bytes) == reinterpret_cast<const std::uint8_t*>(view.exact_rows(q)));
        break;
      case kvq::Segment::kWindow:
        REQUIRE(s.exact_row(slot, pos, row_bytes) == reinterpret_cast<const std::uint8_t*>(view.exact_rows(q)));
        break;
    }
  }
}

template <class P>
void require_paged_matches(const kvq::QuantizedKVCache<P>& cache) {
  using E = typename kvq::QuantizedKVCache<P>::exact_type;
  const kvq::CacheConfig& cfg = cache.config();
  for (index_t l = 0; l < cfg.num_layers; ++l) {
    CAPTURE(l);
    const kvq::HostPagedTables tables = cache.paged(l);
    const kvq::HostPagedTables copy = tables;  // params() of a copy points into the copy
    for (const kvq::HostPagedTables* t : {&tables, &copy}) {
      const kvq::PagedKVParams p = t->params();
      REQUIRE(p.keys.block_table == t->key_table.data());
      REQUIRE(p.num_kv_heads == cfg.num_kv_heads);
      REQUIRE(p.head_dim == cfg.head_dim);
      REQUIRE(p.exact_bytes == static_cast<std::int32_t>(sizeof(E)));
      REQUIRE(t->slots == cache.sequences().slots());
      REQUIRE(p.keys.exact_stride == static_cast<std::uint64_t>(cache.sequences().slot_stride()) * sizeof(E));
      for (std::int32_t s = 0; s < t->slots; ++s) {
        CAPTURE(s);
        if (!cache.is_live(s)) {
          REQUIRE(p.lengths[s] == 0);
          REQUIRE(p.keys.quantized_tokens[s] == 0);
          REQUIRE(p.values.quantized_tokens[s] == 0);
          continue;
        }
        const auto key_view = cache.key_view(s, l);
        const auto value_view = cache.value_view(s, l);
        REQUIRE(static_cast<index_t>(t->max_blocks) >= kvq::ceil_div<index_t>(key_view.counts.quantized, P::block_tokens));
        require_stream_matches(p, p.keys, key_view, cache.key_layout(), cache.key_pool(), s);
        require_stream_matches(p, p.values, value_view, cache.value_layout(), cache.value_pool(), s);
        // Past a slot's blocks the tables hold -1.
        const auto row = static_cast<std::size_t>(s) * static_cast<std::size_t>(t->max_blocks);
        for (std::int32_t b = 0; b < t->max_blocks; ++b) {
          const bool used = b < kvq::ceil_div<index_t>(key_view.counts.quantized, P::block_tokens);
          REQUIRE((t->key_table[row + static_cast<std::size_t>(b)] >= 0) == used);
        }
      }
    }
  }
}

template <class P>
void append_random(kvq::QuantizedKVCache<P>& cache, kvq::Rng& rng, kvq::SequenceId seq, index_t n) {
  const kvq::CacheConfig& cfg = cache.config();
  const index_t width = cfg.num_kv_heads * cfg.head_dim;
  for (index_t l = 0; l < cfg.num_layers; ++l) {
    const std::vector<float> kb = kvq_test::make_bias(rng, width), vb = kvq_test::make_bias(rng, width);
    const std::vector<float> k = kvq_test::make_rows(rng, n, kb), v = kvq_test::make_rows(rng, n, vb);
    cache.append(seq, l, k.data(), v.data(), n);
  }
}

}  // namespace

TEMPLATE_TEST_CASE("paged() addresses the rows key_view and value_view address", "[cache][paged]", KiviSmall,
                   SkvqSmall, CskvSmall, PerTokenSmall, Fp16) {
  const std::uint64_t seed = kvq_test::case_seed("paged export", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  auto cache = kvq_test::make_cache<TestType>(2, 2, 8, 256);
  require_paged_matches(cache);  // no sequence yet
  const kvq::SequenceId a = cache.add_sequence();
  const kvq::SequenceId b = cache.add_sequence();
  const kvq::SequenceId c = cache.add_sequence();
  append_random(cache, rng, a, 3);
  append_random(cache, rng, b, 29);
  require_paged_matches(cache);  // c is live and empty
  for (int step = 0; step < 23; ++step) {
    append_random(cache, rng, a, 1);
    append_random(cache, rng, c, 1 + step % 3);
    if (step % 5 == 0) require_paged_matches(cache);
  }
  const kvq::SequenceId d = cache.fork(b);
  append_random(cache, rng, d, 7);
  cache.free(a);  // a free slot below live ones
  append_random(cache, rng, b, 1);
  require_paged_matches(cache);
  const kvq::SequenceId e = cache.add_sequence();  // reuses a's slot: zero-filled rows
  REQUIRE(e == a);
  append_random(cache, rng, e, 2);
  require_paged_matches(cache);
  REQUIRE_THROWS_WITH(cache.paged(2), KVQ_CONTAINS("argument 'layer' = 2"));
}

TEST_CASE("exact rows of all slots are one array indexed by slot", "[cache][paged]") {
  auto cache = kvq_test::make_cache<SkvqSmall>(2, 2, 8, 64);
  kvq::Rng rng(kvq_test::case_seed("exact slots", 0));
  const kvq::SequenceId a = cache.add_sequence();
  append_random(cache, rng, a, 2);
  std::vector<float> before(static_cast<std::size_t>(2 * 2 * 8));
  cache.read_keys(a, 1, before.data());
  for (int i = 0; i < 5; ++i) cache.add_sequence();  // grows (and may move) the array
  std::vector<float> after(before.size());
  cache.read_keys(a, 1, after.data());
  REQUIRE(after == before);
  const auto& seqs = cache.sequences();
  REQUIRE(seqs.slots() == 6);
  for (kvq::SequenceId s = 0; s < 6; ++s) {
    REQUIRE(seqs.exact(s, 0, true, false) == seqs.exact_data() + s * seqs.slot_stride());
  }
  // A new slot's rows are zero; a freed and re-added slot's too.
  cache.free(a);
  REQUIRE(cache.add_sequence() == a);
  for (index_t i = 0; i < seqs.slot_stride(); ++i) REQUIRE(seqs.exact_data()[a * seqs.slot_stride() + i].bits() == 0);
  REQUIRE(cache.memory_usage().exact_bytes == 6 * static_cast<std::size_t>(seqs.slot_stride()) * sizeof(kvq::Float16));
}
