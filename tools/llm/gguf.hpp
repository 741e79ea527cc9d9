// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief A GGUF (v2, v3) file held in memory: metadata, tensor directory, and fp32 dequantization
///        of F32, F16, BF16, Q4_0, Q4_1 and Q8_0 tensors.
///
/// Layout (all little-endian):
///   "GGUF", u32 version, u64 tensor_count, u64 kv_count,
///   kv_count × { string key, u32 value_type, value },
///   tensor_count × { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset },
///   zero padding to `general.alignment` (default 32), then the data section; each tensor's
///   `offset` is relative to the data section and a multiple of the alignment.
/// A string is a u64 byte count and the bytes (no terminator); an array value is a u32
/// element type, a u64 count and the elements (arrays may nest).
///
/// Every count and length is bounded by the bytes that remain in the file before anything is
/// allocated, every tensor's byte range is checked against the file, and every failure throws
/// kvq::Error (kIoError: unreadable file; kFormatError: malformed contents; kUnsupported: a
/// valid tensor type this reader cannot dequantize) naming the file, the byte offset, key or
/// tensor, the value found and what was expected.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <variant>
#include <vector>

namespace kvq::llm {

/// GGUF metadata value types (the u32 stored before each value).
enum class GgufValueType : std::uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

/// "uint8", "int32", "float32", "bool", "string", "array", ... ("type 17" when unknown).
std::string gguf_value_type_name(GgufValueType type);

/// ggml tensor types as stored in the tensor directory (the ids of ggml.h).
enum class GgmlType : std::uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBF16 = 30,
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
};

/// Storage of one ggml type: `block_elements` consecutive elements of a row (along ne[0]) take
/// `block_bytes` bytes.
struct GgmlTypeTraits {
  const char* name = nullptr;  ///< "f32", "q4_1", ...
  std::uint32_t block_elements = 0;
  std::uint32_t block_bytes = 0;
};

/// Traits of a ggml type id; std::nullopt for ids this reader does not know.
std::optional<GgmlTypeTraits> ggml_type_traits(std::uint32_t type);

/// "q4_1" for a known ggml type id, "unknown type 99" otherwise.
std::string ggml_type_name(std::uint32_t type);

struct GgufValue;

/// An array value: elements of one type (arrays of arrays may mix inner element types).
struct GgufArray {
  GgufValueType element_type = GgufValueType::kUint8;
  std::vector<GgufValue> items;
};

/// One metadata value. `data` holds std::uint64_t for uint8..uint64 and bool (0 or 1),
/// std::int64_t for int8..int64, double for float32/float64, std::string for string and
/// GgufArray for array.
struct GgufValue {
  GgufValueType type = GgufValueType::kUint8;
  std::variant<std::uint64_t, std::int64_t, double, std::string, GgufArray> data;

  /// "uint32", "string", "array of string", "array of array of int32", ...
  std::string type_text() const;
};

/// One metadata entry.
struct GgufKeyValue {
  std::string key;
  GgufValue value;
  std::uint64_t offset = 0;  ///< byte offset of the entry (its key length) in the file
};

/// One entry of the tensor directory.
struct GgufTensorInfo {
  std::string name;
  std::vector<std::uint64_t> dims;  ///< ne[0] first: ne[0] is contiguous (the columns of a matrix)
  std::uint32_t type = 0;           ///< a GgmlType id
  std::uint64_t offset = 0;         ///< from the start of the data section, bytes
  std::uint64_t elements = 0;       ///< product of dims
  std::uint64_t bytes = 0;          ///< size of the data, bytes
  std::uint64_t entry_offset = 0;   ///< byte offset of this directory entry in the file

  /// "[576, 49152]" (ne[0] first).
  std::string dims_text() const;
};

/// A parsed GGUF file and its bytes.
class GgufFile {
 public:
  using TensorInfo = GgufTensorInfo;

  /// Reads and parses the file at `path` (kIoError when it cannot be read).
  static GgufFile open(const std::string& path);
  /// Parses `bytes`; messages name the file as `name_for_messages`.
  static GgufFile parse(std::vector<std::uint8_t> bytes, std::string name_for_messages);

  const std::string& name() const noexcept { return name_; }
  std::uint32_t version() const noexcept { return version_; }
  std::uint32_t alignment() const noexcept { return alignment_; }
  /// Byte offset of the data section in the file (a multiple of alignment()).
  std::uint64_t data_offset() const noexcept { return data_offset_; }
  std::size_t size_bytes() const noexcept { return bytes_.size(); }

  // ---- metadata ----
  const std::vector<GgufKeyValue>& metadata() const noexcept { return metadata_; }
  /// The entry of `key`, or nullptr.
  const GgufKeyValue* find(std::string_view key) const noexcept;
  bool has(std::string_view key) const noexcept { return find(key) != nullptr; }

  /// Typed getters: throw kFormatError naming the key when it is absent or when its value has
  /// another type. Integer getters accept every integer type whose value fits the result.
  std::uint32_t get_u32(std::string_view key) const;
  std::uint64_t get_u64(std::string_view key) const;
  std::int32_t get_i32(std::string_view key) const;
  std::int64_t get_i64(std::string_view key) const;
  /// float32 or float64 (a float64 outside float's range is an error).
  float get_f32(std::string_view key) const;
  bool get_bool(std::string_view key) const;
  const std::string& get_string(std::string_view key) const;
  std::vector<std::string> get_string_array(std::string_view key) const;
  /// An array of any integer type whose every element fits int32.
  std::vector<std::int32_t> get_i32_array(std::string_view key) const;

  /// Like the getters, but std::nullopt when the key is absent (still an error on a wrong type).
  std::optional<std::uint32_t> find_u32(std::string_view key) const;
  std::optional<std::uint64_t> find_u64(std::string_view key) const;
  std::optional<std::int32_t> find_i32(std::string_view key) const;
  std::optional<float> find_f32(std::string_view key) const;
  std::optional<bool> find_bool(std::string_view key) const;
  std::optional<std::string> find_string(std::string_view key) const;

  // ---- tensors ----
  const std::vector<GgufTensorInfo>& tensors() const noexcept { return tensors_; }
  /// The tensor called `name`, or nullptr.
  const GgufTensorInfo* find_tensor(std::string_view name) const noexcept;
  /// The tensor called `name`; kFormatError naming it when absent.
  const GgufTensorInfo& tensor(std::string_view name) const;
  /// First byte of the tensor's data (its whole range lies inside the file).
  const std::uint8_t* tensor_data(const GgufTensorInfo& t) const noexcept;

  /// The tensor's elements as fp32, in storage order (ne[0] fastest). kUnsupported for types
  /// other than F32, F16, BF16, Q4_0, Q4_1, Q8_0; kFormatError when a value is NaN or Inf.
  std::vector<float> dequantize(const GgufTensorInfo& t) const;
  /// Same into `out`, which must hold exactly `count` == t.elements floats.
  void dequantize_into(const GgufTensorInfo& t, float* out, std::size_t count) const;

 private:
  GgufFile() = default;
  const GgufValue& require(std::string_view key, const char* expected) const;

  std::string name_;
  std::vector<std::uint8_t> bytes_;
  std::uint32_t version_ = 0;
  std::uint32_t alignment_ = 32;
  std::uint64_t data_offset_ = 0;
  std::vector<GgufKeyValue> metadata_;
  std::unordered_map<std::string, std::size_t> metadata_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, std::size_t> tensor_index_;
};

}  // namespace kvq::llm
