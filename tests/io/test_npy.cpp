// SPDX-License-Identifier: Apache-2.0
// .npy files: byte-exact headers as NumPy writes them, round trips, and clear errors on every
// unsupported or damaged file.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "kvq/io/npy.hpp"
#include "kvq_catch.hpp"

namespace {

std::string temp_path(const std::string& name) {
  return (std::string(KVQ_TEST_TMPDIR) + "/") + name;
}

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_all(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A .npy file as numpy.save writes it: v1.0, header padded with spaces to 64 bytes, then '\n'.
std::string numpy_file(const std::string& dict, const std::string& data) {
  std::string header = dict;
  const std::size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  std::string out("\x93NUMPY\x01\x00", 8);
  out.push_back(static_cast<char>(header.size() & 0xFF));
  out.push_back(static_cast<char>(header.size() >> 8));
  return out + header + data;
}

std::string float_bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

void require_read_error(const std::string& path, kvq::Status status, const std::string& fragment) {
  try {
    (void)kvq::read_npy(path);
    FAIL("no kvq::Error");
  } catch (const kvq::Error& e) {
    CAPTURE(e.what());
    REQUIRE(e.status() == status);
    REQUIRE(std::string(e.what()).find(fragment) != std::string::npos);
    REQUIRE(std::string(e.what()).find(path) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("write_npy produces the bytes numpy.save produces", "[io][npy]") {
  const std::vector<float> v{1.0f, -2.5f, 3.25f, 0.0f, 1e-3f, 7.0f};
  const std::string path = temp_path("golden_f4.npy");
  kvq::write_npy(path, v.data(), {2, 3});
  REQUIRE(read_all(path) ==
          numpy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", float_bytes(v)));
  REQUIRE(read_all(path).size() == 128 + 24);  // 64-byte aligned data

  const std::string path1 = temp_path("golden_1d.npy");
  kvq::write_npy(path1, v.data(), {6}, kvq::NpyDtype::kFloat16);
  std::string half;
  for (float x : v) {
    const std::uint16_t h = kvq::Float16(x).bits();
    half.append(reinterpret_cast<const char*>(&h), 2);
  }
  REQUIRE(read_all(path1) ==
          numpy_file("{'descr': '<f2', 'fortran_order': False, 'shape': (6,), }", half));
}

TEST_CASE("read_npy round-trips float32 and float16 arrays of any rank", "[io][npy]") {
  std::vector<float> v(2 * 3 * 4);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) * 0.37f - 3.0f;
  for (auto dtype : {kvq::NpyDtype::kFloat32, kvq::NpyDtype::kFloat16}) {
    for (const auto& shape : std::vector<std::vector<std::int64_t>>{{24}, {6, 4}, {2, 3, 4}, {0, 5}}) {
      const std::string path = temp_path("roundtrip.npy");
      kvq::write_npy(path, v.data(), shape, dtype);
      const auto a = kvq::read_npy(path);
      REQUIRE(a.shape == shape);
      REQUIRE(a.dtype == dtype);
      std::size_t count = 1;
      for (auto e : shape) count *= static_cast<std::size_t>(e);
      REQUIRE(a.data.size() == count);
      for (std::size_t i = 0; i < count; ++i) {
        REQUIRE(a.data[i] == (dtype == kvq::NpyDtype::kFloat32 ? v[i] : kvq::Float16(v[i]).to_float()));
      }
    }
  }
  // Headers written by other tools: double quotes, keys in another order, version 2.0.
  const std::string path = temp_path("other_writer.npy");
  std::string file = numpy_file("{\"shape\": (2,), \"fortran_order\": False, \"descr\": \"<f4\"}",
                                float_bytes({1.5f, 2.5f}));
  write_all(path, file);
  REQUIRE(kvq::read_npy(path).data == std::vector<float>{1.5f, 2.5f});
  std::string v2 = file;
  v2[6] = 2;
  v2.insert(10, 2, '\0');  // 4-byte header length
  write_all(path, v2);
  REQUIRE(kvq::read_npy(path).shape == std::vector<std::int64_t>{2});
}

TEST_CASE("read_npy rejects anything else with a message naming the file", "[io][npy]") {
  const std::string path = temp_path("bad.npy");
  const std::string data = float_bytes({1, 2, 3, 4, 5, 6});
  using kvq::Status;
  write_all(path, numpy_file("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }", data));
  require_read_error(path, Status::kFormatError, "dtype '<f8'; expected '<f4' (float32) or '<f2' (float16)");
  write_all(path, numpy_file("{'descr': '<i4', 'fortran_order': False, 'shape': (6,), }", data));
  require_read_error(path, Status::kFormatError, "dtype '<i4'");
  write_all(path, numpy_file("{'descr': '>f4', 'fortran_order': False, 'shape': (6,), }", data));
  require_read_error(path, Status::kFormatError, "dtype '>f4'");
  write_all(path, numpy_file("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", data));
  require_read_error(path, Status::kFormatError, "fortran_order True; expected C order");
  // Truncated data, truncated header, trailing bytes.
  const std::string good = numpy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", data);
  write_all(path, good.substr(0, good.size() - 1));
  require_read_error(path, Status::kFormatError, "23 bytes of data; expected 24 bytes for shape (2, 3) of <f4 (the file is truncated)");
  write_all(path, good.substr(0, 40));
  require_read_error(path, Status::kFormatError, "the file is truncated");
  write_all(path, good + "xx");
  require_read_error(path, Status::kFormatError, "trailing bytes");
  write_all(path, good.substr(0, 5));
  require_read_error(path, Status::kFormatError, "too short");
  write_all(path, "PK\x03\x04 this is a zip file, not an npy file");
  require_read_error(path, Status::kFormatError, "no .npy magic string");
  std::string v9 = good;
  v9[6] = 9;
  write_all(path, v9);
  require_read_error(path, Status::kFormatError, "format version 9.0");
  write_all(path, numpy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }", data));
  require_read_error(path, Status::kFormatError, "non-negative integers in 'shape'");
  write_all(path, numpy_file("{'descr': '<f4', 'shape': (6,), }", data));
  require_read_error(path, Status::kFormatError, "without 'fortran_order'");
  require_read_error(temp_path("does_not_exist.npy"), Status::kIoError, "cannot be opened");
}

TEST_CASE("write_npy fails cleanly and leaves no partial file", "[io][npy]") {
  const std::vector<float> v{1.0f};
  const std::string path = temp_path("no_such_dir/x.npy");
  REQUIRE_THROWS_AS(kvq::write_npy(path, v.data(), {1}), kvq::Error);
  REQUIRE_FALSE(std::ifstream(path).good());
  REQUIRE_FALSE(std::ifstream(path + ".kvq-partial").good());
  REQUIRE_THROWS_AS(kvq::write_npy(temp_path("neg.npy"), v.data(), {-1}), kvq::Error);
}
