// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief A Llama-architecture model held in fp32, whatever file it came from (llama2.c
///        checkpoint or GGUF): the runtime of tools/llm works on this one representation.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "kvq/transform/rope.hpp"

namespace kvq::llm {

/// The shape and the numerics of a Llama-style decoder.
struct ModelConfig {
  int dim = 0;           ///< residual width
  int hidden_dim = 0;    ///< SwiGLU width
  int num_layers = 0;
  int num_heads = 0;     ///< query heads
  int num_kv_heads = 0;  ///< key/value heads (GQA: num_heads % num_kv_heads == 0)
  int head_dim = 0;      ///< dim / num_heads
  int vocab_size = 0;
  int max_context = 0;   ///< longest context the model was trained for, in tokens
  float norm_eps = 1e-5f;                ///< RMSNorm epsilon
  kvq::RopeConfig rope{10000.0, kvq::RopeStyle::kAdjacentPairs};  ///< how wq/wk rows pair up

  int kv_dim() const noexcept { return num_kv_heads * head_dim; }
  int q_dim() const noexcept { return num_heads * head_dim; }
};

/// A row-major fp32 matrix [rows, cols]; a projection y = W x has W of shape [out, in].
struct Matrix {
  int rows = 0;
  int cols = 0;
  std::vector<float> data;  ///< rows * cols floats

  const float* row(int r) const noexcept {
    return data.data() + static_cast<std::size_t>(r) * static_cast<std::size_t>(cols);
  }
};

/// One decoder layer: x += Wo·attn(RoPE(Wq·n1), RoPE(Wk·n1), Wv·n1) with n1 = RMSNorm(x)·attn_norm,
/// then x += Wdown·(SiLU(Wgate·n2) ⊙ Wup·n2) with n2 = RMSNorm(x)·ffn_norm.
struct LayerWeights {
  std::vector<float> attn_norm;  ///< [dim]
  Matrix wq;                     ///< [q_dim, dim]
  Matrix wk;                     ///< [kv_dim, dim]
  Matrix wv;                     ///< [kv_dim, dim]
  Matrix wo;                     ///< [dim, q_dim]
  std::vector<float> ffn_norm;   ///< [dim]
  Matrix w_gate;                 ///< [hidden_dim, dim]  (llama2.c w1)
  Matrix w_up;                   ///< [hidden_dim, dim]  (llama2.c w3)
  Matrix w_down;                 ///< [dim, hidden_dim]  (llama2.c w2)
};

/// A whole model. `output` is empty when the classifier is tied to the token embedding.
struct Model {
  ModelConfig config;
  std::string name;    ///< for tables: file name or general.name
  std::string format;  ///< "llama2.c" or "gguf"
  Matrix token_embedding;            ///< [vocab, dim]
  std::vector<LayerWeights> layers;  ///< num_layers
  std::vector<float> final_norm;     ///< [dim]
  Matrix output;                     ///< [vocab, dim], or empty (tied)

  const Matrix& classifier() const noexcept { return output.data.empty() ? token_embedding : output; }
};

}  // namespace kvq::llm
