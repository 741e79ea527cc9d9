// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Quantize and dequantize one group of values into / out of a packed code stream.
///
/// A group is read through a loader, load(i) -> float for i in [0, n), so the same code serves
/// contiguous, strided (per-channel: a group runs along tokens) and permuted (SKVQ reordered
/// channels) groups. Allocation-free; host and device.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kvq/config.hpp"
#include "kvq/core/bits.hpp"
#include "kvq/core/float_types.hpp"
#include "kvq/core/status.hpp"
#include "kvq/quant/bits.hpp"
#include "kvq/quant/pack.hpp"
#include "kvq/quant/params.hpp"

namespace kvq {

/// Loads element i of a contiguous run: to_float(data[i]).
template <class T>
struct ContiguousLoader {
  const T* data;
  KVQ_HOST_DEVICE float operator()(index_t i) const noexcept { return to_float(data[i]); }
};

/// Loads element i of a strided run: to_float(data[i * stride]).
template <class T>
struct StridedLoader {
  const T* data;
  index_t stride;
  KVQ_HOST_DEVICE float operator()(index_t i) const noexcept { return to_float(data[i * stride]); }
};

/// Loads element i of a permuted run: to_float(data[index[i] * stride]).
template <class T>
struct GatherLoader {
  const T* data;
  const std::int32_t* index;
  index_t stride;
  KVQ_HOST_DEVICE float operator()(index_t i) const noexcept {
    return to_float(data[static_cast<index_t>(index[i]) * stride]);
  }
};

/// Stores element i of a contiguous run: data[i] = from_float<T>(v).
template <class T>
struct ContiguousStorer {
  T* data;
  KVQ_HOST_DEVICE void operator()(index_t i, float v) const noexcept { data[i] = from_float<T>(v); }
};

/// Stores element i of a strided run: data[i * stride] = from_float<T>(v).
template <class T>
struct StridedStorer {
  T* data;
  index_t stride;
  KVQ_HOST_DEVICE void operator()(index_t i, float v) const noexcept {
    data[i * stride] = from_float<T>(v);
  }
};

/// Stores element i of a permuted run: data[index[i] * stride] = from_float<T>(v).
template <class T>
struct ScatterStorer {
  T* data;
  const std::int32_t* index;
  index_t stride;
  KVQ_HOST_DEVICE void operator()(index_t i, float v) const noexcept {
    data[static_cast<index_t>(index[i]) * stride] = from_float<T>(v);
  }
};

/// Minimum and maximum of a group, and whether every element is finite.
struct GroupRange {
  float min;
  float max;
  bool finite;
};

/// Codes are produced and consumed in chunks of this many elements (a multiple of every pack
/// unit: 5, 4, 8, 2, 1), so that the arithmetic runs in simple loops over a small stack buffer.
inline constexpr index_t kCodeChunk = 80;

/// An integer whose signed order is the order of the (non-NaN) float with bit pattern u; the
/// map is its own inverse. Comparing keys instead of floats lets compilers vectorize min/max
/// reductions, which they may not do for floats without -ffinite-math-only.
KVQ_HOST_DEVICE std::int32_t float_order_key(std::uint32_t u) noexcept {
  const auto s = static_cast<std::int32_t>(u);
  return s ^ ((s >> 31) & 0x7FFFFFFF);  // negative floats: larger magnitude, smaller key
}

template <class Load>
KVQ_HOST_DEVICE GroupRange group_range(const Load& load, index_t n) noexcept {
  std::int32_t key_min = 0x7FFFFFFF;
  std::int32_t key_max = -0x7FFFFFFF - 1;
  std::uint32_t special = 0;  // bit 31 ends up set iff some exponent field is all ones
  for (index_t i = 0; i < n; ++i) {
    const std::uint32_t u = float_to_bits(load(i));
    special |= (u & 0x7F800000u) + 0x00800000u;
    const std::int32_t key = float_order_key(u);
    key_min = key < key_min ? key : key_min;
    key_max = key > key_max ? key : key_max;
  }
  return {bits_to_float(static_cast<std::uint32_t>(float_order_key(static_cast<std::uint32_t>(key_min)))),
          bits_to_float(static_cast<std::uint32_t>(float_order_key(static_cast<std::uint32_t>(key_max)))),
          (special >> 31) == 0};
}

/// Computes a group's parameters without writing any codes: the validation half of
/// quantize_group. Returns kInvalidArgument for n < 1, kNonFiniteInput, or the status of
/// make_group_params.
template <Bits B, class Meta, class Load>
KVQ_HOST_DEVICE Status plan_group(const Load& load, index_t n, float clip,
                                  GroupParams<Meta>* params, QuantGrid* grid) noexcept {
  if (n < 1) return Status::kInvalidArgument;
  const GroupRange r = group_range(load, n);
  if (!r.finite) return Status::kNonFiniteInput;
  return make_group_params<Meta>(r.min, r.max, clip, BitsTraits<B>::max_code, params, grid);
}

/// Quantizes the n values load(0 .. n) with clip ratio `clip` into elements
/// [first, first + n) of the width-B stream and stores the group's parameters in *params.
/// On any failure nothing is written.
template <Bits B, class Meta, class Load>
KVQ_HOST_DEVICE Status quantize_group(const Load& load, index_t n, float clip,
                                      std::uint8_t* stream, std::size_t first,
                                      GroupParams<Meta>* params) noexcept {
  GroupParams<Meta> p{};
  QuantGrid grid{};
  const Status s = plan_group<B>(load, n, clip, &p, &grid);
  if (s != Status::kOk) return s;
  PackedWriter<B> writer(stream, first);
  std::uint8_t codes[kCodeChunk];
  for (index_t i0 = 0; i0 < n; i0 += kCodeChunk) {
    const index_t m = n - i0 < kCodeChunk ? n - i0 : kCodeChunk;
    for (index_t j = 0; j < m; ++j) codes[j] = static_cast<std::uint8_t>(quantize_value(load(i0 + j), grid));
    writer.put_codes(codes, static_cast<std::size_t>(m));
  }
  writer.finish();
  *params = p;
  return Status::kOk;
}

/// Dequantizes elements [first, first + n) of the width-B stream with parameters `params`,
/// calling store(i, value) for i in [0, n).
template <Bits B, class Meta, class Store>
KVQ_HOST_DEVICE void dequantize_group(const std::uint8_t* stream, std::size_t first, index_t n,
                                      GroupParams<Meta> params, const Store& store) noexcept {
  const float scale = params.scale.to_float();
  const float zero = params.zero.to_float();
  PackedReader<B> reader(stream, first);
  std::uint8_t codes[kCodeChunk];
  for (index_t i0 = 0; i0 < n; i0 += kCodeChunk) {
    const index_t m = n - i0 < kCodeChunk ? n - i0 : kCodeChunk;
    reader.get_codes(codes, static_cast<std::size_t>(m));
    for (index_t j = 0; j < m; ++j) store(i0 + j, dequantize_value(codes[j], scale, zero));
  }
}

}  // namespace kvq
