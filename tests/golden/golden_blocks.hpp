// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Golden test vectors of the block layout (tests/golden/README.md): fixed inputs, the
///        record of what a cache holds after them (counts, the first key and value block, every
///        block and the exact rows), read from a PagedKVParams of host memory, and the text
///        format of the checked-in file blocks.golden. Shared by the CPU test
///        (tests/cache/test_golden_blocks.cpp), the GPU test (tests/cuda/test_golden_blocks.cu)
///        and the writer (tests/golden/write_golden.cpp). Host-only C++17; SHA-256 from Nettle
///        (the runtime's dependency already), checked against FIPS 180-4's test vectors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nettle/sha2.h>

#include "kvq/core/bits.hpp"
#include "kvq/layout/paged_params.hpp"

namespace kvq_golden {

using kvq::index_t;

// ---- the fixed inputs ----------------------------------------------------------------------

/// A 32-bit integer mix (lowbias32): the same on every compiler and device.
inline std::uint32_t mix(std::uint32_t x) noexcept {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

/// Channel c (of the whole row, num_kv_heads * head_dim) of token t of the keys (stream 0) or
/// values (stream 1): a per-channel bias plus noise, every 23rd channel an outlier (x3), as
/// multiples of 1/128 in [-8, 8]: exact in fp16 (bf16 rounds them, deterministically). Integer
/// arithmetic only, so the inputs are the same wherever they are computed.
inline float input(int stream, index_t t, index_t c) noexcept {
  const auto h = mix(static_cast<std::uint32_t>(stream) * 0x9E3779B9U ^ mix(static_cast<std::uint32_t>(t) * 0x85EBCA6BU ^
                                                                             static_cast<std::uint32_t>(c) * 0xC2B2AE35U));
  const int noise = static_cast<int>(h % 513U) - 256;                                      // [-256, 256]
  const int bias = (static_cast<int>((c * 37 + stream * 11) % 17) - 8) * 32;               // [-256, 256]
  const int scale = c % 23 == 5 ? 3 : 1;
  return static_cast<float>(bias + noise * scale) / 128.0f;  // |.| <= 1024 / 128
}

/// One case: a policy (by name), a one-layer cache of num_kv_heads x head_dim, one sequence fed
/// a prefill chunk of `prefill` tokens and then `decode` decode steps of one token.
struct Case {
  std::string name;  ///< the policy's name()
  index_t num_kv_heads;
  index_t head_dim;
  index_t prefill;
  index_t decode;
};

/// Blocks and exact rows up to this many bytes are written in full; larger ones by digest.
inline constexpr std::size_t kFullHexBytes = 4096;

// ---- SHA-256 (Nettle's, FIPS 180-4) ---------------------------------------------------------

class Sha256 {
 public:
  Sha256() noexcept { reset(); }
  void reset() noexcept { sha256_init(&ctx_); }
  void update(const std::uint8_t* data, std::size_t n) noexcept { sha256_update(&ctx_, n, data); }
  /// The digest as 64 lowercase hex digits (the object is reset).
  std::string hex() {
    std::uint8_t digest[SHA256_DIGEST_SIZE];
    sha256_digest(&ctx_, SHA256_DIGEST_SIZE, digest);  // also re-initialises the context
    std::string out;
    char digit[3];
    for (const std::uint8_t byte : digest) {
      std::snprintf(digit, sizeof digit, "%02x", static_cast<unsigned>(byte));
      out += digit;
    }
    return out;
  }
  static std::string of(const std::uint8_t* data, std::size_t n) {
    Sha256 s;
    s.update(data, n);
    return s.hex();
  }

 private:
  sha256_ctx ctx_;
};

// ---- the record of one stream and one case -------------------------------------------------

/// What one stream of the case's sequence holds. `first_block` and `exact` are kept in full
/// when at most kFullHexBytes long (else empty, and only their digests count).
struct StreamRecord {
  std::int64_t quantized = 0;
  std::int64_t blocks = 0;        ///< blocks in use: ceil(quantized / block_tokens)
  std::int64_t block_bytes = 0;   ///< bytes of one block (padding included)
  std::string first_block_sha256;  ///< block 0 (empty when no row is quantized)
  std::vector<std::uint8_t> first_block;
  std::string blocks_sha256;       ///< every block in use, in table order
  std::int64_t exact_rows = 0;     ///< sinks and window rows held
  std::string exact_sha256;        ///< those rows' bytes in position order
  std::vector<std::uint8_t> exact;
  // Not in the file: where a block's regions are, for messages.
  bool stored_quantized = false;
  kvq::BlockLayout block{};
};

struct Record {
  std::string name;  ///< the case (policy) name
  std::string shape;  ///< "num_kv_heads x head_dim, prefill P, decode D"
  std::int64_t length = 0;
  StreamRecord keys;
  StreamRecord values;
};

inline std::string shape_of(const Case& c) {
  std::ostringstream os;
  os << c.num_kv_heads << "x" << c.head_dim << " prefill " << c.prefill << " decode " << c.decode;
  return os.str();
}

/// The record of one stream of `slot` of a PagedKVParams in host memory (a host export, or a
/// device cache's arrays copied back and rebased): blocks through block_of, exact rows through
/// exact_row, in position order.
inline StreamRecord stream_record(const kvq::PagedKVParams& kv, const kvq::PagedStream& s, std::int32_t slot) {
  StreamRecord r;
  const std::int32_t length = kv.lengths[slot];
  const std::int32_t q = s.quantized_tokens[slot];
  r.quantized = q;
  r.blocks = (q + s.block_tokens - 1) / s.block_tokens;
  r.block_bytes = static_cast<std::int64_t>(s.block_bytes);
  r.stored_quantized = s.quantized;
  r.block = s.block;
  Sha256 all;
  for (std::int32_t b = 0; b < r.blocks; ++b) {
    const std::uint8_t* block = s.block_of(slot, b * s.block_tokens);
    all.update(block, s.block_bytes);
    if (b == 0) {
      r.first_block_sha256 = Sha256::of(block, s.block_bytes);
      if (s.block_bytes <= kFullHexBytes) r.first_block.assign(block, block + s.block_bytes);
    }
  }
  r.blocks_sha256 = all.hex();
  const std::size_t row_bytes = kv.exact_row_bytes();
  const std::int32_t sinks = length < s.sinks ? length : s.sinks;
  std::vector<std::uint8_t> rows;
  for (std::int32_t p = 0; p < length; ++p) {
    if (p >= sinks && p < sinks + q) continue;  // quantized
    const std::uint8_t* row = s.exact_row(slot, p, row_bytes);
    rows.insert(rows.end(), row, row + row_bytes);
    ++r.exact_rows;
  }
  r.exact_sha256 = Sha256::of(rows.data(), rows.size());
  if (rows.size() <= kFullHexBytes) r.exact = rows;
  return r;
}

inline Record record_of(const Case& c, const kvq::PagedKVParams& kv, std::int32_t slot) {
  Record r;
  r.name = c.name;
  r.shape = shape_of(c);
  r.length = kv.lengths[slot];
  r.keys = stream_record(kv, kv.keys, slot);
  r.values = stream_record(kv, kv.values, slot);
  return r;
}

// ---- the file ------------------------------------------------------------------------------

inline void write_hex(std::ostream& os, const std::vector<std::uint8_t>& bytes) {
  static const char* digits = "0123456789abcdef";
  for (std::size_t i = 0; i < bytes.size(); i += 64) {
    os << " ";
    for (std::size_t j = i; j < bytes.size() && j < i + 64; ++j) os << digits[bytes[j] >> 4] << digits[bytes[j] & 15];
    os << "\n";
  }
}

inline void write_stream(std::ostream& os, const char* name, const StreamRecord& s) {
  os << name << ".quantized " << s.quantized << "\n";
  os << name << ".blocks " << s.blocks << "\n";
  os << name << ".block_bytes " << s.block_bytes << "\n";
  if (s.blocks > 0) {
    os << name << ".block0.sha256 " << s.first_block_sha256 << "\n";
    if (!s.first_block.empty()) {
      os << name << ".block0.hex " << s.first_block.size() << "\n";
      write_hex(os, s.first_block);
    }
    os << name << ".all_blocks.sha256 " << s.blocks_sha256 << "\n";
  }
  os << name << ".exact_rows " << s.exact_rows << "\n";
  os << name << ".exact.sha256 " << s.exact_sha256 << "\n";
  if (!s.exact.empty()) {
    os << name << ".exact.hex " << s.exact.size() << "\n";
    write_hex(os, s.exact);
  }
}

/// Writes records in the format of blocks.golden (see README.md).
inline void write_records(std::ostream& os, const std::vector<Record>& records) {
  os << "# kvq golden block vectors, format 1 (tests/golden/README.md). Written by kvq_write_golden from the CPU\n"
        "# cache; checked by kvq_test_cache_golden (CPU) and kvq_test_cuda_golden (GPU). Do not edit by hand.\n";
  for (const Record& r : records) {
    os << "\ncase " << r.name << "\n";
    os << "shape " << r.shape << "\n";
    os << "length " << r.length << "\n";
    write_stream(os, "keys", r.keys);
    write_stream(os, "values", r.values);
    os << "end\n";
  }
}

/// Reads blocks.golden. Throws std::runtime_error with the line number on a malformed file.
inline std::vector<Record> read_records(std::istream& is) {
  std::vector<Record> out;
  std::string line;
  int number = 0;
  Record* r = nullptr;
  auto fail = [&](const std::string& why) {
    throw std::runtime_error("golden file line " + std::to_string(number) + ": " + why + " ('" + line + "')");
  };
  auto read_hex = [&](std::size_t n, std::vector<std::uint8_t>& bytes) {
    bytes.clear();
    while (bytes.size() < n) {
      if (!std::getline(is, line)) fail("the file ends inside hex data");
      ++number;
      if (line.empty() || line[0] != ' ') fail("expected a hex line (starting with a space)");
      for (std::size_t i = 1; i + 1 < line.size(); i += 2) {
        const auto nibble = [&](char ch) -> int {
          if (ch >= '0' && ch <= '9') return ch - '0';
          if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
          fail("not a lowercase hex digit");
          return 0;
        };
        bytes.push_back(static_cast<std::uint8_t>(nibble(line[i]) << 4 | nibble(line[i + 1])));
      }
    }
    if (bytes.size() != n) fail("hex data longer than announced");
  };
  while (std::getline(is, line)) {
    ++number;
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ls(line);
    std::string key;
    ls >> key;
    if (key == "case") {
      out.emplace_back();
      r = &out.back();
      ls >> r->name;
      continue;
    }
    if (r == nullptr) fail("a field outside a case");
    if (key == "end") {
      r = nullptr;
      continue;
    }
    if (key == "shape") {
      std::getline(ls >> std::ws, r->shape);
      continue;
    }
    if (key == "length") {
      ls >> r->length;
      continue;
    }
    const std::size_t dot = key.find('.');
    if (dot == std::string::npos) fail("unknown field");
    const std::string stream = key.substr(0, dot), field = key.substr(dot + 1);
    if (stream != "keys" && stream != "values") fail("unknown stream");
    StreamRecord& s = stream == "keys" ? r->keys : r->values;
    if (field == "quantized") {
      ls >> s.quantized;
    } else if (field == "blocks") {
      ls >> s.blocks;
    } else if (field == "block_bytes") {
      ls >> s.block_bytes;
    } else if (field == "block0.sha256") {
      ls >> s.first_block_sha256;
    } else if (field == "block0.hex") {
      std::size_t n = 0;
      ls >> n;
      read_hex(n, s.first_block);
    } else if (field == "all_blocks.sha256") {
      ls >> s.blocks_sha256;
    } else if (field == "exact_rows") {
      ls >> s.exact_rows;
    } else if (field == "exact.sha256") {
      ls >> s.exact_sha256;
    } else if (field == "exact.hex") {
      std::size_t n = 0;
      ls >> n;
      read_hex(n, s.exact);
    } else {
      fail("unknown field");
    }
    if (ls.fail()) fail("a malformed value");
  }
  if (r != nullptr) fail("the last case has no 'end'");
  return out;
}

inline std::vector<Record> read_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open the golden file " + path);
  return read_records(in);
}

/// The checked-in record of a case, or nullptr.
inline const Record* find(const std::vector<Record>& records, const std::string& name) {
  for (const Record& r : records) {
    if (r.name == name) return &r;
  }
  return nullptr;
}

/// Where byte i of a block of `got`'s stream is: "codes", "scales", "zeros", "padding" or "rows".
inline const char* block_region(const StreamRecord& s, std::size_t i) {
  if (!s.stored_quantized) return "rows";
  return i < s.block.scales_offset ? "codes" : i < s.block.zeros_offset ? "scales" : i < s.block.used_bytes() ? "zeros" : "padding";
}

inline std::string compare_stream(const char* name, const StreamRecord& got, const StreamRecord& want) {
  std::ostringstream os;
  os << name << ": ";
  if (got.quantized != want.quantized || got.blocks != want.blocks || got.block_bytes != want.block_bytes) {
    os << got.quantized << " quantized rows in " << got.blocks << " blocks of " << got.block_bytes << " bytes, golden "
       << want.quantized << " in " << want.blocks << " of " << want.block_bytes;
    return os.str();
  }
  if (!want.first_block.empty() && got.first_block != want.first_block) {
    std::size_t i = 0;
    while (i < got.first_block.size() && got.first_block[i] == want.first_block[i]) ++i;
    os << "block 0 byte " << i << " (" << block_region(got, i) << ") is " << int{got.first_block[i]} << ", golden "
       << int{want.first_block[i]};
    return os.str();
  }
  if (got.first_block_sha256 != want.first_block_sha256) return os.str() + "block 0 differs (sha256 " + got.first_block_sha256 + ")";
  if (got.blocks_sha256 != want.blocks_sha256) return os.str() + "a block after block 0 differs (sha256 of all " + got.blocks_sha256 + ")";
  if (got.exact_rows != want.exact_rows) {
    os << got.exact_rows << " exact rows, golden " << want.exact_rows;
    return os.str();
  }
  if (!want.exact.empty() && got.exact != want.exact) {
    std::size_t i = 0;
    while (i < got.exact.size() && got.exact[i] == want.exact[i]) ++i;
    os << "exact rows differ at byte " << i;
    return os.str();
  }
  if (got.exact_sha256 != want.exact_sha256) return os.str() + "exact rows differ (sha256 " + got.exact_sha256 + ")";
  return "";
}

/// "" when `got` equals the golden record `want`; else the first difference.
inline std::string compare(const Record& got, const Record& want) {
  if (got.shape != want.shape) return "shape '" + got.shape + "', golden '" + want.shape + "'";
  if (got.length != want.length) return "length " + std::to_string(got.length) + ", golden " + std::to_string(want.length);
  std::string d = compare_stream("keys", got.keys, want.keys);
  if (d.empty()) d = compare_stream("values", got.values, want.values);
  return d;
}

}  // namespace kvq_golden
