// SPDX-License-Identifier: Apache-2.0
// kvq capture [--model PATH] [--tokenizer PATH] [--text PATH] [--tokens N] [--layers LIST]
//             [--queries N] [--threads N] --out DIR
//
// Real K/V of a model as .npy files, for tests and benchmarks on a machine that cannot hold the
// model (the GPU machine: tests/cuda/test_realdata_kv.cu). The first N tokens of the text (after
// BOS when the model uses one) run as decode steps on an fp16 cache (the runtime's Session, as
// `kvq eval` runs it); then, for each chosen layer L, DIR gets
//   layerLL_keys.npy     [N][num_kv_heads][head_dim] fp16: the cache's keys (after RoPE)
//   layerLL_values.npy   [N][num_kv_heads][head_dim] fp16: its values
//   layerLL_queries.npy  [Q][num_heads][head_dim]    fp32: the queries (after RoPE) of the last Q
//                        positions N - Q .. N - 1, each of which attends over positions 0 .. itself
// and manifest.json (model, text and their sha256, shapes, positions, RoPE, files). The keys and
// values are exactly what the fp16 cache holds, so a cache filled from them is the model's.
#include <CLI/CLI.hpp>
#include <fmt/core.h>
#include <fmt/os.h>

#include <algorithm>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "commands.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/thread_pool.hpp"
#include "kvq/io/npy.hpp"
#include "llm/any_session.hpp"
#include "llm/calibrate.hpp"
#include "llm/load.hpp"
#include "llm/model_defaults.hpp"
#include "llm/text.hpp"

namespace kvq_tool {
namespace {

struct CaptureOptions {
  std::string model;
  std::string tokenizer;
  std::string text = kvq::llm::kDefaultTextPath;
  std::string out;
  int tokens = 2048;
  std::vector<int> layers = {0, 14, 29};
  int queries = 8;
  int threads = 0;
};

std::string json_string(const std::string& s) {
  std::string o = "\"";
  for (const char ch : s) {
    if (ch == '"' || ch == '\\') {
      o += '\\';
      o += ch;
    } else if (static_cast<unsigned char>(ch) < 0x20) {
      o += fmt::format("\\u{:04x}", static_cast<int>(ch));
    } else {
      o += ch;
    }
  }
  return o + "\"";
}

int run_capture(CaptureOptions o) {
  constexpr const char* where = "kvq capture";
  if (o.model.empty()) o.model = kvq::llm::default_model_path();
  if (o.tokens < 2) kvq::detail::throw_argument_error(where, "--tokens", o.tokens, "at least 2 tokens");
  if (o.queries < 1 || o.queries > o.tokens) {
    kvq::detail::throw_argument_error(where, "--queries", o.queries, fmt::format("1 .. --tokens ({})", o.tokens));
  }
  if (o.threads < 0) kvq::detail::throw_argument_error(where, "--threads", o.threads, "0 (all cores) or more");
  if (o.layers.empty()) kvq::detail::throw_argument_error(where, "--layers", "(none)", "at least one layer");
  const kvq::llm::LoadedModel loaded = kvq::llm::load_model(o.model, o.tokenizer);
  const kvq::llm::Model& model = loaded.model;
  const kvq::llm::ModelConfig& c = model.config;
  for (const int l : o.layers) {
    if (l < 0 || l >= c.num_layers) {
      kvq::detail::throw_argument_error(where, "--layers", l, fmt::format("layers in 0 .. {}", c.num_layers - 1));
    }
  }
  std::sort(o.layers.begin(), o.layers.end());
  o.layers.erase(std::unique(o.layers.begin(), o.layers.end()), o.layers.end());
  const kvq::llm::Tokenizer& tok = *loaded.tokenizer;
  std::vector<int> ids;
  const bool bos = tok.add_bos() && tok.bos() >= 0;
  if (bos) ids.push_back(tok.bos());
  const std::vector<int> text = kvq::llm::leading_tokens(tok, o.text, o.tokens);
  ids.insert(ids.end(), text.begin(), text.end());
  if (static_cast<int>(ids.size()) < o.tokens) {
    kvq::detail::throw_argument_error(where, "--text", o.text, fmt::format("a text of at least {} tokens (it has {})", o.tokens, ids.size()));
  }
  ids.resize(static_cast<std::size_t>(o.tokens));
  const int n = o.tokens, first_query = n - o.queries;
  if (n > c.max_context) {
    kvq::detail::throw_argument_error(where, "--tokens", n, fmt::format("at most the model's context of {} tokens", c.max_context));
  }

  const int threads = o.threads > 0 ? o.threads : std::max(1u, std::thread::hardware_concurrency());
  kvq::ThreadPool pool(threads);
  const std::unique_ptr<kvq::llm::AnySession> session = kvq::llm::make_session("fp16", model, n, &pool);
  const auto qd = static_cast<std::size_t>(c.q_dim()), kvd = static_cast<std::size_t>(c.kv_dim());
  std::vector<std::vector<float>> queries(o.layers.size(), std::vector<float>(static_cast<std::size_t>(o.queries) * qd));
  session->set_observer([&](const kvq::llm::AttentionInputs& in) {
    if (in.position < first_query) return;
    const auto it = std::lower_bound(o.layers.begin(), o.layers.end(), in.layer);
    if (it == o.layers.end() || *it != in.layer) return;
    std::vector<float>& q = queries[static_cast<std::size_t>(it - o.layers.begin())];
    std::copy_n(in.q, qd, q.data() + static_cast<std::size_t>(in.position - first_query) * qd);
  });
  constexpr int kChunk = 256;
  for (int at = 0; at < n; at += kChunk) session->forward(ids.data() + at, std::min(kChunk, n - at), nullptr, false);

  std::filesystem::create_directories(o.out);
  std::vector<float> rows(static_cast<std::size_t>(n) * kvd);
  const std::vector<std::int64_t> kv_shape = {n, c.num_kv_heads, c.head_dim};
  const std::vector<std::int64_t> q_shape = {o.queries, c.num_heads, c.head_dim};
  std::string files;
  std::uintmax_t bytes = 0;
  for (std::size_t i = 0; i < o.layers.size(); ++i) {
    const int l = o.layers[i];
    const std::string stem = fmt::format("layer{:02d}", l);
    auto write = [&](const std::string& name, const float* data, const std::vector<std::int64_t>& shape, kvq::NpyDtype dtype) {
      const std::string path = (std::filesystem::path(o.out) / name).string();
      kvq::write_npy(path, data, shape, dtype);
      bytes += std::filesystem::file_size(path);
    };
    session->read_keys(l, rows.data());
    write(stem + "_keys.npy", rows.data(), kv_shape, kvq::NpyDtype::kFloat16);
    session->read_values(l, rows.data());
    write(stem + "_values.npy", rows.data(), kv_shape, kvq::NpyDtype::kFloat16);
    write(stem + "_queries.npy", queries[i].data(), q_shape, kvq::NpyDtype::kFloat32);
    files += fmt::format("{}    {{\"layer\": {}, \"keys\": \"{}_keys.npy\", \"values\": \"{}_values.npy\", \"queries\": \"{}_queries.npy\"}}",
                         i == 0 ? "" : ",\n", l, stem, stem, stem);
  }
  std::string layers;
  for (std::size_t i = 0; i < o.layers.size(); ++i) layers += fmt::format("{}{}", i == 0 ? "" : ", ", o.layers[i]);
  const std::string manifest = (std::filesystem::path(o.out) / "manifest.json").string();
  {
    auto f = fmt::output_file(manifest);
    f.print("{{\n");
    f.print("  \"what\": \"kvq capture: post-RoPE keys and values of an fp16 cache, queries of the last positions\",\n");
    f.print("  \"model\": {},\n  \"model_file\": {},\n  \"model_sha256\": \"{}\",\n", json_string(model.name),
            json_string(std::filesystem::path(o.model).filename().string()), kvq::llm::file_sha256(o.model));
    f.print("  \"text_file\": {},\n  \"text_sha256\": \"{}\",\n", json_string(std::filesystem::path(o.text).filename().string()),
            kvq::llm::file_sha256(o.text));
    f.print("  \"tokens\": {},\n  \"bos\": {},\n  \"capture_policy\": \"fp16\",\n", n, bos ? "true" : "false");
    f.print("  \"num_layers\": {},\n  \"num_heads\": {},\n  \"num_kv_heads\": {},\n  \"head_dim\": {},\n", c.num_layers, c.num_heads,
            c.num_kv_heads, c.head_dim);
    f.print("  \"rope_theta\": {},\n  \"rope_style\": \"{}\",\n", c.rope.theta,
            c.rope.style == kvq::RopeStyle::kAdjacentPairs ? "adjacent-pairs" : "half-split");
    f.print("  \"query_positions\": [{}, {}],\n", first_query, n - 1);
    f.print("  \"keys_values\": \"[tokens][num_kv_heads][head_dim] fp16\",\n  \"queries\": \"[query][num_heads][head_dim] fp32, "
            "query i at position query_positions[0] + i\",\n");
    f.print("  \"layers\": [{}],\n  \"files\": [\n{}\n  ]\n}}\n", layers, files);
  }
  bytes += std::filesystem::file_size(manifest);
  fmt::print("kvq capture: {} tokens of {} through {} ({} layers, {} kv heads of {}, {} query heads): layers [{}], queries of "
             "positions {} .. {}; {} files, {:.2f} MB in {}\n",
             n, o.text, model.name, c.num_layers, c.num_kv_heads, c.head_dim, c.num_heads, layers, first_query, n - 1,
             3 * o.layers.size() + 1, static_cast<double>(bytes) / 1e6, o.out);
  return 0;
}

}  // namespace

Command add_capture(CLI::App& app) {
  auto o = std::make_shared<CaptureOptions>();
  CLI::App* sub = app.add_subcommand("capture", "Real keys, values and queries of a model as .npy files (for GPU tests)");
  sub->add_option("--model", o->model, "GGUF or llama2.c checkpoint (default: " + kvq::llm::default_model_path() + ")");
  sub->add_option("--tokenizer", o->tokenizer, "tokenizer.bin of a llama2.c model (default: found beside it)");
  sub->add_option("--text", o->text, "text to run (default: " + std::string(kvq::llm::kDefaultTextPath) + ")");
  sub->add_option("--tokens", o->tokens, "tokens to run, BOS included (default 2048)");
  sub->add_option("--layers", o->layers, "layers to write (default 0,14,29)")->delimiter(',');
  sub->add_option("--queries", o->queries, "queries of the last positions to write (default 8)");
  sub->add_option("--threads", o->threads, "threads (default 0: all cores)");
  sub->add_option("--out", o->out, "folder of the .npy files and manifest.json")->required();
  return [o] { return run_capture(*o); };
}

}  // namespace kvq_tool
