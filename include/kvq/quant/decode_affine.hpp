// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Host fast path of dequantization into float: out[i] = code(first + i) * scale + zero
///        over a packed stream (quant/pack.hpp layout), with AVX2 kernels for 2-, 4- and 8-bit
///        codes, a byte lookup table for ternary codes and a portable path for the rest.
///
/// Every kvq host reader of quantized blocks (cache read-back, CPU attention, its fp64
/// reference) goes through this function; its values equal dequantize_value's (quant/params.hpp)
/// on every path.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kvq/config.hpp"
#include "kvq/core/bits.hpp"
#include "kvq/core/float_types.hpp"
#include "kvq/quant/bits.hpp"
#include "kvq/quant/pack.hpp"
#include "kvq/quant/params.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVQ_HAVE_AVX2 1
#else
#define KVQ_HAVE_AVX2 0
#endif

namespace kvq {

namespace detail {

/// code * scale + zero: dequantize_value, whose rounding the SIMD kernels share (fused where
/// FMA exists; the AVX2 kernels need FMA).
inline float affine(std::uint32_t code, float scale, float zero) noexcept {
  return dequantize_value(code, scale, zero);
}
/// affine() of a code held as a float (an exact small integer): the same fused operation.
inline float affine_code(float code, float scale, float zero) noexcept {
#if defined(__FMA__)
  return __builtin_fmaf(code, scale, zero);
#else
  return code * scale + zero;
#endif
}

/// codes[i] = affine_code(codes[i], scale, zero) for i < n, eight at a time with AVX2/FMA.
inline void affine_codes(float* codes, index_t n, float scale, float zero) noexcept {
  index_t i = 0;
#if KVQ_HAVE_AVX2
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 z = _mm256_set1_ps(zero);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(codes + i, _mm256_fmadd_ps(_mm256_loadu_ps(codes + i), s, z));
#endif
  for (; i < n; ++i) codes[i] = affine_code(codes[i], scale, zero);
}

/// The five base-3 digits of every ternary byte value (0 .. 242; larger values never occur).
inline const std::array<std::array<std::uint8_t, 5>, 256>& ternary_digits() noexcept {
  static const auto table = [] {
    std::array<std::array<std::uint8_t, 5>, 256> t{};
    for (std::uint32_t b = 0; b < 256; ++b) {
      std::uint32_t v = b;
      for (int i = 0; i < 5; ++i) {
        t[b][static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(v % 3u);
        v /= 3u;
      }
    }
    return t;
  }();
  return table;
}

/// ternary_digits as floats, padded to 8 lanes (for the AVX2 ternary decoder).
struct alignas(32) TernaryLanes : std::array<float, 8> {};
inline const std::array<TernaryLanes, 256>& ternary_lanes() noexcept {
  static const auto table = [] {
    std::array<TernaryLanes, 256> t{};
    for (std::size_t b = 0; b < 256; ++b) {
      for (std::size_t i = 0; i < 5; ++i) t[b][i] = static_cast<float>(ternary_digits()[b][i]);
    }
    return t;
  }();
  return table;
}

template <Bits B>
void decode_affine_portable(const std::uint8_t* stream, std::size_t first, index_t n, float scale,
                            float zero, float* out) noexcept {
  PackedReader<B> reader(stream, first);
  for (index_t i = 0; i < n; ++i) out[i] = affine(reader.get(), scale, zero);
}

}  // namespace detail

#if KVQ_HAVE_AVX2
namespace detail {

/// Eight codes of width B (2, 4 or 8) starting at byte p, as int32 lanes.
template <Bits B>
KVQ_FORCEINLINE __m256i load8_codes(const std::uint8_t* p) noexcept {
  if constexpr (B == Bits::k8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else {
    constexpr int kWidth = static_cast<int>(B);
    const __m256i shifts = kWidth == 2 ? _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)
                                       : _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    std::uint32_t word = 0;
    std::memcpy(&word, p, kWidth);  // kWidth bytes hold 8 codes
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts),
                            _mm256_set1_epi32((1 << kWidth) - 1));
  }
}

}  // namespace detail
#endif

/// out[i] = code(first + i) * scale + zero for i in [0, n).
template <Bits B>
KVQ_FORCEINLINE void decode_affine(const std::uint8_t* stream, std::size_t first, index_t n, float scale,
                                   float zero, float* out) noexcept {
  if constexpr (B == Bits::kTernary) {
    const auto& digits = detail::ternary_digits();
    index_t i = 0;
    std::size_t e = first;
    for (; i < n && e % 5 != 0; ++i, ++e) {
      out[i] = detail::affine(digits[stream[e / 5]][e % 5], scale, zero);
    }
#if KVQ_HAVE_AVX2
    // Whole bytes: the byte's five digits as floats (padded to 8) times scale plus zero; the
    // 8-wide store spills 3 lanes that the next byte overwrites, so it stops one byte early.
    const auto& lanes = detail::ternary_lanes();
    const __m256 s = _mm256_set1_ps(scale);
    const __m256 z = _mm256_set1_ps(zero);
    for (; i + 8 <= n; i += 5, e += 5) {
      const __m256 d = _mm256_load_ps(lanes[stream[e / 5]].data());
      _mm256_storeu_ps(out + i, _mm256_fmadd_ps(d, s, z));
    }
#endif
    for (; i + 5 <= n; i += 5, e += 5) {
      const auto& d = digits[stream[e / 5]];
      for (int k = 0; k < 5; ++k) out[i + k] = detail::affine(d[static_cast<std::size_t>(k)], scale, zero);
    }
    for (; i < n; ++i, ++e) out[i] = detail::affine(digits[stream[e / 5]][e % 5], scale, zero);
  } else if constexpr (B == Bits::k3) {
    detail::decode_affine_portable<B>(stream, first, n, scale, zero, out);
  } else {
#if KVQ_HAVE_AVX2
    constexpr index_t kPerByte = 8 / static_cast<int>(B);
    constexpr index_t kBytes8 = static_cast<int>(B);  // bytes holding 8 codes
    const __m256 s = _mm256_set1_ps(scale);
    const __m256 z = _mm256_set1_ps(zero);
    if (first % static_cast<std::size_t>(kPerByte) == 0 && n % 8 == 0) {  // the common case
      const std::uint8_t* p = stream + first / static_cast<std::size_t>(kPerByte);
      for (index_t i = 0; i < n; i += 8, p += kBytes8) {
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(detail::load8_codes<B>(p)), s, z));
      }
      return;
    }
    // Scalar head up to a byte boundary, 8 codes per step, scalar tail.
    index_t head = static_cast<index_t>((kPerByte - static_cast<index_t>(first % static_cast<std::size_t>(kPerByte))) % kPerByte);
    if (head > n) head = n;
    detail::decode_affine_portable<B>(stream, first, head, scale, zero, out);
    const std::uint8_t* p = stream + (first + static_cast<std::size_t>(head)) / static_cast<std::size_t>(kPerByte);
    index_t i = head;
    for (; i + 8 <= n; i += 8, p += kBytes8) {
      _mm256_storeu_ps(out + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(detail::load8_codes<B>(p)), s, z));
    }
    detail::decode_affine_portable<B>(stream, first + static_cast<std::size_t>(i), n - i, scale, zero, out + i);
#else
    detail::decode_affine_portable<B>(stream, first, n, scale, zero, out);
#endif
  }
}

/// A stored scale or zero-point as float (F16C for fp16 where available).
template <class Meta>
KVQ_FORCEINLINE float meta_to_float(Meta m) noexcept {
#if KVQ_HAVE_AVX2 && defined(__F16C__)
  if constexpr (std::is_same_v<Meta, Float16>) return _cvtsh_ss(m.bits());
#endif
  if constexpr (std::is_same_v<Meta, Float8E4M3>) {
    // All 256 values, converted once by to_float (exact: every FP8 value is a float).
    static const std::array<float, 256> table = [] {
      std::array<float, 256> t{};
      for (std::uint32_t b = 0; b < 256; ++b) t[b] = Float8E4M3::from_bits(static_cast<std::uint8_t>(b)).to_float();
      return t;
    }();
    return table[m.bits()];
  }
  return m.to_float();
}

/// Float16 bit patterns to float (F16C where available).
inline void half_to_float(const std::uint16_t* in, index_t n, float* out) noexcept {
  index_t i = 0;
#if KVQ_HAVE_AVX2 && defined(__F16C__)
  const index_t n8 = n - n % 8;
  for (; i < n8; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  }
#endif
  for (; i < n; ++i) out[i] = Float16::from_bits(in[i]).to_float();
}

}  // namespace kvq
