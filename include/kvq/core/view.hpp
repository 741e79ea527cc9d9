// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Non-owning views: Span<T> (contiguous) and StridedView<T, Rank> (strided, row-major
///        indexing), plus host-side shape checks that throw kvq::Error.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "kvq/config.hpp"
#include "kvq/core/bits.hpp"
#include "kvq/core/error.hpp"

namespace kvq {

/// A contiguous range of size() elements starting at data(). Does not own them.
template <class T>
class Span {
 public:
  Span() = default;
  KVQ_HOST_DEVICE constexpr Span(T* data, std::size_t size) noexcept : data_(data), size_(size) {}
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T>>>
  KVQ_HOST_DEVICE constexpr Span(Span<U> other) noexcept  // NOLINT: Span<T> -> Span<const T>
      : data_(other.data()), size_(other.size()) {}

  KVQ_HOST_DEVICE constexpr T* data() const noexcept { return data_; }
  KVQ_HOST_DEVICE constexpr std::size_t size() const noexcept { return size_; }
  KVQ_HOST_DEVICE constexpr bool empty() const noexcept { return size_ == 0; }
  KVQ_HOST_DEVICE constexpr T& operator[](std::size_t i) const noexcept { return data_[i]; }
  KVQ_HOST_DEVICE constexpr T* begin() const noexcept { return data_; }
  KVQ_HOST_DEVICE constexpr T* end() const noexcept { return data_ + size_; }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

/// A Rank-dimensional view: element (i0, ..., iR-1) lives at data[sum_d i_d * stride_d].
/// Extents and strides are in elements. Does not own the elements.
template <class T, int Rank>
class StridedView {
  static_assert(Rank >= 1 && Rank <= 4, "kvq: StridedView supports ranks 1 to 4");

 public:
  using element_type = T;
  static constexpr int rank = Rank;

  StridedView() = default;
  KVQ_HOST_DEVICE StridedView(T* data, const index_t (&extents)[Rank],
                              const index_t (&strides)[Rank]) noexcept
      : data_(data) {
    for (int d = 0; d < Rank; ++d) {
      extents_[d] = extents[d];
      strides_[d] = strides[d];
    }
  }
  /// Row-major contiguous view of the given extents.
  KVQ_HOST_DEVICE StridedView(T* data, const index_t (&extents)[Rank]) noexcept : data_(data) {
    index_t stride = 1;
    for (int d = Rank - 1; d >= 0; --d) {
      extents_[d] = extents[d];
      strides_[d] = stride;
      stride *= extents[d];
    }
  }
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T>>>
  KVQ_HOST_DEVICE StridedView(const StridedView<U, Rank>& other) noexcept  // NOLINT: to const
      : data_(other.data()) {
    for (int d = 0; d < Rank; ++d) {
      extents_[d] = other.extent(d);
      strides_[d] = other.stride(d);
    }
  }

  KVQ_HOST_DEVICE T* data() const noexcept { return data_; }
  KVQ_HOST_DEVICE index_t extent(int d) const noexcept { return extents_[d]; }
  KVQ_HOST_DEVICE index_t stride(int d) const noexcept { return strides_[d]; }
  KVQ_HOST_DEVICE index_t size() const noexcept {
    index_t n = 1;
    for (int d = 0; d < Rank; ++d) n *= extents_[d];
    return n;
  }

  template <class... I>
  KVQ_HOST_DEVICE T& operator()(I... idx) const noexcept {
    static_assert(sizeof...(I) == Rank, "kvq: StridedView needs one index per dimension");
    const index_t indices[Rank] = {static_cast<index_t>(idx)...};
    index_t offset = 0;
    for (int d = 0; d < Rank; ++d) offset += indices[d] * strides_[d];
    return data_[offset];
  }

  /// The (Rank-1)-dimensional slice at index i of dimension 0.
  template <int R = Rank, class = std::enable_if_t<(R > 1)>>
  KVQ_HOST_DEVICE StridedView<T, Rank - 1> slice(index_t i) const noexcept {
    index_t extents[Rank - 1];
    index_t strides[Rank - 1];
    for (int d = 1; d < Rank; ++d) {
      extents[d - 1] = extents_[d];
      strides[d - 1] = strides_[d];
    }
    return StridedView<T, Rank - 1>(data_ + i * strides_[0], extents, strides);
  }

  /// True when the elements are densely packed in row-major order.
  KVQ_HOST_DEVICE bool is_contiguous() const noexcept {
    index_t expected = 1;
    for (int d = Rank - 1; d >= 0; --d) {
      if (extents_[d] != 1 && strides_[d] != expected) return false;
      expected *= extents_[d];
    }
    return true;
  }

 private:
  T* data_ = nullptr;
  index_t extents_[Rank] = {};
  index_t strides_[Rank] = {};
};

namespace detail {

template <class T, int Rank>
std::string shape_string(const StridedView<T, Rank>& v) {
  std::string s = "[";
  for (int d = 0; d < Rank; ++d) s += (d ? ", " : "") + std::to_string(v.extent(d));
  return s + "]";
}

inline std::string shape_string(std::initializer_list<index_t> extents) {
  std::string s = "[";
  bool first = true;
  for (index_t e : extents) {
    s += (first ? "" : ", ") + (e < 0 ? std::string("*") : std::to_string(e));
    first = false;
  }
  return s + "]";
}

}  // namespace detail

/// Throws kvq::Error unless `view` is a well-formed view (non-negative extents, non-null data
/// when non-empty) whose extents equal `expected`; an expected extent of -1 matches any extent.
template <class T, int Rank>
void check_view(const char* where, const char* argument, const StridedView<T, Rank>& view,
                std::initializer_list<index_t> expected) {
  bool ok = expected.size() == static_cast<std::size_t>(Rank);
  int d = 0;
  for (index_t e : expected) {
    if (d < Rank && view.extent(d) < 0) ok = false;
    if (d < Rank && e >= 0 && view.extent(d) != e) ok = false;
    ++d;
  }
  if (!ok) {
    detail::throw_argument_error(where, argument, detail::shape_string(view),
                                 "shape " + detail::shape_string(expected));
  }
  if (view.size() > 0 && view.data() == nullptr) {
    detail::throw_argument_error(where, argument, "null data",
                                 "a view of " + std::to_string(view.size()) + " elements");
  }
}

}  // namespace kvq
