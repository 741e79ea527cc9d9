// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief One sequence of a Llama model decoding on a kvq::cuda::DeviceKVCache<Policy>: the
///        runtime of llm/session.hpp with its K/V in GPU memory and attention on the GPU. nvcc only.
///
/// A correctness path, not a fast one: the matrix products, norms, RoPE and SwiGLU run on the host
/// exactly as in Session::forward (llm/linear.hpp), and per token and layer the session copies the
/// key and value rows (rounded to the cache's exact type, as the CPU cache rounds them) and the
/// query to the device, appends them with the device cache's kernel, runs decode attention on the
/// device cache's bytes, and copies the output back (one stream synchronisation per layer). A chunk
/// of n tokens is n decode steps, token by token: each token is one plan_append (all layers), one
/// upload_plan and one append per layer, so the cache holds what a CPU cache fed the same rows
/// holds, byte for byte.
///
/// Attention: the fused kernels of cuda/decode_attention.cuh (head_dim 64 or 128, up to 8 query
/// heads per kv head; queries and outputs in the cache's 16-bit type) where they take the model's
/// shape, else the reference kernel of cuda/reference_decode.cuh (any head_dim, fp32 queries,
/// outputs and math). DeviceAttention::kAuto chooses; kFused and kReference insist.
///
/// Not here (Session has them): calibration data (the device cache stores rows as they come) and
/// the AttentionObserver of session.hpp (which includes Eigen, which nvcc cannot compile with
/// kvq's warnings); DeviceStep gives the rows appended, the query and the output of every layer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "kvq/core/error.hpp"
#include "kvq/core/status.hpp"
#include "kvq/core/thread_pool.hpp"
#include "kvq/cuda/decode_attention.cuh"
#include "kvq/cuda/device_cache.cuh"
#include "kvq/cuda/reference_decode.cuh"
#include "kvq/transform/rope.hpp"
#include "llm/linear.hpp"
#include "llm/model.hpp"

namespace kvq::llm {

/// Which GPU attention a DeviceSession runs.
enum class DeviceAttention { kAuto, kFused, kReference };

inline const char* device_attention_name(DeviceAttention a) noexcept {
  return a == DeviceAttention::kFused ? "fused" : a == DeviceAttention::kReference ? "reference" : "auto";
}

/// What one layer of one token did (DeviceSession::set_observer): the rows appended (k after
/// RoPE, [kv_dim] of the cache's exact type), the query after RoPE [q_dim] as computed (the fused
/// kernels see it rounded to 16 bits) and the attention output [q_dim] copied back from the device.
template <class E>
struct DeviceStep {
  int layer = 0;
  int position = 0;
  const E* k = nullptr;
  const E* v = nullptr;
  const float* q = nullptr;
  const float* out = nullptr;
};

template <class Policy>
class DeviceSession {
 public:
  using Cache = kvq::cuda::DeviceKVCache<Policy>;
  using exact_type = typename Policy::exact_type;
  using Step = DeviceStep<exact_type>;
  using Observer = std::function<void(const Step&)>;
  /// The fused kernels' query type and its host twin (the cache's 16-bit type).
  using FusedQuery = std::conditional_t<std::is_same_v<exact_type, kvq::BFloat16>, __nv_bfloat16, __half>;
  using FusedHostQuery = std::conditional_t<std::is_same_v<exact_type, kvq::BFloat16>, kvq::BFloat16, kvq::Float16>;

  /// A device cache with room for `max_tokens` tokens of one sequence (the CPU Session's config:
  /// same blocks, same block ids), on `stream`. `pool` (may be null) runs the matrix products.
  /// Throws kvq::Error: kInvalidArgument for max_tokens <= 0, or for `attention` = kFused where
  /// the fused kernels do not take the model's shape (the message says why); kCudaError.
  DeviceSession(const Model& model, int max_tokens, kvq::ThreadPool* pool, DeviceAttention attention = DeviceAttention::kAuto,
                cudaStream_t stream = nullptr)
      : model_(model),
        cache_(cache_config(model.config, max_tokens), limits(max_tokens)),
        rope_(model.config.head_dim, model.config.rope, 1),
        pool_(pool),
        max_tokens_(max_tokens),
        stream_(stream) {
    constexpr const char* where = "kvq::llm::DeviceSession";
    const ModelConfig& c = model.config;
    seq_ = cache_.add_sequence();
    const auto kvd = static_cast<std::size_t>(c.kv_dim()), qd = static_cast<std::size_t>(c.q_dim());
    dk_ = kvq::cuda::detail::DeviceBytes(where, kvd * sizeof(exact_type));
    dv_ = kvq::cuda::detail::DeviceBytes(where, kvd * sizeof(exact_type));
    dq_ = kvq::cuda::detail::DeviceBytes(where, qd * sizeof(float));
    dout_ = kvq::cuda::detail::DeviceBytes(where, qd * sizeof(float));
    dslot_ = kvq::cuda::detail::DeviceBytes(where, sizeof(std::int32_t));
    hk_ = kvq::cuda::detail::PinnedBytes(where, kvd * sizeof(exact_type));
    hv_ = kvq::cuda::detail::PinnedBytes(where, kvd * sizeof(exact_type));
    hq_ = kvq::cuda::detail::PinnedBytes(where, qd * sizeof(float));
    hout_ = kvq::cuda::detail::PinnedBytes(where, qd * sizeof(float));
    const auto slot = static_cast<std::int32_t>(seq_);
    kvq::cuda::detail::check_cuda(where, "cudaMemcpy",
                                  cudaMemcpy(dslot_.get(), &slot, sizeof(slot), cudaMemcpyHostToDevice));

    // The fused kernels' workspace (small: partial states of up to kMaxSplits pieces), also for
    // the check of whether they take this shape.
    workspace_bytes_ = kvq::cuda::decode_workspace_bytes<Policy>(1, c.num_heads, c.num_kv_heads, c.head_dim, kMaxSplits);
    workspace_ = kvq::cuda::detail::DeviceBytes(where, workspace_bytes_);
    const kvq::cuda::DecodeAttentionArgs a = args(0, 1);
    fused_why_ = kvq::cuda::decode_check<Policy, FusedQuery>(a);
    if (attention == DeviceAttention::kFused && !fused_why_.empty()) {
      kvq::detail::throw_argument_error(where, "attention", "fused", "a model shape the fused kernels take: " + fused_why_);
    }
    attention_ = attention == DeviceAttention::kAuto ? (fused_why_.empty() ? DeviceAttention::kFused : DeviceAttention::kReference)
                                                     : attention;
    if (attention_ == DeviceAttention::kFused) {
      int device = 0;
      kvq::cuda::detail::check_cuda(where, "cudaGetDevice", cudaGetDevice(&device));
      kvq::cuda::detail::check_cuda(where, "cudaDeviceGetAttribute",
                                    cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device));
      check(kvq::cuda::decode_workspace_clear(workspace_.get(), workspace_bytes_, stream_), "decode_workspace_clear");
    } else {
      const std::string why = kvq::cuda::reference_decode_check<Policy, float>(a);
      if (!why.empty()) kvq::detail::throw_argument_error(where, "attention", "reference", why);
    }
  }

  /// CPU Session's cache config (llm/session.hpp: Session::cache_config).
  static kvq::CacheConfig cache_config(const ModelConfig& c, int max_tokens) {
    if (max_tokens <= 0) {
      kvq::detail::throw_argument_error("kvq::llm::DeviceSession", "max_tokens", max_tokens, "a positive token count");
    }
    kvq::CacheConfig cfg;
    cfg.num_layers = c.num_layers;
    cfg.num_kv_heads = c.num_kv_heads;
    cfg.head_dim = c.head_dim;
    cfg.num_blocks = kvq::QuantizedKVCache<Policy>::blocks_for_tokens(c.num_layers, max_tokens);
    cfg.rope = c.rope;
    return cfg;
  }

  const Cache& cache() const noexcept { return cache_; }
  Cache& cache() noexcept { return cache_; }
  kvq::SequenceId sequence() const noexcept { return seq_; }
  int position() const noexcept { return pos_; }
  /// The attention this session runs (kFused or kReference), and why the fused kernels do not
  /// take the model's shape (empty when they do).
  DeviceAttention attention() const noexcept { return attention_; }
  const std::string& fused_unsupported_reason() const noexcept { return fused_why_; }
  /// Called for every token and layer of the following forward calls (empty: none).
  void set_observer(Observer observer) { observer_ = std::move(observer); }
  /// The device cache's sticky append status (DeviceKVCache::check_status: synchronises; throws
  /// kNonFiniteInput naming the first non-finite row appended).
  void check_status() { cache_.check_status(); }

  /// Runs tokens[0..n) at positions position() .. position() + n - 1 as n decode steps, token by
  /// token. logits: [n, vocab] when `all_logits`, else [vocab] for the last token only; may be
  /// null. Throws kvq::Error (and changes nothing) for a token outside the vocabulary or past
  /// max_tokens; kCudaError when the device fails.
  void forward(const int* tokens, int n, float* logits, bool all_logits = true) {
    const ModelConfig& c = model_.config;
    if (n <= 0) return;
    if (pos_ + n > max_tokens_) {
      kvq::detail::throw_argument_error("kvq::llm::DeviceSession::forward", "n", n,
                                        "at most " + std::to_string(max_tokens_ - pos_) +
                                            " more tokens (the session was made for " + std::to_string(max_tokens_) + ")");
    }
    for (int i = 0; i < n; ++i) {
      if (tokens[i] < 0 || tokens[i] >= c.vocab_size) {
        kvq::detail::throw_argument_error("kvq::llm::DeviceSession::forward", "token", tokens[i],
                                          "an id in [0, " + std::to_string(c.vocab_size) + ")");
      }
    }
    const int vocab = model_.classifier().rows;
    for (int i = 0; i < n; ++i) {
      float* row = logits == nullptr ? nullptr
                   : all_logits      ? logits + static_cast<std::size_t>(i) * static_cast<std::size_t>(vocab)
                   : i == n - 1      ? logits
                                     : nullptr;
      step(tokens[i], row);
    }
  }

 private:
  static constexpr std::int32_t kMaxSplits = 64;

  static kvq::cuda::DeviceCacheLimits limits(int max_tokens) {
    kvq::cuda::DeviceCacheLimits l;
    l.max_slots = 1;
    l.max_tokens = max_tokens;
    l.max_batch = 1;
    l.max_append_tokens = 1;
    return l;
  }

  kvq::cuda::DecodeAttentionArgs args(int layer, std::int32_t splits) const {
    kvq::cuda::DecodeAttentionArgs a;
    a.kv = cache_.paged(layer);
    a.q = dq_.get();
    a.out = dout_.get();
    a.slots = dslot_.get<std::int32_t>();
    a.batch = 1;
    a.num_q_heads = model_.config.num_heads;
    a.num_splits = splits;
    a.workspace = workspace_.get();
    a.workspace_bytes = workspace_bytes_;
    return a;
  }

  void check(kvq::Status s, const char* what) const {
    if (s == kvq::Status::kOk) return;
    const cudaError_t err = cudaGetLastError();
    throw kvq::Error(s, kvq::detail::concat("kvq::llm::DeviceSession: ", what, " failed: ", kvq::status_name(s),
                                            err != cudaSuccess ? kvq::detail::concat(" (", cudaGetErrorString(err), ")")
                                                               : std::string()));
  }
  void check_cuda(const char* what, cudaError_t err) const {
    kvq::cuda::detail::check_cuda("kvq::llm::DeviceSession", what, err);
  }

  /// One decode step: token at position pos_ through every layer; logits [vocab] when non-null.
  void step(int token, float* logits) {
    const ModelConfig& c = model_.config;
    const int dim = c.dim, qd = c.q_dim(), kvd = c.kv_dim(), hid = c.hidden_dim;
    grow(x_, dim);
    grow(xn_, dim);
    grow(y_, dim);
    grow(q_, qd);
    grow(att_, qd);
    grow(k_, kvd);
    grow(v_, kvd);
    grow(gate_, hid);
    grow(up_, hid);
    std::copy_n(model_.token_embedding.row(token), dim, x_.data());
    const kvq::SequenceId slot = seq_;
    cache_.plan_append(&slot, 1, 1);
    check(cache_.upload_plan(stream_), "upload_plan");
    const auto kv_bytes = static_cast<std::size_t>(kvd) * sizeof(exact_type);
    auto* hk = hk_.template get<exact_type>();
    auto* hv = hv_.template get<exact_type>();
    for (int l = 0; l < c.num_layers; ++l) {
      const LayerWeights& w = model_.layers[static_cast<std::size_t>(l)];
      rmsnorm(xn_.data(), x_.data(), w.attn_norm.data(), dim);
      linear(w.wq, xn_.data(), 1, dim, q_.data(), qd, pool_);
      linear(w.wk, xn_.data(), 1, dim, k_.data(), kvd, pool_);
      linear(w.wv, xn_.data(), 1, dim, v_.data(), kvd, pool_);
      rope_.rotate(q_.data(), 1, qd, c.num_heads, pos_, rope_base_);
      if constexpr (!Policy::pre_rope) rope_.rotate(k_.data(), 1, kvd, c.num_kv_heads, pos_, rope_base_);
      for (int j = 0; j < kvd; ++j) {
        hk[j] = kvq::from_float<exact_type>(k_[static_cast<std::size_t>(j)]);
        hv[j] = kvq::from_float<exact_type>(v_[static_cast<std::size_t>(j)]);
      }
      check_cuda("cudaMemcpyAsync (k)", cudaMemcpyAsync(dk_.get(), hk, kv_bytes, cudaMemcpyHostToDevice, stream_));
      check_cuda("cudaMemcpyAsync (v)", cudaMemcpyAsync(dv_.get(), hv, kv_bytes, cudaMemcpyHostToDevice, stream_));
      check(cache_.append(l, dk_.template get<exact_type>(), dv_.template get<exact_type>(), stream_), "append");
      attend(l);
      if (observer_) observer_(Step{l, pos_, hk, hv, q_.data(), att_.data()});
      linear(w.wo, att_.data(), 1, qd, y_.data(), dim, pool_);
      add(x_.data(), y_.data(), static_cast<std::size_t>(dim));
      rmsnorm(xn_.data(), x_.data(), w.ffn_norm.data(), dim);
      linear(w.w_gate, xn_.data(), 1, dim, gate_.data(), hid, pool_);
      linear(w.w_up, xn_.data(), 1, dim, up_.data(), hid, pool_);
      for (std::size_t j = 0; j < static_cast<std::size_t>(hid); ++j) {
        const float g = gate_[j];
        gate_[j] = g / (1.0f + std::exp(-g)) * up_[j];  // SiLU(gate) * up
      }
      linear(w.w_down, gate_.data(), 1, hid, y_.data(), dim, pool_);
      add(x_.data(), y_.data(), static_cast<std::size_t>(dim));
    }
    ++pos_;
    if (logits == nullptr) return;
    rmsnorm(xn_.data(), x_.data(), model_.final_norm.data(), dim);
    const Matrix& cls = model_.classifier();
    linear(cls, xn_.data(), 1, dim, logits, cls.rows, pool_);
  }

  /// q_ (after RoPE) to the device, attention of layer l on the device cache, the output into att_.
  void attend(int layer) {
    const ModelConfig& c = model_.config;
    const auto qd = static_cast<std::size_t>(c.q_dim());
    if (attention_ == DeviceAttention::kFused) {
      auto* hq = hq_.template get<FusedHostQuery>();
      for (std::size_t j = 0; j < qd; ++j) hq[j] = kvq::from_float<FusedHostQuery>(q_[j]);
      check_cuda("cudaMemcpyAsync (q)", cudaMemcpyAsync(dq_.get(), hq, qd * sizeof(FusedHostQuery), cudaMemcpyHostToDevice, stream_));
      const kvq::index_t blocks = cache_.key_counts(seq_, layer).quantized / Cache::block_tokens;
      const std::int32_t splits = std::min(kMaxSplits, kvq::cuda::decode_splits(1, c.num_kv_heads, static_cast<std::int32_t>(blocks), sms_));
      check(kvq::cuda::decode_attention<Policy, FusedQuery>(args(layer, splits), stream_), "decode_attention");
      auto* ho = hout_.template get<FusedHostQuery>();
      check_cuda("cudaMemcpyAsync (out)", cudaMemcpyAsync(ho, dout_.get(), qd * sizeof(FusedHostQuery), cudaMemcpyDeviceToHost, stream_));
      check_cuda("cudaStreamSynchronize", cudaStreamSynchronize(stream_));
      for (std::size_t j = 0; j < qd; ++j) att_[j] = kvq::to_float(ho[j]);
    } else {
      auto* hq = hq_.template get<float>();
      std::copy_n(q_.data(), qd, hq);
      check_cuda("cudaMemcpyAsync (q)", cudaMemcpyAsync(dq_.get(), hq, qd * sizeof(float), cudaMemcpyHostToDevice, stream_));
      check(kvq::cuda::reference_decode_attention<Policy, float>(args(layer, 1), stream_), "reference_decode_attention");
      auto* ho = hout_.template get<float>();
      check_cuda("cudaMemcpyAsync (out)", cudaMemcpyAsync(ho, dout_.get(), qd * sizeof(float), cudaMemcpyDeviceToHost, stream_));
      check_cuda("cudaStreamSynchronize", cudaStreamSynchronize(stream_));
      std::copy_n(ho, qd, att_.data());
    }
  }

  static void grow(std::vector<float>& v, int width) {
    if (v.size() < static_cast<std::size_t>(width)) v.resize(static_cast<std::size_t>(width));
  }

  /// out = weight ⊙ x / sqrt(mean(x²) + eps), as Session's rmsnorm for one row.
  void rmsnorm(float* out, const float* x, const float* weight, int dim) const noexcept {
    float ss = 0.0f;
    for (int j = 0; j < dim; ++j) ss += x[j] * x[j];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + model_.config.norm_eps);
    for (int j = 0; j < dim; ++j) out[j] = weight[j] * (inv * x[j]);
  }

  static void add(float* x, const float* y, std::size_t n) noexcept {
    for (std::size_t j = 0; j < n; ++j) x[j] += y[j];
  }

  const Model& model_;
  Cache cache_;
  kvq::RopeRotator rope_;
  kvq::ThreadPool* pool_;
  int max_tokens_;
  cudaStream_t stream_;
  kvq::SequenceId seq_ = 0;
  int pos_ = 0;
  DeviceAttention attention_ = DeviceAttention::kReference;
  std::string fused_why_;
  int sms_ = 1;
  Observer observer_;
  double rope_base_[2 * kvq::RopeRotator::kMaxHalf] = {};
  // Device buffers of one layer's rows, query and output, the slot, the fused kernels' workspace;
  // pinned host staging of the same.
  kvq::cuda::detail::DeviceBytes dk_, dv_, dq_, dout_, dslot_, workspace_;
  std::size_t workspace_bytes_ = 0;
  kvq::cuda::detail::PinnedBytes hk_, hv_, hq_, hout_;
  std::vector<float> x_, xn_, y_, q_, att_, k_, v_, gate_, up_;
};

}  // namespace kvq::llm
