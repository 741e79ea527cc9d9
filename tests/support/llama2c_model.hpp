// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Test-only llama2.c model (legacy float32 checkpoints such as stories260K) whose
///        attention runs on a kvq::QuantizedKVCache<Policy>.
///
/// The forward pass follows karpathy/llama2.c run.c operation by operation (RMSNorm with eps
/// 1e-5, matmuls summed in input order, RoPE on adjacent pairs (x[2i], x[2i+1]) with
/// theta 10000, GQA, SwiGLU, tied or separate classifier), so that greedy decoding reproduces
/// llama2.c's own output. Only attention differs: the token's key and value rows of each layer
/// are appended to the cache and kvq::attend computes softmax(q·K^T / sqrt(d))·V over it.
/// Policies that store keys before RoPE get un-rotated keys and CacheConfig::rope set to the
/// model's RoPE; the query is always passed rotated.
///
/// This is deliberately small and unoptimized: a test harness, not a runtime (the runtime lives
/// in tools/). Errors are std::runtime_error with the file and what was expected.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "kvq/attention/decode_attention.hpp"
#include "kvq/cache/quantized_kv_cache.hpp"
#include "kvq/transform/rope.hpp"

namespace kvq_test::llama2c {

using kvq::index_t;

/// Token ids of the llama2.c tokenizers.
inline constexpr int kBos = 1;
inline constexpr int kEos = 2;

inline std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("llama2c: cannot open '" + path + "'");
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// The 7 int32 of a llama2.c legacy checkpoint header.
struct Config {
  int dim = 0;         ///< model width
  int hidden_dim = 0;  ///< SwiGLU width
  int n_layers = 0;
  int n_heads = 0;     ///< query heads
  int n_kv_heads = 0;
  int vocab_size = 0;  ///< negative in the file when the classifier is not tied
  int seq_len = 0;     ///< longest context the model was trained for
  bool shared_classifier = true;

  int head_dim() const noexcept { return dim / n_heads; }
  int kv_dim() const noexcept { return n_kv_heads * head_dim(); }
};

/// A loaded checkpoint. Weight matrices are row-major [out, in] as llama2.c stores them.
class Model {
 public:
  /// Loads a llama2.c legacy (version 0) float32 checkpoint; throws std::runtime_error when the
  /// header is implausible or the file size does not match it exactly.
  static Model load(const std::string& path) {
    const std::vector<char> bytes = read_file(path);
    Model m;
    std::int32_t header[7];
    if (bytes.size() < sizeof(header)) {
      throw std::runtime_error("llama2c: '" + path + "' has " + std::to_string(bytes.size()) +
                               " bytes, shorter than the 28-byte header of a llama2.c checkpoint");
    }
    std::memcpy(header, bytes.data(), sizeof(header));
    Config& c = m.config_;
    c.dim = header[0];
    c.hidden_dim = header[1];
    c.n_layers = header[2];
    c.n_heads = header[3];
    c.n_kv_heads = header[4];
    c.shared_classifier = header[5] > 0;
    c.vocab_size = std::abs(header[5]);
    c.seq_len = header[6];
    const bool sane = c.dim > 0 && c.hidden_dim > 0 && c.n_layers > 0 && c.n_heads > 0 &&
                      c.n_kv_heads > 0 && c.vocab_size > 0 && c.seq_len > 0 && c.dim % c.n_heads == 0 &&
                      c.n_heads % c.n_kv_heads == 0 && c.head_dim() % 2 == 0 && c.dim <= 65536 &&
                      c.hidden_dim <= 1 << 20 && c.n_layers <= 1024 && c.vocab_size <= 1 << 20 &&
                      c.seq_len <= 1 << 24;
    if (!sane) {
      throw std::runtime_error(
          "llama2c: '" + path + "' does not start with a llama2.c legacy header (dim " + std::to_string(header[0]) +
          ", hidden " + std::to_string(header[1]) + ", layers " + std::to_string(header[2]) + ", heads " +
          std::to_string(header[3]) + ", kv heads " + std::to_string(header[4]) + ", vocab " +
          std::to_string(header[5]) + ", seq_len " + std::to_string(header[6]) +
          "); expected positive sizes with heads dividing dim, kv heads dividing heads and an even head_dim");
    }
    const auto d = static_cast<std::size_t>(c.dim);
    const auto h = static_cast<std::size_t>(c.hidden_dim);
    const auto l = static_cast<std::size_t>(c.n_layers);
    const auto kv = static_cast<std::size_t>(c.kv_dim());
    const auto v = static_cast<std::size_t>(c.vocab_size);
    const auto rope = static_cast<std::size_t>(c.seq_len) * static_cast<std::size_t>(c.head_dim() / 2);
    const std::size_t floats = v * d + l * d + l * d * d + 2 * l * kv * d + l * d * d + l * d + 3 * l * h * d + d +
                               2 * rope + (c.shared_classifier ? 0 : v * d);
    const std::size_t expected = sizeof(header) + floats * sizeof(float);
    if (bytes.size() != expected) {
      throw std::runtime_error("llama2c: '" + path + "' has " + std::to_string(bytes.size()) +
                               " bytes; its header (dim " + std::to_string(c.dim) + ", hidden " +
                               std::to_string(c.hidden_dim) + ", layers " + std::to_string(c.n_layers) +
                               ", kv_dim " + std::to_string(c.kv_dim()) + ", vocab " + std::to_string(c.vocab_size) +
                               ", seq_len " + std::to_string(c.seq_len) + ") needs exactly " +
                               std::to_string(expected) + " (truncated, or not a float32 legacy checkpoint)");
    }
    const char* p = bytes.data() + sizeof(header);
    auto take = [&](std::vector<float>& dst, std::size_t n) {
      dst.resize(n);
      std::memcpy(dst.data(), p, n * sizeof(float));
      p += n * sizeof(float);
    };
    take(m.token_embedding, v * d);
    take(m.rms_att, l * d);
    take(m.wq, l * d * d);
    take(m.wk, l * kv * d);
    take(m.wv, l * kv * d);
    take(m.wo, l * d * d);
    take(m.rms_ffn, l * d);
    take(m.w1, l * h * d);
    take(m.w2, l * d * h);
    take(m.w3, l * h * d);
    take(m.rms_final, d);
    p += 2 * rope * sizeof(float);  // freq_cis_real / freq_cis_imag: unused (RoPE is computed)
    if (c.shared_classifier) {
      m.wcls = m.token_embedding;
    } else {
      take(m.wcls, v * d);
    }
    for (const std::vector<float>* w : {&m.token_embedding, &m.wq, &m.wk, &m.wv, &m.wo, &m.w1, &m.w2, &m.w3}) {
      if (!std::all_of(w->begin(), w->end(), [](float x) { return std::isfinite(x); })) {
        throw std::runtime_error("llama2c: '" + path + "' holds non-finite weights");
      }
    }
    return m;
  }

  const Config& config() const noexcept { return config_; }
  /// Layer `layer`'s key / value projection [kv_dim, dim] (k = wk · x).
  const float* key_weight(int layer) const noexcept { return wk.data() + layer_offset(layer, config_.kv_dim()); }
  const float* value_weight(int layer) const noexcept { return wv.data() + layer_offset(layer, config_.kv_dim()); }

  std::vector<float> token_embedding;  // [vocab, dim]
  std::vector<float> rms_att;          // [layers, dim]
  std::vector<float> wq;               // [layers, dim, dim]
  std::vector<float> wk;               // [layers, kv_dim, dim]
  std::vector<float> wv;               // [layers, kv_dim, dim]
  std::vector<float> wo;               // [layers, dim, dim]
  std::vector<float> rms_ffn;          // [layers, dim]
  std::vector<float> w1;               // [layers, hidden, dim]
  std::vector<float> w2;               // [layers, dim, hidden]
  std::vector<float> w3;               // [layers, hidden, dim]
  std::vector<float> rms_final;        // [dim]
  std::vector<float> wcls;             // [vocab, dim]

 private:
  std::size_t layer_offset(int layer, int rows) const noexcept {
    return static_cast<std::size_t>(layer) * static_cast<std::size_t>(rows) * static_cast<std::size_t>(config_.dim);
  }
  Config config_;
};

/// A llama2.c tokenizer file (tokenizer.bin format): int32 max_token_length, then per token a
/// float score, an int32 length and the bytes.
class Tokenizer {
 public:
  static Tokenizer load(const std::string& path, int vocab_size) {
    const std::vector<char> bytes = read_file(path);
    Tokenizer t;
    std::size_t at = 0;
    auto need = [&](std::size_t n, const std::string& what) {
      if (bytes.size() - at < n) {
        throw std::runtime_error("llama2c: '" + path + "' is truncated at byte " + std::to_string(at) + " (reading " +
                                 what + " of a " + std::to_string(vocab_size) + "-token vocabulary)");
      }
    };
    std::int32_t max_len = 0;
    need(4, "max_token_length");
    std::memcpy(&max_len, bytes.data(), 4);
    at = 4;
    if (max_len <= 0 || max_len > 1024) {
      throw std::runtime_error("llama2c: '" + path + "' has max_token_length " + std::to_string(max_len) +
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
        throw std::runtime_error("llama2c: '" + path + "': " + which + " has length " + std::to_string(len) +
                                 "; expected 0.." + std::to_string(max_len));
      }
      need(static_cast<std::size_t>(len), which);
      t.pieces_[static_cast<std::size_t>(i)].assign(bytes.data() + at, static_cast<std::size_t>(len));
      at += static_cast<std::size_t>(len);
    }
    if (at != bytes.size()) {
      throw std::runtime_error("llama2c: '" + path + "' has " + std::to_string(bytes.size() - at) +
                               " bytes after the last of " + std::to_string(vocab_size) +
                               " tokens (vocabulary size mismatch with the model?)");
    }
    for (int i = 0; i < vocab_size; ++i) t.lookup_.emplace(t.pieces_[static_cast<std::size_t>(i)], i);
    return t;
  }

  int vocab_size() const noexcept { return static_cast<int>(pieces_.size()); }
  const std::string& piece(int token) const { return pieces_.at(static_cast<std::size_t>(token)); }

  /// llama2.c's decode() followed by its safe_printf(): the bytes run.c prints for `token`
  /// after `prev`. A piece after BOS loses its leading space; "<0xNN>" pieces are the raw byte;
  /// a single byte that is neither printable nor whitespace prints as nothing.
  std::string decode(int prev, int token) const {
    std::string p = piece(token);
    if (prev == kBos && !p.empty() && p[0] == ' ') p.erase(0, 1);
    unsigned byte = 0;
    if (p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>' &&
        std::sscanf(p.c_str(), "<0x%02X>", &byte) == 1) {
      p.assign(1, static_cast<char>(byte));
    }
    if (p.size() == 1) {
      const auto b = static_cast<unsigned char>(p[0]);
      if (!(std::isprint(b) || std::isspace(b))) return {};
    }
    return p;
  }

  /// llama2.c's encode(): optional BOS, a dummy-prefix " " token, one token per UTF-8 code
  /// point (byte-fallback tokens <0xNN> = byte + 3 for code points not in the vocabulary),
  /// then repeatedly merge the adjacent pair whose concatenation is the highest-scoring
  /// vocabulary entry (leftmost on ties). Same result as run.c, with pair scores cached so
  /// that a few thousand characters encode quickly.
  std::vector<int> encode(const std::string& text, bool bos) const {
    std::vector<int> tokens;
    if (bos) tokens.push_back(kBos);
    if (!text.empty()) tokens.push_back(id_of(" "));
    for (std::size_t i = 0; i < text.size();) {
      std::size_t n = 1;
      while (i + n < text.size() && n < 4 && (static_cast<unsigned char>(text[i + n]) & 0xC0) == 0x80) ++n;
      const auto it = lookup_.find(text.substr(i, n));
      if (it != lookup_.end()) {
        tokens.push_back(it->second);
      } else {
        for (std::size_t b = 0; b < n; ++b) tokens.push_back(static_cast<unsigned char>(text[i + b]) + 3);
      }
      i += n;
    }
    // merge[i]: the vocabulary id of pieces(tokens[i]) + pieces(tokens[i + 1]), or -1.
    auto pair_id = [&](std::size_t i) {
      const auto it = lookup_.find(piece(tokens[i]) + piece(tokens[i + 1]));
      return it == lookup_.end() ? -1 : it->second;
    };
    std::vector<int> merge(tokens.size() > 0 ? tokens.size() - 1 : 0);
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

 private:
  int id_of(const std::string& s) const {
    const auto it = lookup_.find(s);
    if (it == lookup_.end()) throw std::runtime_error("llama2c: the tokenizer has no piece '" + s + "'");
    return it->second;
  }
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> lookup_;
};

/// What one forward step computed in each layer, for tests that study the cache's inputs.
struct StepTrace {
  std::vector<float> q;      ///< [layers, n_heads * head_dim] after RoPE
  std::vector<float> k;      ///< [layers, kv_dim] after RoPE
  std::vector<float> k_pre;  ///< [layers, kv_dim] before RoPE
  std::vector<float> v;      ///< [layers, kv_dim]
};

/// llama2.c's RoPE of one vector at position pos (run.c: pairs (i, i + 1), angle
/// pos / 10000^((i mod head_dim) / head_dim), in float).
inline void rope_llama2c(float* x, int n, int head_dim, int pos) {
  for (int i = 0; i < n; i += 2) {
    const int hd = i % head_dim;
    const float freq = 1.0f / std::pow(10000.0f, static_cast<float>(hd) / static_cast<float>(head_dim));
    const float val = static_cast<float>(pos) * freq;
    const float fcr = std::cos(val);
    const float fci = std::sin(val);
    const float v0 = x[i];
    const float v1 = x[i + 1];
    x[i] = v0 * fcr - v1 * fci;
    x[i + 1] = v0 * fci + v1 * fcr;
  }
}

/// One sequence of a model decoding on a QuantizedKVCache<Policy> of its own.
template <class Policy>
class Session {
 public:
  using Cache = kvq::QuantizedKVCache<Policy>;

  /// A cache with room for max_tokens tokens; calibration as the policy needs it (CSKV factors).
  Session(const Model& model, int max_tokens, kvq::CacheCalibration calibration = {})
      : model_(model), cache_(cache_config(model.config(), max_tokens), std::move(calibration)) {
    const Config& c = model.config();
    seq_ = cache_.add_sequence();
    x_.resize(static_cast<std::size_t>(c.dim));
    xb_.resize(x_.size());
    xb2_.resize(x_.size());
    q_.resize(x_.size());
    k_.resize(static_cast<std::size_t>(c.kv_dim()));
    v_.resize(k_.size());
    hb_.resize(static_cast<std::size_t>(c.hidden_dim));
    hb2_.resize(hb_.size());
    logits_.resize(static_cast<std::size_t>(c.vocab_size));
  }

  static kvq::CacheConfig cache_config(const Config& c, int max_tokens) {
    kvq::CacheConfig cfg;
    cfg.num_layers = c.n_layers;
    cfg.num_kv_heads = c.n_kv_heads;
    cfg.head_dim = c.head_dim();
    cfg.num_blocks = Cache::blocks_for_tokens(c.n_layers, max_tokens);
    cfg.rope = {10000.0, kvq::RopeStyle::kAdjacentPairs};  // llama2.c's RoPE (pre-RoPE policies)
    return cfg;
  }

  const Cache& cache() const noexcept { return cache_; }
  kvq::SequenceId sequence() const noexcept { return seq_; }
  /// Tokens processed so far (the position of the next token).
  int position() const noexcept { return pos_; }

  /// Runs `token` at the next position and returns the logits [vocab] of the token after it.
  /// Fills `trace` (when given) with the layer inputs of attention.
  const std::vector<float>& forward(int token, StepTrace* trace = nullptr) {
    const Config& c = model_.config();
    const int dim = c.dim;
    const int kv_dim = c.kv_dim();
    const int hd = c.head_dim();
    if (token < 0 || token >= c.vocab_size) {
      throw std::runtime_error("llama2c: token " + std::to_string(token) + " is outside the vocabulary of " +
                               std::to_string(c.vocab_size));
    }
    if (trace) {
      trace->q.resize(static_cast<std::size_t>(c.n_layers * dim));
      trace->k.resize(static_cast<std::size_t>(c.n_layers * kv_dim));
      trace->k_pre.resize(trace->k.size());
      trace->v.resize(trace->k.size());
    }
    std::copy_n(model_.token_embedding.data() + static_cast<std::size_t>(token) * static_cast<std::size_t>(dim),
                dim, x_.data());
    for (int l = 0; l < c.n_layers; ++l) {
      const auto ld = static_cast<std::size_t>(l) * static_cast<std::size_t>(dim);
      rmsnorm(xb_.data(), x_.data(), model_.rms_att.data() + ld, dim);
      matmul(q_.data(), xb_.data(), model_.wq.data() + ld * static_cast<std::size_t>(dim), dim, dim);
      matmul(k_.data(), xb_.data(), model_.key_weight(l), dim, kv_dim);
      matmul(v_.data(), xb_.data(), model_.value_weight(l), dim, kv_dim);
      if (trace) std::copy(k_.begin(), k_.end(), trace->k_pre.begin() + l * kv_dim);
      rope_llama2c(q_.data(), dim, hd, pos_);
      if constexpr (!Policy::pre_rope) rope_llama2c(k_.data(), kv_dim, hd, pos_);
      cache_.append(seq_, l, k_.data(), v_.data(), 1);
      if (trace) {
        if constexpr (Policy::pre_rope) {
          std::copy(k_.begin(), k_.end(), trace->k.begin() + l * kv_dim);
          rope_llama2c(trace->k.data() + l * kv_dim, kv_dim, hd, pos_);
        } else {
          std::copy(k_.begin(), k_.end(), trace->k.begin() + l * kv_dim);
        }
        std::copy(q_.begin(), q_.end(), trace->q.begin() + l * dim);
        std::copy(v_.begin(), v_.end(), trace->v.begin() + l * kv_dim);
      }
      const index_t shape[2] = {c.n_heads, hd};
      kvq::attend(cache_, seq_, l, kvq::StridedView<const float, 2>(q_.data(), shape),
                  kvq::StridedView<float, 2>(xb_.data(), shape));
      matmul(xb2_.data(), xb_.data(), model_.wo.data() + ld * static_cast<std::size_t>(dim), dim, dim);
      for (int i = 0; i < dim; ++i) x_[static_cast<std::size_t>(i)] += xb2_[static_cast<std::size_t>(i)];
      rmsnorm(xb_.data(), x_.data(), model_.rms_ffn.data() + ld, dim);
      const auto lh =
          static_cast<std::size_t>(l) * static_cast<std::size_t>(c.hidden_dim) * static_cast<std::size_t>(dim);
      matmul(hb_.data(), xb_.data(), model_.w1.data() + lh, dim, c.hidden_dim);
      matmul(hb2_.data(), xb_.data(), model_.w3.data() + lh, dim, c.hidden_dim);
      for (std::size_t i = 0; i < hb_.size(); ++i) {
        float val = hb_[i];
        val *= 1.0f / (1.0f + std::exp(-val));  // SiLU
        hb_[i] = val * hb2_[i];
      }
      matmul(xb_.data(), hb_.data(), model_.w2.data() + lh, c.hidden_dim, dim);
      for (int i = 0; i < dim; ++i) x_[static_cast<std::size_t>(i)] += xb_[static_cast<std::size_t>(i)];
    }
    rmsnorm(x_.data(), x_.data(), model_.rms_final.data(), dim);
    matmul(logits_.data(), x_.data(), model_.wcls.data(), dim, c.vocab_size);
    ++pos_;
    return logits_;
  }

 private:
  /// out = weight * x / sqrt(mean(x^2) + 1e-5) (run.c's rmsnorm; out may alias x).
  static void rmsnorm(float* out, const float* x, const float* weight, int n) {
    float ss = 0.0f;
    for (int j = 0; j < n; ++j) ss += x[j] * x[j];
    ss /= static_cast<float>(n);
    ss += 1e-5f;
    ss = 1.0f / std::sqrt(ss);
    for (int j = 0; j < n; ++j) out[j] = weight[j] * (ss * x[j]);
  }
  /// out [d] = w [d, n] · x [n], summed in input order (run.c's matmul).
  static void matmul(float* out, const float* x, const float* w, int n, int d) {
    for (int i = 0; i < d; ++i) {
      const float* row = w + static_cast<std::size_t>(i) * static_cast<std::size_t>(n);
      float val = 0.0f;
      for (int j = 0; j < n; ++j) val += row[j] * x[j];
      out[i] = val;
    }
  }

  const Model& model_;
  Cache cache_;
  kvq::SequenceId seq_ = 0;
  int pos_ = 0;
  std::vector<float> x_, xb_, xb2_, q_, k_, v_, hb_, hb2_, logits_;
};

/// Index of the largest logit (the first on ties, like run.c's argmax).
inline int argmax(const std::vector<float>& logits) {
  return static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

/// log softmax(logits)[token], in double.
inline double log_prob(const std::vector<float>& logits, int token) {
  const float mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float z : logits) sum += std::exp(static_cast<double>(z) - mx);
  return static_cast<double>(logits[static_cast<std::size_t>(token)]) - mx - std::log(sum);
}

}  // namespace kvq_test::llama2c
