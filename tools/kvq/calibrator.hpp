// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Calibrations for `kvq calibrate` and `kvq eval`: one data pass over the calibration
///        text shared by every policy that needs it, provenance, and a cache of calibration
///        files (by default ~/.cache/kvq/calib/) keyed by everything that determines them.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "kvq/cache/calibration_io.hpp"
#include "kvq/core/thread_pool.hpp"
#include "llm/calibrate.hpp"
#include "llm/load.hpp"
#include "llm/text.hpp"

namespace kvq_tool {

/// The text a calibration reads.
struct CalibrationText {
  std::string path;
  kvq::llm::TextPart part = kvq::llm::TextPart::kFirstHalf;
  int tokens = 2048;  ///< text tokens (BOS not counted)
};

/// How calibrations are computed.
struct CalibrationSettings {
  kvq::llm::SkvqOptions skvq{};
  kvq::llm::CskvOptions cskv{};
  int sample_tokens = 512;  ///< tokens of the SKVQ clip-search sample
};

/// One calibration and where it came from.
struct CalibrationRun {
  std::string policy;
  kvq::CacheCalibration calibration;
  kvq::CalibrationInfo info;
  std::string file;                        ///< the calibration file read or written
  bool cached = false;                     ///< read from the cache directory
  std::vector<kvq::llm::LayerReport> layers;  ///< computed runs only
  std::string label;                       ///< e.g. "cross-head reorder, clip search"
  kvq::calib::FactorMethod factors = kvq::calib::FactorMethod::kRefit;  ///< CSKV, computed runs: the factors held
};

/// $KVQ_MODEL_CACHE/calib, else $XDG_CACHE_HOME/kvq/calib, else ~/.cache/kvq/calib.
std::string default_calibration_dir();

class Calibrator {
 public:
  /// progress: draw progress bars on stderr.
  Calibrator(const kvq::llm::LoadedModel& model, std::string model_path, CalibrationText text,
             CalibrationSettings settings, kvq::ThreadPool* pool, bool progress);

  /// The calibration of `policy` (a registered SKVQ or CSKV policy): from `cache_dir` when a file
  /// made with the same model, text, settings and kvq version is there, else computed and stored
  /// there (cache_dir empty: computed, not stored).
  CalibrationRun get(const std::string& policy, const std::string& cache_dir);

  /// Computes the calibration of `policy` (the data pass runs once per Calibrator).
  CalibrationRun compute(const std::string& policy);

  /// Replaces the SKVQ and CSKV options of later computations; the data pass (text, sample
  /// size) stays, so a sweep over options reads the text once.
  void set_method_options(const kvq::llm::SkvqOptions& skvq, const kvq::llm::CskvOptions& cskv);

  /// The calibration file of a computed run.
  kvq::CalibrationFile file_of(const CalibrationRun& run) const;

  /// "first half of /usr/share/dasher/training_english_GB.txt, 2048 tokens"
  std::string text_label() const;

 private:
  const kvq::llm::CalibrationData& data();
  std::string cache_key(const std::string& policy) const;
  std::vector<std::pair<std::string, std::string>> provenance(const std::string& policy) const;

  const kvq::llm::LoadedModel& model_;
  std::string model_path_;
  CalibrationText text_;
  CalibrationSettings settings_;
  kvq::ThreadPool* pool_;
  bool progress_;
  mutable std::string model_sha256_, text_sha256_;
  std::optional<kvq::llm::CalibrationData> data_;
  int fed_tokens_ = 0;
};

}  // namespace kvq_tool
