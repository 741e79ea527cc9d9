// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Group quantization of a [tokens, channels] matrix, with groups running along tokens
///        (per-channel quantization, KIVI keys) or along channels (per-token quantization,
///        values and SKVQ, optionally with SKVQ's permuted variable-size channel groups).
///
/// Layout of a quantized matrix (caller-owned buffers; nothing is allocated here):
///   A line is a run of values that is split into groups: a channel column [tokens] for
///   GroupAxis::kTokens, a token row [channels] for GroupAxis::kChannels (in permuted order when
///   channel groups are given). Line l's codes are a packed stream (quant/pack.hpp) of
///   line_length codes at codes + l * line_bytes. Scales and zero-points are arrays
///   [lines, groups_per_line] of the metadata type, stored as raw little-endian bytes.
///   For kTokens this is KIVI's transposed key layout: codes [channels][tokens], metadata
///   [channels][tokens / group_size].
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <bitset>
#include <string>

#include "kvq/core/bits.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/view.hpp"
#include "kvq/quant/bits.hpp"
#include "kvq/quant/group.hpp"
#include "kvq/quant/meta_format.hpp"
#include "kvq/quant/params.hpp"

namespace kvq {

/// The axis a quantization group runs along.
enum class GroupAxis : std::uint8_t {
  kTokens,    ///< groups of consecutive tokens of one channel: per-channel quantization
  kChannels,  ///< groups of channels of one token: per-token quantization
};

/// "token" or "channel", as on the command line (the axis the groups run along).
inline std::string axis_label(GroupAxis a) { return a == GroupAxis::kTokens ? "token" : "channel"; }

/// Parses "token" or "channel".
inline GroupAxis parse_axis(const std::string& text, const char* argument = "axis") {
  if (text == "token") return GroupAxis::kTokens;
  if (text == "channel") return GroupAxis::kChannels;
  detail::throw_argument_error("kvq::parse_axis", argument, text,
                               "'token' (groups along tokens, per-channel quantization) or "
                               "'channel' (groups along channels, per-token quantization)");
}

/// Largest channel count that SKVQ channel groups support (kv_hidden of real models is at most
/// a few thousand; SKVQ's own kernel indexes channels with int16).
inline constexpr index_t kMaxPermutedChannels = 65536;

/// SKVQ channel groups: position p of a reordered token row holds channel permutation[p];
/// group g covers positions [boundaries[g], boundaries[g + 1]).
/// permutation: [channels], a bijection of 0 .. channels-1;
/// boundaries: [groups + 1], strictly increasing from 0 to channels.
struct ChannelGroups {
  Span<const std::int32_t> permutation;
  Span<const std::int32_t> boundaries;
  bool empty() const noexcept { return permutation.empty() && boundaries.empty(); }
};

/// How to quantize a matrix.
struct MatrixQuantSpec {
  Bits bits = Bits::k2;
  GroupAxis axis = GroupAxis::kTokens;
  /// Uniform group length; must divide the length of the axis. Ignored with channel_groups.
  index_t group_size = 32;
  /// Clip ratio alpha in (0, 1]; 1 = plain min/max (KIVI).
  float clip = 1.0f;
  MetaFormat meta = MetaFormat::kFp16;
  /// Optional SKVQ variable channel groups; requires axis == GroupAxis::kChannels.
  ChannelGroups channel_groups{};
};

/// Sizes of a quantized matrix (see the file comment for the layout).
struct MatrixLayout {
  index_t tokens = 0;
  index_t channels = 0;
  index_t lines = 0;
  index_t line_length = 0;
  index_t groups_per_line = 0;
  std::size_t line_bytes = 0;  ///< packed bytes of one line
  std::size_t code_bytes = 0;  ///< lines * line_bytes
  std::size_t meta_bytes = 0;  ///< bytes of the scale array (the zero array is as large)

  /// Every byte the quantized matrix occupies: codes, scales and zero-points.
  std::size_t total_bytes() const noexcept { return code_bytes + 2 * meta_bytes; }
  /// Measured storage per element, from the byte counts above.
  double bits_per_element() const noexcept {
    const double n = static_cast<double>(tokens) * static_cast<double>(channels);
    return n > 0 ? 8.0 * static_cast<double>(total_bytes()) / n : 0.0;
  }
};

/// Caller-owned buffers of a quantized matrix: at least code_bytes and meta_bytes each.
struct QuantizedMatrixRef {
  Span<std::uint8_t> codes;
  Span<std::uint8_t> scales;
  Span<std::uint8_t> zeros;
};
struct ConstQuantizedMatrixRef {
  Span<const std::uint8_t> codes;
  Span<const std::uint8_t> scales;
  Span<const std::uint8_t> zeros;
};

namespace detail {

inline void check_channel_groups(const char* where, const ChannelGroups& g, index_t channels) {
  if (channels > kMaxPermutedChannels) {
    throw_argument_error(where, "channels", channels,
                         concat("at most ", kMaxPermutedChannels, " channels with channel groups"));
  }
  if (g.permutation.size() != static_cast<std::size_t>(channels)) {
    throw_argument_error(where, "channel_groups.permutation",
                         concat("a permutation of ", g.permutation.size(), " channels"),
                         concat("one entry per channel (", channels, ")"));
  }
  std::bitset<kMaxPermutedChannels> seen;  // 8 KiB on the stack; no allocation
  for (std::size_t p = 0; p < g.permutation.size(); ++p) {
    const std::int32_t c = g.permutation[p];
    if (c < 0 || c >= channels || seen[static_cast<std::size_t>(c)]) {
      throw_argument_error(where, "channel_groups.permutation",
                           concat("entry ", p, " = ", c),
                           concat("a bijection of 0..", channels - 1,
                                  " (each channel exactly once)"));
    }
    seen[static_cast<std::size_t>(c)] = true;
  }
  const auto& b = g.boundaries;
  if (b.size() < 2 || b[0] != 0 || b[b.size() - 1] != channels) {
    throw_argument_error(where, "channel_groups.boundaries",
                         concat(b.size(), " boundaries from ", b.empty() ? -1 : b[0], " to ",
                                b.empty() ? -1 : b[b.size() - 1]),
                         concat("at least 2 boundaries from 0 to ", channels));
  }
  for (std::size_t i = 1; i < b.size(); ++i) {
    if (b[i] <= b[i - 1]) {
      throw_argument_error(where, "channel_groups.boundaries",
                           concat("boundaries[", i, "] = ", b[i], " after ", b[i - 1]),
                           "strictly increasing boundaries (no empty group)");
    }
  }
}

/// Start and length of group g of a line.
struct GroupSpan {
  index_t start;
  index_t length;
};

inline GroupSpan group_span(const MatrixQuantSpec& spec, index_t g) noexcept {
  if (!spec.channel_groups.empty()) {
    const auto& b = spec.channel_groups.boundaries;
    return {b[static_cast<std::size_t>(g)],
            b[static_cast<std::size_t>(g) + 1] - b[static_cast<std::size_t>(g)]};
  }
  return {g * spec.group_size, spec.group_size};
}

template <class Meta>
GroupParams<Meta> load_params(const std::uint8_t* scales, const std::uint8_t* zeros,
                              std::size_t index) noexcept {
  GroupParams<Meta> p{};
  std::memcpy(&p.scale, scales + index * sizeof(Meta), sizeof(Meta));
  std::memcpy(&p.zero, zeros + index * sizeof(Meta), sizeof(Meta));
  return p;
}

template <class Meta>
void store_params(std::uint8_t* scales, std::uint8_t* zeros, std::size_t index,
                  GroupParams<Meta> p) noexcept {
  std::memcpy(scales + index * sizeof(Meta), &p.scale, sizeof(Meta));
  std::memcpy(zeros + index * sizeof(Meta), &p.zero, sizeof(Meta));
}

/// Calls f(line, group, span) for every group of the matrix.
template <class F>
void for_each_group(const MatrixLayout& layout, const MatrixQuantSpec& spec, F&& f) {
  if (spec.axis == GroupAxis::kTokens) {
    // Token-group outer, channel inner: consecutive groups read neighbouring elements of the
    // same rows, so a row-major input streams through the cache once.
    for (index_t g = 0; g < layout.groups_per_line; ++g) {
      for (index_t line = 0; line < layout.lines; ++line) f(line, g, group_span(spec, g));
    }
  } else {
    for (index_t line = 0; line < layout.lines; ++line) {
      for (index_t g = 0; g < layout.groups_per_line; ++g) f(line, g, group_span(spec, g));
    }
  }
}

}  // namespace detail

/// Validates `spec` for a [tokens, channels] matrix and returns the sizes of its quantized form.
/// Throws kvq::Error naming the offending argument.
inline MatrixLayout plan_matrix(index_t tokens, index_t channels, const MatrixQuantSpec& spec) {
  constexpr const char* where = "kvq::plan_matrix";
  if (tokens < 0) detail::throw_argument_error(where, "tokens", tokens, "tokens >= 0");
  if (channels < 0) detail::throw_argument_error(where, "channels", channels, "channels >= 0");
  check_bits(where, "bits", spec.bits);
  if (!(spec.clip > 0.0f && spec.clip <= 1.0f)) {
    detail::throw_argument_error(where, "clip", spec.clip, "a clip ratio in (0, 1]");
  }
  if (spec.meta != MetaFormat::kFp16 && spec.meta != MetaFormat::kBf16 &&
      spec.meta != MetaFormat::kFp8E4M3) {
    detail::throw_argument_error(where, "meta", static_cast<int>(spec.meta), "fp16, bf16 or fp8");
  }
  if (spec.axis != GroupAxis::kTokens && spec.axis != GroupAxis::kChannels) {
    detail::throw_argument_error(where, "axis", static_cast<int>(spec.axis),
                                 "GroupAxis::kTokens or GroupAxis::kChannels");
  }
  MatrixLayout l;
  l.tokens = tokens;
  l.channels = channels;
  const bool along_tokens = spec.axis == GroupAxis::kTokens;
  l.lines = along_tokens ? channels : tokens;
  l.line_length = along_tokens ? tokens : channels;
  if (!spec.channel_groups.empty()) {
    if (along_tokens) {
      detail::throw_argument_error(where, "channel_groups", "given with axis 'token'",
                                   "channel groups only with axis 'channel' (per-token groups)");
    }
    detail::check_channel_groups(where, spec.channel_groups, channels);
    l.groups_per_line = static_cast<index_t>(spec.channel_groups.boundaries.size()) - 1;
  } else {
    const char* axis_name = along_tokens ? "token count" : "channel count";
    if (spec.group_size <= 0 || (l.line_length > 0 && l.line_length % spec.group_size != 0)) {
      detail::throw_argument_error(
          where, "group_size", spec.group_size,
          detail::concat("a positive divisor of the ", axis_name, " ", l.line_length,
                         along_tokens ? " (a partial token group belongs in the full-precision "
                                        "window, not in a quantized group)"
                                      : ""));
    }
    l.groups_per_line = l.line_length / spec.group_size;
  }
  l.line_bytes = packed_bytes(spec.bits, static_cast<std::size_t>(l.line_length));
  l.code_bytes = static_cast<std::size_t>(l.lines) * l.line_bytes;
  l.meta_bytes = static_cast<std::size_t>(l.lines) * static_cast<std::size_t>(l.groups_per_line) *
                 meta_bytes(spec.meta);
  return l;
}

namespace detail {

inline void check_buffers(const char* where, const MatrixLayout& l, std::size_t codes,
                          std::size_t scales, std::size_t zeros) {
  if (codes < l.code_bytes) {
    throw_argument_error(where, "codes", concat(codes, " bytes"),
                         concat("at least ", l.code_bytes, " bytes"));
  }
  if (scales < l.meta_bytes) {
    throw_argument_error(where, "scales", concat(scales, " bytes"),
                         concat("at least ", l.meta_bytes, " bytes"));
  }
  if (zeros < l.meta_bytes) {
    throw_argument_error(where, "zeros", concat(zeros, " bytes"),
                         concat("at least ", l.meta_bytes, " bytes"));
  }
}

/// Input element (token, channel) of position i of group (line, span).
inline void group_element(const MatrixQuantSpec& spec, index_t line, GroupSpan span, index_t i,
                          index_t* token, index_t* channel) noexcept {
  if (spec.axis == GroupAxis::kTokens) {
    *token = span.start + i;
    *channel = line;
  } else {
    *token = line;
    const index_t p = span.start + i;
    *channel = spec.channel_groups.empty()
                   ? p
                   : static_cast<index_t>(spec.channel_groups.permutation[static_cast<std::size_t>(p)]);
  }
}

template <class T, class F>
decltype(auto) with_group_loader(StridedView<const T, 2> x, const MatrixQuantSpec& spec,
                                 index_t line, GroupSpan span, F&& f) {
  if (spec.axis == GroupAxis::kTokens) {
    return f(StridedLoader<T>{&x(span.start, line), x.stride(0)});
  }
  if (spec.channel_groups.empty()) {
    if (x.stride(1) == 1) return f(ContiguousLoader<T>{&x(line, span.start)});
    return f(StridedLoader<T>{&x(line, span.start), x.stride(1)});
  }
  return f(GatherLoader<T>{&x(line, 0), spec.channel_groups.permutation.data() + span.start,
                           x.stride(1)});
}

/// Calls f with the storer of group (line, span) of y (the mirror of with_group_loader).
template <class T, class F>
void with_group_storer(StridedView<T, 2> y, const MatrixQuantSpec& spec, index_t line,
                       GroupSpan span, F&& f) {
  if (spec.axis == GroupAxis::kTokens) {
    f(StridedStorer<T>{&y(span.start, line), y.stride(0)});
  } else if (!spec.channel_groups.empty()) {
    f(ScatterStorer<T>{&y(line, 0), spec.channel_groups.permutation.data() + span.start, y.stride(1)});
  } else if (y.stride(1) == 1) {
    f(ContiguousStorer<T>{&y(line, span.start)});
  } else {
    f(StridedStorer<T>{&y(line, span.start), y.stride(1)});
  }
}

/// Quantizes the groups of line `row` of a per-token (GroupAxis::kChannels) matrix x, group g
/// covering group_span(spec, g), into the line's packed codes `line_codes` and the parameters at
/// index meta_index + g * meta_stride of `scales` / `zeros`. With line_codes == nullptr nothing is written:
/// the groups are only planned (validated). Returns kOk, or the first failing group's status
/// with its index in *failed_group (nothing of that group or later ones is written).
/// The one per-token group loop: quantize_matrix, the cache's block encoder and its append-time
/// checks all call it.
template <Bits B, class Meta, class T>
Status quantize_token_line(StridedView<const T, 2> x, index_t row, const MatrixQuantSpec& spec,
                           index_t groups_per_line, std::uint8_t* line_codes, std::uint8_t* scales,
                           std::uint8_t* zeros, std::size_t meta_index, std::size_t meta_stride,
                           index_t* failed_group) {
  for (index_t g = 0; g < groups_per_line; ++g) {
    const GroupSpan span = group_span(spec, g);
    const Status s = with_group_loader<T>(x, spec, row, span, [&](const auto& load) {
      GroupParams<Meta> p{};
      if (line_codes == nullptr) {
        QuantGrid grid{};
        return plan_group<B>(load, span.length, spec.clip, &p, &grid);
      }
      const Status q = quantize_group<B>(load, span.length, spec.clip, line_codes,
                                         static_cast<std::size_t>(span.start), &p);
      if (q == Status::kOk) store_params(scales, zeros, meta_index + static_cast<std::size_t>(g) * meta_stride, p);
      return q;
    });
    if (s != Status::kOk) {
      *failed_group = g;
      return s;
    }
  }
  return Status::kOk;
}

/// Calls f(integral_constant<Bits, B>, Meta{}) for the spec's runtime width and metadata format.
template <class F>
void dispatch_spec(const MatrixQuantSpec& spec, F&& f) {
  dispatch_bits(spec.bits, [&](auto bits_tag) {
    dispatch_meta(spec.meta, [&](auto meta_tag) { f(bits_tag, meta_tag); });
  });
}

/// Throws the kvq::Error for group g of `line` whose planning returned `status`: the first
/// non-finite element with its position, or the group's range that its metadata cannot hold.
template <class Meta, class Load>
[[noreturn]] void throw_group_error(const char* where, const MatrixQuantSpec& spec, index_t line,
                                    index_t g, GroupSpan span, const Load& load, Status status) {
  index_t token = 0;
  index_t channel = 0;
  if (status == Status::kNonFiniteInput) {
    for (index_t i = 0; i < span.length; ++i) {
      if (!is_finite_value(load(i))) {
        group_element(spec, line, span, i, &token, &channel);
        throw_argument_error(where, "x", concat(load(i), " at [token ", token, ", channel ", channel, "]"),
                             "finite values (NaN and Inf cannot be quantized)", status);
      }
    }
  }
  group_element(spec, line, span, 0, &token, &channel);
  const GroupRange r = group_range(load, span.length);
  throw_argument_error(
      where, "x",
      concat("group ", g, " of ", spec.axis == GroupAxis::kTokens ? "channel " : "token ", line,
             " (from [token ", token, ", channel ", channel, "]) with range [", r.min, ", ", r.max, "]"),
      concat("a range whose zero-point and scale fit ", meta_label(spec.meta),
             " (largest finite value ", Meta::max().to_float(), ")"),
      status);
}

}  // namespace detail

/// Quantizes x [tokens, channels] (float, Float16 or BFloat16) into `out` as `spec` says.
/// The whole input is validated first (shape, buffer sizes, finite values, metadata range):
/// on any error kvq::Error is thrown and `out` is left untouched.
template <class T>
void quantize_matrix(StridedView<const T, 2> x, const MatrixQuantSpec& spec,
                     QuantizedMatrixRef out) {
  constexpr const char* where = "kvq::quantize_matrix";
  check_view(where, "x", x, {-1, -1});
  const MatrixLayout layout = plan_matrix(x.extent(0), x.extent(1), spec);
  detail::check_buffers(where, layout, out.codes.size(), out.scales.size(), out.zeros.size());
  detail::dispatch_spec(spec, [&](auto bits_tag, auto meta_tag) {
    constexpr Bits B = decltype(bits_tag)::value;
    using Meta = decltype(meta_tag);
    if (spec.axis == GroupAxis::kChannels) {
      // Pass 1 validates every line without writing; pass 2 quantizes and packs.
      for (int pass = 0; pass < 2; ++pass) {
        for (index_t line = 0; line < layout.lines; ++line) {
          index_t g = 0;
          const Status s = detail::quantize_token_line<B, Meta>(
              x, line, spec, layout.groups_per_line,
              pass == 0 ? nullptr : out.codes.data() + static_cast<std::size_t>(line) * layout.line_bytes,
              out.scales.data(), out.zeros.data(), static_cast<std::size_t>(line * layout.groups_per_line), 1, &g);
          if (s != Status::kOk) {
            const detail::GroupSpan span = detail::group_span(spec, g);
            detail::with_group_loader<T>(x, spec, line, span, [&](const auto& load) {
              detail::throw_group_error<Meta>(where, spec, line, g, span, load, s);
            });
          }
        }
      }
      return;
    }
    // Per-channel groups: pass 1 validates every group without writing, pass 2 quantizes.
    detail::for_each_group(layout, spec, [&](index_t line, index_t g, detail::GroupSpan span) {
      detail::with_group_loader<T>(x, spec, line, span, [&](const auto& load) {
        GroupParams<Meta> p{};
        QuantGrid grid{};
        const Status s = plan_group<B>(load, span.length, spec.clip, &p, &grid);
        if (s != Status::kOk) detail::throw_group_error<Meta>(where, spec, line, g, span, load, s);
      });
    });
    detail::for_each_group(layout, spec, [&](index_t line, index_t g, detail::GroupSpan span) {
      detail::with_group_loader<T>(x, spec, line, span, [&](const auto& load) {
        GroupParams<Meta> p{};
        quantize_group<B>(load, span.length, spec.clip,
                          out.codes.data() + static_cast<std::size_t>(line) * layout.line_bytes,
                          static_cast<std::size_t>(span.start), &p);
        detail::store_params(out.scales.data(), out.zeros.data(),
                             static_cast<std::size_t>(line * layout.groups_per_line + g), p);
      });
    });
  });
}

/// Dequantizes `in` (quantized by quantize_matrix with the same spec) into y [tokens, channels]
/// (float, Float16 or BFloat16).
template <class T>
void dequantize_matrix(ConstQuantizedMatrixRef in, const MatrixQuantSpec& spec,
                       StridedView<T, 2> y) {
  constexpr const char* where = "kvq::dequantize_matrix";
  check_view(where, "y", y, {-1, -1});
  const MatrixLayout layout = plan_matrix(y.extent(0), y.extent(1), spec);
  detail::check_buffers(where, layout, in.codes.size(), in.scales.size(), in.zeros.size());
  detail::dispatch_spec(spec, [&](auto bits_tag, auto meta_tag) {
    constexpr Bits B = decltype(bits_tag)::value;
    using Meta = decltype(meta_tag);
    detail::for_each_group(layout, spec, [&](index_t line, index_t g, detail::GroupSpan span) {
      const auto p = detail::load_params<Meta>(
          in.scales.data(), in.zeros.data(),
          static_cast<std::size_t>(line * layout.groups_per_line + g));
      detail::with_group_storer<T>(y, spec, line, span, [&](const auto& store) {
        dequantize_group<B>(in.codes.data() + static_cast<std::size_t>(line) * layout.line_bytes,
                            static_cast<std::size_t>(span.start), span.length, p, store);
      });
    });
  });
}

}  // namespace kvq
