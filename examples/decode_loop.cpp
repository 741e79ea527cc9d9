// SPDX-License-Identifier: Apache-2.0
// What an inference engine does with kvq: pick a cache policy by type, prefill a ragged batch of
// sequences, then run decode steps that append each layer's new K/V and call kvq::attend
// instead of fp16 attention. The "model" here is random numbers; the calls and shapes are the
// real ones. The same loop runs with an fp16 cache: changing the policy is changing one type.
#include <kvq/kvq.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

namespace {

// Model shape: 8 query heads share 2 kv heads (GQA 4:1), head_dim 64, 3 layers.
constexpr kvq::index_t kLayers = 3, kQueryHeads = 8, kKvHeads = 2, kHeadDim = 64;
constexpr kvq::index_t kRow = kKvHeads * kHeadDim;  // one token's K (or V) in one layer
constexpr kvq::index_t kDecodeSteps = 16;
const std::vector<kvq::index_t> kPrompts = {300, 1500, 701};  // a ragged batch

struct Run {
  std::size_t memory_bytes = 0;  // what the cache holds at the end
  double stored_elements = 0;
  double max_diff = 0;  // largest |fused - fp64 reference| over the last step's outputs
};

template <class Policy>
Run decode_loop() {
  using Cache = kvq::QuantizedKVCache<Policy>;
  // The block pool is allocated up front: size it for the most tokens the batch will hold.
  kvq::index_t most = 0;
  for (kvq::index_t p : kPrompts) most += p + kDecodeSteps;
  kvq::CacheConfig config;
  config.num_layers = kLayers;
  config.num_kv_heads = kKvHeads;
  config.head_dim = kHeadDim;
  config.num_blocks =
      Cache::blocks_for_tokens(kLayers, most, static_cast<kvq::index_t>(kPrompts.size()));
  Cache cache(config);

  kvq::Rng rng(42);  // stands in for the model's K/V/Q projections
  auto random = [&](std::vector<float>& x) {
    for (float& e : x) e = rng.normal();
  };

  // Prefill: one append per layer with the prompt's K and V, [prompt, kv_heads, head_dim]
  // (post-RoPE keys: KIVI stores keys after RoPE).
  std::vector<kvq::SequenceId> batch;
  for (kvq::index_t prompt : kPrompts) {
    const kvq::SequenceId seq = cache.add_sequence();
    std::vector<float> k(static_cast<std::size_t>(prompt * kRow)), v(k.size());
    for (kvq::index_t layer = 0; layer < kLayers; ++layer) {
      random(k);
      random(v);
      cache.append(seq, layer, k.data(), v.data(), prompt);
    }
    batch.push_back(seq);
  }

  // Decode: every step, every sequence, every layer appends one token and attends over its
  // whole history (sinks, quantized blocks and the full-precision window, fused).
  Run run;
  std::vector<float> q(kQueryHeads * kHeadDim), out(q.size()), ref(q.size()), k(kRow), v(kRow);
  for (kvq::index_t step = 0; step < kDecodeSteps; ++step) {
    for (kvq::SequenceId seq : batch) {
      for (kvq::index_t layer = 0; layer < kLayers; ++layer) {
        random(q);
        random(k);
        random(v);
        cache.append(seq, layer, k.data(), v.data(), 1);
        const kvq::StridedView<const float, 2> query(q.data(), {kQueryHeads, kHeadDim});
        kvq::attend(cache, seq, layer, query,
                    kvq::StridedView<float, 2>(out.data(), {kQueryHeads, kHeadDim}));
        // out [query_heads, head_dim] goes on to the layer's output projection. On the last step,
        // check it against kvq::ref::attend, the fp64 oracle over the same (dequantized) cache.
        if (step + 1 == kDecodeSteps) {
          kvq::ref::attend(cache, seq, layer, query,
                           kvq::StridedView<float, 2>(ref.data(), {kQueryHeads, kHeadDim}));
          for (std::size_t i = 0; i < out.size(); ++i)
            run.max_diff = std::fmax(run.max_diff, std::fabs(out[i] - ref[i]));
        }
      }
    }
  }
  run.memory_bytes = cache.memory_bytes();  // measured from allocations: blocks, sinks, windows
  run.stored_elements = cache.stored_elements();
  for (kvq::SequenceId seq : batch) cache.free(seq);  // blocks go back to the pool
  return run;
}

}  // namespace

int main() {
  // Pick the policy by type. KIVI-2: 2-bit keys per channel and 2-bit values per token in groups
  // of 32, the most recent tokens (residual of 128) in fp16.
  using Policy = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 128>;
  const Run kivi = decode_loop<Policy>();
  const Run fp16 = decode_loop<kvq::Fp16Policy<kvq::Float16>>();  // the baseline: one type away

  const double bytes = static_cast<double>(kivi.memory_bytes);
  const double fp16_bytes = 2.0 * kivi.stored_elements;  // 2 bytes per K/V element
  std::printf(
      "%s: %zu sequences x %lld layers, %.0f K/V elements in %.0f bytes (%.2f bits/element)\n",
      Policy::name().c_str(), kPrompts.size(), static_cast<long long>(kLayers),
      kivi.stored_elements, bytes, 8.0 * bytes / kivi.stored_elements);
  std::printf(
      "fp16 K/V of the same tokens: %.0f bytes (the fp16 cache holds %zu, with block padding)\n",
      fp16_bytes, fp16.memory_bytes);
  std::printf(
      "memory saved: %.1f%% (%.2fx smaller); fused attention vs the fp64 reference: max |diff| "
      "%.1e\n",
      100.0 * (1.0 - bytes / fp16_bytes), fp16_bytes / bytes,
      std::fmax(kivi.max_diff, fp16.max_diff));
  return bytes < fp16_bytes && kivi.max_diff < 1e-4 && fp16.max_diff < 1e-4 ? 0 : 1;
}
