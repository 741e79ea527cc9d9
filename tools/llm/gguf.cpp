// SPDX-License-Identifier: Apache-2.0
#include "llm/gguf.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <type_traits>
#include <utility>

#include "kvq/core/error.hpp"
#include "kvq/core/float_types.hpp"
#include "kvq/quant/decode_affine.hpp"

namespace kvq::llm {
namespace {

constexpr std::uint64_t kHeaderBytes = 24;  // magic, version, tensor count, kv count
constexpr int kMaxArrayDepth = 16;
constexpr std::uint32_t kMaxDims = 4;  // GGML_MAX_DIMS
// Smallest possible encodings, used to bound counts by the bytes left in the file.
constexpr std::uint64_t kMinKvBytes = 8 + 4 + 1;          // empty key, type, 1-byte value
constexpr std::uint64_t kMinTensorBytes = 8 + 4 + 4 + 8;  // empty name, n_dims = 0, type, offset

[[noreturn]] void format_error(const std::string& message) {
  throw kvq::Error(kvq::Status::kFormatError, message);
}

std::string show(std::string_view s) {
  constexpr std::size_t kMax = 80;
  std::string out = "'";
  for (std::size_t i = 0; i < s.size() && i < kMax; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7F) {
      out.push_back(static_cast<char>(c));
    } else {
      out += fmt::format("\\x{:02x}", c);
    }
  }
  if (s.size() > kMax) out += "...";
  return out + "'";
}

std::uint64_t min_value_bytes(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
    case GgufValueType::kString:
      return 8;
    case GgufValueType::kArray:
      return 12;
  }
  return 0;
}

bool known_value_type(std::uint32_t t) {
  return t <= static_cast<std::uint32_t>(GgufValueType::kFloat64);
}

bool is_integer(GgufValueType t) {
  switch (t) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
      return true;
    default:
      return false;
  }
}

/// Sequential little-endian reads over the file's bytes; every read is bounds-checked and a
/// short read names what was being read.
class Reader {
 public:
  Reader(const std::vector<std::uint8_t>& bytes, const std::string& file)
      : data_(bytes.data()), size_(bytes.size()), file_(file) {}

  std::uint64_t pos() const noexcept { return pos_; }
  std::uint64_t remaining() const noexcept { return size_ - pos_; }
  const std::string& file() const noexcept { return file_; }

  template <class Describe>
  void need(std::uint64_t n, const Describe& what) const {
    if (n > remaining()) {
      format_error(fmt::format(
          "GGUF file '{}' is truncated: {} at byte {} needs {} bytes, but the file ends "
          "after {} more (file size {})",
          file_, what(), pos_, n, remaining(), size_));
    }
  }

  template <class Describe>
  std::uint64_t uint(int width, const Describe& what) {
    need(static_cast<std::uint64_t>(width), what);
    std::uint64_t v = 0;
    for (int i = 0; i < width; ++i)
      v |= static_cast<std::uint64_t>(data_[pos_ + static_cast<std::uint64_t>(i)]) << (8 * i);
    pos_ += static_cast<std::uint64_t>(width);
    return v;
  }
  template <class Describe>
  std::uint32_t u32(const Describe& what) {
    return static_cast<std::uint32_t>(uint(4, what));
  }
  template <class Describe>
  std::uint64_t u64(const Describe& what) {
    return uint(8, what);
  }

  template <class Describe>
  std::string string(const Describe& what) {
    const std::uint64_t at = pos_;
    const std::uint64_t length = u64([&] { return "the length of " + what(); });
    if (length > remaining()) {
      format_error(fmt::format(
          "GGUF file '{}': {} at byte {} has length {}; expected at most the {} bytes left "
          "in the file (truncated or corrupt file)",
          file_, what(), at, length, remaining()));
    }
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<std::size_t>(length));
    pos_ += length;
    return s;
  }

 private:
  const std::uint8_t* data_;
  std::uint64_t size_;
  std::uint64_t pos_ = 0;
  const std::string& file_;
};

float f32_from_bits(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

double f64_from_bits(std::uint64_t bits) {
  double f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// A non-owning callable that describes what is being read; evaluated only for messages.
class Describe {
 public:
  template <class F, class = std::enable_if_t<!std::is_same_v<std::decay_t<F>, Describe>>>
  Describe(const F& f)  // NOLINT(google-explicit-constructor): built from lambdas at call sites
      : object_(&f), call_([](const void* o) { return (*static_cast<const F*>(o))(); }) {}
  std::string operator()() const { return call_(object_); }

 private:
  const void* object_;
  std::string (*call_)(const void*);
};

/// Reads one value of `type`; `what` describes it for messages.
GgufValue read_value(Reader& r, GgufValueType type, int depth, const Describe& what) {
  GgufValue v;
  v.type = type;
  switch (type) {
    case GgufValueType::kUint8:
      v.data = r.uint(1, what);
      break;
    case GgufValueType::kUint16:
      v.data = r.uint(2, what);
      break;
    case GgufValueType::kUint32:
      v.data = r.uint(4, what);
      break;
    case GgufValueType::kUint64:
      v.data = r.uint(8, what);
      break;
    case GgufValueType::kInt8:
      v.data = static_cast<std::int64_t>(static_cast<std::int8_t>(r.uint(1, what)));
      break;
    case GgufValueType::kInt16:
      v.data = static_cast<std::int64_t>(static_cast<std::int16_t>(r.uint(2, what)));
      break;
    case GgufValueType::kInt32:
      v.data = static_cast<std::int64_t>(static_cast<std::int32_t>(r.uint(4, what)));
      break;
    case GgufValueType::kInt64:
      v.data = static_cast<std::int64_t>(r.uint(8, what));
      break;
    case GgufValueType::kFloat32:
      v.data = static_cast<double>(f32_from_bits(r.u32(what)));
      break;
    case GgufValueType::kFloat64:
      v.data = f64_from_bits(r.u64(what));
      break;
    case GgufValueType::kBool: {
      const std::uint64_t at = r.pos();
      const std::uint64_t b = r.uint(1, what);
      if (b > 1) {
        format_error(
            fmt::format("GGUF file '{}': {} at byte {} is a bool stored as {}; expected 0 or 1",
                        r.file(), what(), at, b));
      }
      v.data = b;
      break;
    }
    case GgufValueType::kString:
      v.data = r.string(what);
      break;
    case GgufValueType::kArray: {
      if (depth >= kMaxArrayDepth) {
        format_error(
            fmt::format("GGUF file '{}': {} at byte {} nests arrays {} deep; expected at most {}",
                        r.file(), what(), r.pos(), depth + 1, kMaxArrayDepth));
      }
      const std::uint64_t type_at = r.pos();
      const std::uint32_t raw_type = r.u32([&] { return "the element type of " + what(); });
      if (!known_value_type(raw_type)) {
        format_error(fmt::format(
            "GGUF file '{}': {} at byte {} has element type {}; expected a GGUF value type "
            "0..12",
            r.file(), what(), type_at, raw_type));
      }
      const auto element_type = static_cast<GgufValueType>(raw_type);
      const std::uint64_t count_at = r.pos();
      const std::uint64_t count = r.u64([&] { return "the element count of " + what(); });
      const std::uint64_t fit = r.remaining() / min_value_bytes(element_type);
      if (count > fit) {
        format_error(fmt::format(
            "GGUF file '{}': {} at byte {} has {} elements of type {}; expected at most {}, as "
            "many as the {} bytes left in the file can hold (truncated or corrupt file)",
            r.file(), what(), count_at, count, gguf_value_type_name(element_type), fit,
            r.remaining()));
      }
      GgufArray a;
      a.element_type = element_type;
      a.items.reserve(static_cast<std::size_t>(count));
      for (std::uint64_t i = 0; i < count; ++i) {
        a.items.push_back(read_value(r, element_type, depth + 1, Describe([&] {
                                       return fmt::format("element {} of {}", i, what());
                                     })));
      }
      v.data = std::move(a);
      break;
    }
  }
  return v;
}

std::string value_text(const GgufValue& v) {
  switch (v.data.index()) {
    case 0:
      return std::to_string(std::get<std::uint64_t>(v.data));
    case 1:
      return std::to_string(std::get<std::int64_t>(v.data));
    case 2:
      return fmt::format("{}", std::get<double>(v.data));
    case 3:
      return show(std::get<std::string>(v.data));
    default:
      return fmt::format("[{} elements]", std::get<GgufArray>(v.data).items.size());
  }
}

bool multiply(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  return !__builtin_mul_overflow(a, b, &out);
}

/// False when some element is NaN or Inf (exponent bits all ones); branch-free so that it
/// vectorizes.
bool all_finite(const float* p, std::size_t n) {
  std::uint32_t bad = 0;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t b;
    std::memcpy(&b, p + i, sizeof b);
    bad |= static_cast<std::uint32_t>((b & 0x7F800000u) == 0x7F800000u);
  }
  return bad == 0;
}

float half(const std::uint8_t* p) {
  return kvq::Float16::from_bits(static_cast<std::uint16_t>(p[0] | (p[1] << 8))).to_float();
}

void dequantize_q4_0(const std::uint8_t* src, std::size_t blocks, float* out) {
  for (std::size_t b = 0; b < blocks; ++b, src += 18, out += 32) {
    const float d = half(src);
    const std::uint8_t* q = src + 2;
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>((q[j] & 0x0F) - 8) * d;
      out[j + 16] = static_cast<float>((q[j] >> 4) - 8) * d;
    }
  }
}

void dequantize_q4_1(const std::uint8_t* src, std::size_t blocks, float* out) {
  for (std::size_t b = 0; b < blocks; ++b, src += 20, out += 32) {
    const float d = half(src);
    const float m = half(src + 2);
    const std::uint8_t* q = src + 4;
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(q[j] & 0x0F) * d + m;
      out[j + 16] = static_cast<float>(q[j] >> 4) * d + m;
    }
  }
}

void dequantize_q8_0(const std::uint8_t* src, std::size_t blocks, float* out) {
  for (std::size_t b = 0; b < blocks; ++b, src += 34, out += 32) {
    const float d = half(src);
    const std::uint8_t* q = src + 2;
    for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(static_cast<std::int8_t>(q[j])) * d;
  }
}

void dequantize_f16(const std::uint8_t* src, std::size_t n, float* out) {
  constexpr std::size_t kChunk = 2048;
  std::array<std::uint16_t, kChunk> buffer;  // the source may be only byte-aligned
  for (std::size_t i = 0; i < n; i += kChunk) {
    const std::size_t m = std::min(kChunk, n - i);
    std::memcpy(buffer.data(), src + 2 * i, 2 * m);
    kvq::half_to_float(buffer.data(), static_cast<kvq::index_t>(m), out + i);
  }
}

void dequantize_bf16(const std::uint8_t* src, std::size_t n, float* out) {
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t bits = static_cast<std::uint32_t>(src[2 * i] | (src[2 * i + 1] << 8)) << 16;
    std::memcpy(out + i, &bits, sizeof bits);
  }
}

}  // namespace

std::string gguf_value_type_name(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
      return "uint8";
    case GgufValueType::kInt8:
      return "int8";
    case GgufValueType::kUint16:
      return "uint16";
    case GgufValueType::kInt16:
      return "int16";
    case GgufValueType::kUint32:
      return "uint32";
    case GgufValueType::kInt32:
      return "int32";
    case GgufValueType::kFloat32:
      return "float32";
    case GgufValueType::kBool:
      return "bool";
    case GgufValueType::kString:
      return "string";
    case GgufValueType::kArray:
      return "array";
    case GgufValueType::kUint64:
      return "uint64";
    case GgufValueType::kInt64:
      return "int64";
    case GgufValueType::kFloat64:
      return "float64";
  }
  return "type " + std::to_string(static_cast<std::uint32_t>(type));
}

std::optional<GgmlTypeTraits> ggml_type_traits(std::uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32:
      return GgmlTypeTraits{"f32", 1, 4};
    case GgmlType::kF16:
      return GgmlTypeTraits{"f16", 1, 2};
    case GgmlType::kQ4_0:
      return GgmlTypeTraits{"q4_0", 32, 18};
    case GgmlType::kQ4_1:
      return GgmlTypeTraits{"q4_1", 32, 20};
    case GgmlType::kQ5_0:
      return GgmlTypeTraits{"q5_0", 32, 22};
    case GgmlType::kQ5_1:
      return GgmlTypeTraits{"q5_1", 32, 24};
    case GgmlType::kQ8_0:
      return GgmlTypeTraits{"q8_0", 32, 34};
    case GgmlType::kQ8_1:
      return GgmlTypeTraits{"q8_1", 32, 36};
    case GgmlType::kQ2_K:
      return GgmlTypeTraits{"q2_K", 256, 84};
    case GgmlType::kQ3_K:
      return GgmlTypeTraits{"q3_K", 256, 110};
    case GgmlType::kQ4_K:
      return GgmlTypeTraits{"q4_K", 256, 144};
    case GgmlType::kQ5_K:
      return GgmlTypeTraits{"q5_K", 256, 176};
    case GgmlType::kQ6_K:
      return GgmlTypeTraits{"q6_K", 256, 210};
    case GgmlType::kQ8_K:
      return GgmlTypeTraits{"q8_K", 256, 292};
    case GgmlType::kIQ2_XXS:
      return GgmlTypeTraits{"iq2_xxs", 256, 66};
    case GgmlType::kIQ2_XS:
      return GgmlTypeTraits{"iq2_xs", 256, 74};
    case GgmlType::kIQ3_XXS:
      return GgmlTypeTraits{"iq3_xxs", 256, 98};
    case GgmlType::kIQ1_S:
      return GgmlTypeTraits{"iq1_s", 256, 50};
    case GgmlType::kIQ4_NL:
      return GgmlTypeTraits{"iq4_nl", 32, 18};
    case GgmlType::kIQ3_S:
      return GgmlTypeTraits{"iq3_s", 256, 110};
    case GgmlType::kIQ2_S:
      return GgmlTypeTraits{"iq2_s", 256, 82};
    case GgmlType::kIQ4_XS:
      return GgmlTypeTraits{"iq4_xs", 256, 136};
    case GgmlType::kI8:
      return GgmlTypeTraits{"i8", 1, 1};
    case GgmlType::kI16:
      return GgmlTypeTraits{"i16", 1, 2};
    case GgmlType::kI32:
      return GgmlTypeTraits{"i32", 1, 4};
    case GgmlType::kI64:
      return GgmlTypeTraits{"i64", 1, 8};
    case GgmlType::kF64:
      return GgmlTypeTraits{"f64", 1, 8};
    case GgmlType::kIQ1_M:
      return GgmlTypeTraits{"iq1_m", 256, 56};
    case GgmlType::kBF16:
      return GgmlTypeTraits{"bf16", 1, 2};
    case GgmlType::kTQ1_0:
      return GgmlTypeTraits{"tq1_0", 256, 54};
    case GgmlType::kTQ2_0:
      return GgmlTypeTraits{"tq2_0", 256, 66};
    case GgmlType::kMXFP4:
      return GgmlTypeTraits{"mxfp4", 32, 17};
  }
  return std::nullopt;
}

std::string ggml_type_name(std::uint32_t type) {
  const auto traits = ggml_type_traits(type);
  return traits ? std::string(traits->name) : "unknown type " + std::to_string(type);
}

std::string GgufValue::type_text() const {
  if (type != GgufValueType::kArray) return gguf_value_type_name(type);
  const auto& a = std::get<GgufArray>(data);
  if (a.element_type == GgufValueType::kArray && !a.items.empty())
    return "array of " + a.items.front().type_text();
  return "array of " + gguf_value_type_name(a.element_type);
}

std::string GgufTensorInfo::dims_text() const {
  std::string s = "[";
  for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

GgufFile GgufFile::open(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    const std::string why = ec                                  ? ec.message()
                            : std::filesystem::exists(path, ec) ? std::string("not a regular file")
                                                                : std::string("no such file");
    throw kvq::Error(kvq::Status::kIoError,
                     fmt::format("cannot open GGUF file '{}': {}", path, why));
  }
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  std::ifstream in(path, std::ios::binary);
  if (ec || !in) {
    throw kvq::Error(kvq::Status::kIoError, fmt::format("cannot open GGUF file '{}': {}", path,
                                                        ec ? ec.message() : std::strerror(errno)));
  }
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size));
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  if (static_cast<std::uintmax_t>(in.gcount()) != size) {
    throw kvq::Error(
        kvq::Status::kIoError,
        fmt::format("cannot read GGUF file '{}': got {} of its {} bytes", path, in.gcount(), size));
  }
  return parse(std::move(bytes), path);
}

GgufFile GgufFile::parse(std::vector<std::uint8_t> bytes, std::string name_for_messages) {
  GgufFile g;
  g.name_ = std::move(name_for_messages);
  g.bytes_ = std::move(bytes);
  const std::string& file = g.name_;
  const std::uint64_t size = g.bytes_.size();

  if (size < 4 || std::memcmp(g.bytes_.data(), "GGUF", 4) != 0) {
    const std::string start(reinterpret_cast<const char*>(g.bytes_.data()),
                            std::min<std::size_t>(4, g.bytes_.size()));
    format_error(
        fmt::format("GGUF file '{}': magic at byte 0 is {}; expected 'GGUF'", file, show(start)));
  }
  if (size < kHeaderBytes) {
    format_error(
        fmt::format("GGUF file '{}' is truncated: the header needs {} bytes, the file has {}", file,
                    kHeaderBytes, size));
  }
  Reader r(g.bytes_, file);
  (void)r.u32([] { return std::string("magic"); });
  g.version_ = r.u32([] { return std::string("version"); });
  if (g.version_ != 2 && g.version_ != 3) {
    const std::uint32_t v = g.version_;
    const std::uint32_t swapped =
        (v >> 24) | ((v >> 8) & 0xFF00u) | ((v << 8) & 0xFF0000u) | (v << 24);
    format_error(fmt::format("GGUF file '{}': version at byte 4 is {}{}; expected 2 or 3", file, v,
                             swapped == 2 || swapped == 3 ? " (a big-endian file?)"
                             : v == 1                     ? " (GGUF v1, not supported)"
                                                          : ""));
  }
  const std::uint64_t tensor_count = r.u64([] { return std::string("tensor count"); });
  const std::uint64_t kv_count = r.u64([] { return std::string("metadata kv count"); });
  if (kv_count > r.remaining() / kMinKvBytes) {
    format_error(fmt::format(
        "GGUF file '{}': metadata kv count at byte 16 is {}; expected at most {}, as many as the "
        "{} bytes after the header can hold (truncated or corrupt file)",
        file, kv_count, r.remaining() / kMinKvBytes, r.remaining()));
  }

  g.metadata_.reserve(static_cast<std::size_t>(kv_count));
  for (std::uint64_t i = 0; i < kv_count; ++i) {
    GgufKeyValue kv;
    kv.offset = r.pos();
    kv.key = r.string([&] { return fmt::format("the key of metadata entry {}", i); });
    const std::uint64_t type_at = r.pos();
    const std::uint32_t raw_type =
        r.u32([&] { return fmt::format("the value type of key {}", show(kv.key)); });
    if (!known_value_type(raw_type)) {
      format_error(fmt::format(
          "GGUF file '{}': value type of key {} at byte {} is {}; expected a GGUF value type "
          "0..12",
          file, show(kv.key), type_at, raw_type));
    }
    kv.value =
        read_value(r, static_cast<GgufValueType>(raw_type), 0,
                   Describe([&] { return fmt::format("the value of key {}", show(kv.key)); }));
    if (!g.metadata_index_.emplace(kv.key, g.metadata_.size()).second) {
      format_error(fmt::format(
          "GGUF file '{}': metadata key {} at byte {} appears twice; expected unique keys", file,
          show(kv.key), kv.offset));
    }
    g.metadata_.push_back(std::move(kv));
  }

  if (g.has("general.alignment")) {
    const std::uint32_t a = g.get_u32("general.alignment");
    if (a == 0 || (a & (a - 1)) != 0) {
      format_error(
          fmt::format("GGUF file '{}': general.alignment at byte {} is {}; expected a power of two",
                      file, g.find("general.alignment")->offset, a));
    }
    g.alignment_ = a;
  }

  if (tensor_count > r.remaining() / kMinTensorBytes) {
    format_error(fmt::format(
        "GGUF file '{}': tensor count at byte 8 is {}; expected at most {}, as many as the {} "
        "bytes after the metadata can hold (truncated or corrupt file)",
        file, tensor_count, r.remaining() / kMinTensorBytes, r.remaining()));
  }
  g.tensors_.reserve(static_cast<std::size_t>(tensor_count));
  for (std::uint64_t i = 0; i < tensor_count; ++i) {
    GgufTensorInfo t;
    t.entry_offset = r.pos();
    t.name = r.string([&] { return fmt::format("the name of tensor {}", i); });
    const std::string who = fmt::format("tensor {} at byte {}", show(t.name), t.entry_offset);
    const std::uint64_t dims_at = r.pos();
    const std::uint32_t n_dims = r.u32([&] { return "the dimension count of " + who; });
    if (n_dims > kMaxDims) {
      format_error(fmt::format(
          "GGUF file '{}': {} has {} dimensions (n_dims at byte {}); expected at most {}", file,
          who, n_dims, dims_at, kMaxDims));
    }
    t.elements = 1;
    bool overflow = false;
    for (std::uint32_t d = 0; d < n_dims; ++d) {
      t.dims.push_back(r.u64([&] { return fmt::format("dimension {} of {}", d, who); }));
      overflow = overflow || !multiply(t.elements, t.dims.back(), t.elements);
    }
    const std::uint64_t type_at = r.pos();
    t.type = r.u32([&] { return "the type of " + who; });
    t.offset = r.u64([&] { return "the data offset of " + who; });
    const auto traits = ggml_type_traits(t.type);
    if (!traits) {
      format_error(fmt::format(
          "GGUF file '{}': {} has ggml type {} (at byte {}); expected a known ggml type such "
          "as 0 (f32), 1 (f16), 3 (q4_1) or 8 (q8_0)",
          file, who, t.type, type_at));
    }
    if (overflow) {
      format_error(fmt::format("GGUF file '{}': {} has dims {} whose product overflows 64 bits",
                               file, who, t.dims_text()));
    }
    const std::uint64_t ne0 = t.dims.empty() ? 1 : t.dims.front();
    if (ne0 % traits->block_elements != 0) {
      format_error(fmt::format(
          "GGUF file '{}': {} of type {} has ne[0] = {}; expected a multiple of its block size "
          "{}",
          file, who, traits->name, ne0, traits->block_elements));
    }
    if (!multiply(t.elements / traits->block_elements, traits->block_bytes, t.bytes)) {
      format_error(
          fmt::format("GGUF file '{}': {} with dims {} has a byte size that overflows 64 bits",
                      file, who, t.dims_text()));
    }
    if (t.offset % g.alignment_ != 0) {
      format_error(fmt::format(
          "GGUF file '{}': {} has data offset {}; expected a multiple of the alignment {}", file,
          who, t.offset, g.alignment_));
    }
    if (!g.tensor_index_.emplace(t.name, g.tensors_.size()).second) {
      format_error(
          fmt::format("GGUF file '{}': {} has the name of an earlier tensor; expected unique names",
                      file, who));
    }
    g.tensors_.push_back(std::move(t));
  }

  g.data_offset_ = (r.pos() + g.alignment_ - 1) / g.alignment_ * g.alignment_;
  if (!g.tensors_.empty() && g.data_offset_ > size) {
    format_error(fmt::format(
        "GGUF file '{}' is truncated: the data section starts at byte {} (the tensor directory "
        "ends at byte {}, aligned to {}), but the file has {} bytes",
        file, g.data_offset_, r.pos(), g.alignment_, size));
  }
  for (const GgufTensorInfo& t : g.tensors_) {
    const std::uint64_t available = size - g.data_offset_;
    if (t.offset > available || t.bytes > available - t.offset) {
      format_error(fmt::format(
          "GGUF file '{}': tensor {} ({} {}, {} bytes) has data offset {}; expected offset + "
          "size <= {}, the bytes of the data section (which starts at byte {}, file size {}; "
          "truncated or "
          "corrupt file)",
          file, show(t.name), ggml_type_name(t.type), t.dims_text(), t.bytes, t.offset, available,
          g.data_offset_, size));
    }
  }
  return g;
}

const GgufKeyValue* GgufFile::find(std::string_view key) const noexcept {
  const auto it = metadata_index_.find(std::string(key));
  return it == metadata_index_.end() ? nullptr : &metadata_[it->second];
}

const GgufValue& GgufFile::require(std::string_view key, const char* expected) const {
  const GgufKeyValue* kv = find(key);
  if (kv == nullptr) {
    format_error(fmt::format("GGUF file '{}': metadata key {} is missing; expected {}", name_,
                             show(key), expected));
  }
  return kv->value;
}

namespace {

[[noreturn]] void type_error(const std::string& file, std::string_view key, const GgufKeyValue& kv,
                             const std::string& expected) {
  format_error(fmt::format("GGUF file '{}': metadata key {} at byte {} is {} {}; expected {}", file,
                           show(key), kv.offset, kv.value.type_text(), value_text(kv.value),
                           expected));
}

/// The integer value of `v` if it is an integer that fits [lo, hi].
template <class T>
std::optional<T> integer_in_range(const GgufValue& v) {
  if (!is_integer(v.type)) return std::nullopt;
  if (v.data.index() == 0) {
    const std::uint64_t u = std::get<std::uint64_t>(v.data);
    if (u > static_cast<std::uint64_t>(std::numeric_limits<T>::max())) return std::nullopt;
    return static_cast<T>(u);
  }
  const std::int64_t s = std::get<std::int64_t>(v.data);
  if constexpr (std::is_unsigned_v<T>) {
    if (s < 0 ||
        static_cast<std::uint64_t>(s) > static_cast<std::uint64_t>(std::numeric_limits<T>::max())) {
      return std::nullopt;
    }
  } else {
    if (s < static_cast<std::int64_t>(std::numeric_limits<T>::min()) ||
        s > static_cast<std::int64_t>(std::numeric_limits<T>::max())) {
      return std::nullopt;
    }
  }
  return static_cast<T>(s);
}

template <class T>
const char* integer_expectation() {
  if constexpr (std::is_same_v<T, std::uint32_t>) return "an integer in [0, 4294967295] (uint32)";
  if constexpr (std::is_same_v<T, std::uint64_t>) return "a non-negative integer (uint64)";
  if constexpr (std::is_same_v<T, std::int32_t>)
    return "an integer in [-2147483648, 2147483647] (int32)";
  return "an integer (int64)";
}

template <class T>
T get_integer(const GgufFile& g, std::string_view key, const GgufValue& v) {
  const auto x = integer_in_range<T>(v);
  if (!x) type_error(g.name(), key, *g.find(key), integer_expectation<T>());
  return *x;
}

}  // namespace

std::uint32_t GgufFile::get_u32(std::string_view key) const {
  return get_integer<std::uint32_t>(*this, key, require(key, integer_expectation<std::uint32_t>()));
}
std::uint64_t GgufFile::get_u64(std::string_view key) const {
  return get_integer<std::uint64_t>(*this, key, require(key, integer_expectation<std::uint64_t>()));
}
std::int32_t GgufFile::get_i32(std::string_view key) const {
  return get_integer<std::int32_t>(*this, key, require(key, integer_expectation<std::int32_t>()));
}
std::int64_t GgufFile::get_i64(std::string_view key) const {
  return get_integer<std::int64_t>(*this, key, require(key, integer_expectation<std::int64_t>()));
}

float GgufFile::get_f32(std::string_view key) const {
  const GgufValue& v = require(key, "a float32");
  if (v.type != GgufValueType::kFloat32 && v.type != GgufValueType::kFloat64) {
    type_error(name_, key, *find(key), "a float32");
  }
  const double d = std::get<double>(v.data);
  if (std::isfinite(d) && std::fabs(d) > static_cast<double>(std::numeric_limits<float>::max())) {
    type_error(name_, key, *find(key), "a value within float32's range");
  }
  return static_cast<float>(d);
}

bool GgufFile::get_bool(std::string_view key) const {
  const GgufValue& v = require(key, "a bool");
  if (v.type != GgufValueType::kBool) type_error(name_, key, *find(key), "a bool");
  return std::get<std::uint64_t>(v.data) != 0;
}

const std::string& GgufFile::get_string(std::string_view key) const {
  const GgufValue& v = require(key, "a string");
  if (v.type != GgufValueType::kString) type_error(name_, key, *find(key), "a string");
  return std::get<std::string>(v.data);
}

std::vector<std::string> GgufFile::get_string_array(std::string_view key) const {
  const GgufValue& v = require(key, "an array of string");
  if (v.type != GgufValueType::kArray ||
      std::get<GgufArray>(v.data).element_type != GgufValueType::kString) {
    type_error(name_, key, *find(key), "an array of string");
  }
  const auto& items = std::get<GgufArray>(v.data).items;
  std::vector<std::string> out;
  out.reserve(items.size());
  for (const GgufValue& item : items) out.push_back(std::get<std::string>(item.data));
  return out;
}

std::vector<std::int32_t> GgufFile::get_i32_array(std::string_view key) const {
  const GgufValue& v = require(key, "an array of int32");
  if (v.type != GgufValueType::kArray || !is_integer(std::get<GgufArray>(v.data).element_type)) {
    type_error(name_, key, *find(key), "an array of int32");
  }
  const auto& items = std::get<GgufArray>(v.data).items;
  std::vector<std::int32_t> out;
  out.reserve(items.size());
  for (std::size_t i = 0; i < items.size(); ++i) {
    const auto x = integer_in_range<std::int32_t>(items[i]);
    if (!x) {
      format_error(fmt::format(
          "GGUF file '{}': element {} of metadata key {} is {}; expected an integer that fits "
          "int32",
          name_, i, show(key), value_text(items[i])));
    }
    out.push_back(*x);
  }
  return out;
}

std::optional<std::uint32_t> GgufFile::find_u32(std::string_view key) const {
  return has(key) ? std::optional<std::uint32_t>(get_u32(key)) : std::nullopt;
}
std::optional<std::uint64_t> GgufFile::find_u64(std::string_view key) const {
  return has(key) ? std::optional<std::uint64_t>(get_u64(key)) : std::nullopt;
}
std::optional<std::int32_t> GgufFile::find_i32(std::string_view key) const {
  return has(key) ? std::optional<std::int32_t>(get_i32(key)) : std::nullopt;
}
std::optional<float> GgufFile::find_f32(std::string_view key) const {
  return has(key) ? std::optional<float>(get_f32(key)) : std::nullopt;
}
std::optional<bool> GgufFile::find_bool(std::string_view key) const {
  return has(key) ? std::optional<bool>(get_bool(key)) : std::nullopt;
}
std::optional<std::string> GgufFile::find_string(std::string_view key) const {
  return has(key) ? std::optional<std::string>(get_string(key)) : std::nullopt;
}

const GgufTensorInfo* GgufFile::find_tensor(std::string_view name) const noexcept {
  const auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufTensorInfo& GgufFile::tensor(std::string_view name) const {
  const GgufTensorInfo* t = find_tensor(name);
  if (t == nullptr) {
    format_error(fmt::format("GGUF file '{}': tensor {} is missing ({} tensors in the file)", name_,
                             show(name), tensors_.size()));
  }
  return *t;
}

const std::uint8_t* GgufFile::tensor_data(const GgufTensorInfo& t) const noexcept {
  return bytes_.data() + data_offset_ + t.offset;
}

std::vector<float> GgufFile::dequantize(const GgufTensorInfo& t) const {
  std::vector<float> out(static_cast<std::size_t>(t.elements));
  dequantize_into(t, out.data(), out.size());
  return out;
}

void GgufFile::dequantize_into(const GgufTensorInfo& t, float* out, std::size_t count) const {
  const auto traits = ggml_type_traits(t.type);
  const std::uint64_t available = bytes_.size() >= data_offset_ ? bytes_.size() - data_offset_ : 0;
  if (!traits || t.offset > available || t.bytes > available - t.offset ||
      t.bytes != t.elements / traits->block_elements * traits->block_bytes ||
      t.elements % traits->block_elements != 0) {
    throw kvq::Error(
        kvq::Status::kInvalidArgument,
        fmt::format("kvq::llm::GgufFile::dequantize: tensor {} is not a tensor of GGUF file '{}'",
                    show(t.name), name_));
  }
  if (count != t.elements) {
    throw kvq::Error(
        kvq::Status::kInvalidArgument,
        fmt::format(
            "kvq::llm::GgufFile::dequantize: argument 'count' = {}; expected the {} elements of "
            "tensor {}",
            count, t.elements, show(t.name)));
  }
  const std::uint8_t* src = tensor_data(t);
  const std::size_t n = count;
  const std::size_t blocks = n / traits->block_elements;
  switch (static_cast<GgmlType>(t.type)) {
    case GgmlType::kF32:
      if (n != 0) std::memcpy(out, src, 4 * n);
      break;
    case GgmlType::kF16:
      dequantize_f16(src, n, out);
      break;
    case GgmlType::kBF16:
      dequantize_bf16(src, n, out);
      break;
    case GgmlType::kQ4_0:
      dequantize_q4_0(src, blocks, out);
      break;
    case GgmlType::kQ4_1:
      dequantize_q4_1(src, blocks, out);
      break;
    case GgmlType::kQ8_0:
      dequantize_q8_0(src, blocks, out);
      break;
    default:
      throw kvq::Error(
          kvq::Status::kUnsupported,
          fmt::format(
              "GGUF file '{}': tensor {} has type {}; this reader dequantizes f32, f16, bf16, "
              "q4_0, q4_1 and q8_0",
              name_, show(t.name), traits->name));
  }
  if (!all_finite(out, n)) {
    std::size_t i = 0;
    while (i < n && std::isfinite(out[i])) ++i;
    const std::uint64_t ne0 = t.dims.empty() ? 1 : t.dims.front();
    format_error(fmt::format(
        "GGUF file '{}': tensor {} ({} {}) has a non-finite value {} at element {} (row {}, "
        "column {}); expected finite weights",
        name_, show(t.name), traits->name, t.dims_text(), out[i], i, i / ne0, i % ne0));
  }
}

}  // namespace kvq::llm
