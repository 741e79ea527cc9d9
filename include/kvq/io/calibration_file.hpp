// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The versioned binary container of kvq calibration files (host only): ordered string
///        metadata and named int32/float32 arrays, each section with its own CRC-32.
///
/// This header implements only the container. Which arrays and keys a calibration holds (SKVQ
/// permutations, group boundaries, clip ratios, CSKV factors, provenance) is defined by the layer
/// that maps them to the cache's calibration struct.
///
/// Byte format, version 1. All integers are little endian; offsets marked "+" are relative to the
/// start of their record; no field is aligned except the array payloads.
///
/// | Offset          | Size | Type     | Field                                                      |
/// |-----------------|------|----------|------------------------------------------------------------|
/// | **File header** |      |          | 24 bytes                                                   |
/// | 0               | 8    | char[8]  | magic "KVQCALIB"                                           |
/// | 8               | 4    | u32      | format version = 1 (kCalibrationFormatVersion)             |
/// | 12              | 4    | u32      | M: number of metadata entries                              |
/// | 16              | 4    | u32      | A: number of arrays                                        |
/// | 20              | 4    | u32      | header CRC-32 of bytes [0, 20)                             |
/// | **Metadata entry** |      |          | M times, in order, directly after the header               |
/// | +0              | 4    | u32      | K: key length in bytes, 1..255                             |
/// | +4              | 4    | u32      | V: value length in bytes, 0..1048576 (1 MiB)               |
/// | +8              | K    | bytes    | key: printable ASCII (0x20..0x7E), unique in the file      |
/// | +8+K            | V    | bytes    | value: UTF-8 (no terminator)                               |
/// | +8+K+V          | 4    | u32      | entry CRC-32 of bytes [+0, +8+K+V)                         |
/// | **Array record** |      |          | A times, in order, directly after the last metadata entry    |
/// | +0              | 4    | u32      | N: name length in bytes, 1..255                            |
/// | +4              | 1    | u8       | dtype code: 1 = int32, 2 = float32 (CalibrationDtype)      |
/// | +5              | 1    | u8       | R: rank, 0..8                                              |
/// | +6              | 2    | u16      | reserved, 0                                                |
/// | +8              | 8    | u64      | P: payload length in bytes = 4 * product of the extents    |
/// | +16             | 4    | u32      | payload CRC-32 of the P payload bytes (0 when P = 0)       |
/// | +20             | N    | bytes    | name: printable ASCII without space (0x21..0x7E), unique   |
/// | +20+N           | 8R   | i64[R]   | extents, each >= 0 (rank 0: a scalar of 1 element)         |
/// | +20+N+8R        | 4    | u32      | record CRC-32 of bytes [+0, +20+N+8R)                      |
/// | +24+N+8R        | 0..7 | zero     | padding to the next file offset that is a multiple of 8    |
/// |                 | P    | i32/f32  | payload in C order (float32 values must be finite)         |
/// | **Trailer**     |      |          | 12 bytes, the last of the file                             |
/// | n-12            | 4    | u32      | file CRC-32 of bytes [0, n-12)                             |
/// | n-8             | 8    | char[8]  | end marker "CALIBEND"                                      |
///
/// CRC-32 is the IEEE 802.3 polynomial as zlib's crc32() computes it (kvq::crc32). The smallest
/// file (no metadata, no arrays) is 36 bytes.
///
/// Decoding is strict: the magic, the version (a higher one was written by a newer kvq), every
/// length against the bytes remaining, every CRC, the padding (zero), key and name rules,
/// uniqueness, dtype codes, ranks, extents, element counts against payload lengths, finite
/// floats, and the exact end of the file (no trailing bytes) are checked, and any violation
/// raises kvq::Error with Status::kFormatError naming the source, the field, the value found and
/// what was expected (Status::kIoError when the file cannot be opened or read). Nothing is
/// allocated from a length before it has been checked against the bytes that remain. Order of
/// the checks: magic, size, version (before the header CRC, whose layout a newer version may
/// change), header CRC, then each entry and record: the lengths needed to find its CRC, the CRC,
/// then its contents; the payload CRC before the finiteness of its floats; the file CRC and the
/// end marker last. A newer writer that changes the layout must raise the version.
///
/// Writing validates the content first (the same rules; Status::kInvalidArgument, or
/// Status::kNonFiniteInput for NaN/Inf in a float32 array) and goes through a temporary file in
/// the same directory renamed into place, so a failed write leaves no partial output.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/core/status.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "kvq/io/calibration_file.hpp assumes a little-endian host"
#endif

namespace kvq {

/// The container version this header writes and the only one it reads.
inline constexpr std::uint32_t kCalibrationFormatVersion = 1;

/// Element type of a calibration array (the value is the on-disk dtype code).
enum class CalibrationDtype : std::uint8_t { kInt32 = 1, kFloat32 = 2 };

/// Lower-case name of a dtype for messages ("int32", "float32").
inline const char* calibration_dtype_name(CalibrationDtype d) noexcept {
  switch (d) {
    case CalibrationDtype::kInt32: return "int32";
    case CalibrationDtype::kFloat32: return "float32";
  }
  return "unknown dtype";
}

/// One named array of a calibration file.
struct CalibrationArray {
  std::string name;                    ///< unique in the file, 1..255 bytes, printable ASCII, no spaces
  CalibrationDtype dtype = CalibrationDtype::kFloat32;
  std::vector<std::int64_t> shape;     ///< rank 0..8, each extent >= 0; element count = product
  std::vector<std::int32_t> i32;       ///< size() values in C order when dtype == kInt32 (else empty)
  std::vector<float> f32;              ///< size() values in C order when dtype == kFloat32 (else empty)

  /// Product of the extents (1 for rank 0); -1 when an extent is negative or the product
  /// overflows int64 (such a shape is rejected by encode and never produced by decode).
  std::int64_t size() const {
    std::int64_t count = 1;
    for (std::int64_t e : shape) {
      if (e < 0) return -1;
      if (e != 0 && count > std::numeric_limits<std::int64_t>::max() / e) return -1;
      count *= e;
    }
    return count;
  }
};

namespace detail {

inline constexpr char kCalibMagic[8] = {'K', 'V', 'Q', 'C', 'A', 'L', 'I', 'B'};
inline constexpr char kCalibEndMarker[8] = {'C', 'A', 'L', 'I', 'B', 'E', 'N', 'D'};
inline constexpr std::size_t kCalibHeaderBytes = 24;
inline constexpr std::size_t kCalibTrailerBytes = 12;
inline constexpr std::size_t kCalibMetaFixedBytes = 12;    // K, V, CRC
inline constexpr std::size_t kCalibArrayFixedBytes = 24;   // N, dtype, rank, reserved, P, payload CRC, record CRC
inline constexpr std::size_t kCalibMaxNameBytes = 255;
inline constexpr std::size_t kCalibMaxValueBytes = std::size_t{1} << 20;
inline constexpr std::size_t kCalibMaxRank = 8;
/// Element counts above this cannot be stored (4 * count must fit in int64).
inline constexpr std::uint64_t kCalibMaxElements =
    static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / 4;

/// "[2, 3]" ("[]" for rank 0); -1 extents (any) print as "any" when `any` is set.
inline std::string calib_shape_text(const std::vector<std::int64_t>& shape, bool any = false) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += (any && shape[i] == -1) ? std::string("any") : std::to_string(shape[i]);
  }
  return s + "]";
}

/// Bytes quoted for a message: '...' with non-printable bytes as \xNN, cut after 64 bytes.
inline std::string calib_quote(const void* data, std::size_t n) {
  static const char kHex[] = "0123456789abcdef";
  const auto* p = static_cast<const unsigned char*>(data);
  std::string s = "'";
  const std::size_t shown = n < 64 ? n : 64;
  for (std::size_t i = 0; i < shown; ++i) {
    const unsigned char c = p[i];
    if (c >= 0x20 && c <= 0x7E && c != '\\' && c != '\'') {
      s += static_cast<char>(c);
    } else {
      s += "\\x";
      s += kHex[c >> 4];
      s += kHex[c & 0xF];
    }
  }
  s += '\'';
  if (shown < n) s += concat("... (", n, " bytes)");
  return s;
}
inline std::string calib_quote(const std::string& s) { return calib_quote(s.data(), s.size()); }

/// True when `s` is 1..255 bytes of 0x20..0x7E (keys) or 0x21..0x7E (names, allow_space false).
inline bool calib_valid_ident(const void* data, std::size_t n, bool allow_space) {
  if (n == 0 || n > kCalibMaxNameBytes) return false;
  const auto* p = static_cast<const unsigned char*>(data);
  const unsigned char lo = allow_space ? 0x20 : 0x21;
  for (std::size_t i = 0; i < n; ++i) {
    if (p[i] < lo || p[i] > 0x7E) return false;
  }
  return true;
}

/// Offset of the first byte that starts an invalid UTF-8 sequence (overlong forms, surrogates
/// and code points above U+10FFFF are invalid), or n when all of it is valid.
inline std::size_t calib_utf8_error(const void* data, std::size_t n) {
  const auto* s = static_cast<const unsigned char*>(data);
  std::size_t i = 0;
  while (i < n) {
    const std::uint32_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    std::uint32_t cp = 0, min = 0;
    if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07, min = 0x10000;
    } else {
      return i;
    }
    if (n - i < len) return i;
    for (std::size_t k = 1; k < len; ++k) {
      const std::uint32_t d = s[i + k];
      if ((d & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (d & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return n;
}

struct Crc32Table {
  std::uint32_t v[256];
};

constexpr Crc32Table make_crc32_table() {
  Crc32Table t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
    t.v[i] = c;
  }
  return t;
}

inline constexpr Crc32Table kCrc32Table = make_crc32_table();

}  // namespace detail

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), the value zlib's crc32() computes.
/// Chainable: crc32(b, nb, crc32(a, na)) is the CRC of a followed by b. crc32("123456789", 9)
/// is 0xCBF43926; the CRC of no bytes is 0. `data` may be null when n is 0.
inline std::uint32_t crc32(const void* data, std::size_t n, std::uint32_t crc = 0) {
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) crc = detail::kCrc32Table.v[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

/// The content of a calibration file: ordered metadata and ordered arrays.
struct CalibrationFile {
  /// Ordered (key, value) pairs: unique keys of 1..255 printable ASCII bytes, UTF-8 values of at
  /// most 1 MiB.
  std::vector<std::pair<std::string, std::string>> metadata;
  /// Ordered arrays with unique names.
  std::vector<CalibrationArray> arrays;

  /// The value of `key`, or nullptr when absent.
  const std::string* find_metadata(const std::string& key) const {
    for (const auto& kv : metadata) {
      if (kv.first == key) return &kv.second;
    }
    return nullptr;
  }

  /// The array named `name`, or nullptr when absent.
  const CalibrationArray* find_array(const std::string& name) const {
    for (const auto& a : arrays) {
      if (a.name == name) return &a;
    }
    return nullptr;
  }

  /// The value of `key`; throws kvq::Error(kFormatError) naming the key and `what` (what the
  /// value is for, e.g. "the SKVQ key bit width") when it is absent.
  const std::string& metadata_value(const std::string& key, const std::string& what) const {
    const std::string* v = find_metadata(key);
    if (v == nullptr) {
      throw Error(Status::kFormatError,
                  detail::concat("kvq::CalibrationFile::metadata_value: metadata key '", key,
                                 "' is missing; expected ", what));
    }
    return *v;
  }

  /// The array `name`, checked to have `dtype`, the rank of `shape` and its extents (-1 accepts
  /// any extent) and as many values as its shape holds; throws kvq::Error(kFormatError) naming
  /// the array, what was found and `what` (what the array is for) otherwise.
  const CalibrationArray& array(const std::string& name, CalibrationDtype dtype,
                                const std::vector<std::int64_t>& shape, const std::string& what) const {
    constexpr const char* where = "kvq::CalibrationFile::array";
    const std::string expected = detail::concat(what, " (", calibration_dtype_name(dtype), ", shape ",
                                                detail::calib_shape_text(shape, true), ")");
    const CalibrationArray* a = find_array(name);
    if (a == nullptr) {
      throw Error(Status::kFormatError, detail::concat(where, ": array '", name, "' is missing; expected ", expected));
    }
    if (a->dtype != dtype) {
      throw Error(Status::kFormatError, detail::concat(where, ": array '", name, "' has dtype ",
                                                       calibration_dtype_name(a->dtype), "; expected ", expected));
    }
    bool match = a->shape.size() == shape.size();
    for (std::size_t i = 0; match && i < shape.size(); ++i) {
      match = shape[i] == -1 ? a->shape[i] >= 0 : a->shape[i] == shape[i];
    }
    if (!match) {
      throw Error(Status::kFormatError, detail::concat(where, ": array '", name, "' has shape ",
                                                       detail::calib_shape_text(a->shape), "; expected ", expected));
    }
    const std::size_t held = dtype == CalibrationDtype::kInt32 ? a->i32.size() : a->f32.size();
    if (static_cast<std::int64_t>(held) != a->size()) {
      throw Error(Status::kFormatError, detail::concat(where, ": array '", name, "' holds ", held, " values for shape ",
                                                       detail::calib_shape_text(a->shape), "; expected ", a->size(),
                                                       " values (", what, ")"));
    }
    return *a;
  }
};

namespace detail {

// ---- encoding ------------------------------------------------------------------------------

class CalibWriter {
 public:
  explicit CalibWriter(std::size_t reserve) { out_.reserve(reserve); }
  std::size_t size() const { return out_.size(); }
  std::vector<std::uint8_t>& bytes() { return out_; }
  void put(const void* data, std::size_t n) {
    const auto* p = static_cast<const std::uint8_t*>(data);
    out_.insert(out_.end(), p, p + n);
  }
  void u8(std::uint8_t v) { out_.push_back(v); }
  void u16(std::uint16_t v) { put(&v, 2); }
  void u32(std::uint32_t v) { put(&v, 4); }
  void u64(std::uint64_t v) { put(&v, 8); }
  void i64(std::int64_t v) { put(&v, 8); }
  /// Appends the CRC-32 of bytes [from, size()).
  void crc_since(std::size_t from) { u32(crc32(out_.data() + from, out_.size() - from)); }
  void pad8() {
    while (out_.size() % 8 != 0) out_.push_back(0);
  }

 private:
  std::vector<std::uint8_t> out_;
};

[[noreturn]] inline void calib_bad_content(const char* where, Status status, const std::string& field,
                                           const std::string& found, const std::string& expected) {
  throw Error(status, concat(where, ": ", field, " = ", found, "; expected ", expected));
}

inline std::size_t calib_add(std::size_t a, std::uint64_t b, const char* where) {
  if (b > std::numeric_limits<std::size_t>::max() - a) {
    calib_bad_content(where, Status::kInvalidArgument, "encoded size", "more than SIZE_MAX bytes",
                      "a file small enough to address");
  }
  return a + static_cast<std::size_t>(b);
}

/// Validates `file` (see the file comment) and returns its encoded size in bytes.
inline std::size_t calib_validate(const CalibrationFile& file, const char* where) {
  constexpr Status bad = Status::kInvalidArgument;
  if (file.metadata.size() > std::numeric_limits<std::uint32_t>::max()) {
    calib_bad_content(where, bad, "metadata count", std::to_string(file.metadata.size()), "at most 2^32 - 1 entries");
  }
  if (file.arrays.size() > std::numeric_limits<std::uint32_t>::max()) {
    calib_bad_content(where, bad, "array count", std::to_string(file.arrays.size()), "at most 2^32 - 1 arrays");
  }
  std::size_t total = kCalibHeaderBytes;
  std::set<std::string> seen;
  for (std::size_t i = 0; i < file.metadata.size(); ++i) {
    const std::string& key = file.metadata[i].first;
    const std::string& value = file.metadata[i].second;
    const std::string field = concat("metadata[", i, "] key");
    if (!calib_valid_ident(key.data(), key.size(), true)) {
      calib_bad_content(where, bad, field, calib_quote(key) + concat(" (", key.size(), " bytes)"),
                        "1..255 bytes of printable ASCII (0x20..0x7E)");
    }
    if (!seen.insert(key).second) {
      calib_bad_content(where, bad, field, calib_quote(key), "unique metadata keys (this key appears twice)");
    }
    if (value.size() > kCalibMaxValueBytes) {
      calib_bad_content(where, bad, concat("metadata '", key, "' value length"), concat(value.size(), " bytes"),
                        "at most 1048576 bytes (1 MiB)");
    }
    const std::size_t bad_at = calib_utf8_error(value.data(), value.size());
    if (bad_at != value.size()) {
      calib_bad_content(where, bad, concat("metadata '", key, "' value byte ", bad_at),
                        calib_quote(value.data() + bad_at, value.size() - bad_at < 4 ? value.size() - bad_at : 4),
                        "valid UTF-8");
    }
    total = calib_add(total, kCalibMetaFixedBytes + key.size() + value.size(), where);
  }
  seen.clear();
  for (std::size_t i = 0; i < file.arrays.size(); ++i) {
    const CalibrationArray& a = file.arrays[i];
    if (!calib_valid_ident(a.name.data(), a.name.size(), false)) {
      calib_bad_content(where, bad, concat("arrays[", i, "] name"), calib_quote(a.name) + concat(" (", a.name.size(), " bytes)"),
                        "1..255 bytes of printable ASCII without spaces (0x21..0x7E)");
    }
    if (!seen.insert(a.name).second) {
      calib_bad_content(where, bad, concat("arrays[", i, "] name"), calib_quote(a.name),
                        "unique array names (this name appears twice)");
    }
    const std::string label = concat("array '", a.name, "'");
    if (a.dtype != CalibrationDtype::kInt32 && a.dtype != CalibrationDtype::kFloat32) {
      calib_bad_content(where, bad, label + " dtype", concat("code ", static_cast<int>(a.dtype)),
                        "CalibrationDtype::kInt32 (1) or kFloat32 (2)");
    }
    if (a.shape.size() > kCalibMaxRank) {
      calib_bad_content(where, bad, label + " rank", std::to_string(a.shape.size()), "at most 8");
    }
    std::uint64_t count = 1;
    for (std::int64_t e : a.shape) {
      if (e < 0) {
        calib_bad_content(where, bad, label + " shape", calib_shape_text(a.shape), "non-negative extents");
      }
      const auto ue = static_cast<std::uint64_t>(e);
      if (ue != 0 && count > kCalibMaxElements / ue) {
        calib_bad_content(where, bad, label + " shape", calib_shape_text(a.shape),
                          "at most 2^61 elements (the element count overflows)");
      }
      count *= ue;
    }
    const bool is_int = a.dtype == CalibrationDtype::kInt32;
    const std::size_t held = is_int ? a.i32.size() : a.f32.size();
    const std::size_t other = is_int ? a.f32.size() : a.i32.size();
    if (static_cast<std::uint64_t>(held) != count) {
      calib_bad_content(where, bad, concat(label, " ", is_int ? "i32" : "f32", ".size()"), std::to_string(held),
                        concat(count, " values for shape ", calib_shape_text(a.shape)));
    }
    if (other != 0) {
      calib_bad_content(where, bad, concat(label, " ", is_int ? "f32" : "i32", ".size()"), std::to_string(other),
                        concat("0 (the array's dtype is ", calibration_dtype_name(a.dtype), ")"));
    }
    if (!is_int) {
      for (std::size_t k = 0; k < a.f32.size(); ++k) {
        if (!std::isfinite(a.f32[k])) {
          calib_bad_content(where, Status::kNonFiniteInput, concat(label, " element ", k), concat(a.f32[k]),
                            "finite values (calibration data must be finite)");
        }
      }
    }
    total = calib_add(total, kCalibArrayFixedBytes + a.name.size() + 8 * a.shape.size(), where);
    total = calib_add(total, (8 - total % 8) % 8, where);
    total = calib_add(total, count * 4, where);
  }
  return calib_add(total, kCalibTrailerBytes, where);
}

inline std::vector<std::uint8_t> encode_calibration(const CalibrationFile& file, const char* where) {
  const std::size_t total = calib_validate(file, where);
  CalibWriter w(total);
  w.put(kCalibMagic, 8);
  w.u32(kCalibrationFormatVersion);
  w.u32(static_cast<std::uint32_t>(file.metadata.size()));
  w.u32(static_cast<std::uint32_t>(file.arrays.size()));
  w.crc_since(0);
  for (const auto& kv : file.metadata) {
    const std::size_t start = w.size();
    w.u32(static_cast<std::uint32_t>(kv.first.size()));
    w.u32(static_cast<std::uint32_t>(kv.second.size()));
    w.put(kv.first.data(), kv.first.size());
    w.put(kv.second.data(), kv.second.size());
    w.crc_since(start);
  }
  for (const CalibrationArray& a : file.arrays) {
    const bool is_int = a.dtype == CalibrationDtype::kInt32;
    const void* payload = is_int ? static_cast<const void*>(a.i32.data()) : static_cast<const void*>(a.f32.data());
    const std::size_t payload_bytes = 4 * (is_int ? a.i32.size() : a.f32.size());
    const std::size_t start = w.size();
    w.u32(static_cast<std::uint32_t>(a.name.size()));
    w.u8(static_cast<std::uint8_t>(a.dtype));
    w.u8(static_cast<std::uint8_t>(a.shape.size()));
    w.u16(0);
    w.u64(static_cast<std::uint64_t>(payload_bytes));
    w.u32(crc32(payload, payload_bytes));
    w.put(a.name.data(), a.name.size());
    for (std::int64_t e : a.shape) w.i64(e);
    w.crc_since(start);
    w.pad8();
    w.put(payload, payload_bytes);
  }
  w.crc_since(0);
  w.put(kCalibEndMarker, 8);
  return std::move(w.bytes());
}

// ---- decoding ------------------------------------------------------------------------------

/// Bounds-checked little-endian reader over the bytes of one file; every failure throws
/// kvq::Error(kFormatError) naming `where`, the source, the field, the value and the expectation.
class CalibReader {
 public:
  CalibReader(const std::uint8_t* bytes, std::size_t n, const std::string& source, const char* where)
      : p_(bytes), n_(n), source_(source), where_(where) {}

  [[noreturn]] void fail(const std::string& found, const std::string& expected) const {
    throw Error(Status::kFormatError, concat(where_, ": file '", source_, "': ", found, "; expected ", expected));
  }

  std::size_t pos() const { return pos_; }
  std::size_t remaining() const { return n_ - pos_; }
  const std::uint8_t* at(std::size_t offset) const { return p_ + offset; }

  /// Fails unless `k` more bytes exist for `what`.
  void need(std::uint64_t k, const std::string& what) const {
    if (k > remaining()) {
      fail(concat(what, " at offset ", pos_, " needs ", k, " bytes but only ", remaining(), " remain of ", n_),
           "a complete file (it is truncated or a length field is corrupt)");
    }
  }
  const std::uint8_t* take(std::size_t k, const std::string& what) {
    need(k, what);
    const std::uint8_t* q = p_ + pos_;
    pos_ += k;
    return q;
  }
  template <class T>
  T get(const std::string& what) {
    T v;
    std::memcpy(&v, take(sizeof(T), what), sizeof(T));
    return v;
  }
  /// Fails unless the stored CRC at the cursor equals the CRC of bytes [from, pos()).
  void check_crc(std::size_t from, const std::string& section) {
    const std::uint32_t computed = crc32(p_ + from, pos_ - from);
    const std::size_t at_offset = pos_;
    const auto stored = get<std::uint32_t>(section + " CRC");
    if (stored != computed) {
      fail(concat(section, " CRC at offset ", at_offset, " = ", hex(stored)),
           concat(hex(computed), " (the ", section, " is corrupt)"));
    }
  }
  /// Skips the zero padding up to the next multiple of 8.
  void skip_padding(const std::string& section) {
    const std::size_t pad = (8 - pos_ % 8) % 8;
    const std::size_t start = pos_;
    const std::uint8_t* q = take(pad, section + " padding");
    for (std::size_t i = 0; i < pad; ++i) {
      if (q[i] != 0) {
        fail(concat(section, " padding byte at offset ", start + i, " = ", static_cast<unsigned>(q[i])),
             "0 (padding must be zero)");
      }
    }
  }

  static std::string hex(std::uint32_t v) {
    static const char kHex[] = "0123456789abcdef";
    std::string s = "0x";
    for (int shift = 28; shift >= 0; shift -= 4) s += kHex[(v >> shift) & 0xF];
    return s;
  }

 private:
  const std::uint8_t* p_;
  std::size_t n_;
  std::size_t pos_ = 0;
  const std::string& source_;
  const char* where_;
};

inline CalibrationFile decode_calibration(const std::uint8_t* bytes, std::size_t n, const std::string& source,
                                          const char* where) {
  if (bytes == nullptr && n > 0) throw_argument_error(where, "bytes", "null", concat(n, " readable bytes"));
  CalibReader r(bytes, n, source, where);
  const std::size_t minimum = kCalibHeaderBytes + kCalibTrailerBytes;
  // Header: magic first (on what exists), then size, version, CRC.
  if (n > 0 && std::memcmp(bytes, kCalibMagic, n < 8 ? n : 8) != 0) {
    r.fail(concat("magic ", calib_quote(bytes, n < 8 ? n : 8)), "'KVQCALIB' (this is not a kvq calibration file)");
  }
  if (n < minimum) {
    r.fail(concat(n, " bytes, too short for a calibration file"),
           concat("at least ", minimum, " bytes (24-byte header and 12-byte trailer; the file is truncated)"));
  }
  r.take(8, "magic");
  const auto version = r.get<std::uint32_t>("format version");
  if (version != kCalibrationFormatVersion) {
    r.fail(concat("format version ", version),
           concat(kCalibrationFormatVersion,
                  version > kCalibrationFormatVersion
                      ? " (the file was written by a newer kvq; upgrade kvq to read it)"
                      : " (no kvq writes this version; the file is corrupt)"));
  }
  const auto meta_count = r.get<std::uint32_t>("metadata count");
  const auto array_count = r.get<std::uint32_t>("array count");
  r.check_crc(0, "header");
  {
    const std::uint64_t least = static_cast<std::uint64_t>(meta_count) * (kCalibMetaFixedBytes + 1) +
                                static_cast<std::uint64_t>(array_count) * (kCalibArrayFixedBytes + 1) +
                                kCalibTrailerBytes;
    if (least > r.remaining()) {
      r.fail(concat("header counts of ", meta_count, " metadata entries and ", array_count,
                    " arrays, which need at least ", least, " bytes after the header, in a file with ",
                    r.remaining()),
             "counts that fit the file (it is truncated or the header is corrupt)");
    }
  }

  CalibrationFile out;
  std::set<std::string> seen;
  out.metadata.reserve(meta_count);
  for (std::uint32_t i = 0; i < meta_count; ++i) {
    const std::string entry = concat("metadata entry ", i);
    const std::size_t start = r.pos();
    const auto key_len = r.get<std::uint32_t>(entry + " key length");
    const auto value_len = r.get<std::uint32_t>(entry + " value length");
    if (key_len == 0 || key_len > kCalibMaxNameBytes) {
      r.fail(concat(entry, " (offset ", start, ") key length ", key_len), "1..255 bytes");
    }
    if (value_len > kCalibMaxValueBytes) {
      r.fail(concat(entry, " (offset ", start, ") value length ", value_len), "at most 1048576 bytes (1 MiB)");
    }
    r.need(std::uint64_t{key_len} + value_len + 4, entry + " key, value and CRC");
    const std::uint8_t* key = r.take(key_len, entry + " key");
    const std::uint8_t* value = r.take(value_len, entry + " value");
    r.check_crc(start, concat(entry, " (key ", calib_quote(key, key_len), ")"));
    if (!calib_valid_ident(key, key_len, true)) {
      r.fail(concat(entry, " key ", calib_quote(key, key_len)), "1..255 bytes of printable ASCII (0x20..0x7E)");
    }
    std::string k(reinterpret_cast<const char*>(key), key_len);
    const std::size_t bad_at = calib_utf8_error(value, value_len);
    if (bad_at != value_len) {
      r.fail(concat("metadata '", k, "' value byte ", bad_at, " ",
                    calib_quote(value + bad_at, value_len - bad_at < 4 ? value_len - bad_at : 4)),
             "valid UTF-8");
    }
    if (!seen.insert(k).second) {
      r.fail(concat(entry, " key '", k, "', which an earlier entry already has"), "unique metadata keys");
    }
    out.metadata.emplace_back(std::move(k), std::string(reinterpret_cast<const char*>(value), value_len));
  }

  seen.clear();
  out.arrays.reserve(array_count);
  for (std::uint32_t i = 0; i < array_count; ++i) {
    const std::string record = concat("array record ", i);
    const std::size_t start = r.pos();
    const auto name_len = r.get<std::uint32_t>(record + " name length");
    const auto dtype_code = r.get<std::uint8_t>(record + " dtype");
    const auto rank = r.get<std::uint8_t>(record + " rank");
    const auto reserved = r.get<std::uint16_t>(record + " reserved field");
    const auto payload_len = r.get<std::uint64_t>(record + " payload length");
    const auto payload_crc = r.get<std::uint32_t>(record + " payload CRC");
    if (name_len == 0 || name_len > kCalibMaxNameBytes) {
      r.fail(concat(record, " (offset ", start, ") name length ", name_len), "1..255 bytes");
    }
    if (rank > kCalibMaxRank) {
      r.fail(concat(record, " (offset ", start, ") rank ", static_cast<unsigned>(rank)), "a rank of at most 8");
    }
    r.need(std::uint64_t{name_len} + 8u * rank + 4, record + " name, extents and CRC");
    const std::uint8_t* name = r.take(name_len, record + " name");
    std::vector<std::int64_t> shape(rank);
    if (rank > 0) std::memcpy(shape.data(), r.take(8u * rank, record + " extents"), 8u * rank);
    const std::string quoted = calib_quote(name, name_len);
    r.check_crc(start, "array " + quoted + " record");
    if (!calib_valid_ident(name, name_len, false)) {
      r.fail(concat(record, " name ", quoted), "1..255 bytes of printable ASCII without spaces (0x21..0x7E)");
    }
    std::string nm(reinterpret_cast<const char*>(name), name_len);
    const std::string label = "array '" + nm + "'";
    if (!seen.insert(nm).second) {
      r.fail(concat(record, " name '", nm, "', which an earlier array already has"), "unique array names");
    }
    if (dtype_code != static_cast<std::uint8_t>(CalibrationDtype::kInt32) &&
        dtype_code != static_cast<std::uint8_t>(CalibrationDtype::kFloat32)) {
      r.fail(concat(label, " dtype code ", static_cast<unsigned>(dtype_code)), "1 (int32) or 2 (float32)");
    }
    if (reserved != 0) r.fail(concat(label, " reserved field ", reserved), "0");
    std::uint64_t count = 1;
    for (std::int64_t e : shape) {
      if (e < 0) r.fail(concat(label, " shape ", calib_shape_text(shape)), "non-negative extents");
      const auto ue = static_cast<std::uint64_t>(e);
      if (ue != 0 && count > kCalibMaxElements / ue) {
        r.fail(concat(label, " shape ", calib_shape_text(shape), ", whose element count overflows"),
               "at most 2^61 elements");
      }
      count *= ue;
    }
    if (payload_len != 4 * count) {
      r.fail(concat(label, " payload length ", payload_len, " bytes"),
                    concat(4 * count, " bytes (4 per element) for shape ", calib_shape_text(shape)));
    }
    r.skip_padding(label);
    r.need(payload_len, label + " payload");  // before any allocation
    const auto payload_bytes = static_cast<std::size_t>(payload_len);
    const std::size_t payload_at = r.pos();
    const std::uint8_t* payload = r.take(payload_bytes, label + " payload");
    const std::uint32_t computed = crc32(payload, payload_bytes);
    if (computed != payload_crc) {
      r.fail(concat(label, " payload CRC ", CalibReader::hex(payload_crc), " (stored at offset ", start + 16, ")"),
             concat(CalibReader::hex(computed), " (the payload at offset ", payload_at, " is corrupt)"));
    }
    CalibrationArray a;
    a.name = std::move(nm);
    a.dtype = static_cast<CalibrationDtype>(dtype_code);
    a.shape = std::move(shape);
    const auto elements = static_cast<std::size_t>(count);
    if (a.dtype == CalibrationDtype::kInt32) {
      a.i32.resize(elements);
      if (payload_bytes > 0) std::memcpy(a.i32.data(), payload, payload_bytes);
    } else {
      a.f32.resize(elements);
      if (payload_bytes > 0) std::memcpy(a.f32.data(), payload, payload_bytes);
      for (std::size_t k = 0; k < elements; ++k) {
        if (!std::isfinite(a.f32[k])) {
          r.fail(concat(label, " element ", k, " = ", a.f32[k]), "finite values (calibration data must be finite)");
        }
      }
    }
    out.arrays.push_back(std::move(a));
  }

  // Trailer: exactly the file CRC and the end marker remain.
  if (r.remaining() != kCalibTrailerBytes) {
    if (r.remaining() < kCalibTrailerBytes) {
      r.fail(concat(r.remaining(), " bytes after the last array at offset ", r.pos()),
             "the 12-byte trailer (file CRC and end marker; the file is truncated)");
    }
    r.fail(concat(r.remaining() - kCalibTrailerBytes, " trailing bytes after the trailer (file size ", n, ")"),
           concat("the file to end at offset ", r.pos() + kCalibTrailerBytes,
                  ", after the 12-byte trailer that follows the last array"));
  }
  r.check_crc(0, "file");
  const std::uint8_t* marker = r.take(8, "end marker");
  if (std::memcmp(marker, kCalibEndMarker, 8) != 0) {
    r.fail(concat("end marker ", calib_quote(marker, 8), " at offset ", n - 8), "'CALIBEND'");
  }
  return out;
}

[[noreturn]] inline void calib_io_fail(const char* where, const std::string& path, const std::string& found,
                                       const std::string& expected) {
  throw Error(Status::kIoError, concat(where, ": file '", path, "': ", found, "; expected ", expected));
}

}  // namespace detail

/// Encodes `file` in the format of the file comment after validating it: keys, names, value
/// sizes and UTF-8, uniqueness, dtypes, ranks, extents, data sizes against shapes (the vector of
/// the other dtype must be empty) and finite floats. Throws kvq::Error(kInvalidArgument), or
/// kvq::Error(kNonFiniteInput) for NaN/Inf, naming the field, the value and what was expected.
inline std::vector<std::uint8_t> encode_calibration_file(const CalibrationFile& file) {
  return detail::encode_calibration(file, "kvq::encode_calibration_file");
}

/// Decodes and fully validates the n bytes of a calibration file. `source` names the file in
/// messages. Throws kvq::Error(kFormatError) on any deviation from the format (see the file
/// comment); never returns a partially decoded file.
inline CalibrationFile decode_calibration_file(const std::uint8_t* bytes, std::size_t n, const std::string& source) {
  return detail::decode_calibration(bytes, n, source, "kvq::decode_calibration_file");
}

/// Validates, encodes and writes `file` to `path` through `path + ".kvq-partial"` renamed into
/// place: the file appears complete or not at all. Throws what encode_calibration_file throws,
/// and kvq::Error(kIoError) naming the path when it cannot be written.
inline void write_calibration_file(const std::string& path, const CalibrationFile& file) {
  constexpr const char* where = "kvq::write_calibration_file";
  const std::vector<std::uint8_t> bytes = detail::encode_calibration(file, where);
  const std::string tmp = path + ".kvq-partial";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) detail::calib_io_fail(where, path, "cannot be created", "a writable path in an existing directory");
  const bool written = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const bool closed = std::fclose(f) == 0;
  if (!written || !closed) {
    std::remove(tmp.c_str());
    detail::calib_io_fail(where, path, "write failed", "a writable path with free space");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    detail::calib_io_fail(where, path, "cannot be renamed into place", "a writable path");
  }
}

/// Reads and decodes the calibration file at `path`. Throws kvq::Error(kIoError) naming the path
/// when it cannot be opened or read, and what decode_calibration_file throws otherwise.
inline CalibrationFile read_calibration_file(const std::string& path) {
  constexpr const char* where = "kvq::read_calibration_file";
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) detail::calib_io_fail(where, path, "cannot be opened", "a readable file");
  std::vector<std::uint8_t> bytes;
  std::uint8_t chunk[16384];
  while (true) {
    const std::size_t got = std::fread(chunk, 1, sizeof(chunk), f);
    bytes.insert(bytes.end(), chunk, chunk + got);
    if (got < sizeof(chunk)) break;
  }
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) detail::calib_io_fail(where, path, "read failed", "a readable regular file");
  return detail::decode_calibration(bytes.data(), bytes.size(), path, where);
}

}  // namespace kvq
