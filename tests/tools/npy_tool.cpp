// SPDX-License-Identifier: Apache-2.0
// Helper of the CLI tests: writes K/V-like .npy files and compares token ranges of two files.
//   npy_tool gen OUT.npy TOKENS HEADS DIM SEED f16|f32   N(0,1) plus a per-channel offset, with
//                                                        two outlier channels of offset +-10
//   npy_tool gen OUT.npy ROWS COLS SEED f16|f32           a 2-D array (projection weights)
//   npy_tool compare A.npy B.npy FIRST END equal|differ  rows [FIRST, END) of the leading axis
// compare prints both shapes and dtypes and the largest |A - B| over the range; it exits 1 when
// the shapes differ or the range is (equal) not identical / (differ) identical.
#include <kvq/core/random.hpp>
#include <kvq/io/npy.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

const char* dtype_name(kvq::NpyDtype d) {
  return d == kvq::NpyDtype::kFloat32 ? "float32" : "float16";
}

int usage() {
  std::fprintf(stderr,
               "usage: npy_tool gen OUT.npy TOKENS HEADS DIM SEED f16|f32\n"
               "       npy_tool gen OUT.npy ROWS COLS SEED f16|f32\n"
               "       npy_tool compare A.npy B.npy FIRST END equal|differ\n");
  return 2;
}

int gen(const std::vector<std::string>& a) {
  std::vector<std::int64_t> shape;
  for (std::size_t i = 1; i + 2 < a.size(); ++i) shape.push_back(std::atoll(a[i].c_str()));
  const auto seed = static_cast<std::uint64_t>(std::atoll(a[a.size() - 2].c_str()));
  const kvq::NpyDtype dtype = a.back() == "f16" ? kvq::NpyDtype::kFloat16 : kvq::NpyDtype::kFloat32;
  std::size_t n = 1;
  for (std::int64_t e : shape) n *= static_cast<std::size_t>(e);
  const auto channels = static_cast<std::size_t>(shape.back() * (shape.size() == 3 ? shape[1] : 1));
  kvq::Rng rng(seed);
  std::vector<float> offset(channels);
  for (float& o : offset) o = 0.5f * rng.normal();
  if (shape.size() == 3 && channels > 8) {
    offset[3] = 10.0f;
    offset[channels / 2 + 1] = -10.0f;
  }
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i)
    x[i] = (shape.size() == 3 ? offset[i % channels] : 0.0f) + rng.normal();
  kvq::write_npy(a[0], x.data(), shape, dtype);
  return 0;
}

int compare(const std::vector<std::string>& a) {
  const kvq::NpyArray x = kvq::read_npy(a[0]);
  const kvq::NpyArray y = kvq::read_npy(a[1]);
  std::printf("%s: shape %s %s\n%s: shape %s %s\n", a[0].c_str(),
              kvq::detail::npy_shape_text(x.shape).c_str(), dtype_name(x.dtype), a[1].c_str(),
              kvq::detail::npy_shape_text(y.shape).c_str(), dtype_name(y.dtype));
  if (x.shape != y.shape || x.shape.empty()) {
    std::printf("shapes differ\n");
    return 1;
  }
  const std::int64_t first = std::atoll(a[2].c_str()), end = std::atoll(a[3].c_str());
  if (first < 0 || end > x.shape[0] || first >= end) {
    std::printf("bad range [%lld, %lld)\n", static_cast<long long>(first),
                static_cast<long long>(end));
    return 1;
  }
  const auto row = x.data.size() / static_cast<std::size_t>(x.shape[0]);
  double worst = 0;
  for (auto i = static_cast<std::size_t>(first) * row; i < static_cast<std::size_t>(end) * row;
       ++i) {
    worst = std::fmax(worst, std::fabs(static_cast<double>(x.data[i]) - y.data[i]));
  }
  std::printf("rows [%lld, %lld): max |diff| %g\n", static_cast<long long>(first),
              static_cast<long long>(end), worst);
  const bool want_equal = a[4] == "equal";
  if (want_equal != (worst == 0)) {
    std::printf("expected the rows to %s\n", want_equal ? "be identical" : "differ");
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  const std::string cmd = argv[1];
  const std::vector<std::string> a(argv + 2, argv + argc);
  try {
    if (cmd == "gen" && (a.size() == 6 || a.size() == 5)) return gen(a);
    if (cmd == "compare" && a.size() == 5) return compare(a);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "npy_tool: %s\n", e.what());
    return 1;
  }
  return usage();
}
