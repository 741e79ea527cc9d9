// SPDX-License-Identifier: Apache-2.0
// An inference engine's decode loop on the GPU cache, kvq::cuda::DeviceKVCache: a ragged batch of
// sequences is prefilled in chunks, then every decode step plans on the host (plan_append) and
// runs on one stream: upload_plan, then per layer the quantize-on-append kernel and fused decode
// attention on the packed 2-bit blocks. The step is captured once in a CUDA graph and replayed.
// The "model" is random numbers (an engine's projection kernels would write K, V and q into the
// same device buffers); the calls, shapes and rules are the real ones. At the end the last
// step's GPU attention is checked against CPU attention (kvq::attend) on a host cache fed the
// same tokens, and on the device cache copied back to the host (download).
//
// Build: the kvq_example_cuda_decode_loop target (KVQ_ENABLE_CUDA, sm_90a by default). Prints
// "SKIPPED: no usable CUDA device" and exits 0 where there is no GPU; exits 1 on any error or
// mismatch. README.md, "Engines on the GPU", explains each rule used here.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <kvq/cuda/decode_attention.cuh>
#include <kvq/cuda/device_cache.cuh>
#include <kvq/kvq.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

// The cache policy, by type: KIVI-2, 2-bit keys per channel and 2-bit values per token in groups
// of 128, the latest 128 tokens in fp16. kvq::Fp16Policy<kvq::Float16> is the fp16 baseline (one
// type away); Fp16Policy<kvq::BFloat16> takes bf16 rows and __nv_bfloat16 queries.
using Policy = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, /*Group=*/128, /*Residual=*/128>;
using Exact = Policy::exact_type;  // kvq::Float16: the K/V rows append takes (bit-compatible with __half)
using TQ = __half;                 // queries and outputs of decode attention

// Model shape: 32 query heads share 8 kv heads (GQA 4:1), head_dim 128, 4 layers.
constexpr int kLayers = 4, kKvHeads = 8, kQueryHeads = 32, kHeadDim = 128;
constexpr int kRow = kKvHeads * kHeadDim;      // one token's K (or V) in one layer
constexpr int kQRow = kQueryHeads * kHeadDim;  // one token's q (or attention output) in one layer
constexpr int kPrefillChunk = 512;             // the longest append: DeviceCacheLimits::max_append_tokens
constexpr int kDecodeSteps = 64;
const std::vector<int> kPrompts = {1000, 77, 530, 300};  // a ragged batch
const int kBatch = static_cast<int>(kPrompts.size());

// ---- error handling: kvq::Error (exceptions) from the host API, kvq::Status from the launchers ----

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "cuda_decode_loop: %s\n", what.c_str());
  std::exit(1);
}
void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) fail(std::string(what) + ": " + cudaGetErrorString(err));
}
void check(kvq::Status s, const char* what) {  // launchers return a Status and never throw
  if (s != kvq::Status::kOk) fail(std::string(what) + " returned " + kvq::status_name(s));
}

template <class T>
T* device_alloc(std::size_t count) {
  void* p = nullptr;
  check(cudaMalloc(&p, count * sizeof(T)), "cudaMalloc");
  return static_cast<T*>(p);
}
template <class T>
T* pinned_alloc(std::size_t count) {
  void* p = nullptr;
  check(cudaMallocHost(&p, count * sizeof(T)), "cudaMallocHost");
  return static_cast<T*>(p);
}

void fill_random(kvq::Rng& rng, Exact* x, std::size_t n) {  // stands in for the model's projections
  for (std::size_t i = 0; i < n; ++i) x[i] = kvq::from_float<Exact>(rng.normal());
}

/// max over (sequence, query head) of ||gpu - cpu|| / ||cpu|| for one layer's outputs.
double row_error(const std::vector<float>& cpu, const kvq::Float16* gpu) {
  double worst = 0.0;
  for (int h = 0; h < kQueryHeads; ++h) {
    double err2 = 0.0, ref2 = 0.0;
    for (int c = 0; c < kHeadDim; ++c) {
      const std::size_t i = static_cast<std::size_t>(h * kHeadDim + c);
      const double d = static_cast<double>(gpu[i].to_float()) - cpu[i];
      err2 += d * d;
      ref2 += static_cast<double>(cpu[i]) * cpu[i];
    }
    worst = std::max(worst, std::sqrt(err2 / std::max(ref2, 1e-30)));
  }
  return worst;
}

int run() {
  // ---- setup: everything is allocated here, once ------------------------------------------------
  int longest = 0, total = 0;
  for (int p : kPrompts) {
    longest = std::max(longest, p + kDecodeSteps);
    total += p + kDecodeSteps;
  }
  kvq::CacheConfig config;
  config.num_layers = kLayers;
  config.num_kv_heads = kKvHeads;
  config.head_dim = kHeadDim;
  config.num_blocks = kvq::QuantizedKVCache<Policy>::blocks_for_tokens(kLayers, total, kBatch);  // per pool
  kvq::cuda::DeviceCacheLimits limits;
  limits.max_slots = kBatch;                 // sequences live at once
  limits.max_tokens = 2048;                  // positions per sequence: the block tables' width
  limits.max_batch = kBatch;                 // entries of one plan
  limits.max_append_tokens = kPrefillChunk;  // n of one plan (sizes the plan buffers)
  // The device cache owns its pools, exact rows, block tables, lengths and plan buffers (cudaMalloc
  // and cudaMallocHost in the constructor, nothing later). The engine owns everything else below.
  kvq::cuda::DeviceKVCache<Policy> cache(config, limits);
  kvq::QuantizedKVCache<Policy> cpu(config);  // the CPU reference, fed the same tokens

  cudaStream_t stream = nullptr;  // one stream carries every step: plan upload, appends, attention
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");

  // The engine's device buffers, at fixed addresses (a captured graph holds these pointers):
  // K/V of one append [layer][batch][n][kv_heads][head_dim], q and out [layer][batch][q_heads][head_dim].
  const std::size_t kv_numbers = static_cast<std::size_t>(kLayers) * std::max(kBatch, kPrefillChunk) * kRow;
  const std::size_t q_numbers = static_cast<std::size_t>(kLayers) * kBatch * kQRow;
  Exact* dk = device_alloc<Exact>(kv_numbers);
  Exact* dv = device_alloc<Exact>(kv_numbers);
  TQ* dq = device_alloc<TQ>(q_numbers);
  TQ* dout = device_alloc<TQ>(q_numbers);
  std::int32_t* dslots = device_alloc<std::int32_t>(static_cast<std::size_t>(kBatch));

  std::vector<kvq::SequenceId> slots;
  for (int b = 0; b < kBatch; ++b) {
    slots.push_back(cache.add_sequence());  // the lowest free slot: 0, 1, 2, 3
    if (cpu.add_sequence() != slots.back()) fail("the CPU cache numbers its sequences differently");
  }
  check(cudaMemcpy(dslots, slots.data(), slots.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice), "cudaMemcpy (slots)");

  // ---- prefill: chunks of at most kPrefillChunk tokens, one sequence per plan ---------------------
  // An engine runs its own prefill attention (flash attention over the prompt); the cache stores.
  kvq::Rng rng(2024);
  Exact* staging = pinned_alloc<Exact>(2 * static_cast<std::size_t>(kLayers) * kPrefillChunk * kRow);
  for (int b = 0; b < kBatch; ++b) {
    for (int done = 0; done < kPrompts[static_cast<std::size_t>(b)];) {
      const int n = std::min(kPrefillChunk, kPrompts[static_cast<std::size_t>(b)] - done);
      const std::size_t numbers = static_cast<std::size_t>(kLayers) * n * kRow;  // [layer][1][n][row]
      Exact* hk = staging;
      Exact* hv = staging + numbers;
      fill_random(rng, hk, numbers);
      fill_random(rng, hv, numbers);
      cache.plan_append(&slots[static_cast<std::size_t>(b)], 1, n);  // host: block ids, flushes (throws kvq::Error)
      check(cudaMemcpyAsync(dk, hk, numbers * sizeof(Exact), cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync (k)");
      check(cudaMemcpyAsync(dv, hv, numbers * sizeof(Exact), cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync (v)");
      check(cache.upload_plan(stream), "upload_plan");
      for (int l = 0; l < kLayers; ++l) {
        const std::size_t at = static_cast<std::size_t>(l) * n * kRow;
        check(cache.append(l, dk + at, dv + at, stream), "append");
        cpu.append(slots[static_cast<std::size_t>(b)], l, hk + at, hv + at, n);
      }
      check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");  // before `staging` is rewritten
      done += n;
    }
  }

  // ---- decode attention's arguments: plain data, built once -------------------------------------
  // num_splits is a kernel argument, so it is fixed in the graph: choose it for the longest
  // sequence the graph will see (lengths themselves are read on the device at every launch).
  const int max_blocks = (longest + Policy::block_tokens - 1) / Policy::block_tokens;
  const std::int32_t splits = kvq::cuda::decode_splits_for<Policy, TQ>(kBatch, kKvHeads, kHeadDim, max_blocks);
  const std::size_t workspace_bytes = kvq::cuda::decode_workspace_bytes<Policy>(kBatch, kQueryHeads, kKvHeads, kHeadDim, splits);
  void* workspace = device_alloc<std::uint8_t>(workspace_bytes);  // one for all layers: they run in stream order
  check(kvq::cuda::decode_workspace_clear(workspace, workspace_bytes, stream), "decode_workspace_clear");  // once
  std::vector<kvq::cuda::DecodeAttentionArgs> args(kLayers);
  for (int l = 0; l < kLayers; ++l) {
    kvq::cuda::DecodeAttentionArgs& a = args[static_cast<std::size_t>(l)];
    a.kv = cache.paged(l);  // device pointers into the cache, stable for its life
    a.q = dq + static_cast<std::size_t>(l) * kBatch * kQRow;
    a.out = dout + static_cast<std::size_t>(l) * kBatch * kQRow;
    a.slots = dslots;  // batch entry b reads slot dslots[b]
    a.batch = kBatch;
    a.num_q_heads = kQueryHeads;
    a.num_splits = splits;
    a.workspace = workspace;
    a.workspace_bytes = workspace_bytes;
    const std::string why = kvq::cuda::decode_check<Policy, TQ>(a);  // what a launcher would reject, in words
    if (!why.empty()) fail("decode_check: " + why);
  }

  // One decode step on the stream: the plan's copy, then per layer the append and the attention.
  // Nothing here synchronises or allocates, so the whole of it can be captured.
  auto enqueue_step = [&]() -> kvq::Status {
    kvq::Status s = cache.upload_plan(stream);
    for (int l = 0; l < kLayers && s == kvq::Status::kOk; ++l) {
      const std::size_t at = static_cast<std::size_t>(l) * kBatch * kRow;  // [layer][batch][1][row]
      s = cache.append(l, dk + at, dv + at, stream);
      // (an engine runs its q projection and RoPE here; this example copied q in beforehand)
      if (s == kvq::Status::kOk) s = kvq::cuda::decode_attention<Policy, TQ>(args[static_cast<std::size_t>(l)], stream);
      // (... and the output projection and the MLP, on the same stream)
    }
    return s;
  };

  // The model's K, V and q of every decode step, made up front in pinned memory; an engine's
  // projection kernels would write them into dk, dv and dq inside the graph.
  const std::size_t step_kv = static_cast<std::size_t>(kLayers) * kBatch * kRow;
  const std::size_t step_q = q_numbers;
  Exact* all_k = pinned_alloc<Exact>(kDecodeSteps * step_kv);
  Exact* all_v = pinned_alloc<Exact>(kDecodeSteps * step_kv);
  Exact* all_q = pinned_alloc<Exact>(kDecodeSteps * step_q);
  fill_random(rng, all_k, kDecodeSteps * step_kv);
  fill_random(rng, all_v, kDecodeSteps * step_kv);
  fill_random(rng, all_q, kDecodeSteps * step_q);

  // ---- decode: plan on the host, replay the graph ------------------------------------------------
  cudaGraphExec_t exec = nullptr;
  auto timed_from = std::chrono::steady_clock::now();
  for (int step = 0; step < kDecodeSteps; ++step) {
    // 1. The host plans one token for every sequence of the batch (all layers). Its only wait:
    //    the previous step's plan copy (so the pinned plan buffer can be rewritten). Same batch
    //    and n at every replay: the graph's kernels were launched for them.
    cache.plan_append(slots.data(), kBatch, 1);
    // 2. This step's inputs into the fixed buffers, in stream order before the replay.
    const std::size_t s = static_cast<std::size_t>(step);
    check(cudaMemcpyAsync(dk, all_k + s * step_kv, step_kv * sizeof(Exact), cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync (k)");
    check(cudaMemcpyAsync(dv, all_v + s * step_kv, step_kv * sizeof(Exact), cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync (v)");
    check(cudaMemcpyAsync(dq, all_q + s * step_q, step_q * sizeof(TQ), cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync (q)");
    // 3. Capture at the first step, after its plan_append (the plan just written is what the
    //    first replay copies); replay at every step.
    if (exec == nullptr) {
      cudaGraph_t graph = nullptr;
      check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
      const kvq::Status captured = enqueue_step();
      check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");  // end the capture before failing
      check(captured, "capturing the decode step");
      check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
      check(cudaGraphDestroy(graph), "cudaGraphDestroy");
    }
    check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
    if (step == 0) {  // time the replays after the first (capture and instantiation are one-off)
      check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
      timed_from = std::chrono::steady_clock::now();
    }
  }
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  const double us_per_step =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - timed_from).count() / (kDecodeSteps - 1);
  cache.check_status();  // the appends' sticky status (non-finite input): a host sync, once here, not every step

  // ---- check: the last step's GPU outputs against CPU attention ----------------------------------
  for (int step = 0; step < kDecodeSteps; ++step) {  // the CPU cache takes the same decode tokens
    for (int l = 0; l < kLayers; ++l) {
      for (int b = 0; b < kBatch; ++b) {
        const std::size_t at = static_cast<std::size_t>(step) * step_kv + (static_cast<std::size_t>(l) * kBatch + b) * kRow;
        cpu.append(slots[static_cast<std::size_t>(b)], l, all_k + at, all_v + at, 1);
      }
    }
  }
  kvq::QuantizedKVCache<Policy> downloaded(config);
  cache.download(downloaded);  // pools, exact rows and tables copied back: a host cache like `cpu`
  std::vector<kvq::Float16> gpu_out(q_numbers);
  check(cudaMemcpy(gpu_out.data(), dout, q_numbers * sizeof(TQ), cudaMemcpyDeviceToHost), "cudaMemcpy (out)");
  const Exact* last_q = all_q + static_cast<std::size_t>(kDecodeSteps - 1) * step_q;
  double worst = 0.0;
  bool same_as_downloaded = true;
  std::vector<float> q(kQRow), ref(kQRow), ref_downloaded(kQRow);
  for (int l = 0; l < kLayers; ++l) {
    for (int b = 0; b < kBatch; ++b) {
      const std::size_t at = (static_cast<std::size_t>(l) * kBatch + b) * kQRow;
      for (int i = 0; i < kQRow; ++i) q[static_cast<std::size_t>(i)] = last_q[at + static_cast<std::size_t>(i)].to_float();
      const kvq::StridedView<const float, 2> query(q.data(), {kQueryHeads, kHeadDim});
      kvq::attend(cpu, slots[static_cast<std::size_t>(b)], l, query, kvq::StridedView<float, 2>(ref.data(), {kQueryHeads, kHeadDim}));
      kvq::attend(downloaded, slots[static_cast<std::size_t>(b)], l, query,
                  kvq::StridedView<float, 2>(ref_downloaded.data(), {kQueryHeads, kHeadDim}));
      same_as_downloaded = same_as_downloaded && ref == ref_downloaded;
      worst = std::max(worst, row_error(ref, gpu_out.data() + at));
    }
  }

  const double fp16_bytes = 2.0 * cpu.stored_elements();
  std::printf("%s: %d sequences (prompts %d, %d, %d, %d + %d decode steps) x %d layers, %d kv heads x %d, %d query heads\n",
              Policy::name().c_str(), kBatch, kPrompts[0], kPrompts[1], kPrompts[2], kPrompts[3], kDecodeSteps, kLayers,
              kKvHeads, kHeadDim, kQueryHeads);
  std::printf("cache: %zu bytes held (%.2f bits/element; fp16: %.0f bytes), %zu bytes of device arrays\n", cpu.memory_bytes(),
              cpu.bits_per_element(), fp16_bytes, cache.device_bytes());
  std::printf("decode step (plan_append + input copies + graph replay of %d appends and %d attentions, %d splits): %.1f us\n",
              kLayers, kLayers, splits, us_per_step);
  std::printf("last step, GPU vs CPU attention: max row error ||gpu - cpu|| / ||cpu|| = %.2e (limit 2e-3)\n", worst);
  std::printf("downloaded cache: CPU attention %s the CPU-fed cache's\n", same_as_downloaded ? "identical to" : "DIFFERS from");

  check(cudaGraphExecDestroy(exec), "cudaGraphExecDestroy");
  for (void* p : {static_cast<void*>(dk), static_cast<void*>(dv), static_cast<void*>(dq), static_cast<void*>(dout),
                  static_cast<void*>(dslots), workspace}) {
    check(cudaFree(p), "cudaFree");
  }
  for (void* p : {static_cast<void*>(staging), static_cast<void*>(all_k), static_cast<void*>(all_v), static_cast<void*>(all_q)}) {
    check(cudaFreeHost(p), "cudaFreeHost");
  }
  check(cudaStreamDestroy(stream), "cudaStreamDestroy");
  return worst <= 2e-3 && same_as_downloaded ? 0 : 1;
}

}  // namespace

int main() {
  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no usable CUDA device (%s)\n", err != cudaSuccess ? cudaGetErrorString(err) : "device count is 0");
    return 0;
  }
  try {
    return run();
  } catch (const kvq::Error& e) {  // the host API (constructor, plan_append, download, check_status) throws
    std::fprintf(stderr, "cuda_decode_loop: %s\n", e.what());
    return 1;
  }
}
