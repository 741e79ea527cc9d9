// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Asymmetric min/max quantization of one group: scale and zero-point, clipping,
///        rounding, and the per-element quantize / dequantize maps.
///
/// For a group with minimum `mn` and maximum `mx`, code width B (q_max = max_code(B)), clip
/// ratio alpha in (0, 1] and metadata type Meta:
///   lo = alpha * mn,  hi = alpha * mx                  (SKVQ clipping: both ends scaled by alpha)
///   zero  = lo rounded down to Meta                    (zero <= lo)
///   scale = max((hi - zero) / q_max, floor) rounded up to Meta,
///           floor = 1e-5 * max(1, |lo|, |hi|)           (the scale floor rule)
///   code(x) = round_half_even(clamp((clamp(x, lo, hi) - zero) / scale, 0, q_max))
///   x'(code) = code * scale + zero
/// With alpha = 1 and metadata that represents lo and (hi - lo) / q_max exactly, this is KIVI's
/// quantizer (zero = min, scale = (max - min) / q_max) bit for bit.
///
/// Why the metadata is rounded outward: rounding zero down and scale up keeps the grid
/// [zero, zero + q_max * scale] around [lo, hi], so every dequantized element is within half a
/// (stored) step of clamp(x, lo, hi) for every metadata format. Rounding to nearest, as the
/// reference implementations do, can cut off part of the range; with FP8 metadata that error
/// reaches |mn| / 16, far more than half a step.
/// Why the floor: a constant group (mx == mn) would otherwise divide by zero, and a step far
/// below float's resolution at the group's magnitude would only turn rounding noise into codes.
/// The floor is 1e-5 of the magnitude, about 84 float ulps, and 1e-5 absolute below magnitude 1
/// (SKVQ and CSKV clamp at 1e-5 absolute).
///
/// Arithmetic is ordered so that no step can be contracted into a fused multiply-add: the codes
/// are bit-identical wherever this header is compiled (CPU, CUDA).
#pragma once

#include <cmath>
#include <cstdint>

#include "kvq/config.hpp"
#include "kvq/core/float_types.hpp"
#include "kvq/core/status.hpp"

namespace kvq {

/// Scale and zero-point of one group, as stored.
template <class Meta>
struct GroupParams {
  Meta scale;
  Meta zero;
};

/// The float grid a group's codes live on, with its clipping bounds.
struct QuantGrid {
  float scale;   ///< step between consecutive codes
  float zero;    ///< value of code 0
  float lo;      ///< inputs below lo are clipped to lo
  float hi;      ///< inputs above hi are clipped to hi
  int max_code;  ///< q_max
};

/// Relative scale floor: scale >= kScaleFloor * max(1, |lo|, |hi|).
inline constexpr float kScaleFloor = 1e-5f;

/// True when x is neither NaN nor +-Inf.
KVQ_HOST_DEVICE bool is_finite_value(float x) noexcept {
  return (float_to_bits(x) & 0x7F800000u) != 0x7F800000u;
}

/// Round half to even of 0 <= v <= 2^22 (every code value). Adding and subtracting 2^23 leaves
/// no fraction bits in float's default rounding mode; unlike rint it vectorizes on baseline
/// x86-64. Under fast-math (which may cancel the two additions) and on the device, rint.
KVQ_HOST_DEVICE float round_half_even_code(float v) noexcept {
#if KVQ_DEVICE_PASS
  return rintf(v);
#elif defined(__FAST_MATH__)
  return std::rint(v);
#else
  constexpr float kShift = 8388608.0f;  // 2^23
  return (v + kShift) - kShift;
#endif
}

/// a / b correctly rounded, also under nvcc's fast-math flags.
KVQ_HOST_DEVICE float divide_rn(float a, float b) noexcept {
#if KVQ_DEVICE_PASS
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

/// Computes the stored parameters and the float grid of a group whose finite minimum and
/// maximum are mn <= mx. Returns kMetadataOverflow when zero or scale exceeds the range of
/// Meta, kInvalidArgument for a clip ratio outside (0, 1]; writes nothing on failure.
template <class Meta>
KVQ_HOST_DEVICE Status make_group_params(float mn, float mx, float clip, int max_code,
                                         GroupParams<Meta>* params, QuantGrid* grid) noexcept {
  if (!(clip > 0.0f && clip <= 1.0f)) return Status::kInvalidArgument;
  const float lo = clip * mn;
  const float hi = clip * mx;
  const float abs_lo = lo < 0.0f ? -lo : lo;
  const float abs_hi = hi < 0.0f ? -hi : hi;
  float magnitude = abs_lo > abs_hi ? abs_lo : abs_hi;
  if (magnitude < 1.0f) magnitude = 1.0f;
  const float floor = kScaleFloor * magnitude;

  const Meta zero = Meta::from_float(lo, Rounding::kTowardNegative);
  if (!zero.is_finite()) return Status::kMetadataOverflow;
  const float zero_f = zero.to_float();
  float step = divide_rn(hi - zero_f, static_cast<float>(max_code));
  if (!(step >= floor)) step = floor;  // also catches a NaN step (it cannot be, but cheaply)
  const Meta scale = Meta::from_float(step, Rounding::kTowardPositive);
  if (!scale.is_finite()) return Status::kMetadataOverflow;

  params->scale = scale;
  params->zero = zero;
  grid->scale = scale.to_float();
  grid->zero = zero_f;
  grid->lo = lo;
  grid->hi = hi;
  grid->max_code = max_code;
  return Status::kOk;
}

/// The code of x on grid g.
KVQ_HOST_DEVICE std::uint32_t quantize_value(float x, const QuantGrid& g) noexcept {
  // Sequential (not nested) selects: compilers turn them into branch-free vector code.
  float clipped = x < g.lo ? g.lo : x;
  clipped = clipped > g.hi ? g.hi : clipped;
  float v = divide_rn(clipped - g.zero, g.scale);
  const float top = static_cast<float>(g.max_code);
  v = v < 0.0f ? 0.0f : v;
  v = v > top ? top : v;
  return static_cast<std::uint32_t>(static_cast<std::int32_t>(round_half_even_code(v)));
}

/// The value of a code: code * scale + zero, fused (one rounding) wherever the target has FMA,
/// so that every reader of a block (group and matrix dequantization, cache read-back, attention)
/// sees the same value whatever the compiler's contraction settings.
KVQ_HOST_DEVICE float dequantize_value(std::uint32_t code, float scale, float zero) noexcept {
#if KVQ_DEVICE_PASS
  return __fmaf_rn(static_cast<float>(code), scale, zero);
#elif defined(__FMA__)
  return __builtin_fmaf(static_cast<float>(code), scale, zero);
#else
  return static_cast<float>(code) * scale + zero;
#endif
}

}  // namespace kvq
