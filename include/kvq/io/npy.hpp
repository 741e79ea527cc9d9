// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Reading and writing NumPy .npy files of float32 or float16 in C order (host only).
///
/// Accepted: format versions 1.0, 2.0 and 3.0; descr '<f4' or '<f2' (also '=f4'/'=f2');
/// fortran_order False; any rank. Anything else, and truncated or over-long files, raise
/// kvq::Error (Status::kFormatError or kIoError) naming the file and what was expected.
/// Writing goes through a temporary file renamed into place, so a failed write leaves no
/// partial output.
#pragma once

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/core/float_types.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kvq/io/npy.hpp assumes a little-endian host"
#endif

namespace kvq {

/// Element type of a .npy file.
enum class NpyDtype : std::uint8_t { kFloat32, kFloat16 };

/// An array read from a .npy file, converted to float (float16 converts exactly).
struct NpyArray {
  std::vector<std::int64_t> shape;  ///< C-order extents; empty for a 0-d array
  NpyDtype dtype = NpyDtype::kFloat32;
  std::vector<float> data;          ///< prod(shape) values in C order
};

namespace detail {

[[noreturn]] inline void npy_fail(Status status, const char* where, const std::string& path,
                                  const std::string& found, const std::string& expected) {
  throw Error(status, concat(where, ": file '", path, "': ", found, "; expected ", expected));
}

/// Parser of the Python dict literal in a .npy header.
class NpyHeaderParser {
 public:
  NpyHeaderParser(const std::string& text, const std::string& path) : s_(text), path_(path) {}

  void parse(std::string* descr, bool* fortran, std::vector<std::int64_t>* shape) {
    bool have_descr = false, have_fortran = false, have_shape = false;
    expect('{');
    while (true) {
      skip_space();
      if (peek() == '}') break;
      const std::string key = parse_string();
      expect(':');
      if (key == "descr") {
        *descr = parse_string();
        have_descr = true;
      } else if (key == "fortran_order") {
        *fortran = parse_bool();
        have_fortran = true;
      } else if (key == "shape") {
        *shape = parse_shape();
        have_shape = true;
      } else {
        fail("key '" + key + "'", "only the keys 'descr', 'fortran_order' and 'shape'");
      }
      skip_space();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      skip_space();
      if (peek() != '}') fail(quote_here(), "',' or '}' in the header dict");
    }
    if (!have_descr || !have_fortran || !have_shape) {
      fail("a header without " + std::string(!have_descr ? "'descr'" : !have_fortran ? "'fortran_order'" : "'shape'"),
           "the keys 'descr', 'fortran_order' and 'shape'");
    }
  }

 private:
  [[noreturn]] void fail(const std::string& found, const std::string& expected) const {
    npy_fail(Status::kFormatError, "kvq::read_npy", path_, found, expected);
  }
  char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  std::string quote_here() const {
    return pos_ < s_.size() ? "header text '" + s_.substr(pos_, 16) + "'" : "end of header";
  }
  void skip_space() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  void expect(char c) {
    skip_space();
    if (peek() != c) fail(quote_here(), std::string("'") + c + "' in the header dict");
    ++pos_;
  }
  std::string parse_string() {
    skip_space();
    const char q = peek();
    if (q != '\'' && q != '"') fail(quote_here(), "a quoted string in the header dict");
    const std::size_t end = s_.find(q, pos_ + 1);
    if (end == std::string::npos) fail("an unterminated string", "a quoted string");
    std::string out = s_.substr(pos_ + 1, end - pos_ - 1);
    pos_ = end + 1;
    return out;
  }
  bool parse_bool() {
    skip_space();
    if (s_.compare(pos_, 4, "True") == 0) {
      pos_ += 4;
      return true;
    }
    if (s_.compare(pos_, 5, "False") == 0) {
      pos_ += 5;
      return false;
    }
    fail(quote_here(), "True or False for 'fortran_order'");
  }
  std::vector<std::int64_t> parse_shape() {
    expect('(');
    std::vector<std::int64_t> shape;
    while (true) {
      skip_space();
      if (peek() == ')') {
        ++pos_;
        return shape;
      }
      if (!std::isdigit(static_cast<unsigned char>(peek()))) {
        fail(quote_here(), "non-negative integers in 'shape'");
      }
      std::int64_t v = 0;
      while (std::isdigit(static_cast<unsigned char>(peek()))) {
        const int digit = peek() - '0';
        if (v > (std::numeric_limits<std::int64_t>::max() - digit) / 10) {
          fail("a shape extent that overflows 64 bits", "extents below 2^63");
        }
        v = v * 10 + digit;
        ++pos_;
      }
      shape.push_back(v);
      skip_space();
      if (peek() == ',') {
        ++pos_;
      } else if (peek() != ')') {
        fail(quote_here(), "',' or ')' in 'shape'");
      }
    }
  }

  const std::string& s_;
  const std::string& path_;
  std::size_t pos_ = 0;
};

inline std::string npy_shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    s += std::to_string(shape[i]);
    if (i + 1 < shape.size() || shape.size() == 1) s += ",";
    if (i + 1 < shape.size()) s += " ";
  }
  return s + ")";
}

}  // namespace detail

/// Reads a float32 or float16 .npy file. Throws kvq::Error on anything else.
inline NpyArray read_npy(const std::string& path) {
  constexpr const char* where = "kvq::read_npy";
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::npy_fail(Status::kIoError, where, path, "cannot be opened", "a readable file");
  const std::vector<char> bytes((std::istreambuf_iterator<char>(in)),
                                std::istreambuf_iterator<char>());
  if (in.bad()) detail::npy_fail(Status::kIoError, where, path, "read failed", "a readable file");

  const std::size_t size = bytes.size();
  static const char kMagic[] = "\x93NUMPY";
  if (size < 10 || std::memcmp(bytes.data(), kMagic, 6) != 0) {
    detail::npy_fail(Status::kFormatError, where, path,
                     size < 10 ? detail::concat(size, " bytes, too short for a .npy header")
                               : std::string("no .npy magic string"),
                     "a NumPy .npy file (starting with \\x93NUMPY)");
  }
  const auto u8 = [&](std::size_t i) { return static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[i])); };
  const std::uint32_t major = u8(6);
  std::size_t header_len = 0;
  std::size_t header_start = 0;
  if (major == 1) {
    header_len = u8(8) | (u8(9) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) detail::npy_fail(Status::kFormatError, where, path, "a truncated header", "a complete header");
    header_len = u8(8) | (u8(9) << 8) | (u8(10) << 16) | (static_cast<std::size_t>(u8(11)) << 24);
    header_start = 12;
  } else {
    detail::npy_fail(Status::kFormatError, where, path, detail::concat("format version ", major, ".", u8(7)),
                     "version 1.0, 2.0 or 3.0");
  }
  if (header_start + header_len > size) {
    detail::npy_fail(Status::kFormatError, where, path,
                     detail::concat("a header of ", header_len, " bytes in a file of ", size, " bytes"),
                     "a complete header (the file is truncated)");
  }
  const std::string header(bytes.data() + header_start, header_len);
  std::string descr;
  bool fortran = false;
  NpyArray array;
  detail::NpyHeaderParser(header, path).parse(&descr, &fortran, &array.shape);

  std::size_t item = 0;
  if (descr == "<f4" || descr == "=f4") {
    array.dtype = NpyDtype::kFloat32;
    item = 4;
  } else if (descr == "<f2" || descr == "=f2") {
    array.dtype = NpyDtype::kFloat16;
    item = 2;
  } else {
    detail::npy_fail(Status::kFormatError, where, path, "dtype '" + descr + "'",
                     "'<f4' (float32) or '<f2' (float16), little endian");
  }
  if (fortran) {
    detail::npy_fail(Status::kFormatError, where, path, "fortran_order True",
                     "C order (numpy.ascontiguousarray before saving)");
  }
  std::uint64_t count = 1;
  for (std::int64_t e : array.shape) {
    if (e != 0 && count > std::numeric_limits<std::uint64_t>::max() / 8 / static_cast<std::uint64_t>(e)) {
      detail::npy_fail(Status::kFormatError, where, path, "shape " + detail::npy_shape_text(array.shape),
                       "an array small enough to address");
    }
    count *= static_cast<std::uint64_t>(e);
  }
  const std::size_t data_start = header_start + header_len;
  const std::uint64_t data_bytes = count * item;
  if (size - data_start != data_bytes) {
    detail::npy_fail(Status::kFormatError, where, path,
                     detail::concat(size - data_start, " bytes of data"),
                     detail::concat(data_bytes, " bytes for shape ", detail::npy_shape_text(array.shape),
                                    " of ", descr,
                                    size - data_start < data_bytes ? " (the file is truncated)"
                                                                   : " (trailing bytes)"));
  }
  array.data.resize(static_cast<std::size_t>(count));
  const char* src = bytes.data() + data_start;
  if (array.dtype == NpyDtype::kFloat32) {
    if (data_bytes > 0) std::memcpy(array.data.data(), src, static_cast<std::size_t>(data_bytes));
  } else {
    for (std::size_t i = 0; i < array.data.size(); ++i) {
      std::uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      array.data[i] = Float16::from_bits(h).to_float();
    }
  }
  return array;
}

/// Writes prod(shape) floats from `data` (C order) as a version 1.0 .npy file of dtype `dtype`
/// (float16 rounds to nearest-even). Atomic: the file appears complete or not at all.
inline void write_npy(const std::string& path, const float* data,
                      const std::vector<std::int64_t>& shape,
                      NpyDtype dtype = NpyDtype::kFloat32) {
  constexpr const char* where = "kvq::write_npy";
  std::uint64_t count = 1;
  for (std::int64_t e : shape) {
    if (e < 0) detail::throw_argument_error(where, "shape", detail::npy_shape_text(shape), "non-negative extents");
    count *= static_cast<std::uint64_t>(e);
  }
  if (count > 0 && data == nullptr) {
    detail::throw_argument_error(where, "data", "null", detail::concat(count, " floats"));
  }
  std::string header = std::string("{'descr': '") + (dtype == NpyDtype::kFloat32 ? "<f4" : "<f2") +
                       "', 'fortran_order': False, 'shape': " + detail::npy_shape_text(shape) + ", }";
  // Pad with spaces so that magic + version + length + header is a multiple of 64, ending in \n.
  const std::size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  if (header.size() > 65535) {
    detail::throw_argument_error(where, "shape", detail::npy_shape_text(shape), "a header below 64 KiB");
  }

  std::string out;
  out.reserve(10 + header.size() + static_cast<std::size_t>(count) * 4);
  out.append("\x93NUMPY\x01\x00", 8);
  out.push_back(static_cast<char>(header.size() & 0xFF));
  out.push_back(static_cast<char>(header.size() >> 8));
  out += header;
  if (dtype == NpyDtype::kFloat32) {
    if (count > 0) out.append(reinterpret_cast<const char*>(data), static_cast<std::size_t>(count) * 4);
  } else {
    for (std::uint64_t i = 0; i < count; ++i) {
      const std::uint16_t h = Float16(data[i]).bits();
      out.append(reinterpret_cast<const char*>(&h), 2);
    }
  }

  const std::string tmp = path + ".kvq-partial";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) detail::npy_fail(Status::kIoError, where, path, "cannot be created", "a writable path");
    f.write(out.data(), static_cast<std::streamsize>(out.size()));
    f.close();
    if (!f) {
      std::remove(tmp.c_str());
      detail::npy_fail(Status::kIoError, where, path, "write failed", "a writable path with free space");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    detail::npy_fail(Status::kIoError, where, path, "cannot be renamed into place", "a writable path");
  }
}

}  // namespace kvq
