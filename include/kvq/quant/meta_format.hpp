// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief MetaFormat: the storage format of per-group scales and zero-points (fp16, bf16,
///        fp8-e4m3), and the mapping to kvq's storage types.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "kvq/core/error.hpp"
#include "kvq/core/float_types.hpp"

namespace kvq {

/// Format of a group's scale and zero-point. KIVI stores them in the activation dtype (fp16);
/// SKVQ optionally in FP8 E4M3.
enum class MetaFormat : std::uint8_t { kFp16 = 0, kBf16 = 1, kFp8E4M3 = 2 };

namespace detail {
template <MetaFormat F>
struct meta_type_of;
template <>
struct meta_type_of<MetaFormat::kFp16> {
  using type = Float16;
};
template <>
struct meta_type_of<MetaFormat::kBf16> {
  using type = BFloat16;
};
template <>
struct meta_type_of<MetaFormat::kFp8E4M3> {
  using type = Float8E4M3;
};
}  // namespace detail

/// The storage type of metadata format F.
template <MetaFormat F>
using meta_type_t = typename detail::meta_type_of<F>::type;

/// The MetaFormat whose storage type is Meta.
template <class Meta>
inline constexpr MetaFormat meta_format_of_v =
    std::is_same_v<Meta, Float16>    ? MetaFormat::kFp16
    : std::is_same_v<Meta, BFloat16> ? MetaFormat::kBf16
                                     : MetaFormat::kFp8E4M3;

/// Bytes of one scale (or one zero-point) in format f.
constexpr std::size_t meta_bytes(MetaFormat f) noexcept {
  return f == MetaFormat::kFp8E4M3 ? 1 : 2;
}

/// "fp16", "bf16" or "fp8".
inline std::string meta_label(MetaFormat f) {
  switch (f) {
    case MetaFormat::kFp16: return "fp16";
    case MetaFormat::kBf16: return "bf16";
    case MetaFormat::kFp8E4M3: return "fp8";
  }
  return "unknown(" + std::to_string(static_cast<int>(f)) + ")";
}

/// Parses "fp16", "bf16" or "fp8" (also "fp8-e4m3").
inline MetaFormat parse_meta_format(const std::string& text, const char* argument = "meta") {
  if (text == "fp16") return MetaFormat::kFp16;
  if (text == "bf16") return MetaFormat::kBf16;
  if (text == "fp8" || text == "fp8-e4m3") return MetaFormat::kFp8E4M3;
  detail::throw_argument_error("kvq::parse_meta_format", argument, text,
                               "one of fp16, bf16, fp8 (fp8-e4m3)");
}

/// Calls f(Meta{}) with the storage type of the runtime format (host only).
template <class F>
decltype(auto) dispatch_meta(MetaFormat format, F&& f) {
  switch (format) {
    case MetaFormat::kFp16: return f(Float16{});
    case MetaFormat::kBf16: return f(BFloat16{});
    case MetaFormat::kFp8E4M3: return f(Float8E4M3{});
  }
  detail::throw_argument_error("kvq::dispatch_meta", "format", static_cast<int>(format),
                               "MetaFormat::kFp16, kBf16 or kFp8E4M3");
}

}  // namespace kvq
