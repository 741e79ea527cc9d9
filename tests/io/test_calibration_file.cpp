// SPDX-License-Identifier: Apache-2.0
// Calibration files: the byte format exactly as documented in calibration_file.hpp (checked
// against an independent writer of that table), round trips, and strict rejection of every
// truncation, every flipped bit and every specific corruption with a message that says what.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kvq/core/random.hpp"
#include "kvq/io/calibration_file.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

using Bytes = std::vector<std::uint8_t>;
using kvq::CalibrationArray;
using kvq::CalibrationDtype;
using kvq::CalibrationFile;
using kvq::Status;

std::string temp_path(const std::string& name) { return (std::string(KVQ_TEST_TMPDIR) + "/") + name; }

bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

Bytes read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  const std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return Bytes(s.begin(), s.end());
}

void write_all(const std::string& path, const Bytes& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

CalibrationArray int_array(const std::string& name, std::vector<std::int64_t> shape, std::vector<std::int32_t> v) {
  CalibrationArray a;
  a.name = name;
  a.dtype = CalibrationDtype::kInt32;
  a.shape = std::move(shape);
  a.i32 = std::move(v);
  return a;
}

CalibrationArray float_array(const std::string& name, std::vector<std::int64_t> shape, std::vector<float> v) {
  CalibrationArray a;
  a.name = name;
  a.dtype = CalibrationDtype::kFloat32;
  a.shape = std::move(shape);
  a.f32 = std::move(v);
  return a;
}

/// Same content, floats compared bit for bit (-0.0 and denormals must survive).
void require_same(const CalibrationFile& a, const CalibrationFile& b) {
  REQUIRE(a.metadata == b.metadata);
  REQUIRE(a.arrays.size() == b.arrays.size());
  for (std::size_t i = 0; i < a.arrays.size(); ++i) {
    const CalibrationArray& x = a.arrays[i];
    const CalibrationArray& y = b.arrays[i];
    INFO("array " << x.name);
    REQUIRE(x.name == y.name);
    REQUIRE(x.dtype == y.dtype);
    REQUIRE(x.shape == y.shape);
    REQUIRE(x.i32 == y.i32);
    REQUIRE(x.f32.size() == y.f32.size());
    REQUIRE((x.f32.empty() || std::memcmp(x.f32.data(), y.f32.data(), 4 * x.f32.size()) == 0));
  }
}

/// f must throw kvq::Error with `status` whose message contains every fragment.
void require_error(const std::function<void()>& f, Status status, std::initializer_list<std::string> fragments) {
  try {
    f();
  } catch (const kvq::Error& e) {
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(e.status() == status);
    for (const std::string& fragment : fragments) {
      CAPTURE(fragment);
      CHECK(what.find(fragment) != std::string::npos);
    }
    return;
  }
  FAIL("no kvq::Error");
}

/// decode must reject `bytes` with kFormatError naming the source and every fragment.
void require_decode_error(const Bytes& bytes, std::initializer_list<std::string> fragments) {
  std::vector<std::string> all(fragments);
  all.push_back("kvq::decode_calibration_file: file 'crafted.kvqcal'");
  try {
    (void)kvq::decode_calibration_file(bytes.data(), bytes.size(), "crafted.kvqcal");
  } catch (const kvq::Error& e) {
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(e.status() == Status::kFormatError);
    for (const std::string& fragment : all) {
      CAPTURE(fragment);
      CHECK(what.find(fragment) != std::string::npos);
    }
    return;
  }
  FAIL("decode accepted the bytes");
}

// ---- an independent writer of the documented byte table --------------------------------------

struct Raw {
  Bytes b;
  void put(const void* p, std::size_t n) {
    const auto* q = static_cast<const std::uint8_t*>(p);
    b.insert(b.end(), q, q + n);
  }
  void str(const std::string& s) { put(s.data(), s.size()); }
  void u8(std::uint8_t v) { b.push_back(v); }
  void u16(std::uint16_t v) { put(&v, 2); }
  void u32(std::uint32_t v) { put(&v, 4); }
  void u64(std::uint64_t v) { put(&v, 8); }
  void i64(std::int64_t v) { put(&v, 8); }
  void crc_from(std::size_t start) { u32(kvq::crc32(b.data() + start, b.size() - start)); }

  void header(std::uint32_t meta, std::uint32_t arrays, std::uint32_t version = 1) {
    str("KVQCALIB");
    u32(version);
    u32(meta);
    u32(arrays);
    crc_from(0);
  }
  void meta(const std::string& key, const std::string& value) {
    const std::size_t start = b.size();
    u32(static_cast<std::uint32_t>(key.size()));
    u32(static_cast<std::uint32_t>(value.size()));
    str(key);
    str(value);
    crc_from(start);
  }
  struct Array {
    std::string name;
    std::uint8_t dtype = 2;
    std::vector<std::int64_t> shape;
    Bytes payload;
    std::uint64_t payload_len = ~std::uint64_t{0};  // default: payload.size()
    std::uint16_t reserved = 0;
    std::uint8_t pad_byte = 0;
  };
  void array(const Array& a) {
    const std::size_t start = b.size();
    u32(static_cast<std::uint32_t>(a.name.size()));
    u8(a.dtype);
    u8(static_cast<std::uint8_t>(a.shape.size()));
    u16(a.reserved);
    u64(a.payload_len == ~std::uint64_t{0} ? a.payload.size() : a.payload_len);
    u32(kvq::crc32(a.payload.data(), a.payload.size()));
    str(a.name);
    for (std::int64_t e : a.shape) i64(e);
    crc_from(start);
    while (b.size() % 8 != 0) u8(a.pad_byte);
    put(a.payload.data(), a.payload.size());
  }
  Bytes seal() {
    crc_from(0);
    str("CALIBEND");
    return b;
  }
};

template <class T>
Bytes payload_of(const std::vector<T>& v) {
  Bytes out(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(out.data(), v.data(), out.size());
  return out;
}

/// A small file with a metadata entry, an int32 array (padding before it) and a float scalar.
CalibrationFile small_file() {
  CalibrationFile f;
  f.metadata = {{"method", "skvq"}, {"note", ""}};
  f.arrays.push_back(int_array("perm", {3}, {2, 0, 1}));
  f.arrays.push_back(float_array("clip", {}, {0.875f}));
  return f;
}

Bytes small_raw() {
  Raw r;
  r.header(2, 2);
  r.meta("method", "skvq");
  r.meta("note", "");
  r.array({"perm", 1, {3}, payload_of(std::vector<std::int32_t>{2, 0, 1})});
  r.array({"clip", 2, {}, payload_of(std::vector<float>{0.875f})});
  return r.seal();
}

/// Random printable ASCII of 1..max_len bytes (no spaces when `names`).
std::string random_ident(kvq::Rng& rng, std::uint32_t max_len, bool names) {
  std::string s(1 + rng.below(max_len), 'x');
  for (char& c : s) c = static_cast<char>((names ? 0x21 : 0x20) + rng.below(names ? 94 : 95));
  return s;
}

/// A file with several metadata entries and arrays of both dtypes, ranks 0..3, empty arrays,
/// random contents and edge-case floats.
CalibrationFile random_file(std::uint64_t seed) {
  kvq::Rng rng(seed);
  CalibrationFile f;
  f.metadata.emplace_back("kvq.method", "skvq");
  f.metadata.emplace_back("model", "Llama-2-7b \xE2\x80\x94 \xC3\xA9t\xC3\xA9 \xF0\x9F\xA6\x99");  // UTF-8
  f.metadata.emplace_back("empty value", "");
  std::string text;
  for (std::uint32_t i = 0, n = rng.below(300); i < n; ++i) text += static_cast<char>(0x20 + rng.below(95));
  text += '\n';
  text.push_back('\0');  // U+0000 is valid UTF-8
  f.metadata.emplace_back("random.text", text);
  for (int i = 0; i < 3; ++i) f.metadata.emplace_back("r" + std::to_string(i) + "." + random_ident(rng, 20, false), text.substr(0, rng.below(40)));

  auto extent = [&] { return static_cast<std::int64_t>(1 + rng.below(6)); };
  auto ints = [&](std::int64_t n) {
    std::vector<std::int32_t> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = static_cast<std::int32_t>(static_cast<std::uint32_t>(rng.next_u64()));
    return v;
  };
  auto floats = [&](std::int64_t n) {
    std::vector<float> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = 100.0f * rng.normal();
    return v;
  };
  f.arrays.push_back(float_array("scalar", {}, {-0.0f}));
  f.arrays.push_back(int_array("i.scalar", {}, ints(1)));
  const std::int64_t a = extent(), b = extent(), c = extent();
  f.arrays.push_back(int_array("skvq.perm", {a}, ints(a)));
  f.arrays.push_back(float_array("skvq.clip", {a}, floats(a)));
  f.arrays.push_back(float_array("cskv.factor", {a, b}, floats(a * b)));
  f.arrays.push_back(int_array("groups2", {b, c}, ints(b * c)));
  f.arrays.push_back(float_array("rank3", {a, b, c}, floats(a * b * c)));
  f.arrays.push_back(int_array("i.rank3", {c, a, b}, ints(a * b * c)));
  f.arrays.push_back(float_array("empty", {0}, {}));
  f.arrays.push_back(int_array("empty.3d", {a, 0, b}, {}));
  f.arrays.push_back(float_array("edge", {6},
                                 {std::numeric_limits<float>::max(), std::numeric_limits<float>::lowest(),
                                  std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(),
                                  -0.0f, 1.0f}));
  f.arrays.push_back(int_array("i.edge", {2}, {std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max()}));
  f.arrays.push_back(float_array(random_ident(rng, 40, true) + "#", {b}, floats(b)));
  return f;
}

}  // namespace

TEST_CASE("crc32 matches zlib's crc32 on known vectors", "[io][calibration]") {
  const std::string check = "123456789";
  REQUIRE(kvq::crc32(check.data(), check.size()) == 0xCBF43926u);
  REQUIRE(kvq::crc32(nullptr, 0) == 0u);
  REQUIRE(kvq::crc32("", 0) == 0u);
  REQUIRE(kvq::crc32("a", 1) == 0xE8B7BE43u);
  const std::string fox = "The quick brown fox jumps over the lazy dog";
  REQUIRE(kvq::crc32(fox.data(), fox.size()) == 0x414FA339u);
  // Chaining: the CRC of a concatenation from the CRC of its first part.
  REQUIRE(kvq::crc32(check.data() + 4, 5, kvq::crc32(check.data(), 4)) == 0xCBF43926u);
  const std::vector<std::uint8_t> zeros(32, 0), ones(32, 0xFF);
  REQUIRE(kvq::crc32(zeros.data(), zeros.size()) == 0x190A55ADu);
  REQUIRE(kvq::crc32(ones.data(), ones.size()) == 0xFF6CAB0Bu);
}

TEST_CASE("encode writes exactly the byte table of the header comment", "[io][calibration]") {
  const Bytes bytes = kvq::encode_calibration_file(small_file());
  REQUIRE(bytes == small_raw());
  // Header 24, entries 12+6+4 at 24 and 12+4+0 at 46, record 24+4+8 at 62 (6 bytes of padding:
  // payload at 104, 12 bytes), record 24+4+0 at 116 (no padding: payload at 144, 4 bytes),
  // trailer 12 at 148.
  REQUIRE(bytes.size() == 160);
  REQUIRE(std::memcmp(bytes.data(), "KVQCALIB", 8) == 0);
  REQUIRE(std::memcmp(bytes.data() + bytes.size() - 8, "CALIBEND", 8) == 0);
  std::uint32_t file_crc = 0;
  std::memcpy(&file_crc, bytes.data() + bytes.size() - 12, 4);
  REQUIRE(file_crc == kvq::crc32(bytes.data(), bytes.size() - 12));
  // The empty file is 36 bytes.
  const Bytes empty = kvq::encode_calibration_file(CalibrationFile{});
  REQUIRE(empty.size() == 36);
  REQUIRE(kvq::decode_calibration_file(empty.data(), empty.size(), "empty").arrays.empty());
  // Payloads start on multiples of 8 whatever the names' lengths.
  for (std::size_t len = 1; len <= 9; ++len) {
    CalibrationFile f;
    f.metadata = {{std::string(len, 'k'), std::string(len, 'v')}};
    f.arrays.push_back(int_array(std::string(len, 'n'), {2}, {7, 9}));
    const Bytes b = kvq::encode_calibration_file(f);
    const std::size_t record = 24 + 12 + 2 * len;
    const std::size_t payload = (record + 24 + len + 8 + 7) / 8 * 8;
    INFO("name length " << len);
    REQUIRE(b.size() == payload + 8 + 12);
    std::int32_t first = 0;
    std::memcpy(&first, b.data() + payload, 4);
    REQUIRE(first == 7);
  }
}

TEST_CASE("calibration files round-trip through bytes and through a real file", "[io][calibration]") {
  for (std::uint64_t index = 0; index < 4; ++index) {
    const std::uint64_t seed = kvq_test::case_seed("calibration round trip", index);
    INFO("seed " << seed << " (case " << index << ")");
    const CalibrationFile f = random_file(seed);
    const Bytes bytes = kvq::encode_calibration_file(f);
    const CalibrationFile back = kvq::decode_calibration_file(bytes.data(), bytes.size(), "memory");
    require_same(f, back);
    REQUIRE(kvq::encode_calibration_file(back) == bytes);  // deterministic

    const std::string path = temp_path("roundtrip.kvqcal");
    kvq::write_calibration_file(path, f);
    REQUIRE(read_all(path) == bytes);
    REQUIRE_FALSE(file_exists(path + ".kvq-partial"));
    require_same(f, kvq::read_calibration_file(path));
  }
  SECTION("at the limits: 255-byte keys and names, a 1 MiB value, rank 8") {
    CalibrationFile f;
    std::string big(std::size_t{1} << 20, 'x');
    big.replace(0, 4, "\xF0\x9F\xA6\x99");
    f.metadata = {{std::string(255, '~'), big}, {" ", ""}};
    f.arrays.push_back(float_array(std::string(255, '!'), {1, 2, 1, 1, 2, 1, 1, 2}, std::vector<float>(8, 1.5f)));
    f.arrays.push_back(int_array("zero-size", {0, 0, 0, 0, 0, 0, 0, 0}, {}));
    const Bytes bytes = kvq::encode_calibration_file(f);
    require_same(f, kvq::decode_calibration_file(bytes.data(), bytes.size(), "limits"));
  }
  SECTION("overwriting an existing file replaces it") {
    const std::string path = temp_path("overwrite.kvqcal");
    kvq::write_calibration_file(path, random_file(1));
    kvq::write_calibration_file(path, small_file());
    require_same(small_file(), kvq::read_calibration_file(path));
  }
}

TEST_CASE("every truncation and every appended byte is rejected", "[io][calibration]") {
  const Bytes good = kvq::encode_calibration_file(small_file());
  for (std::size_t len = 0; len < good.size(); ++len) {
    INFO("prefix of " << len << " of " << good.size() << " bytes");
    const Bytes cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(len));
    require_decode_error(cut, {"truncated"});
  }
  for (std::size_t extra = 1; extra <= 16; ++extra) {
    INFO(extra << " trailing bytes");
    Bytes longer = good;
    longer.insert(longer.end(), extra, 0);
    require_decode_error(longer, {"trailing bytes"});
  }
  Bytes doubled = good;
  doubled.insert(doubled.end(), good.begin(), good.end());
  require_decode_error(doubled, {"160 trailing bytes"});
}

TEST_CASE("every flipped bit of a valid file is rejected", "[io][calibration]") {
  const Bytes good = kvq::encode_calibration_file(small_file());
  REQUIRE_NOTHROW(kvq::decode_calibration_file(good.data(), good.size(), "good"));
  for (std::size_t offset = 0; offset < good.size(); ++offset) {
    for (int bit = 0; bit < 8; ++bit) {
      Bytes bad = good;
      bad[offset] = static_cast<std::uint8_t>(bad[offset] ^ (1u << bit));
      INFO("offset " << offset << " bit " << bit);
      require_decode_error(bad, {});
    }
  }
  // And a random file's every byte XOR 0x01 and XOR 0x80.
  const std::uint64_t seed = kvq_test::case_seed("calibration bit flips", 0);
  INFO("seed " << seed);
  const Bytes big = kvq::encode_calibration_file(random_file(seed));
  for (std::size_t offset = 0; offset < big.size(); ++offset) {
    for (std::uint8_t mask : {std::uint8_t{0x01}, std::uint8_t{0x80}}) {
      Bytes bad = big;
      bad[offset] = static_cast<std::uint8_t>(bad[offset] ^ mask);
      try {
        (void)kvq::decode_calibration_file(bad.data(), bad.size(), "flipped");
        FAIL("accepted a flip at offset " << offset << " mask " << int{mask});
      } catch (const kvq::Error& e) {
        if (e.status() != Status::kFormatError) FAIL("status " << kvq::status_name(e.status()));
      }
    }
  }
}

TEST_CASE("specific corruptions give specific messages", "[io][calibration]") {
  const Bytes good = small_raw();
  SECTION("magic, version, header") {
    Bytes bad = good;
    bad[3] = 'X';
    require_decode_error(bad, {"magic 'KVQXALIB'", "expected 'KVQCALIB'", "not a kvq calibration file"});
    require_decode_error(Bytes{'P', 'K', 3, 4}, {"magic 'PK\\x03\\x04'"});
    Raw v2;
    v2.header(0, 0, 2);
    require_decode_error(v2.seal(), {"format version 2; expected 1", "written by a newer kvq"});
    bad = good;
    bad[8] = 0;  // version 0, stale header CRC: the version is reported first
    require_decode_error(bad, {"format version 0; expected 1"});
    bad = good;
    bad[12] = 3;  // metadata count
    require_decode_error(bad, {"header CRC at offset 20", "the header is corrupt"});
    Raw huge;
    huge.header(0xFFFFFFFFu, 0);
    require_decode_error(huge.seal(), {"header counts of 4294967295 metadata entries", "counts that fit the file"});
  }
  SECTION("section CRCs name their section") {
    Bytes bad = good;
    bad[24 + 8 + 6] ^= 0x20;  // "skvq" -> "Skvq"
    require_decode_error(bad, {"metadata entry 0 (key 'method') CRC", "corrupt"});
    bad = good;
    bad[62 + 24] = 4;  // perm's extent 3 -> 4
    require_decode_error(bad, {"array 'perm' record CRC at offset 94"});
    bad = good;
    bad[104] = 5;  // perm's first value
    require_decode_error(bad, {"array 'perm' payload CRC", "the payload at offset 104 is corrupt"});
    bad = good;
    bad[good.size() - 12] ^= 1;
    require_decode_error(bad, {"file CRC at offset 148"});
    bad = good;
    bad[good.size() - 1] = '!';
    require_decode_error(bad, {"end marker 'CALIBEN!'", "expected 'CALIBEND'"});
  }
  SECTION("duplicates") {
    Raw r;
    r.header(3, 0);
    r.meta("model", "a");
    r.meta("other", "b");
    r.meta("model", "c");
    require_decode_error(r.seal(), {"metadata entry 2 key 'model'", "unique metadata keys"});
    Raw s;
    s.header(0, 2);
    s.array({"w", 1, {1}, payload_of(std::vector<std::int32_t>{1})});
    s.array({"w", 2, {1}, payload_of(std::vector<float>{1})});
    require_decode_error(s.seal(), {"array record 1 name 'w'", "unique array names"});
  }
  SECTION("non-finite floats, even with valid CRCs") {
    for (float x : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
      INFO("value " << x);
      Raw r;
      r.header(0, 1);
      r.array({"clip", 2, {3}, payload_of(std::vector<float>{1.0f, x, 2.0f})});
      require_decode_error(r.seal(), {"array 'clip' element 1 = ", "expected finite values"});
      // The same bits as int32 are fine.
      Raw ok;
      ok.header(0, 1);
      ok.array({"clip", 1, {3}, payload_of(std::vector<float>{1.0f, x, 2.0f})});
      const Bytes b = ok.seal();
      REQUIRE(kvq::decode_calibration_file(b.data(), b.size(), "ints").arrays[0].i32.size() == 3);
    }
  }
  SECTION("shape against payload length") {
    Raw r;
    r.header(0, 1);
    r.array({"m", 1, {2, 3}, payload_of(std::vector<std::int32_t>{1, 2, 3, 4, 5})});
    require_decode_error(r.seal(), {"array 'm' payload length 20 bytes; expected 24 bytes (4 per element) for shape [2, 3]"});
    Raw longer;
    longer.header(0, 1);
    longer.array({"m", 1, {2}, payload_of(std::vector<std::int32_t>{1, 2, 3})});
    require_decode_error(longer.seal(), {"payload length 12 bytes; expected 8 bytes"});
    // A consistent but huge shape: rejected against the bytes remaining, before allocating.
    Raw huge;
    huge.header(0, 1);
    Raw::Array a{"h", 2, {std::int64_t{1} << 40}, {}};
    a.payload_len = std::uint64_t{1} << 42;
    huge.array(a);
    require_decode_error(huge.seal(), {"array 'h' payload at offset", "needs 4398046511104 bytes", "truncated"});
    Raw over;
    over.header(0, 1);
    over.array({"o", 2, {std::int64_t{1} << 31, std::int64_t{1} << 31, 4}, {}});
    require_decode_error(over.seal(), {"array 'o' shape [2147483648, 2147483648, 4], whose element count overflows"});
    Raw neg;
    neg.header(0, 1);
    neg.array({"n", 2, {2, -1}, {}});
    require_decode_error(neg.seal(), {"array 'n' shape [2, -1]", "non-negative extents"});
  }
  SECTION("record fields") {
    Raw dtype;
    dtype.header(0, 1);
    dtype.array({"d", 3, {1}, Bytes(4, 0)});
    require_decode_error(dtype.seal(), {"array 'd' dtype code 3", "1 (int32) or 2 (float32)"});
    Raw zero;
    zero.header(0, 1);
    zero.array({"d", 0, {1}, Bytes(4, 0)});
    require_decode_error(zero.seal(), {"dtype code 0"});
    Raw rank;
    rank.header(0, 1);
    rank.array({"r", 2, std::vector<std::int64_t>(9, 1), Bytes(4, 0)});
    require_decode_error(rank.seal(), {"array record 0 (offset 24) rank 9", "at most 8"});
    Raw reserved;
    reserved.header(0, 1);
    Raw::Array a{"x", 2, {1}, payload_of(std::vector<float>{1})};
    a.reserved = 7;
    reserved.array(a);
    require_decode_error(reserved.seal(), {"array 'x' reserved field 7"});
    Raw pad;
    pad.header(0, 1);
    Raw::Array p{"x", 2, {1}, payload_of(std::vector<float>{1})};
    p.pad_byte = 0x55;
    pad.array(p);
    require_decode_error(pad.seal(), {"array 'x' padding byte at offset 57 = 85", "padding must be zero"});
    Raw space;
    space.header(0, 1);
    space.array({"a b", 2, {}, payload_of(std::vector<float>{1})});
    require_decode_error(space.seal(), {"array record 0 name 'a b'", "without spaces"});
    Raw noname;
    noname.header(0, 1);
    noname.array({"", 2, {}, payload_of(std::vector<float>{1})});
    require_decode_error(noname.seal(), {"name length 0; expected 1..255"});
  }
  SECTION("metadata fields") {
    Raw utf;
    utf.header(1, 0);
    utf.meta("k", "ok \xC3\x28");
    require_decode_error(utf.seal(), {"metadata 'k' value byte 3", "valid UTF-8"});
    for (const std::string& v : {std::string("\xC0\xAF"), std::string("\xED\xA0\x80"), std::string("\xF4\x90\x80\x80"),
                                 std::string("\xE2\x82"), std::string("\x80")}) {
      Raw r;
      r.header(1, 0);
      r.meta("k", v);
      require_decode_error(r.seal(), {"valid UTF-8"});
    }
    Raw ctrl;
    ctrl.header(1, 0);
    ctrl.meta("a\tb", "x");
    require_decode_error(ctrl.seal(), {"metadata entry 0 key 'a\\x09b'", "printable ASCII"});
    // Length fields: over the limit, or past the end of the file.
    Bytes bad = good;
    const std::uint32_t huge = 0xFFFFFFF0u;
    std::memcpy(bad.data() + 28, &huge, 4);
    require_decode_error(bad, {"metadata entry 0 (offset 24) value length 4294967280", "at most 1048576 bytes"});
    const std::uint32_t big = 1000;
    std::memcpy(bad.data() + 28, &big, 4);
    require_decode_error(bad, {"metadata entry 0 key, value and CRC at offset 32 needs 1010 bytes", "truncated"});
    const std::uint32_t k0 = 0;
    bad = good;
    std::memcpy(bad.data() + 24, &k0, 4);
    require_decode_error(bad, {"metadata entry 0 (offset 24) key length 0; expected 1..255 bytes"});
  }
  SECTION("read_calibration_file names the path") {
    const std::string path = temp_path("corrupt.kvqcal");
    Bytes bad = good;
    bad[104] = 5;
    write_all(path, bad);
    require_error([&] { (void)kvq::read_calibration_file(path); }, Status::kFormatError,
                  {"kvq::read_calibration_file: file '" + path + "'", "array 'perm' payload CRC"});
  }
}

TEST_CASE("encode validates the content first", "[io][calibration]") {
  const auto encode_error = [](const CalibrationFile& f, Status status, std::initializer_list<std::string> fragments) {
    require_error([&] { (void)kvq::encode_calibration_file(f); }, status, fragments);
  };
  constexpr Status bad = Status::kInvalidArgument;
  SECTION("NaN and Inf") {
    CalibrationFile f = small_file();
    f.arrays[1].f32[0] = std::numeric_limits<float>::quiet_NaN();
    encode_error(f, Status::kNonFiniteInput,
                 {"kvq::encode_calibration_file: array 'clip' element 0 = nan", "calibration data must be finite"});
    f.arrays[1].f32[0] = -std::numeric_limits<float>::infinity();
    encode_error(f, Status::kNonFiniteInput, {"array 'clip' element 0 = -inf"});
    const std::string path = temp_path("nan.kvqcal");
    std::remove(path.c_str());
    require_error([&] { kvq::write_calibration_file(path, f); }, Status::kNonFiniteInput,
                  {"kvq::write_calibration_file: array 'clip'"});
    REQUIRE_FALSE(file_exists(path));
    REQUIRE_FALSE(file_exists(path + ".kvq-partial"));
  }
  SECTION("keys and values") {
    CalibrationFile f = small_file();
    f.metadata.emplace_back("method", "kivi");
    encode_error(f, bad, {"metadata[2] key = 'method'", "unique metadata keys"});
    f.metadata.back().first = "";
    encode_error(f, bad, {"metadata[2] key = '' (0 bytes)", "1..255 bytes of printable ASCII"});
    f.metadata.back().first = std::string(256, 'k');
    encode_error(f, bad, {"(256 bytes)"});
    f.metadata.back().first = "new\nline";
    encode_error(f, bad, {"'new\\x0aline'"});
    f.metadata.back().first = "fine key";
    f.metadata.back().second = std::string((std::size_t{1} << 20) + 1, 'v');
    encode_error(f, bad, {"metadata 'fine key' value length = 1048577 bytes", "at most 1048576 bytes (1 MiB)"});
    f.metadata.back().second = "abc\xFF";
    encode_error(f, bad, {"metadata 'fine key' value byte 3 = '\\xff'", "valid UTF-8"});
  }
  SECTION("arrays") {
    CalibrationFile f = small_file();
    f.arrays.push_back(int_array("perm", {1}, {0}));
    encode_error(f, bad, {"arrays[2] name = 'perm'", "unique array names"});
    f.arrays.back().name = "has space";
    encode_error(f, bad, {"arrays[2] name = 'has space'", "without spaces"});
    f.arrays.back().name = "ok";
    f.arrays.back().shape = std::vector<std::int64_t>(9, 1);
    encode_error(f, bad, {"array 'ok' rank = 9; expected at most 8"});
    f.arrays.back().shape = {1, -1};
    encode_error(f, bad, {"array 'ok' shape = [1, -1]; expected non-negative extents"});
    f.arrays.back().shape = {std::int64_t{1} << 40, std::int64_t{1} << 40};
    encode_error(f, bad, {"overflows"});
    f.arrays.back().shape = {2};
    encode_error(f, bad, {"array 'ok' i32.size() = 1; expected 2 values for shape [2]"});
    f.arrays.back().shape = {1};
    f.arrays.back().f32 = {1.0f};
    encode_error(f, bad, {"array 'ok' f32.size() = 1; expected 0 (the array's dtype is int32)"});
    f.arrays.back().f32.clear();
    f.arrays.back().dtype = static_cast<CalibrationDtype>(7);
    encode_error(f, bad, {"array 'ok' dtype = code 7"});
  }
}

TEST_CASE("lookup helpers name the key or array and what was expected", "[io][calibration]") {
  CalibrationFile f = small_file();
  f.arrays.push_back(float_array("factor", {4, 2}, std::vector<float>(8, 0.5f)));
  REQUIRE(f.find_metadata("method") != nullptr);
  REQUIRE(*f.find_metadata("method") == "skvq");
  REQUIRE(f.find_metadata("nope") == nullptr);
  REQUIRE(f.find_array("perm") == &f.arrays[0]);
  REQUIRE(f.find_array("nope") == nullptr);
  REQUIRE(f.metadata_value("note", "a note") == "");
  require_error([&] { (void)f.metadata_value("skvq.bits", "the SKVQ key bit width"); }, Status::kFormatError,
                {"kvq::CalibrationFile::metadata_value: metadata key 'skvq.bits' is missing; expected the SKVQ key bit width"});
  REQUIRE(&f.array("factor", CalibrationDtype::kFloat32, {4, 2}, "w") == &f.arrays[2]);
  REQUIRE(&f.array("factor", CalibrationDtype::kFloat32, {-1, 2}, "w") == &f.arrays[2]);
  REQUIRE(&f.array("clip", CalibrationDtype::kFloat32, {}, "w") == &f.arrays[1]);
  require_error([&] { (void)f.array("cskv.key", CalibrationDtype::kFloat32, {-1, 8}, "the CSKV key factor"); },
                Status::kFormatError,
                {"kvq::CalibrationFile::array: array 'cskv.key' is missing; expected the CSKV key factor (float32, shape [any, 8])"});
  require_error([&] { (void)f.array("perm", CalibrationDtype::kFloat32, {3}, "clip ratios"); }, Status::kFormatError,
                {"array 'perm' has dtype int32; expected clip ratios (float32, shape [3])"});
  require_error([&] { (void)f.array("factor", CalibrationDtype::kFloat32, {4, 3}, "W"); }, Status::kFormatError,
                {"array 'factor' has shape [4, 2]; expected W (float32, shape [4, 3])"});
  require_error([&] { (void)f.array("factor", CalibrationDtype::kFloat32, {-1}, "W"); }, Status::kFormatError,
                {"array 'factor' has shape [4, 2]; expected W (float32, shape [any])"});
  f.arrays[2].f32.pop_back();
  require_error([&] { (void)f.array("factor", CalibrationDtype::kFloat32, {4, 2}, "W"); }, Status::kFormatError,
                {"array 'factor' holds 7 values for shape [4, 2]; expected 8 values"});
  CalibrationArray a;
  a.shape = {2, 3, 4};
  REQUIRE(a.size() == 24);
  a.shape = {};
  REQUIRE(a.size() == 1);
  a.shape = {5, 0};
  REQUIRE(a.size() == 0);
  a.shape = {-2};
  REQUIRE(a.size() == -1);
  a.shape = {std::int64_t{1} << 40, std::int64_t{1} << 40};
  REQUIRE(a.size() == -1);
}

TEST_CASE("file errors are i/o errors naming the path and leave nothing behind", "[io][calibration]") {
  const std::string path = temp_path("no_such_dir/x.kvqcal");
  require_error([&] { kvq::write_calibration_file(path, small_file()); }, Status::kIoError,
                {"kvq::write_calibration_file: file '" + path + "': cannot be created"});
  REQUIRE_FALSE(file_exists(path));
  REQUIRE_FALSE(file_exists(path + ".kvq-partial"));
  const std::string missing = temp_path("does_not_exist.kvqcal");
  require_error([&] { (void)kvq::read_calibration_file(missing); }, Status::kIoError,
                {"kvq::read_calibration_file: file '" + missing + "': cannot be opened"});
  // A directory opens on some systems but cannot be read.
  REQUIRE_THROWS_AS(kvq::read_calibration_file(KVQ_TEST_TMPDIR), kvq::Error);
  try {
    (void)kvq::read_calibration_file(KVQ_TEST_TMPDIR);
  } catch (const kvq::Error& e) {
    CHECK(e.status() == Status::kIoError);
  }
  // An empty file is a format error, not an i/o error.
  const std::string empty = temp_path("empty.kvqcal");
  write_all(empty, {});
  require_error([&] { (void)kvq::read_calibration_file(empty); }, Status::kFormatError,
                {"file '" + empty + "': 0 bytes, too short", "truncated"});
}
