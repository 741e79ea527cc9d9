// SPDX-License-Identifier: Apache-2.0
// kvq roundtrip --bits B --group G --axis token|channel [--clip A] [--meta fp16|bf16|fp8]
//               --in X.npy --out Y.npy
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <memory>
#include <string>

#include "commands.hpp"
#include "kvq/io/npy.hpp"
#include "kvq/quant/matrix.hpp"
#include "roundtrip_stats.hpp"

namespace kvq_tool {
namespace {

struct RoundtripOptions {
  std::string bits;
  kvq::index_t group = 0;
  std::string axis;
  float clip = 1.0f;
  std::string meta = "fp16";
  std::string in;
  std::string out;
};

int run_roundtrip(const RoundtripOptions& o) {
  kvq::MatrixQuantSpec spec;
  spec.bits = kvq::parse_bits(o.bits, "--bits");
  spec.axis = kvq::parse_axis(o.axis, "--axis");
  spec.meta = kvq::parse_meta_format(o.meta, "--meta");
  spec.group_size = o.group;
  spec.clip = o.clip;

  const kvq::NpyArray x = kvq::read_npy(o.in);
  if (x.shape.size() != 2) {
    kvq::detail::throw_argument_error("kvq roundtrip", "--in",
                                      o.in + " of shape " + kvq::detail::npy_shape_text(x.shape),
                                      "a 2-D array [tokens, channels]");
  }
  const kvq::index_t tokens = x.shape[0], channels = x.shape[1];
  const RoundTrip r = round_trip(x.data, tokens, channels, spec);
  kvq::write_npy(o.out, r.dequantized.data(), x.shape, x.dtype);

  const kvq::MatrixLayout& l = r.layout;
  const char* dtype = x.dtype == kvq::NpyDtype::kFloat32 ? "float32" : "float16";
  fmt::print("kvq roundtrip: {} [{}, {}] {} -> {}\n", o.in, tokens, channels, dtype, o.out);
  fmt::print("  {}-bit codes, groups of {} along {}s ({} quantization), clip {}, {} metadata\n",
             kvq::bits_label(spec.bits), spec.group_size, kvq::axis_label(spec.axis),
             spec.axis == kvq::GroupAxis::kTokens ? "per-channel" : "per-token", spec.clip,
             kvq::meta_label(spec.meta));
  fmt::print("  max |err|          {:.6g}\n", r.max_abs_error);
  fmt::print("  mean |err|         {:.6g}\n", r.mean_abs_error);
  fmt::print("  relative Frobenius {:.6g}\n", r.relative_frobenius);
  fmt::print("  bits / element     {:.4f}  (codes {} B + scales {} B + zeros {} B = {} B for {} elements)\n",
             l.bits_per_element(), l.code_bytes, l.meta_bytes, l.meta_bytes, l.total_bytes(),
             tokens * channels);
  return 0;
}

}  // namespace

Command add_roundtrip(CLI::App& app) {
  auto o = std::make_shared<RoundtripOptions>();
  CLI::App* sub = app.add_subcommand(
      "roundtrip", "Quantize a 2-D .npy array [tokens, channels], write the dequantized array, "
                   "print the error and the measured bits per element");
  sub->add_option("--bits", o->bits, "code width: 1.5 (ternary), 2, 3, 4 or 8")->required();
  sub->add_option("--group", o->group, "group length; must divide the grouped axis")->required();
  sub->add_option("--axis", o->axis,
                  "axis the groups run along: token (per-channel, KIVI keys) or channel "
                  "(per-token, values and SKVQ)")
      ->required();
  sub->add_option("--clip", o->clip, "clip ratio alpha in (0, 1] (SKVQ); default 1");
  sub->add_option("--meta", o->meta, "scale/zero format: fp16, bf16 or fp8; default fp16");
  sub->add_option("--in", o->in, "input .npy (float32 or float16, 2-D, C order)")->required();
  sub->add_option("--out", o->out, "output .npy of the dequantized values (input's dtype)")->required();
  return [o] { return run_roundtrip(*o); };
}

}  // namespace kvq_tool
