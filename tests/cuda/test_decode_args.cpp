// SPDX-License-Identifier: Apache-2.0
// The split and workspace plan of GPU decode attention (kvq/cuda/decode_args.hpp), host
// arithmetic only: decode_splits never starts a second wave of the splits' thread blocks, keeps
// its bounds, and gives the counts measured best on the H200 (bench/gpu/NOTES.md); the split
// pieces with work cover every block once and PieceWork numbers them (and the window pieces) 0 ..
// count - 1, the kernels' states and arrivals; the workspace layout's parts are aligned, disjoint
// and inside its bytes.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kvq/cuda/decode_args.hpp"
#include "kvq_catch.hpp"

namespace {

using kvq::cuda::blocks_per_split;
using kvq::cuda::decode_splits;
using kvq::cuda::decode_workspace_layout;
using kvq::cuda::PieceWork;
using kvq::cuda::splits_with_work;

TEST_CASE("decode_splits fills one wave and keeps its bounds", "[cuda][plan]") {
  for (std::int32_t sms : {1, 14, 108, 132}) {
    for (std::int32_t ctas : {1, 2, 3, 4}) {
      for (std::int32_t window : {0, 6}) {
        for (std::int32_t batch : {1, 3, 8, 64}) {
          for (std::int32_t heads : {1, 3, 8, 32}) {
            for (std::int32_t blocks : {1, 4, 31, 256, 1024, 8192}) {
              CAPTURE(sms, ctas, window, batch, heads, blocks);
              const std::int32_t s = decode_splits(batch, heads, blocks, sms, ctas, 64, window);
              REQUIRE(s >= 1);
              REQUIRE(s <= 64);
              REQUIRE(s <= std::max(1, (blocks + 3) / 4));  // a block per warp, rounded up
              const std::int64_t items = static_cast<std::int64_t>(batch) * heads;
              const std::int64_t slots = static_cast<std::int64_t>(sms) * ctas;
              if (items <= slots) {
                // The splits' thread blocks fit one wave; with the window pieces too when they fit
                // beside them (more than twice their number per item in a wave).
                REQUIRE(items * s <= slots);
                if (slots / items > 2 * window) REQUIRE(items * (s + window) <= slots);
              } else {
                REQUIRE(s == 1);  // more items than a wave: no splitting
              }
            }
          }
        }
      }
    }
  }
}

TEST_CASE("decode_splits gives the counts measured best on the H200", "[cuda][plan]") {
  // KIVI-2 g128 (3 thread blocks per SM, 6 window pieces), 132 SMs; 128-token blocks.
  CHECK(decode_splits(1, 8, 1024, 132, 3, 64, 6) == 43);   // B1 128K: 43 splits 54.5 us, 22 67.1, 64 62.8
  CHECK(decode_splits(8, 8, 256, 132, 3, 64, 6) == 6);     // B8 32K: 6 splits 94.5 us, 3 140.4
  CHECK(decode_splits(1, 32, 512, 132, 3, 64, 6) == 12);   // MHA 64K: 10 91.6 us, 14 95.6
  CHECK(decode_splits(1, 8, 31, 132, 3, 64, 6) == 8);      // B1 4K (31 blocks): 8 splits 11.8 us, 7 13.0, 10 12.0, 6 12.8
  // The fp16 kernel: 2 thread blocks per SM, 16-token blocks, no window pieces.
  CHECK(decode_splits(1, 8, 8192, 132, 2, 64, 0) == 33);   // B1 128K: 33 139.8 us, 48 152.8
}

TEST_CASE("split pieces with work cover every block once", "[cuda][plan]") {
  for (std::int32_t blocks = 0; blocks <= 300; ++blocks) {
    for (std::int32_t splits = 1; splits <= 70; ++splits) {
      CAPTURE(blocks, splits);
      const std::int32_t per = blocks_per_split(blocks, splits);
      const std::int32_t working = splits_with_work(blocks, per);
      REQUIRE(working <= splits);
      std::int32_t next = 0;  // pieces take [s per, min(blocks, (s + 1) per)), the kernels' ranges
      for (std::int32_t s = 0; s < splits; ++s) {
        const std::int32_t first = s * per, last = std::min(blocks, first + per);
        REQUIRE((first < last) == (s < working));  // work exactly in pieces [0, working)
        if (first < last) {
          REQUIRE(first == next);
          next = last;
        }
      }
      REQUIRE(next == blocks);
    }
  }
}

TEST_CASE("PieceWork numbers the pieces with work 0 .. count - 1", "[cuda][plan]") {
  for (std::int32_t pieces = 1; pieces <= 20; ++pieces) {
    for (std::int32_t begin = 0; begin <= pieces; ++begin) {
      for (std::int32_t first = 0; first <= begin; ++first) {
        for (std::int32_t second = 0; begin + second <= pieces; ++second) {
          CAPTURE(pieces, first, begin, second);
          std::vector<int> seen;
          std::int32_t count = -1;
          for (std::int32_t p = 0; p < pieces; ++p) {
            const PieceWork w = PieceWork::of(p, first, begin, second);
            if (count < 0) count = w.count;
            REQUIRE(w.count == count);  // every piece agrees on the arrivals to wait for
            const bool works = p < first || (p >= begin && p < begin + second);
            if (first + second == 0) {
              REQUIRE(w.index == (p == 0 ? 0 : -1));  // nothing to do: piece 0 writes the zeros
            } else {
              REQUIRE((w.index >= 0) == works);
            }
            if (w.index >= 0) seen.push_back(w.index);
          }
          REQUIRE(count == std::max(1, first + second));
          std::sort(seen.begin(), seen.end());
          REQUIRE(static_cast<std::int32_t>(seen.size()) == count);
          for (std::int32_t i = 0; i < count; ++i) REQUIRE(seen[static_cast<std::size_t>(i)] == i);
        }
      }
    }
  }
}

TEST_CASE("decode_workspace_layout parts are aligned, disjoint and inside", "[cuda][plan]") {
  for (std::int32_t batch : {1, 7, 64}) {
    for (std::int32_t pieces : {1, 2, 49, 70}) {
      for (std::int32_t dim : {64, 128}) {
        CAPTURE(batch, pieces, dim);
        const std::int32_t hkv = 3, hq = 9;
        const auto w = decode_workspace_layout(batch, hq, hkv, dim, pieces);
        const std::size_t states = static_cast<std::size_t>(batch) * hq * pieces;
        REQUIRE(w.counters == 0);
        REQUIRE(w.stats % 256 == 0);
        REQUIRE(w.partials % 256 == 0);  // float4 loads of the merge need 16
        REQUIRE(w.stats >= static_cast<std::size_t>(batch) * hkv * sizeof(std::int32_t));
        REQUIRE(w.partials >= w.stats + states * 2 * sizeof(float));
        REQUIRE(w.bytes >= w.partials + states * static_cast<std::size_t>(dim) * sizeof(float));
      }
    }
  }
}

}  // namespace
