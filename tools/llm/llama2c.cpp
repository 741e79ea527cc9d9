// SPDX-License-Identifier: Apache-2.0
#include "llm/llama2c.hpp"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "kvq/core/error.hpp"
#include "llm/read_file.hpp"

namespace kvq::llm {
namespace {

[[noreturn]] void format_error(const std::string& message) {
  throw kvq::Error(kvq::Status::kFormatError, "llama2.c: " + message);
}

/// A [rows, cols] matrix taken from `p`, which advances.
Matrix take_matrix(const char*& p, int rows, int cols) {
  Matrix m;
  m.rows = rows;
  m.cols = cols;
  m.data.resize(static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols));
  std::memcpy(m.data.data(), p, m.data.size() * sizeof(float));
  p += m.data.size() * sizeof(float);
  return m;
}

std::vector<float> take_vector(const char*& p, int n) {
  std::vector<float> v(static_cast<std::size_t>(n));
  std::memcpy(v.data(), p, v.size() * sizeof(float));
  p += v.size() * sizeof(float);
  return v;
}

void check_finite(const std::vector<float>& v, const std::string& path, const char* tensor) {
  const auto bad = std::find_if(v.begin(), v.end(), [](float x) { return !std::isfinite(x); });
  if (bad != v.end()) {
    format_error("'" + path + "': tensor " + tensor + " holds a non-finite weight at element " +
                 std::to_string(bad - v.begin()) + "; expected finite float32 weights");
  }
}

}  // namespace

Model load_llama2c(const std::string& path) {
  const std::string bytes = read_file(path, "llama2.c checkpoint");
  std::int32_t h[7];
  if (bytes.size() < sizeof(h)) {
    format_error("'" + path + "' has " + std::to_string(bytes.size()) +
                 " bytes, shorter than the 28-byte header of a llama2.c checkpoint");
  }
  std::memcpy(h, bytes.data(), sizeof(h));
  Model m;
  m.format = "llama2.c";
  m.name = path.substr(path.find_last_of('/') + 1);
  ModelConfig& c = m.config;
  c.dim = h[0];
  c.hidden_dim = h[1];
  c.num_layers = h[2];
  c.num_heads = h[3];
  c.num_kv_heads = h[4];
  const bool tied = h[5] > 0;
  c.vocab_size = h[5] == INT32_MIN ? 0 : std::abs(h[5]);
  c.max_context = h[6];
  c.norm_eps = 1e-5f;
  c.rope = {10000.0, kvq::RopeStyle::kAdjacentPairs};
  const bool sane = c.dim > 0 && c.hidden_dim > 0 && c.num_layers > 0 && c.num_heads > 0 && c.num_kv_heads > 0 &&
                    c.vocab_size > 0 && c.max_context > 0 && c.dim <= 65536 && c.hidden_dim <= (1 << 20) &&
                    c.num_layers <= 1024 && c.vocab_size <= (1 << 21) && c.max_context <= (1 << 24) &&
                    c.dim % c.num_heads == 0 && c.num_heads % c.num_kv_heads == 0 &&
                    (c.dim / c.num_heads) % 2 == 0;
  if (!sane) {
    format_error("'" + path + "' does not start with a llama2.c legacy header (dim " + std::to_string(h[0]) +
                 ", hidden " + std::to_string(h[1]) + ", layers " + std::to_string(h[2]) + ", heads " +
                 std::to_string(h[3]) + ", kv heads " + std::to_string(h[4]) + ", vocab " + std::to_string(h[5]) +
                 ", seq_len " + std::to_string(h[6]) +
                 "); expected positive sizes, heads dividing dim, kv heads dividing heads and an even head_dim");
  }
  c.head_dim = c.dim / c.num_heads;
  const auto d = static_cast<std::size_t>(c.dim);
  const auto hid = static_cast<std::size_t>(c.hidden_dim);
  const auto l = static_cast<std::size_t>(c.num_layers);
  const auto kv = static_cast<std::size_t>(c.kv_dim());
  const auto v = static_cast<std::size_t>(c.vocab_size);
  const std::size_t rope = static_cast<std::size_t>(c.max_context) * static_cast<std::size_t>(c.head_dim / 2);
  const std::size_t floats = v * d + l * (2 * d + 2 * d * d + 2 * kv * d + 3 * hid * d) + d + 2 * rope +
                             (tied ? 0 : v * d);
  const std::size_t expected = sizeof(h) + floats * sizeof(float);
  if (bytes.size() != expected) {
    format_error("'" + path + "' has " + std::to_string(bytes.size()) + " bytes; its header (dim " +
                 std::to_string(c.dim) + ", hidden " + std::to_string(c.hidden_dim) + ", layers " +
                 std::to_string(c.num_layers) + ", kv_dim " + std::to_string(c.kv_dim()) + ", vocab " +
                 std::to_string(c.vocab_size) + ", seq_len " + std::to_string(c.max_context) + ") needs exactly " +
                 std::to_string(expected) + " (truncated, or not a float32 legacy checkpoint)");
  }
  const char* p = bytes.data() + sizeof(h);
  const int L = c.num_layers;
  m.token_embedding = take_matrix(p, c.vocab_size, c.dim);
  m.layers.resize(l);
  // llama2.c stores each tensor for all layers at once.
  for (int i = 0; i < L; ++i) m.layers[static_cast<std::size_t>(i)].attn_norm = take_vector(p, c.dim);
  for (int i = 0; i < L; ++i) m.layers[static_cast<std::size_t>(i)].wq = take_matrix(p, c.q_dim(), c.dim);
  for (int i = 0; i < L; ++i) m.layers[static_cast<std::size_t>(i)].wk = take_matrix(p, c.kv_dim(), c.dim);
  for (int i = 0; i < L; ++i) m.layers[static_cast<std::size_t>(i)].wv = take_matrix(p, c.kv_dim(), c.dim);
  for (int i = 0; i < L; ++i) m.layers[static_cast<std::size_t>(i)].wo = take_matrix(p, c.dim, c.q_dim());
  for (int i = 0; i < L; ++i) m.layers[static_cast<std::size_t>(i)].ffn_norm = take_vector(p, c.dim);
  for (int i = 0; i < L; ++i) m.layers[static_cast<std::size_t>(i)].w_gate = take_matrix(p, c.hidden_dim, c.dim);
  for (int i = 0; i < L; ++i) m.layers[static_cast<std::size_t>(i)].w_down = take_matrix(p, c.dim, c.hidden_dim);
  for (int i = 0; i < L; ++i) m.layers[static_cast<std::size_t>(i)].w_up = take_matrix(p, c.hidden_dim, c.dim);
  m.final_norm = take_vector(p, c.dim);
  p += 2 * rope * sizeof(float);  // freq_cis_real / freq_cis_imag: RoPE is computed
  if (!tied) m.output = take_matrix(p, c.vocab_size, c.dim);

  check_finite(m.token_embedding.data, path, "token_embedding");
  check_finite(m.final_norm, path, "rms_final");
  check_finite(m.output.data, path, "wcls");
  for (const LayerWeights& lw : m.layers) {
    check_finite(lw.attn_norm, path, "rms_att");
    check_finite(lw.wq.data, path, "wq");
    check_finite(lw.wk.data, path, "wk");
    check_finite(lw.wv.data, path, "wv");
    check_finite(lw.wo.data, path, "wo");
    check_finite(lw.ffn_norm, path, "rms_ffn");
    check_finite(lw.w_gate.data, path, "w1");
    check_finite(lw.w_down.data, path, "w2");
    check_finite(lw.w_up.data, path, "w3");
  }
  return m;
}

Llama2cTokenizer Llama2cTokenizer::load(const std::string& path, int vocab_size) {
  const std::string bytes = read_file(path, "llama2.c tokenizer");
  Llama2cTokenizer t;
  std::size_t at = 0;
  auto need = [&](std::size_t n, const std::string& what) {
    if (bytes.size() - at < n) {
      format_error("'" + path + "' is truncated at byte " + std::to_string(at) + " (reading " + what + " of a " +
                   std::to_string(vocab_size) + "-token vocabulary)");
    }
  };
  std::int32_t max_len = 0;
  need(4, "max_token_length");
  std::memcpy(&max_len, bytes.data(), 4);
  at = 4;
  if (max_len <= 0 || max_len > 1024) {
    format_error("'" + path + "' has max_token_length " + std::to_string(max_len) +
                 "; expected 1..1024 (is it a llama2.c tokenizer.bin?)");
  }
  t.pieces_.resize(static_cast<std::size_t>(vocab_size));
  t.scores_.resize(static_cast<std::size_t>(vocab_size));
  for (int i = 0; i < vocab_size; ++i) {
    const std::string which = "token " + std::to_string(i);
    need(8, which);
    std::int32_t len = 0;
    std::memcpy(&t.scores_[static_cast<std::size_t>(i)], bytes.data() + at, 4);
    std::memcpy(&len, bytes.data() + at + 4, 4);
    at += 8;
    if (len < 0 || len > max_len) {
      format_error("'" + path + "': " + which + " has length " + std::to_string(len) + "; expected 0.." +
                   std::to_string(max_len));
    }
    need(static_cast<std::size_t>(len), which);
    t.pieces_[static_cast<std::size_t>(i)].assign(bytes.data() + at, static_cast<std::size_t>(len));
    at += static_cast<std::size_t>(len);
  }
  if (at != bytes.size()) {
    format_error("'" + path + "' has " + std::to_string(bytes.size() - at) + " bytes after the last of " +
                 std::to_string(vocab_size) + " tokens (does the vocabulary size match the model's?)");
  }
  if (vocab_size < 3 + 256) {
    format_error("'" + path + "' has " + std::to_string(vocab_size) +
                 " tokens; expected at least 259 (<unk>, BOS, EOS and 256 byte-fallback pieces)");
  }
  for (int i = 0; i < vocab_size; ++i) t.lookup_.emplace(t.pieces_[static_cast<std::size_t>(i)], i);
  return t;
}

const std::string& Llama2cTokenizer::piece(int token) const {
  if (token < 0 || token >= vocab_size()) {
    kvq::detail::throw_argument_error("Llama2cTokenizer", "token", token,
                                      "an id in [0, " + std::to_string(vocab_size()) + ")");
  }
  return pieces_[static_cast<std::size_t>(token)];
}

int Llama2cTokenizer::id_of(const std::string& s) const {
  const auto it = lookup_.find(s);
  if (it == lookup_.end()) format_error("the tokenizer has no piece '" + s + "'");
  return it->second;
}

std::string Llama2cTokenizer::decode(int previous, int token) const {
  std::string p = piece(token);
  if (token == kBos || token == kEos) return {};
  if (previous == kBos && !p.empty() && p[0] == ' ') p.erase(0, 1);
  unsigned byte = 0;
  if (p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>' && std::sscanf(p.c_str(), "<0x%02X>", &byte) == 1) {
    p.assign(1, static_cast<char>(byte));
  }
  if (p.size() == 1) {
    const auto b = static_cast<unsigned char>(p[0]);
    if (!(std::isprint(b) || std::isspace(b))) return {};
  }
  return p;
}

std::vector<int> Llama2cTokenizer::encode(std::string_view text) const {
  std::vector<int> tokens;
  if (!text.empty()) tokens.push_back(id_of(" "));
  for (std::size_t i = 0; i < text.size();) {
    std::size_t n = 1;
    while (i + n < text.size() && n < 4 && (static_cast<unsigned char>(text[i + n]) & 0xC0) == 0x80) ++n;
    const auto it = lookup_.find(std::string(text.substr(i, n)));
    if (it != lookup_.end()) {
      tokens.push_back(it->second);
    } else {
      for (std::size_t b = 0; b < n; ++b) tokens.push_back(static_cast<unsigned char>(text[i + b]) + 3);
    }
    i += n;
  }
  // merge[i]: the id of piece(tokens[i]) + piece(tokens[i + 1]), or -1.
  auto pair_id = [&](std::size_t i) {
    const auto it = lookup_.find(pieces_[static_cast<std::size_t>(tokens[i])] +
                                 pieces_[static_cast<std::size_t>(tokens[i + 1])]);
    return it == lookup_.end() ? -1 : it->second;
  };
  std::vector<int> merge(tokens.empty() ? 0 : tokens.size() - 1);
  for (std::size_t i = 0; i < merge.size(); ++i) merge[i] = pair_id(i);
  while (true) {
    float best = -1e10f;
    std::size_t best_i = merge.size();
    for (std::size_t i = 0; i < merge.size(); ++i) {
      if (merge[i] >= 0 && scores_[static_cast<std::size_t>(merge[i])] > best) {
        best = scores_[static_cast<std::size_t>(merge[i])];
        best_i = i;
      }
    }
    if (best_i == merge.size()) break;
    tokens[best_i] = merge[best_i];
    tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(best_i) + 1);
    merge.erase(merge.begin() + static_cast<std::ptrdiff_t>(best_i));
    if (best_i < merge.size()) merge[best_i] = pair_id(best_i);
    if (best_i > 0) merge[best_i - 1] = pair_id(best_i - 1);
  }
  return tokens;
}

}  // namespace kvq::llm
