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

template <class Load>
KVQ_HOST_DEVICE GroupRange group_range(const Load& load, index_t n) noexcept {
  float mn = load(0);
  float mx = mn;
  bool finite = is_finite_value(mn);
  for (index_t i = 1; i < n; ++i) {
    const float v = load(i);
    finite = finite && is_finite_value(v);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  return {mn, mx, finite};
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
  for (index_t i = 0; i < n; ++i) writer.put(quantize_value(load(i), grid));
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
  for (index_t i = 0; i < n; ++i) store(i, dequantize_value(reader.get(), scale, zero));
}

}  // namespace kvq
