// SPDX-License-Identifier: Apache-2.0
// cache/calibration_io.hpp: a CacheCalibration through a calibration file and back (bytes and
// a real file), the checks of read_cache_calibration (missing or malformed metadata, arrays of
// the wrong shape, bad permutations and boundaries, clip ratios, unknown arrays), every
// truncation and a flipped byte of a real file, and check_calibration_fits.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "kvq/cache/calibration_io.hpp"
#include "kvq/kvq.hpp"
#include "kvq_catch.hpp"
#include "require_error.hpp"
#include "seeds.hpp"

namespace {

using kvq::index_t;
using kvq::Status;

/// A calibration of 3 layers, 2 kv heads of 8 channels: SKVQ-like keys (groups, clip) and
/// CSKV-like values (factors of rank 6, clip on one layer).
kvq::CacheCalibration sample(kvq::Rng& rng) {
  kvq::CacheCalibration c;
  for (int l = 0; l < 3; ++l) {
    kvq::StreamCalibration k;
    for (int ch = 0; ch < 16; ++ch) k.permutation.push_back(ch);
    for (int ch = 15; ch > 0; --ch) std::swap(k.permutation[static_cast<std::size_t>(ch)], k.permutation[rng.below(static_cast<std::uint32_t>(ch + 1))]);
    k.boundaries = {0, 3 + l, 9, 16};
    k.clip = 0.9f + 0.01f * static_cast<float>(l);
    c.keys.push_back(k);
    kvq::StreamCalibration v;
    v.latent = kvq::random_orthonormal_factor(16, 6, rng.next_u64());
    if (l == 1) v.clip = 0.95f;
    c.values.push_back(v);
  }
  return c;
}

kvq::CalibrationInfo sample_info() {
  kvq::CalibrationInfo i;
  i.policy = "test-policy";
  i.method = "test";
  i.num_layers = 3;
  i.num_kv_heads = 2;
  i.head_dim = 8;
  i.provenance = {{"model", "m.gguf"}, {"tokens", "2048"}};
  return i;
}

bool same(const kvq::CacheCalibration& a, const kvq::CacheCalibration& b) {
  auto eq = [](const std::vector<kvq::StreamCalibration>& x, const std::vector<kvq::StreamCalibration>& y) {
    if (x.size() != y.size()) return false;
    for (std::size_t l = 0; l < x.size(); ++l) {
      if (x[l].clip != y[l].clip || x[l].permutation != y[l].permutation || x[l].boundaries != y[l].boundaries ||
          x[l].latent.width != y[l].latent.width || x[l].latent.rank != y[l].latent.rank ||
          x[l].latent.down != y[l].latent.down || x[l].latent.up != y[l].latent.up) {
        return false;
      }
    }
    return true;
  };
  return eq(a.keys, b.keys) && eq(a.values, b.values);
}

kvq::CalibrationArray* array_named(kvq::CalibrationFile& f, const std::string& name) {
  for (auto& a : f.arrays) {
    if (a.name == name) return &a;
  }
  FAIL("no array " << name);
  return nullptr;
}

}  // namespace

TEST_CASE("a cache calibration round-trips through a calibration file", "[cache][calibration][io]") {
  const std::uint64_t seed = kvq_test::case_seed("calibration io round trip", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  const kvq::CacheCalibration c = sample(rng);
  kvq::CalibrationArray report;
  report.name = "errors";
  report.shape = {3};
  report.f32 = {0.1f, 0.2f, 0.3f};
  const kvq::CalibrationFile file = kvq::make_calibration_file(sample_info(), c, {report});
  REQUIRE(file.find_array("report.errors") != nullptr);
  REQUIRE(*file.find_metadata("kvq.format") == "kvq-cache-calibration");

  const std::vector<std::uint8_t> bytes = kvq::encode_calibration_file(file);
  kvq::CalibrationInfo info;
  const kvq::CacheCalibration back =
      kvq::read_cache_calibration(kvq::decode_calibration_file(bytes.data(), bytes.size(), "mem"), "mem", &info);
  REQUIRE(same(c, back));
  REQUIRE(info.policy == "test-policy");
  REQUIRE(info.method == "test");
  REQUIRE(info.num_layers == 3);
  REQUIRE(info.num_kv_heads == 2);
  REQUIRE(info.head_dim == 8);
  REQUIRE(info.get("model") == "m.gguf");
  REQUIRE(info.get("tokens") == "2048");
  REQUIRE(info.get("absent", "x") == "x");

  // Through a real file, and into caches whose streams take these transforms.
  const std::string path = std::string(KVQ_TEST_TMPDIR) + "/round_trip.kvqc";
  kvq::write_calibration_file(path, file);
  const kvq::CacheCalibration loaded = kvq::load_cache_calibration(path);
  REQUIRE(same(c, loaded));
  kvq::CacheConfig cfg;
  cfg.num_layers = 3;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 8;
  cfg.num_blocks = 4;
  kvq::CacheCalibration keys_only;
  keys_only.keys = loaded.keys;
  using Skvq = kvq::SkvqPolicy<kvq::Bits::k2, kvq::Bits::k2, 8, 4, 1>;  // 2 groups by default
  kvq::QuantizedKVCache<Skvq> cache(cfg, keys_only);
  REQUIRE(cache.key_layout().block.groups_per_line == 3);
  REQUIRE(cache.key_transform(2).clip == c.keys[2].clip);
  std::remove(path.c_str());
}

TEST_CASE("read_cache_calibration rejects malformed calibrations, naming the file and the entry",
          "[cache][calibration][io][errors]") {
  kvq::Rng rng(kvq_test::case_seed("calibration io errors", 0));
  const kvq::CalibrationFile good = kvq::make_calibration_file(sample_info(), sample(rng));
  const auto read = [](const kvq::CalibrationFile& f) { (void)kvq::read_cache_calibration(f, "bad.kvqc"); };
  auto expect = [&](const std::function<void(kvq::CalibrationFile&)>& corrupt, std::initializer_list<std::string> fragments) {
    kvq::CalibrationFile f = good;
    corrupt(f);
    try {
      read(f);
    } catch (const kvq::Error& e) {
      CHECK(e.status() == Status::kFormatError);
      const std::string what = e.what();
      CAPTURE(what);
      CHECK(what.find("bad.kvqc") != std::string::npos);
      for (const std::string& fr : fragments) {
        CAPTURE(fr);
        CHECK(what.find(fr) != std::string::npos);
      }
      return;
    }
    FAIL("accepted a corrupt calibration");
  };
  expect([](auto& f) { f.metadata[0].second = "something-else"; }, {"kvq.format", "kvq-cache-calibration"});
  expect([](auto& f) { f.metadata.erase(f.metadata.begin() + 2); }, {"'policy'", "missing"});
  expect([](auto& f) { f.metadata[4].second = "three"; }, {"num_layers", "'three'", "positive count"});
  expect([](auto& f) { f.metadata[5].second = "0"; }, {"num_kv_heads", "positive count"});
  expect([](auto& f) { array_named(f, "keys.1.permutation")->i32[4] = array_named(f, "keys.1.permutation")->i32[5]; },
         {"keys layer 1", "bijection"});
  expect([](auto& f) { array_named(f, "keys.0.permutation")->i32[0] = 16; }, {"keys layer 0", "permutation"});
  expect([](auto& f) { array_named(f, "keys.2.boundaries")->i32 = {0, 9, 4, 16}; }, {"keys layer 2", "boundaries"});
  expect([](auto& f) { array_named(f, "keys.2.boundaries")->i32 = {0, 4, 9, 15}; }, {"keys layer 2", "boundaries"});
  expect([](auto& f) {
    auto* a = array_named(f, "keys.0.permutation");
    a->i32.pop_back();
    a->shape = {15};
  }, {"keys.0.permutation", "[15]", "[16]"});
  expect([](auto& f) {
    f.arrays.erase(f.arrays.begin() + static_cast<std::ptrdiff_t>(array_named(f, "keys.1.boundaries") - f.arrays.data()));
  }, {"keys.1.boundaries", "missing"});
  expect([](auto& f) { array_named(f, "keys.0.clip")->f32[0] = 1.5f; }, {"keys.0.clip", "(0, 1]"});
  expect([](auto& f) { array_named(f, "keys.0.clip")->f32[0] = 0.0f; }, {"keys.0.clip", "(0, 1]"});
  expect([](auto& f) {
    auto* a = array_named(f, "values.2.up");
    a->shape = {5, 16};
    a->f32.resize(80);
  }, {"values.2.up", "[5, 16]", "[6, 16]"});
  expect([](auto& f) {
    f.arrays.erase(f.arrays.begin() + static_cast<std::ptrdiff_t>(array_named(f, "values.0.down") - f.arrays.data()));
  }, {"values.0.down", "missing"});
  expect([](auto& f) {
    kvq::CalibrationArray extra;
    extra.name = "keys.3.clip";  // a layer the file does not have
    extra.f32 = {0.9f};
    f.arrays.push_back(extra);
  }, {"keys.3.clip", "3 layers"});
  expect([](auto& f) {
    kvq::CalibrationArray extra;
    extra.name = "keys.0.rotation";
    extra.f32 = {0.9f};
    f.arrays.push_back(extra);
  }, {"keys.0.rotation"});
}

TEST_CASE("a calibration file cut at any byte or with a flipped byte loads nothing", "[cache][calibration][io][errors]") {
  kvq::Rng rng(kvq_test::case_seed("calibration io truncation", 0));
  const kvq::CalibrationFile file = kvq::make_calibration_file(sample_info(), sample(rng));
  const std::vector<std::uint8_t> bytes = kvq::encode_calibration_file(file);
  const std::string path = std::string(KVQ_TEST_TMPDIR) + "/truncated.kvqc";
  auto write = [&](const std::vector<std::uint8_t>& b, std::size_t n) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(n));
  };
  std::size_t rejected = 0;
  for (std::size_t n = 0; n < bytes.size(); n += 1 + n / 64) {
    write(bytes, n);
    try {
      (void)kvq::load_cache_calibration(path);
    } catch (const kvq::Error& e) {
      CHECK(e.status() == Status::kFormatError);
      ++rejected;
      continue;
    }
    FAIL("a file cut at byte " << n << " of " << bytes.size() << " was accepted");
  }
  REQUIRE(rejected > 0);
  for (std::size_t at : {std::size_t{30}, bytes.size() / 2, bytes.size() - 20}) {
    std::vector<std::uint8_t> flipped = bytes;
    flipped[at] ^= 0x10;
    write(flipped, flipped.size());
    CAPTURE(at);
    try {
      (void)kvq::load_cache_calibration(path);
      FAIL("a file with a flipped byte at " << at << " was accepted");
    } catch (const kvq::Error& e) {
      CHECK(e.status() == Status::kFormatError);
      CHECK(std::string(e.what()).find("truncated.kvqc") != std::string::npos);
    }
  }
  write(bytes, bytes.size());
  REQUIRE_NOTHROW(kvq::load_cache_calibration(path));
  std::remove(path.c_str());
}

TEST_CASE("check_calibration_fits names the policy or the shape that differs", "[cache][calibration][io][errors]") {
  kvq::CalibrationInfo info = sample_info();
  kvq::CacheConfig cfg;
  cfg.num_layers = 3;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 8;
  REQUIRE_NOTHROW(kvq::check_calibration_fits(info, "f.kvqc", "test-policy", cfg));
  kvq_test::require_error([&] { kvq::check_calibration_fits(info, "f.kvqc", "other-policy", cfg); },
                          {"f.kvqc", "made for test-policy", "a calibration of other-policy"});
  cfg.num_layers = 30;
  kvq_test::require_error([&] { kvq::check_calibration_fits(info, "f.kvqc", "test-policy", cfg); },
                          {"f.kvqc", "3 layers", "30 layers"});
  kvq::CalibrationInfo reserved = info;
  reserved.provenance.push_back({"policy", "x"});
  kvq_test::require_error([&] { (void)kvq::make_calibration_file(reserved, {}); }, {"info.provenance", "'policy'"});
}
