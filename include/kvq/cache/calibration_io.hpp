// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief A cache's calibration (CacheCalibration) as a kvq calibration file and back: which
///        metadata and arrays the container of io/calibration_file.hpp holds, and their checks.
///
/// Metadata (string values):
///   kvq.format        "kvq-cache-calibration" (what the container holds)
///   kvq.version       the kvq version that wrote the file, "major.minor.patch"
///   policy            the policy the calibration was made for (e.g. "skvq-k2v2-g128-w128-s5")
///   method            "skvq" or "cskv" (or another method's name)
///   num_layers, num_kv_heads, head_dim   the model shape (decimal)
///   anything else     provenance written by the caller (model file and sha256, text, tokens,
///                     options, ...), kept in order
/// Arrays, for stream s in {keys, values} and layer l (decimal, no padding):
///   s.l.clip          float32 []                clip ratio (absent: 0, the policy's)
///   s.l.permutation   int32 [width]             SKVQ channel order (width = num_kv_heads * head_dim)
///   s.l.boundaries    int32 [groups + 1]        SKVQ group boundaries (with the permutation)
///   s.l.down          float32 [width, rank]     CSKV A
///   s.l.up            float32 [rank, width]     CSKV B
///   report.*          any arrays the caller adds (per-layer errors of the calibration); ignored
/// Reading checks all of it (required keys, numbers, the shape of every array, permutations that
/// are bijections, boundaries that cover the row, clip ratios in (0, 1], no unknown array) and
/// throws kvq::Error(kFormatError) naming the file, the entry and what was expected; nothing
/// half-read is returned. Whether the calibration fits a given policy and model is checked by
/// check_calibration_fits() and, in full, by the cache's constructor.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kvq/cache/cache_config.hpp"
#include "kvq/config.hpp"
#include "kvq/core/error.hpp"
#include "kvq/io/calibration_file.hpp"
#include "kvq/quant/matrix.hpp"

namespace kvq {

/// What a calibration file says about itself.
struct CalibrationInfo {
  std::string policy;
  std::string method;
  index_t num_layers = 0;
  index_t num_kv_heads = 0;
  index_t head_dim = 0;
  /// Provenance and options, in file order (every metadata entry not listed above).
  std::vector<std::pair<std::string, std::string>> provenance;

  /// The provenance value of `key`, or `fallback`.
  std::string get(const std::string& key, const std::string& fallback = "") const {
    for (const auto& kv : provenance) {
      if (kv.first == key) return kv.second;
    }
    return fallback;
  }
};

inline constexpr const char* kCacheCalibrationFormat = "kvq-cache-calibration";

namespace detail {

inline std::string kvq_version_string() {
  return concat(KVQ_VERSION_MAJOR, ".", KVQ_VERSION_MINOR, ".", KVQ_VERSION_PATCH);
}

inline bool is_reserved_calibration_key(const std::string& key) {
  return key == "kvq.format" || key == "kvq.version" || key == "policy" || key == "method" || key == "num_layers" ||
         key == "num_kv_heads" || key == "head_dim";
}

[[noreturn]] inline void calibration_format_error(const std::string& source, const std::string& what,
                                                  const std::string& expected) {
  throw Error(Status::kFormatError,
              concat("kvq::read_cache_calibration: file '", source, "': ", what, "; expected ", expected));
}

inline index_t parse_calibration_count(const CalibrationFile& file, const std::string& source, const char* key) {
  const std::string* v = file.find_metadata(key);
  if (v == nullptr) calibration_format_error(source, concat("metadata '", key, "' is missing"), "a positive count");
  index_t n = 0;
  bool ok = !v->empty() && v->size() <= 9;
  for (char ch : *v) {
    if (ch < '0' || ch > '9') ok = false;
    if (ok) n = n * 10 + (ch - '0');
  }
  if (!ok || n <= 0) calibration_format_error(source, concat("metadata '", key, "' = '", *v, "'"), "a positive count");
  return n;
}

inline std::string stream_array_name(bool is_key, index_t layer, const char* field) {
  return concat(is_key ? "keys." : "values.", layer, ".", field);
}

}  // namespace detail

/// The calibration file of `calibration`: the metadata of `info` (provenance entries must not
/// reuse the reserved keys) and the arrays of every non-empty field, plus `report` arrays (their
/// names are prefixed with "report." when they lack it).
inline CalibrationFile make_calibration_file(const CalibrationInfo& info, const CacheCalibration& calibration,
                                             std::vector<CalibrationArray> report = {}) {
  constexpr const char* where = "kvq::make_calibration_file";
  if (info.num_layers <= 0 || info.num_kv_heads <= 0 || info.head_dim <= 0) {
    detail::throw_argument_error(where, "info", detail::concat(info.num_layers, " layers, ", info.num_kv_heads, " kv heads, head_dim ", info.head_dim),
                                 "a positive model shape");
  }
  for (const auto* list : {&calibration.keys, &calibration.values}) {
    if (!list->empty() && list->size() != static_cast<std::size_t>(info.num_layers)) {
      detail::throw_argument_error(where, list == &calibration.keys ? "calibration.keys" : "calibration.values",
                                   detail::concat(list->size(), " layers"), detail::concat("none or ", info.num_layers));
    }
  }
  CalibrationFile f;
  f.metadata = {{"kvq.format", kCacheCalibrationFormat},
                {"kvq.version", detail::kvq_version_string()},
                {"policy", info.policy},
                {"method", info.method},
                {"num_layers", detail::concat(info.num_layers)},
                {"num_kv_heads", detail::concat(info.num_kv_heads)},
                {"head_dim", detail::concat(info.head_dim)}};
  for (const auto& kv : info.provenance) {
    if (detail::is_reserved_calibration_key(kv.first)) {
      detail::throw_argument_error(where, "info.provenance", kv.first, "a key other than the reserved ones");
    }
    f.metadata.push_back(kv);
  }
  auto add = [&](bool is_key, const std::vector<StreamCalibration>& layers) {
    for (std::size_t l = 0; l < layers.size(); ++l) {
      const StreamCalibration& s = layers[l];
      const auto layer = static_cast<index_t>(l);
      if (s.clip != 0.0f) {
        CalibrationArray a;
        a.name = detail::stream_array_name(is_key, layer, "clip");
        a.dtype = CalibrationDtype::kFloat32;
        a.f32 = {s.clip};
        f.arrays.push_back(std::move(a));
      }
      for (const auto& [field, values] : {std::pair<const char*, const std::vector<std::int32_t>*>{"permutation", &s.permutation},
                                          {"boundaries", &s.boundaries}}) {
        if (values->empty()) continue;
        CalibrationArray a;
        a.name = detail::stream_array_name(is_key, layer, field);
        a.dtype = CalibrationDtype::kInt32;
        a.shape = {static_cast<std::int64_t>(values->size())};
        a.i32 = *values;
        f.arrays.push_back(std::move(a));
      }
      if (!s.latent.empty()) {
        const auto w = static_cast<std::int64_t>(s.latent.width), r = static_cast<std::int64_t>(s.latent.rank);
        for (const bool is_down : {true, false}) {
          CalibrationArray a;
          a.name = detail::stream_array_name(is_key, layer, is_down ? "down" : "up");
          a.dtype = CalibrationDtype::kFloat32;
          a.shape = is_down ? std::vector<std::int64_t>{w, r} : std::vector<std::int64_t>{r, w};
          a.f32 = is_down ? s.latent.down : s.latent.up;
          f.arrays.push_back(std::move(a));
        }
      }
    }
  };
  add(true, calibration.keys);
  add(false, calibration.values);
  for (CalibrationArray& a : report) {
    if (a.name.rfind("report.", 0) != 0) a.name = "report." + a.name;
    f.arrays.push_back(std::move(a));
  }
  return f;
}

/// The calibration held by a calibration file, checked as the file comment says. `source`
/// names the file in errors; *info (may be null) receives the file's description.
inline CacheCalibration read_cache_calibration(const CalibrationFile& file, const std::string& source,
                                               CalibrationInfo* info = nullptr) {
  const std::string* format = file.find_metadata("kvq.format");
  if (format == nullptr || *format != kCacheCalibrationFormat) {
    detail::calibration_format_error(source, format ? "metadata 'kvq.format' = '" + *format + "'" : "no metadata 'kvq.format'",
                                     detail::concat("'", kCacheCalibrationFormat, "' (a file written by kvq calibrate)"));
  }
  CalibrationInfo i;
  for (const char* key : {"policy", "method", "kvq.version"}) {
    const std::string* v = file.find_metadata(key);
    if (v == nullptr || v->empty()) detail::calibration_format_error(source, detail::concat("metadata '", key, "' is missing"), "a non-empty value");
  }
  i.policy = *file.find_metadata("policy");
  i.method = *file.find_metadata("method");
  i.num_layers = detail::parse_calibration_count(file, source, "num_layers");
  i.num_kv_heads = detail::parse_calibration_count(file, source, "num_kv_heads");
  i.head_dim = detail::parse_calibration_count(file, source, "head_dim");
  for (const auto& kv : file.metadata) {
    if (!detail::is_reserved_calibration_key(kv.first)) i.provenance.push_back(kv);
  }
  const index_t width = i.num_kv_heads * i.head_dim;
  if (width > kMaxPermutedChannels) {
    detail::calibration_format_error(source, detail::concat("a row of ", width, " channels"),
                                     detail::concat("at most ", kMaxPermutedChannels));
  }

  // Every array must be one the format defines.
  std::vector<char> used(file.arrays.size(), 0);
  auto find = [&](const std::string& name) -> const CalibrationArray* {
    for (std::size_t k = 0; k < file.arrays.size(); ++k) {
      if (file.arrays[k].name == name) {
        used[k] = 1;
        return &file.arrays[k];
      }
    }
    return nullptr;
  };
  auto require_shape = [&](const CalibrationArray& a, CalibrationDtype dtype, const std::vector<std::int64_t>& shape,
                           const std::string& what) {
    bool ok = a.dtype == dtype && a.shape.size() == shape.size();
    for (std::size_t d = 0; ok && d < shape.size(); ++d) ok = shape[d] < 0 ? a.shape[d] > 0 : a.shape[d] == shape[d];
    const std::size_t held = dtype == CalibrationDtype::kInt32 ? a.i32.size() : a.f32.size();
    if (!ok || static_cast<std::int64_t>(held) != a.size()) {
      detail::calibration_format_error(source,
                                       detail::concat("array '", a.name, "' of dtype ", calibration_dtype_name(a.dtype), " and shape ",
                                                      detail::calib_shape_text(a.shape)),
                                       detail::concat(what, " (", calibration_dtype_name(dtype), ", shape ",
                                                      detail::calib_shape_text(shape, true), ")"));
    }
  };

  CacheCalibration c;
  for (const bool is_key : {true, false}) {
    std::vector<StreamCalibration> layers(static_cast<std::size_t>(i.num_layers));
    bool any = false;
    for (index_t l = 0; l < i.num_layers; ++l) {
      StreamCalibration& s = layers[static_cast<std::size_t>(l)];
      if (const CalibrationArray* a = find(detail::stream_array_name(is_key, l, "clip"))) {
        require_shape(*a, CalibrationDtype::kFloat32, {}, "a clip ratio");
        s.clip = a->f32[0];
        if (!(s.clip > 0.0f && s.clip <= 1.0f)) {
          detail::calibration_format_error(source, detail::concat("array '", a->name, "' = ", s.clip), "a clip ratio in (0, 1]");
        }
        any = true;
      }
      const CalibrationArray* perm = find(detail::stream_array_name(is_key, l, "permutation"));
      const CalibrationArray* bounds = find(detail::stream_array_name(is_key, l, "boundaries"));
      if ((perm == nullptr) != (bounds == nullptr)) {
        detail::calibration_format_error(
            source, detail::concat("array '", detail::stream_array_name(is_key, l, perm ? "boundaries" : "permutation"), "' is missing"),
            "a permutation and its group boundaries together");
      }
      if (perm != nullptr) {
        require_shape(*perm, CalibrationDtype::kInt32, {width}, "a channel permutation of the layer row");
        require_shape(*bounds, CalibrationDtype::kInt32, {-1}, "group boundaries");
        s.permutation = perm->i32;
        s.boundaries = bounds->i32;
        try {
          detail::check_channel_groups("kvq::read_cache_calibration", s.groups(), width);
        } catch (const Error& e) {
          detail::calibration_format_error(source, detail::concat("the channel groups of ", is_key ? "keys" : "values", " layer ", l, ": ", e.what()),
                                           "a bijection of the row's channels and increasing boundaries from 0 to the width");
        }
        any = true;
      }
      const CalibrationArray* down = find(detail::stream_array_name(is_key, l, "down"));
      const CalibrationArray* up = find(detail::stream_array_name(is_key, l, "up"));
      if ((down == nullptr) != (up == nullptr)) {
        detail::calibration_format_error(
            source, detail::concat("array '", detail::stream_array_name(is_key, l, down ? "up" : "down"), "' is missing"),
            "the factors A and B together");
      }
      if (down != nullptr) {
        require_shape(*down, CalibrationDtype::kFloat32, {width, -1}, "the latent factor A [width, rank]");
        const std::int64_t rank = down->shape[1];
        if (rank > width) detail::calibration_format_error(source, detail::concat("array '", down->name, "' of rank ", rank), "a rank <= the width");
        require_shape(*up, CalibrationDtype::kFloat32, {rank, width}, "the latent factor B [rank, width]");
        s.latent.width = width;
        s.latent.rank = rank;
        s.latent.down = down->f32;
        s.latent.up = up->f32;
        any = true;
      }
    }
    if (any) (is_key ? c.keys : c.values) = std::move(layers);
  }
  for (std::size_t k = 0; k < file.arrays.size(); ++k) {
    if (!used[k] && file.arrays[k].name.rfind("report.", 0) != 0) {
      detail::calibration_format_error(source, detail::concat("array '", file.arrays[k].name, "'"),
                                       detail::concat("only the arrays of ", i.num_layers,
                                                      " layers (keys.L.*, values.L.*) and report.* arrays"));
    }
  }
  if (info != nullptr) *info = std::move(i);
  return c;
}

/// Reads and checks a calibration file (read_calibration_file + read_cache_calibration).
inline CacheCalibration load_cache_calibration(const std::string& path, CalibrationInfo* info = nullptr) {
  return read_cache_calibration(read_calibration_file(path), path, info);
}

/// Throws kvq::Error naming the file unless the calibration was made for `policy` and a model
/// of this shape.
inline void check_calibration_fits(const CalibrationInfo& info, const std::string& source, const std::string& policy,
                                   const CacheConfig& config) {
  if (info.policy != policy) {
    detail::throw_argument_error("kvq::check_calibration_fits", "calibration", source + " (made for " + info.policy + ")",
                                 "a calibration of " + policy);
  }
  if (info.num_layers != config.num_layers || info.num_kv_heads != config.num_kv_heads || info.head_dim != config.head_dim) {
    detail::throw_argument_error(
        "kvq::check_calibration_fits", "calibration",
        detail::concat(source, " (", info.num_layers, " layers, ", info.num_kv_heads, " kv heads, head_dim ", info.head_dim, ")"),
        detail::concat("a calibration of this model's shape (", config.num_layers, " layers, ", config.num_kv_heads,
                       " kv heads, head_dim ", config.head_dim, ")"));
  }
}

}  // namespace kvq
