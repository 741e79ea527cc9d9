// SPDX-License-Identifier: Apache-2.0
// kvq roundtrip, two modes:
//   matrix mode: --bits B --group G --axis token|channel [--clip A] [--meta fp16|bf16|fp8]
//                --in X.npy --out Y.npy
//   cache mode:  --policy NAME --keys K.npy --values V.npy [...] (policy_roundtrip.cpp)
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <memory>
#include <string>
#include <vector>

#include "commands.hpp"
#include "kvq/io/npy.hpp"
#include "kvq/quant/matrix.hpp"
#include "policy_roundtrip.hpp"
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

const std::vector<std::string> kMatrixOptions = {"--bits", "--group", "--axis", "--clip",
                                                 "--meta", "--in",    "--out"};
const std::vector<std::string> kMatrixRequired = {"--bits", "--group", "--axis", "--in", "--out"};
const std::vector<std::string> kCacheOptions = {
    "--policy",     "--keys",       "--values", "--out-keys",    "--out-values",
    "--rope-theta", "--rope-style", "--seed",   "--key-weights", "--value-weights"};
const std::vector<std::string> kCacheRequired = {"--policy", "--keys", "--values"};

/// Those of `options` given on the command line, as "--a, --b".
std::string given(const CLI::App& sub, const std::vector<std::string>& options) {
  std::string text;
  for (const std::string& name : options) {
    if (sub.count(name) > 0) text += (text.empty() ? "" : ", ") + name;
  }
  return text;
}

/// Which mode the command line asks for; throws kvq::Error (exit 1, nothing written) when it
/// mixes the two modes, names neither, or misses a required option of its mode.
bool cache_mode(const CLI::App& sub) {
  const std::string matrix = given(sub, kMatrixOptions);
  const std::string cache = given(sub, kCacheOptions);
  constexpr const char* both =
      "either matrix mode (--bits --group --axis [--clip --meta] --in --out) or cache mode "
      "(--policy --keys --values [...]), not both";
  if (!matrix.empty() && !cache.empty()) {
    kvq::detail::throw_argument_error("kvq roundtrip", "options", matrix + " with " + cache, both);
  }
  if (matrix.empty() && cache.empty()) {
    kvq::detail::throw_argument_error(
        "kvq roundtrip", "options", "none",
        "either --policy NAME --keys K.npy --values V.npy (a registered cache "
        "policy on [tokens, kv_heads, head_dim] dumps) or --bits B --group G "
        "--axis A --in X.npy --out Y.npy (one quantizer on a 2-D array)");
  }
  const bool is_cache = !cache.empty();
  for (const std::string& name : is_cache ? kCacheRequired : kMatrixRequired) {
    if (sub.count(name) == 0) {
      throw kvq::Error(
          kvq::Status::kInvalidArgument,
          "kvq roundtrip: " + name + " is required in " +
              (is_cache ? "cache mode (--policy NAME --keys K.npy --values V.npy)"
                        : "matrix mode (--bits B --group G --axis A --in X.npy --out Y.npy)"));
    }
  }
  return is_cache;
}

}  // namespace

Command add_roundtrip(CLI::App& app) {
  auto o = std::make_shared<RoundtripOptions>();
  auto p = std::make_shared<PolicyRoundtripOptions>();
  CLI::App* sub = app.add_subcommand(
      "roundtrip",
      "Quantize a 2-D .npy array, or K/V dumps through a cache policy (--policy), write what comes "
      "back, print the error and the measured bits per element");
  sub->footer(
      "Matrix mode (--bits --group --axis --in --out): one quantizer on a 2-D array [tokens,\n"
      "  channels].\n"
      "Cache mode (--policy --keys --values): K and V [tokens, kv_heads, head_dim] are appended "
      "one\n"
      "  token at a time to a one-layer QuantizedKVCache of a registered policy (kvq policies) "
      "and\n"
      "  read back as attention sees them: quantized positions dequantized, sinks and window "
      "exact.\n"
      "  Errors are printed per stream for quantized and exact positions.");
  sub->add_option("--bits", o->bits, "code width: 1.5 (ternary), 2, 3, 4 or 8")
      ->group("Matrix mode");
  sub->add_option("--group", o->group, "group length; must divide the grouped axis")
      ->group("Matrix mode");
  sub->add_option("--axis", o->axis,
                  "axis the groups run along: token (per-channel, KIVI keys) or "
                  "channel (per-token, values and SKVQ)")
      ->group("Matrix mode");
  sub->add_option("--clip", o->clip, "clip ratio alpha in (0, 1] (SKVQ); default 1")
      ->group("Matrix mode");
  sub->add_option("--meta", o->meta, "scale/zero format fp16, bf16 or fp8; default fp16")
      ->group("Matrix mode");
  sub->add_option("--in", o->in, "input .npy (float32 or float16, 2-D, C order)")
      ->group("Matrix mode");
  sub->add_option("--out", o->out, "output .npy of the dequantized values (input's dtype)")
      ->group("Matrix mode");

  const std::string cache = "Cache mode";
  sub->add_option("--policy", p->policy, "a registered policy name (kvq policies)")->group(cache);
  sub->add_option("--keys", p->keys, "K .npy [tokens, kv_heads, head_dim], float32 or float16")
      ->group(cache);
  sub->add_option("--values", p->values, "V .npy, the same shape as --keys")->group(cache);
  sub->add_option("--out-keys", p->out_keys, "write the keys as read back (the input's dtype)")
      ->group(cache);
  sub->add_option("--out-values", p->out_values, "write the values as read back")->group(cache);
  sub->add_option("--rope-theta", p->rope_theta,
                  "RoPE base of the model (default 10000); pre-RoPE policies (SKVQ, CSKV) "
                  "rotate keys only inside attention, so it does not change the round trip")
      ->group(cache);
  sub->add_option("--rope-style", p->rope_style,
                  "RoPE pairs: half (i, i+d/2) or adjacent (2i, 2i+1)")
      ->group(cache);
  sub->add_option("--seed", p->seed, "seed of the random orthonormal CSKV factors (default 1)")
      ->group(cache);
  sub->add_option("--key-weights", p->key_weights,
                  "CSKV: W_K .npy [hidden, kv_heads * head_dim] (k = x W_K); factors from "
                  "its truncated SVD instead of random ones")
      ->group(cache);
  sub->add_option("--value-weights", p->value_weights, "CSKV: W_V .npy, the shape of --key-weights")
      ->group(cache);
  return [o, p, sub] { return cache_mode(*sub) ? run_policy_roundtrip(*p) : run_roundtrip(*o); };
}

}  // namespace kvq_tool
