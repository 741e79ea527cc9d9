// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Packing of quantization codes into byte streams, at any element offset.
///
/// Stream layout (the contract every kvq CPU path and CUDA kernel reads and writes):
///   k2, k3, k4, k8: code i occupies stream bits [i*B, (i+1)*B), and stream bit k is bit (k mod 8)
///       of byte k/8: a little-endian, least-significant-bit-first stream. For 2 bits, code i is
///       bits [2(i mod 4), 2(i mod 4) + 2) of byte i/4; 3-bit codes may straddle two bytes.
///   kTernary: code i is base-3 digit (i mod 5) of byte i/5, that is
///       byte = c0 + 3*c1 + 9*c2 + 27*c3 + 81*c4 (0 .. 242), five codes per byte.
/// Writers touch only the bits (digits) of the elements they write; the rest of a partially
/// written byte is preserved, so a stream can be filled group by group at any offset. A ternary
/// byte that is only partly written must hold a valid encoding (<= 242) before the write, for
/// example zero from initialisation.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvq/config.hpp"
#include "kvq/quant/bits.hpp"

// GCC 12 at -O3 cannot relate the bulk loops' bounds to the callers' buffer sizes and reports
// writes past a stack buffer that never happen (-Wstringop-overflow) and, when vectorizing for
// AVX2, reads of codes the callers never filled (-Wmaybe-uninitialized; put_codes reads only
// codes[0, m)); the round-trip tests at every offset and length, under AddressSanitizer too,
// check the bounds for real.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace kvq {
namespace detail {

KVQ_HOST_DEVICE constexpr std::uint32_t pow3(int k) noexcept {
  std::uint32_t p = 1;
  for (int i = 0; i < k; ++i) p *= 3;
  return p;
}

}  // namespace detail

/// Packs one pack unit (BitsTraits<B>::unit_codes codes) into unit_bytes bytes at out.
template <Bits B>
KVQ_HOST_DEVICE void pack_unit(const std::uint8_t* c, std::uint8_t* out) noexcept {
  if constexpr (B == Bits::kTernary) {
    out[0] = static_cast<std::uint8_t>(c[0] + 3 * c[1] + 9 * c[2] + 27 * c[3] + 81 * c[4]);
  } else if constexpr (B == Bits::k2) {
    out[0] = static_cast<std::uint8_t>(c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6));
  } else if constexpr (B == Bits::k3) {
    std::uint32_t v = 0;
    for (int i = 0; i < 8; ++i) v |= static_cast<std::uint32_t>(c[i]) << (3 * i);
    out[0] = static_cast<std::uint8_t>(v);
    out[1] = static_cast<std::uint8_t>(v >> 8);
    out[2] = static_cast<std::uint8_t>(v >> 16);
  } else if constexpr (B == Bits::k4) {
    out[0] = static_cast<std::uint8_t>(c[0] | (c[1] << 4));
  } else {
    out[0] = c[0];
  }
}

/// Unpacks one pack unit at in into BitsTraits<B>::unit_codes codes.
template <Bits B>
KVQ_HOST_DEVICE void unpack_unit(const std::uint8_t* in, std::uint8_t* c) noexcept {
  if constexpr (B == Bits::kTernary) {
    std::uint32_t v = in[0];
    for (int i = 0; i < 5; ++i) {
      c[i] = static_cast<std::uint8_t>(v % 3u);
      v /= 3u;
    }
  } else if constexpr (B == Bits::k3) {
    const std::uint32_t v = in[0] | (static_cast<std::uint32_t>(in[1]) << 8) |
                            (static_cast<std::uint32_t>(in[2]) << 16);
    for (int i = 0; i < 8; ++i) c[i] = static_cast<std::uint8_t>((v >> (3 * i)) & 7u);
  } else {
    constexpr int kWidth = static_cast<int>(B);
    constexpr int kCodes = 8 / kWidth;
    for (int i = 0; i < kCodes; ++i) {
      c[i] = static_cast<std::uint8_t>((in[0] >> (kWidth * i)) & ((1u << kWidth) - 1u));
    }
  }
}

/// Sequential writer of width-B codes into a packed stream, starting at element `first`.
/// Call put() for each code, then finish() once to write the last partial byte.
template <Bits B>
class PackedWriter {
  static constexpr int kWidth = static_cast<int>(B);

 public:
  KVQ_HOST_DEVICE PackedWriter(std::uint8_t* stream, std::size_t first) noexcept {
    (void)BitsTraits<B>{};
    if constexpr (B == Bits::kTernary) {
      byte_ = stream + first / 5;
      fill_ = static_cast<int>(first % 5);
      place_ = detail::pow3(fill_);
      acc_ = fill_ > 0 ? *byte_ % place_ : 0u;
    } else {
      const std::size_t bit = first * static_cast<std::size_t>(kWidth);
      byte_ = stream + bit / 8;
      fill_ = static_cast<int>(bit % 8);
      acc_ = fill_ > 0 ? *byte_ & ((1u << fill_) - 1u) : 0u;
    }
  }

  /// Appends one code; code must be <= BitsTraits<B>::max_code.
  KVQ_HOST_DEVICE void put(std::uint32_t code) noexcept {
    if constexpr (B == Bits::kTernary) {
      acc_ += code * place_;
      place_ *= 3;
      if (++fill_ == 5) {
        *byte_++ = static_cast<std::uint8_t>(acc_);
        acc_ = 0;
        fill_ = 0;
        place_ = 1;
      }
    } else {
      acc_ |= code << fill_;
      fill_ += kWidth;
      if (fill_ >= 8) {
        *byte_++ = static_cast<std::uint8_t>(acc_);
        acc_ >>= 8;
        fill_ -= 8;
      }
    }
  }

  /// Appends codes[0 .. m); whole pack units go straight to memory.
  KVQ_HOST_DEVICE void put_codes(const std::uint8_t* codes, std::size_t m) noexcept {
    constexpr std::size_t kUnit = BitsTraits<B>::unit_codes;
    std::size_t i = 0;
    for (; i < m && fill_ != 0; ++i) put(codes[i]);
    const std::size_t units = (m - i) / kUnit;
    for (std::size_t u = 0; u < units; ++u, i += kUnit) {
      pack_unit<B>(codes + i, byte_);
      byte_ += BitsTraits<B>::unit_bytes;
    }
    for (; i < m; ++i) put(codes[i]);
  }

  /// Writes the pending partial byte, keeping the elements after the last one written.
  KVQ_HOST_DEVICE void finish() noexcept {
    if (fill_ == 0) return;
    if constexpr (B == Bits::kTernary) {
      const std::uint32_t old = *byte_;
      *byte_ = static_cast<std::uint8_t>(old - old % place_ + acc_);
    } else {
      const std::uint32_t mask = (1u << fill_) - 1u;
      *byte_ = static_cast<std::uint8_t>((*byte_ & ~mask) | (acc_ & mask));
    }
    fill_ = 0;
  }

 private:
  std::uint8_t* byte_;
  std::uint32_t acc_;    // pending bits (or base-3 digits) of *byte_
  int fill_;             // bits (digits) of *byte_ already in acc_
  std::uint32_t place_;  // ternary: 3^fill_
};

/// Sequential reader of width-B codes from a packed stream, starting at element `first`.
/// Reads a byte only when a code in it is requested.
template <Bits B>
class PackedReader {
  static constexpr int kWidth = static_cast<int>(B);

 public:
  KVQ_HOST_DEVICE PackedReader(const std::uint8_t* stream, std::size_t first) noexcept {
    (void)BitsTraits<B>{};
    if constexpr (B == Bits::kTernary) {
      byte_ = stream + first / 5;
      skip_ = static_cast<int>(first % 5);
    } else {
      const std::size_t bit = first * static_cast<std::size_t>(kWidth);
      byte_ = stream + bit / 8;
      skip_ = static_cast<int>(bit % 8);
    }
  }

  KVQ_HOST_DEVICE std::uint32_t get() noexcept {
    if constexpr (B == Bits::kTernary) {
      if (left_ == 0) {
        acc_ = *byte_++ / detail::pow3(skip_);
        left_ = 5 - skip_;
        skip_ = 0;
      }
      const std::uint32_t code = acc_ % 3u;
      acc_ /= 3u;
      --left_;
      return code;
    } else {
      while (left_ < skip_ + kWidth) {
        acc_ |= static_cast<std::uint32_t>(*byte_++) << left_;
        left_ += 8;
      }
      acc_ >>= skip_;
      left_ -= skip_;
      skip_ = 0;
      const std::uint32_t code = acc_ & ((1u << kWidth) - 1u);
      acc_ >>= kWidth;
      left_ -= kWidth;
      return code;
    }
  }

  /// Reads the next m codes into codes[0 .. m); whole pack units come straight from memory.
  KVQ_HOST_DEVICE void get_codes(std::uint8_t* codes, std::size_t m) noexcept {
    constexpr std::size_t kUnit = BitsTraits<B>::unit_codes;
    std::size_t i = 0;
    for (; i < m && (left_ != 0 || skip_ != 0); ++i) codes[i] = static_cast<std::uint8_t>(get());
    const std::size_t units = (m - i) / kUnit;
    for (std::size_t u = 0; u < units; ++u, i += kUnit) {
      unpack_unit<B>(byte_, codes + i);
      byte_ += BitsTraits<B>::unit_bytes;
    }
    for (; i < m; ++i) codes[i] = static_cast<std::uint8_t>(get());
  }

 private:
  const std::uint8_t* byte_;
  std::uint32_t acc_ = 0;  // unread bits (digits) already loaded
  int left_ = 0;           // how many of them
  int skip_;               // bits (digits) of the first byte before element `first`
};

/// Writes codes[0 .. n) to elements [first, first + n) of the stream.
template <Bits B>
KVQ_HOST_DEVICE void pack_codes(const std::uint8_t* codes, std::size_t n, std::uint8_t* stream,
                                std::size_t first) noexcept {
  PackedWriter<B> w(stream, first);
  w.put_codes(codes, n);
  w.finish();
}

/// Reads elements [first, first + n) of the stream into codes[0 .. n).
template <Bits B>
KVQ_HOST_DEVICE void unpack_codes(const std::uint8_t* stream, std::size_t first, std::size_t n,
                                  std::uint8_t* codes) noexcept {
  PackedReader<B>(stream, first).get_codes(codes, n);
}

/// The code of element i of the stream.
template <Bits B>
KVQ_HOST_DEVICE std::uint32_t code_at(const std::uint8_t* stream, std::size_t i) noexcept {
  return PackedReader<B>(stream, i).get();
}

}  // namespace kvq

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
