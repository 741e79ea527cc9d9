// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Bits: the code widths kvq quantizes to, their code ranges and packed sizes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kvq/config.hpp"
#include "kvq/core/error.hpp"

namespace kvq {

/// Width of one quantization code.
///   kTernary: codes {0, 1, 2} ("1.5 bits"; log2 3 = 1.585 bits of information), packed five to
///             a byte (1.6 stored bits per code);
///   k2, k3, k4, k8: codes 0 .. 2^B - 1, packed in a little-endian bit stream.
enum class Bits : std::uint8_t { kTernary = 1, k2 = 2, k3 = 3, k4 = 4, k8 = 8 };

/// True for the widths kvq implements.
KVQ_HOST_DEVICE constexpr bool is_supported(Bits b) noexcept {
  return b == Bits::kTernary || b == Bits::k2 || b == Bits::k3 || b == Bits::k4 || b == Bits::k8;
}

/// Compile-time facts about a code width. Instantiating it with an unsupported width is a
/// compile error with a readable message.
template <Bits B>
struct BitsTraits {
  static_assert(is_supported(B),
                "kvq: unsupported code width; use Bits::kTernary, Bits::k2, Bits::k3, Bits::k4 "
                "or Bits::k8");
  /// Largest code (q_max): codes are 0 .. max_code.
  static constexpr int max_code = B == Bits::kTernary ? 2 : (1 << static_cast<int>(B)) - 1;
  /// Codes in one pack unit, the smallest run that fills whole bytes.
  static constexpr int unit_codes = B == Bits::kTernary ? 5 : B == Bits::k3 ? 8 : 8 / static_cast<int>(B);
  /// Bytes in one pack unit.
  static constexpr int unit_bytes = B == Bits::k3 ? 3 : 1;
};

/// Largest code of width b (2, 3, 7, 15, 255); 0 for an unsupported width.
KVQ_HOST_DEVICE constexpr int max_code(Bits b) noexcept {
  switch (b) {
    case Bits::kTernary: return BitsTraits<Bits::kTernary>::max_code;
    case Bits::k2: return BitsTraits<Bits::k2>::max_code;
    case Bits::k3: return BitsTraits<Bits::k3>::max_code;
    case Bits::k4: return BitsTraits<Bits::k4>::max_code;
    case Bits::k8: return BitsTraits<Bits::k8>::max_code;
  }
  return 0;
}

/// Bytes that hold n codes of width b packed from element 0: ceil(n / 5) for ternary,
/// ceil(n * B / 8) otherwise.
KVQ_HOST_DEVICE constexpr std::size_t packed_bytes(Bits b, std::size_t n) noexcept {
  return b == Bits::kTernary ? (n + 4) / 5 : (n * static_cast<std::size_t>(b) + 7) / 8;
}

/// Label used by the CLI and reports: "1.5", "2", "3", "4", "8".
inline std::string bits_label(Bits b) {
  return b == Bits::kTernary ? std::string("1.5") : std::to_string(static_cast<int>(b));
}

/// Parses a width written as on the command line ("1.5", "2", "3", "4", "8").
inline Bits parse_bits(const std::string& text, const char* argument = "bits") {
  for (Bits b : {Bits::kTernary, Bits::k2, Bits::k3, Bits::k4, Bits::k8}) {
    if (text == bits_label(b)) return b;
  }
  detail::throw_argument_error("kvq::parse_bits", argument, text, "one of 1.5, 2, 3, 4, 8");
}

/// Throws kvq::Error unless b is a supported width.
inline void check_bits(const char* where, const char* argument, Bits b) {
  if (!is_supported(b)) {
    detail::throw_argument_error(where, argument, static_cast<int>(static_cast<std::uint8_t>(b)),
                                 "Bits::kTernary (1.5), k2, k3, k4 or k8");
  }
}

/// Calls f(std::integral_constant<Bits, B>{}) for the runtime width b (host only).
template <class F>
decltype(auto) dispatch_bits(Bits b, F&& f) {
  switch (b) {
    case Bits::kTernary: return f(std::integral_constant<Bits, Bits::kTernary>{});
    case Bits::k2: return f(std::integral_constant<Bits, Bits::k2>{});
    case Bits::k3: return f(std::integral_constant<Bits, Bits::k3>{});
    case Bits::k4: return f(std::integral_constant<Bits, Bits::k4>{});
    case Bits::k8: return f(std::integral_constant<Bits, Bits::k8>{});
  }
  check_bits("kvq::dispatch_bits", "b", b);
  return f(std::integral_constant<Bits, Bits::k2>{});  // unreachable: check_bits threw
}

}  // namespace kvq
