// SPDX-License-Identifier: Apache-2.0
#include "llm/gguf_model.hpp"

#include <fmt/format.h>

#include <climits>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <optional>
#include <utility>
#include <vector>

#include "kvq/core/error.hpp"
#include "llm/bpe_tokenizer.hpp"

namespace kvq::llm {
namespace {

[[noreturn]] void format_error(const GgufFile& g, const std::string& message) {
  throw kvq::Error(kvq::Status::kFormatError, fmt::format("GGUF file '{}': {}", g.name(), message));
}

[[noreturn]] void unsupported(const GgufFile& g, const std::string& message) {
  throw kvq::Error(kvq::Status::kUnsupported, fmt::format("GGUF file '{}': {}", g.name(), message));
}

int positive_int(const GgufFile& g, const char* key) {
  const std::uint32_t v = g.get_u32(key);
  if (v == 0 || v > static_cast<std::uint32_t>(INT_MAX)) {
    format_error(g, fmt::format("{} = {}; expected a positive integer below 2^31", key, v));
  }
  return static_cast<int>(v);
}

/// The key's value; `fallback` when absent (an error when there is none).
float positive_float(const GgufFile& g, const char* key, std::optional<float> fallback) {
  const float v = fallback ? g.find_f32(key).value_or(*fallback) : g.get_f32(key);
  if (!std::isfinite(v) || v <= 0.0f)
    format_error(g, fmt::format("{} = {}; expected a positive finite number", key, v));
  return v;
}

std::string layer_tensor(int layer, const char* name) {
  return fmt::format("blk.{}.{}.weight", layer, name);
}

/// One tensor to load: its name and expected GGUF dims (ne[0] first).
struct Planned {
  std::string name;
  std::vector<std::uint64_t> dims;
};

std::string dims_text(const std::vector<std::uint64_t>& dims) {
  std::string s = "[";
  for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

/// Dims without trailing 1s, so that [576] and [576, 1] compare equal.
std::vector<std::uint64_t> squeezed(std::vector<std::uint64_t> dims) {
  while (dims.size() > 1 && dims.back() == 1) dims.pop_back();
  return dims;
}

const GgufTensorInfo& checked_tensor(const GgufFile& g, const Planned& p) {
  const GgufTensorInfo* t = g.find_tensor(p.name);
  if (t == nullptr) {
    format_error(g, fmt::format("tensor '{}' is missing; expected a tensor with dims {}", p.name,
                                dims_text(p.dims)));
  }
  if (squeezed(t->dims) != squeezed(p.dims)) {
    format_error(g, fmt::format("tensor '{}' has dims {}; expected {} (ne[0] first)", p.name,
                                t->dims_text(), dims_text(p.dims)));
  }
  return *t;
}

std::uint64_t u64(int v) { return static_cast<std::uint64_t>(v); }

Matrix load_matrix(const GgufFile& g, const Planned& p) {
  const GgufTensorInfo& t = checked_tensor(g, p);
  Matrix m;
  m.cols = static_cast<int>(p.dims[0]);
  m.rows = static_cast<int>(p.dims[1]);
  m.data = g.dequantize(t);
  return m;
}

std::vector<float> load_vector(const GgufFile& g, const Planned& p) {
  return g.dequantize(checked_tensor(g, p));
}

}  // namespace

void unpermute_rope_rows(Matrix& m, int heads, int head_dim) {
  if (heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 ||
      static_cast<long long>(heads) * head_dim != m.rows ||
      m.data.size() != static_cast<std::size_t>(m.rows) * static_cast<std::size_t>(m.cols)) {
    throw kvq::Error(
        kvq::Status::kInvalidArgument,
        fmt::format("kvq::llm::unpermute_rope_rows: a [{}, {}] matrix with {} floats, heads = {}, "
                    "head_dim = {}; expected rows = heads * head_dim with head_dim even",
                    m.rows, m.cols, m.data.size(), heads, head_dim));
  }
  const std::size_t cols = static_cast<std::size_t>(m.cols);
  const int half = head_dim / 2;
  std::vector<float> out(m.data.size());
  for (int h = 0; h < heads; ++h) {
    const int base = h * head_dim;
    for (int i = 0; i < half; ++i) {
      for (int j = 0; j < 2; ++j) {
        const auto src = static_cast<std::size_t>(base + 2 * i + j);
        const auto dst = static_cast<std::size_t>(base + j * half + i);
        std::memcpy(out.data() + dst * cols, m.data.data() + src * cols, cols * sizeof(float));
      }
    }
  }
  m.data = std::move(out);
}

ModelConfig read_gguf_config(const GgufFile& g, GgufLoadOptions options) {
  const std::string& arch = g.get_string("general.architecture");
  if (arch != "llama") {
    unsupported(g, fmt::format("general.architecture = '{}'; expected 'llama'", arch));
  }
  if (const auto experts = g.find_u32("llama.expert_count"); experts && *experts > 0) {
    unsupported(
        g,
        fmt::format(
            "llama.expert_count = {}; expected a dense model (mixture-of-experts is not supported)",
            *experts));
  }
  if (const auto scaling = g.find_string("llama.rope.scaling.type");
      scaling && *scaling != "none") {
    unsupported(
        g, fmt::format(
               "llama.rope.scaling.type = '{}'; expected 'none' (RoPE scaling is not supported)",
               *scaling));
  }

  ModelConfig c;
  c.num_layers = positive_int(g, "llama.block_count");
  c.dim = positive_int(g, "llama.embedding_length");
  c.hidden_dim = positive_int(g, "llama.feed_forward_length");
  c.num_heads = positive_int(g, "llama.attention.head_count");
  c.num_kv_heads = g.has("llama.attention.head_count_kv")
                       ? positive_int(g, "llama.attention.head_count_kv")
                       : c.num_heads;
  c.max_context = positive_int(g, "llama.context_length");
  c.norm_eps = positive_float(g, "llama.attention.layer_norm_rms_epsilon", std::nullopt);
  const float theta = positive_float(g, "llama.rope.freq_base", 10000.0f);

  if (c.dim % c.num_heads != 0) {
    format_error(
        g, fmt::format(
               "llama.embedding_length = {} is not a multiple of llama.attention.head_count = {}",
               c.dim, c.num_heads));
  }
  c.head_dim = c.dim / c.num_heads;
  if (c.head_dim % 2 != 0) {
    format_error(
        g, fmt::format(
               "head_dim = llama.embedding_length / llama.attention.head_count = {} / {} = {}; "
               "expected an even number (RoPE rotates pairs)",
               c.dim, c.num_heads, c.head_dim));
  }
  if (c.num_kv_heads > c.num_heads || c.num_heads % c.num_kv_heads != 0) {
    format_error(g, fmt::format("llama.attention.head_count_kv = {}; expected a divisor of "
                                "llama.attention.head_count = {}",
                                c.num_kv_heads, c.num_heads));
  }
  for (const char* key : {"llama.attention.key_length", "llama.attention.value_length"}) {
    if (const auto v = g.find_u32(key); v && *v != static_cast<std::uint32_t>(c.head_dim)) {
      unsupported(g, fmt::format("{} = {}; expected head_dim = {} (embedding_length / head_count)",
                                 key, *v, c.head_dim));
    }
  }
  if (const auto rope_dims = g.find_u32("llama.rope.dimension_count");
      rope_dims && *rope_dims != static_cast<std::uint32_t>(c.head_dim)) {
    unsupported(
        g,
        fmt::format("llama.rope.dimension_count = {}; expected head_dim = {} (partial RoPE is not "
                    "supported)",
                    *rope_dims, c.head_dim));
  }

  const GgufTensorInfo& embd = g.tensor("token_embd.weight");
  if (embd.dims.size() != 2 || embd.dims[0] != u64(c.dim) || embd.dims[1] == 0 ||
      embd.dims[1] > static_cast<std::uint64_t>(INT_MAX)) {
    format_error(
        g, fmt::format("tensor 'token_embd.weight' has dims {}; expected [{}, vocab] (ne[0] first)",
                       embd.dims_text(), c.dim));
  }
  c.vocab_size = static_cast<int>(embd.dims[1]);
  if (const auto v = g.find_u32("llama.vocab_size");
      v && *v != static_cast<std::uint32_t>(c.vocab_size)) {
    format_error(g, fmt::format("llama.vocab_size = {}; expected {}, the rows of token_embd.weight",
                                *v, c.vocab_size));
  }
  if (static_cast<std::size_t>(c.num_layers) > g.tensors().size()) {
    format_error(
        g, fmt::format(
               "llama.block_count = {}; expected at most the {} tensors of the file (9 per layer)",
               c.num_layers, g.tensors().size()));
  }
  c.rope = {static_cast<double>(theta),
            options.unpermute_qk ? kvq::RopeStyle::kHalfSplit : kvq::RopeStyle::kAdjacentPairs};
  return c;
}

LoadedGguf load_gguf_model(const std::string& path, GgufLoadOptions options) {
  return load_gguf_model(GgufFile::open(path), options);
}

LoadedGguf load_gguf_model(const GgufFile& g, GgufLoadOptions options) {
  const ModelConfig c = read_gguf_config(g, options);
  const std::uint64_t dim = u64(c.dim), hidden = u64(c.hidden_dim), q_dim = u64(c.q_dim()),
                      kv_dim = u64(c.kv_dim());

  // Every tensor's presence and shape is checked before anything is dequantized.
  const Planned embd{"token_embd.weight", {dim, u64(c.vocab_size)}};
  const Planned final_norm{"output_norm.weight", {dim}};
  const Planned output{"output.weight", {dim, u64(c.vocab_size)}};
  struct LayerPlan {
    Planned attn_norm, wq, wk, wv, wo, ffn_norm, gate, up, down;
  };
  std::vector<LayerPlan> plans;
  plans.reserve(static_cast<std::size_t>(c.num_layers));
  for (int l = 0; l < c.num_layers; ++l) {
    plans.push_back({{layer_tensor(l, "attn_norm"), {dim}},
                     {layer_tensor(l, "attn_q"), {dim, q_dim}},
                     {layer_tensor(l, "attn_k"), {dim, kv_dim}},
                     {layer_tensor(l, "attn_v"), {dim, kv_dim}},
                     {layer_tensor(l, "attn_output"), {q_dim, dim}},
                     {layer_tensor(l, "ffn_norm"), {dim}},
                     {layer_tensor(l, "ffn_gate"), {dim, hidden}},
                     {layer_tensor(l, "ffn_up"), {dim, hidden}},
                     {layer_tensor(l, "ffn_down"), {hidden, dim}}});
    const LayerPlan& p = plans.back();
    for (const Planned* t :
         {&p.attn_norm, &p.wq, &p.wk, &p.wv, &p.wo, &p.ffn_norm, &p.gate, &p.up, &p.down}) {
      (void)checked_tensor(g, *t);
    }
  }
  (void)checked_tensor(g, embd);
  (void)checked_tensor(g, final_norm);
  const bool tied = g.find_tensor(output.name) == nullptr;
  if (!tied) (void)checked_tensor(g, output);

  auto tokenizer = std::make_unique<BpeTokenizer>(BpeTokenizer::from_gguf(g));
  if (tokenizer->vocab_size() != c.vocab_size) {
    format_error(
        g, fmt::format(
               "tokenizer.ggml.tokens has {} entries; expected {}, the rows of token_embd.weight",
               tokenizer->vocab_size(), c.vocab_size));
  }

  LoadedGguf loaded;
  Model& m = loaded.model;
  m.config = c;
  m.format = "gguf";
  m.name = g.find_string("general.name").value_or(std::filesystem::path(g.name()).stem().string());
  m.token_embedding = load_matrix(g, embd);
  m.layers.resize(static_cast<std::size_t>(c.num_layers));
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerPlan& p = plans[static_cast<std::size_t>(l)];
    LayerWeights& w = m.layers[static_cast<std::size_t>(l)];
    w.attn_norm = load_vector(g, p.attn_norm);
    w.wq = load_matrix(g, p.wq);
    w.wk = load_matrix(g, p.wk);
    if (options.unpermute_qk) {
      unpermute_rope_rows(w.wq, c.num_heads, c.head_dim);
      unpermute_rope_rows(w.wk, c.num_kv_heads, c.head_dim);
    }
    w.wv = load_matrix(g, p.wv);
    w.wo = load_matrix(g, p.wo);
    w.ffn_norm = load_vector(g, p.ffn_norm);
    w.w_gate = load_matrix(g, p.gate);
    w.w_up = load_matrix(g, p.up);
    w.w_down = load_matrix(g, p.down);
  }
  m.final_norm = load_vector(g, final_norm);
  if (!tied) m.output = load_matrix(g, output);
  loaded.tokenizer = std::move(tokenizer);
  return loaded;
}

}  // namespace kvq::llm
