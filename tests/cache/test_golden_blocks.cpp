// SPDX-License-Identifier: Apache-2.0
// Golden block vectors on the CPU (tests/golden/README.md): the fixed inputs of every case run
// through QuantizedKVCache must give exactly the counts, block bytes (block 0 in full where it is
// at most 4 KiB, every block by SHA-256) and exact rows checked into tests/golden/blocks.golden.
// tests/cuda/test_golden_blocks.cu checks the device cache against the same file.
#include <cmath>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "golden_cases.hpp"
#include "kvq_catch.hpp"

namespace {

using kvq_golden::Record;

const std::vector<Record>& golden() {
  static const std::vector<Record> records = kvq_golden::read_file(KVQ_GOLDEN_FILE);
  return records;
}

template <class P>
void require_golden() {
  const Record got = kvq_golden::cpu_record<P>();
  CAPTURE(got.name, got.shape, KVQ_GOLDEN_FILE);
  const Record* want = kvq_golden::find(golden(), got.name);
  REQUIRE(want != nullptr);
  const std::string diff = kvq_golden::compare(got, *want);
  INFO(diff);
  REQUIRE(diff.empty());
  // The case exercises what it should: quantized (or stored) rows in blocks.
  REQUIRE(got.keys.blocks >= 1);
  REQUIRE(got.values.blocks >= 1);
}

}  // namespace

TEST_CASE("golden: the SHA-256 wrapper over Nettle prints the FIPS 180-4 test vectors' digests", "[cache][golden]") {
  auto sha = [](const std::string& s) {
    return kvq_golden::Sha256::of(reinterpret_cast<const std::uint8_t*>(s.data()), s.size());
  };
  REQUIRE(sha("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  REQUIRE(sha("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  REQUIRE(sha("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
          "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  kvq_golden::Sha256 million;
  const std::string a(1000, 'a');
  for (int i = 0; i < 1000; ++i) million.update(reinterpret_cast<const std::uint8_t*>(a.data()), a.size());
  REQUIRE(million.hex() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST_CASE("golden: the inputs are multiples of 1/128 in [-8, 8], exact in fp16", "[cache][golden]") {
  for (int stream = 0; stream < 2; ++stream) {
    for (kvq::index_t t = 0; t < 300; t += 7) {
      for (kvq::index_t c = 0; c < 128; ++c) {
        const float x = kvq_golden::input(stream, t, c);
        REQUIRE(std::fabs(x) <= 8.0f);
        REQUIRE(x * 128.0f == std::round(x * 128.0f));
        REQUIRE(kvq::to_float(kvq::Float16(x)) == x);
      }
    }
  }
  REQUIRE(kvq_golden::input(0, 0, 0) != kvq_golden::input(1, 0, 0));
}

TEST_CASE("golden: the checked-in file holds every case and reads back as it was written", "[cache][golden]") {
  const std::vector<Record>& records = golden();
  for (const char* name : {"fp16", "bf16", "kivi-k2v2-g32-r128", "kivi-k4v4-g128-r128", "skvq-k2v1.5-g32-w128-s5",
                           "cskv-k4v4-r50-50-w32"}) {
    CAPTURE(name);
    REQUIRE(kvq_golden::find(records, name) != nullptr);
  }
  std::ifstream in(KVQ_GOLDEN_FILE);
  std::stringstream text;
  text << in.rdbuf();
  std::ostringstream again;
  kvq_golden::write_records(again, records);
  REQUIRE(again.str() == text.str());
}

TEST_CASE("golden: fp16 and bf16 exact blocks equal the checked-in bytes", "[cache][golden]") {
  require_golden<kvq_golden::Fp16>();
  require_golden<kvq_golden::Bf16>();
}

TEST_CASE("golden: KIVI 2-bit g32 and 4-bit g128 (r128) blocks equal the checked-in bytes", "[cache][golden]") {
  require_golden<kvq_golden::Kivi2g32>();
  require_golden<kvq_golden::Kivi4g128>();
}

TEST_CASE("golden: SKVQ (calibrated channel groups, fp8 metadata, ternary values) blocks equal the checked-in bytes",
          "[cache][golden]") {
  require_golden<kvq_golden::Skvq>();
}

TEST_CASE("golden: CSKV (latent rows) blocks equal the checked-in bytes", "[cache][golden]") {
  require_golden<kvq_golden::Cskv>();
}

TEST_CASE("golden: a changed byte is reported with its block region", "[cache][golden]") {
  const Record want = kvq_golden::cpu_record<kvq_golden::Kivi2g32>();
  REQUIRE(!want.keys.first_block.empty());
  Record got = want;
  got.keys.first_block[static_cast<std::size_t>(want.keys.block.scales_offset) + 3] ^= 1;
  REQUIRE(kvq_golden::compare(got, want) ==
          "keys: block 0 byte " + std::to_string(want.keys.block.scales_offset + 3) + " (scales) is " +
              std::to_string(int{got.keys.first_block[static_cast<std::size_t>(want.keys.block.scales_offset) + 3]}) +
              ", golden " + std::to_string(int{want.keys.first_block[static_cast<std::size_t>(want.keys.block.scales_offset) + 3]}));
  got = want;
  got.values.exact_sha256[0] = got.values.exact_sha256[0] == '0' ? '1' : '0';
  REQUIRE(kvq_golden::compare(got, want).find("values: exact rows differ") == 0);
  got = want;
  got.values.blocks_sha256[5] = got.values.blocks_sha256[5] == '0' ? '1' : '0';
  REQUIRE(kvq_golden::compare(got, want).find("values: a block after block 0 differs") == 0);
}
