// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief A Llama-architecture GGUF file (llama.cpp naming) as an fp32 Model plus its byte-level
///        BPE tokenizer.
///
/// Metadata read: general.architecture (must be "llama"), general.name, llama.{block_count,
/// embedding_length, feed_forward_length, attention.head_count, attention.head_count_kv
/// (default head_count), attention.layer_norm_rms_epsilon, context_length, rope.freq_base
/// (default 10000), rope.dimension_count (default and required value: head_dim), vocab_size
/// (optional; must match)}. Tensors, with GGUF dims (ne[0] first, so [in, out] for a
/// projection y = W x whose Matrix is [out, in]):
///   token_embd.weight [dim, vocab]          output_norm.weight [dim]
///   output.weight [dim, vocab] (absent: tied; Model::output stays empty)
///   blk.N.attn_norm.weight [dim]            blk.N.ffn_norm.weight [dim]
///   blk.N.attn_q.weight [dim, q_dim]        blk.N.attn_k.weight [dim, kv_dim]
///   blk.N.attn_v.weight [dim, kv_dim]       blk.N.attn_output.weight [q_dim, dim]
///   blk.N.ffn_gate.weight [dim, hidden]     blk.N.ffn_up.weight [dim, hidden]
///   blk.N.ffn_down.weight [hidden, dim]
#pragma once

#include <memory>
#include <string>

#include "llm/gguf.hpp"
#include "llm/model.hpp"
#include "llm/tokenizer.hpp"

namespace kvq::llm {

struct GgufLoadOptions {
  /// llama.cpp's converter permutes the rows of wq and wk so that RoPE rotates adjacent pairs:
  /// within each head of size d, GGUF row 2i + j holds the Hugging Face row j·(d/2) + i
  /// (j ∈ {0, 1}). true: undo that per head (rows in Hugging Face order) and use
  /// RopeStyle::kHalfSplit; false: keep the file order and use RopeStyle::kAdjacentPairs. Both
  /// give the same attention scores.
  bool unpermute_qk = true;
};

struct LoadedGguf {
  Model model;
  std::unique_ptr<Tokenizer> tokenizer;  ///< a BpeTokenizer
};

/// Loads the file at `path`. Throws kvq::Error (kIoError, kFormatError, kUnsupported) naming the
/// file and the key or tensor at fault, the value found and what was expected.
LoadedGguf load_gguf_model(const std::string& path, GgufLoadOptions options = {});
/// Same from an already parsed file; Model::name falls back to the stem of file.name().
LoadedGguf load_gguf_model(const GgufFile& file, GgufLoadOptions options = {});

/// The ModelConfig of a llama GGUF file (vocab_size from token_embd.weight), fully checked.
ModelConfig read_gguf_config(const GgufFile& file, GgufLoadOptions options = {});

/// Undoes llama.cpp's RoPE row permutation in place: for each of `heads` consecutive blocks of
/// `head_dim` rows, output row j·(head_dim/2) + i = input row 2i + j. `m.rows` must equal
/// heads·head_dim, head_dim even.
void unpermute_rope_rows(Matrix& m, int heads, int head_dim);

}  // namespace kvq::llm
