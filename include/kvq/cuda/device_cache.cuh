// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief kvq::cuda::DeviceKVCache<Policy>: a quantized KV cache in GPU memory whose blocks,
///        exact rows and tables are byte for byte those of QuantizedKVCache<Policy> fed the same
///        tokens, with quantize-on-append kernels (one launch per layer for a whole batch).
///        nvcc only.
///
/// Ownership: the constructor allocates everything (cudaMalloc, cudaMallocHost; nothing is
/// allocated later): the key and value pools (CacheConfig::num_blocks blocks each, the CPU
/// cache's block layouts), the exact-row pool [max_slots][num_layers][ExactRows::layer_stride()]
/// (each slot laid out as a CPU cache's sequence), block tables [num_layers][max_slots]
/// [max_blocks] and lengths / quantized counts [num_layers][max_slots] (int32), the plan buffers
/// (pinned host and device) and a status word. The destructor frees them. paged(layer) gives
/// PagedKVParams of device pointers that stay valid (and keep their values) for the cache's
/// life: attention kernels take it by value and may be captured in a CUDA graph.
///
/// Host plans, device executes (cuda/append_plan.hpp has the plan's layout):
///   1. plan_append(slots, batch, n): host only. Advances the host mirror (live slots, counts and
///      block lists, the block-id free lists) by an append of n tokens to each of the batch's
///      sequences in every layer, with the CPU cache's WindowRule; allocates the new blocks and
///      writes the plan into the pinned buffer. Before writing, it waits for the previous
///      upload_plan's copy to finish (cudaEventSynchronize on the event upload_plan records):
///      the only host wait of a step. Throws kvq::Error (kInvalidArgument, kOutOfCapacity)
///      leaving the cache unchanged.
///   2. upload_plan(stream): one cudaMemcpyAsync of the plan (plan_bytes(): fixed by batch and n)
///      from the pinned buffer to device memory, then records the event (as an external event
///      node when captured).
///   3. append(layer, k, v, stream) for every layer: one kernel launch that writes the plan's
///      block ids and counts into the device tables, zeroes the new blocks, quantizes what
///      leaves the windows (from the window ring or the input) and stores the tokens that stay
///      exact, in the CPU cache's order. k, v: device [batch][n][num_kv_heads][head_dim] of the
///      exact type, in the plan's batch order. Never allocates, never synchronises; returns a
///      kvq::Status (kInvalidArgument without a plan or for a bad layer, kCudaError from the
///      launch).
/// Every plan_append must be followed by upload_plan and the appends of all layers on one
/// stream (or streams ordered after each other) before the next plan_append. Device work reads
/// the plan of the last upload; the mirror is ahead of the device by at most one step.
///
/// CUDA graphs: capture upload_plan and the appends of one step (batch B, n tokens) once; for
/// every later step call plan_append(slots, B, n) (same B and n) and replay the graph: the host
/// rewrites the pinned plan before each replay (plan_append waits for the previous replay's
/// copy through the captured event), the replay copies it, and the kernels read it from the same
/// device buffer. Kernel arguments (pointers, batch, n) do not change between replays.
///
/// Non-finite inputs (which the CPU cache rejects with kNonFiniteInput): the kernel records the
/// smallest failing (layer, slot, position) in a sticky device status word; check_status()
/// synchronises the device, reads and clears it and throws kvq::Error(kNonFiniteInput) naming
/// them. What that (layer, slot) holds after such an append is unspecified: free the sequence.
///
/// upload(host) copies a CPU cache of the same config to the device: pools, exact rows and
/// tables are plain cudaMemcpys, and the mirror takes the host's bookkeeping (block ids too).
/// download(host) is the reverse: the host cache takes the mirror's bookkeeping
/// (QuantizedKVCache::restore) and the device's pools and exact rows by cudaMemcpy, so it holds
/// what a CPU cache fed the same tokens holds, byte for byte.
///
/// Threading: one host thread at a time may call the non-const member functions (like
/// QuantizedKVCache's mutating ones); device work follows stream order. Slots of the device
/// cache are the sequence ids of add_sequence; a new slot's device lengths and counts are those
/// of its last append (an added sequence reads as empty after its first append, whose kernel
/// also zero-fills its exact rows).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "kvq/cache/quantized_kv_cache.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/status.hpp"
#include "kvq/cuda/append_plan.hpp"
#include "kvq/cuda/device_memory.cuh"
#include "kvq/cuda/status.cuh"
#include "kvq/layout/paged_params.hpp"

namespace kvq {
namespace cuda {
namespace detail {

inline constexpr int kAppendThreads = 256;

/// One thread block per (batch entry, part of the row's channels); see AppendWork.
template <class Policy>
__global__ void __launch_bounds__(kAppendThreads) append_kernel(const AppendArgs a) {
  const auto b = static_cast<std::int32_t>(blockIdx.x);
  const auto part = static_cast<std::int32_t>(blockIdx.y);
  const int tid = static_cast<int>(threadIdx.x);
  const int threads = static_cast<int>(blockDim.x);
  AppendWork<Policy>::begin(a, b, part, tid, threads);
  __syncthreads();  // new blocks and rows are zero before anything is written into them
  AppendWork<Policy>::flush(a, b, part, tid, threads);
  __syncthreads();  // the flush has read the ring rows the store overwrites
  AppendWork<Policy>::store(a, b, part, tid, threads);
}

}  // namespace detail

/// Everything a device cache's arrays hold, copied to the host (DeviceKVCache::contents).
struct DeviceCacheContents {
  std::vector<std::uint8_t> key_pool;    ///< num_blocks * key block_bytes
  std::vector<std::uint8_t> value_pool;  ///< num_blocks * value block_bytes
  std::vector<std::uint8_t> exact;       ///< [max_slots][slot_stride] exact numbers, as bytes
  std::vector<std::int32_t> key_table;   ///< [num_layers][max_slots][max_blocks]
  std::vector<std::int32_t> value_table;
  std::vector<std::int32_t> key_quantized;  ///< [num_layers][max_slots]
  std::vector<std::int32_t> value_quantized;
  std::vector<std::int32_t> lengths;
};

/// The device cache. See the file comment.
template <class Policy>
class DeviceKVCache {
  static_assert(is_device_policy_v<Policy>,
                "kvq: DeviceKVCache implements Fp16Policy<Float16>, Fp16Policy<BFloat16> and "
                "KiviPolicy<k2 or k4, k2 or k4, Group 32, 64 or 128, Residual 128>");

 public:
  using policy_type = Policy;
  using exact_type = typename Policy::exact_type;
  static constexpr index_t block_tokens = Policy::block_tokens;

  /// Allocates and zero-fills every array (tables: -1). Throws kvq::Error naming a bad config or
  /// limit (kInvalidArgument), or kCudaError when the device memory cannot be had.
  DeviceKVCache(const CacheConfig& config, const DeviceCacheLimits& limits) : planner_(config, limits) {
    constexpr const char* where = "kvq::cuda::DeviceKVCache";
    const DeviceCacheLimits& lim = planner_.limits();
    const auto layers = static_cast<std::size_t>(config.num_layers);
    const auto slots = static_cast<std::size_t>(lim.max_slots);
    const auto blocks = static_cast<std::size_t>(config.num_blocks);
    key_pool_ = detail::DeviceBytes(where, blocks * planner_.key_layout().block_bytes);
    value_pool_ = detail::DeviceBytes(where, blocks * planner_.value_layout().block_bytes);
    exact_ = detail::DeviceBytes(where, slots * static_cast<std::size_t>(planner_.slot_stride()) * sizeof(exact_type));
    const std::size_t table_bytes = layers * slots * static_cast<std::size_t>(planner_.max_blocks()) * sizeof(std::int32_t);
    key_table_ = detail::DeviceBytes(where, table_bytes);
    value_table_ = detail::DeviceBytes(where, table_bytes);
    const std::size_t count_bytes = layers * slots * sizeof(std::int32_t);
    key_quantized_ = detail::DeviceBytes(where, count_bytes);
    value_quantized_ = detail::DeviceBytes(where, count_bytes);
    lengths_ = detail::DeviceBytes(where, count_bytes);
    const std::size_t plan_bytes = static_cast<std::size_t>(planner_.max_plan_words()) * sizeof(std::int32_t);
    plan_device_ = detail::DeviceBytes(where, plan_bytes);
    plan_host_ = detail::PinnedBytes(where, plan_bytes);
    status_ = detail::DeviceBytes(where, sizeof(AppendStatusWord));
    uploaded_ = detail::Event(where);
    for (const detail::DeviceBytes* b : {&key_pool_, &value_pool_, &exact_, &key_quantized_, &value_quantized_, &lengths_}) {
      if (b->bytes() > 0) detail::check_cuda(where, "cudaMemset", cudaMemset(b->get(), 0, b->bytes()));
    }
    for (const detail::DeviceBytes* b : {&key_table_, &value_table_}) {
      if (b->bytes() > 0) detail::check_cuda(where, "cudaMemset", cudaMemset(b->get(), 0xFF, b->bytes()));
    }
    reset_status(where);
    detail::check_cuda(where, "cudaDeviceSynchronize", cudaDeviceSynchronize());
  }

  DeviceKVCache(const DeviceKVCache&) = delete;
  DeviceKVCache& operator=(const DeviceKVCache&) = delete;
  DeviceKVCache(DeviceKVCache&&) = delete;
  DeviceKVCache& operator=(DeviceKVCache&&) = delete;
  ~DeviceKVCache() = default;

  // ---- sequences (host only) -------------------------------------------------------------------

  /// Starts an empty sequence in the lowest free slot (kOutOfCapacity when max_slots are live).
  SequenceId add_sequence() { return planner_.add_sequence(); }
  /// Ends a sequence: its block ids return to the free lists, its slot to the free slots. The
  /// device arrays are not touched; the next plan may hand the blocks to another sequence (its
  /// appends zero them in stream order, after earlier work on the stream).
  void free(SequenceId seq) { planner_.free(seq); }
  bool is_live(SequenceId seq) const noexcept { return planner_.is_live(seq); }
  /// Counts of a (sequence, layer) as planned (the device reaches them when the plan's appends run).
  StreamCounts key_counts(SequenceId seq, index_t layer) const {
    check(seq, layer, "kvq::cuda::DeviceKVCache::key_counts");
    return planner_.sequences().layer(seq, layer).key.counts;
  }
  StreamCounts value_counts(SequenceId seq, index_t layer) const {
    check(seq, layer, "kvq::cuda::DeviceKVCache::value_counts");
    return planner_.sequences().layer(seq, layer).value.counts;
  }
  index_t length(SequenceId seq, index_t layer = 0) const { return key_counts(seq, layer).length; }

  // ---- a step: plan, upload, append ---------------------------------------------------------------

  /// Plans an append of n tokens to each of slots[0 .. batch) in every layer (n == 1: a decode
  /// step; n > 1: a prefill chunk) into the pinned plan buffer; see the file comment. Waits for
  /// the previous upload_plan's copy. Throws kvq::Error (cache unchanged): kInvalidArgument for
  /// a bad batch (1 .. max_batch), n (1 .. max_append_tokens), dead or repeated slot;
  /// kOutOfCapacity when a sequence would exceed max_tokens or the pools lack blocks (the
  /// message gives the blocks needed and free); kCudaError when waiting fails.
  void plan_append(const SequenceId* slots, index_t batch, index_t n) {
    detail::check_cuda("kvq::cuda::DeviceKVCache::plan_append", "cudaEventSynchronize (previous upload_plan)",
                       cudaEventSynchronize(uploaded_.get()));
    planner_.plan(slots, batch, n, plan_host_.get<std::int32_t>());
    batch_ = batch;
    n_ = n;
  }

  /// Copies the last plan to the device (one cudaMemcpyAsync of plan_bytes() from pinned memory)
  /// and records the event plan_append waits on. Graph-capturable (the event becomes an external
  /// event record node). kInvalidArgument before any plan; kCudaError from the runtime.
  Status upload_plan(cudaStream_t stream) {
    if (batch_ == 0) return Status::kInvalidArgument;
    const cudaError_t err =
        cudaMemcpyAsync(plan_device_.get(), plan_host_.get(), plan_bytes(), cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) return to_status(err);
    // Under capture the record must be an external event node (so that replays record it too);
    // outside capture that flag is illegal and a plain record does the same.
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    const cudaError_t q = cudaStreamIsCapturing(stream, &capture);
    if (q != cudaSuccess) return to_status(q);
    return to_status(capture == cudaStreamCaptureStatusActive
                         ? cudaEventRecordWithFlags(uploaded_.get(), stream, cudaEventRecordExternal)
                         : cudaEventRecord(uploaded_.get(), stream));
  }

  /// Appends the planned tokens of one layer: k, v device [batch][n][num_kv_heads][head_dim] of
  /// exact_type in the plan's batch order. One kernel launch on `stream`; see the file comment.
  Status append(index_t layer, const exact_type* k, const exact_type* v, cudaStream_t stream) {
    if (batch_ == 0 || layer < 0 || layer >= planner_.config().num_layers || k == nullptr || v == nullptr) {
      return Status::kInvalidArgument;
    }
    const AppendArgs a = launch_args(layer, k, v);
    const dim3 grid(static_cast<unsigned>(batch_), static_cast<unsigned>(a.parts));
    detail::append_kernel<Policy><<<grid, detail::kAppendThreads, 0, stream>>>(a);
    return to_status(cudaGetLastError());
  }

  /// Synchronises the device (cudaDeviceSynchronize), then reads and clears the sticky status of
  /// the appends since the last call: throws kvq::Error(kNonFiniteInput) naming the smallest
  /// failing layer, slot and position (and whether keys or values), kCudaError when the device
  /// reports an error. A host sync: for tests and for checking an engine's inputs, not for every step.
  void check_status() {
    constexpr const char* where = "kvq::cuda::DeviceKVCache::check_status";
    detail::check_cuda(where, "cudaDeviceSynchronize", cudaDeviceSynchronize());
    AppendStatusWord w;
    detail::check_cuda(where, "cudaMemcpy", cudaMemcpy(&w, status_.get(), sizeof(w), cudaMemcpyDeviceToHost));
    if (w.status == 0) return;
    reset_status(where);
    const auto layer = static_cast<index_t>(w.first >> 52);
    const auto slot = static_cast<index_t>((w.first >> 32) & 0xFFFFFu);
    const auto position = static_cast<index_t>((w.first & 0xFFFFFFFFu) >> 1);
    const bool is_value = (w.first & 1u) != 0;
    const auto status = static_cast<Status>(w.status);
    kvq::detail::throw_argument_error(
        "kvq::cuda::DeviceKVCache::append", is_value ? "v" : "k",
        kvq::detail::concat("a non-finite number at position ", position, " of sequence ", slot, " in layer ", layer),
        kvq::detail::concat("finite values (", status_name(status), "; that sequence's layer holds unspecified data now)"),
        status);
  }

  // ---- copies --------------------------------------------------------------------------------------

  /// Copies a CPU cache of the same config (layers, heads, head_dim, num_blocks) to the device:
  /// pools, exact rows and tables by cudaMemcpy; the mirror takes its sequences, counts, block
  /// lists and free lists. Synchronous (cudaDeviceSynchronize first: nothing may be in flight);
  /// any plan is dropped. Throws kvq::Error (kInvalidArgument, kOutOfCapacity: more slots or
  /// longer sequences than the limits; cache unchanged) or kCudaError.
  void upload(const QuantizedKVCache<Policy>& host) {
    constexpr const char* where = "kvq::cuda::DeviceKVCache::upload";
    AppendPlanner<Policy> next = planner_;
    next.assign(host);
    detail::check_cuda(where, "cudaDeviceSynchronize", cudaDeviceSynchronize());
    planner_ = std::move(next);
    batch_ = 0;
    n_ = 0;
    copy_to_device(where, key_pool_.get(), host.key_pool().data(), key_pool_.bytes());
    copy_to_device(where, value_pool_.get(), host.value_pool().data(), value_pool_.bytes());
    const SequenceTable<exact_type>& seqs = host.sequences();
    copy_to_device(where, exact_.get(), seqs.exact_data(),
                   static_cast<std::size_t>(seqs.slots() * seqs.slot_stride()) * sizeof(exact_type));
    std::vector<std::int32_t> kt, vt, kq, vq, len;
    planner_.tables(kt, vt, kq, vq, len);
    copy_to_device(where, key_table_.get(), kt.data(), kt.size() * sizeof(std::int32_t));
    copy_to_device(where, value_table_.get(), vt.data(), vt.size() * sizeof(std::int32_t));
    copy_to_device(where, key_quantized_.get(), kq.data(), kq.size() * sizeof(std::int32_t));
    copy_to_device(where, value_quantized_.get(), vq.data(), vq.size() * sizeof(std::int32_t));
    copy_to_device(where, lengths_.get(), len.data(), len.size() * sizeof(std::int32_t));
  }

  /// Copies the device cache into a host cache of the same config (layers, heads, head_dim,
  /// num_blocks), the reverse of upload: the host cache then holds exactly the device's sequences
  /// (same slots, lengths, counts, block ids, reference counts and free lists, from the mirror;
  /// QuantizedKVCache::restore) with both pools and the exact rows of its slots copied by
  /// cudaMemcpy; it keeps its own calibration. Synchronous (cudaDeviceSynchronize first). Call it
  /// after the appends of every layer of the last plan_append were enqueued: the mirror is ahead
  /// of the device between a plan and its appends. The sticky append status is not read
  /// (check_status). Throws kvq::Error: kInvalidArgument when the configs differ (naming both),
  /// kCudaError from the runtime; the host cache is unchanged then. Allocates the host cache's
  /// new pools (QuantizedKVCache::restore); the device cache is not modified.
  void download(QuantizedKVCache<Policy>& host) const {
    constexpr const char* where = "kvq::cuda::DeviceKVCache::download";
    planner_.check_host_config(where, host.config());
    detail::check_cuda(where, "cudaDeviceSynchronize", cudaDeviceSynchronize());
    host.restore(planner_.sequences(), planner_.key_ids(), planner_.value_ids(), [&](const CacheBytes& b) {
      copy_from_device(where, b.key_pool, key_pool_, b.key_pool_bytes);
      copy_from_device(where, b.value_pool, value_pool_, b.value_pool_bytes);
      copy_from_device(where, b.exact, exact_, b.exact_bytes);
    });
  }

  /// Every device array copied to the host (cudaDeviceSynchronize first): for tests and debugging.
  DeviceCacheContents contents() const {
    constexpr const char* where = "kvq::cuda::DeviceKVCache::contents";
    detail::check_cuda(where, "cudaDeviceSynchronize", cudaDeviceSynchronize());
    DeviceCacheContents c;
    copy_to_host(where, c.key_pool, key_pool_);
    copy_to_host(where, c.value_pool, value_pool_);
    copy_to_host(where, c.exact, exact_);
    copy_to_host(where, c.key_table, key_table_);
    copy_to_host(where, c.value_table, value_table_);
    copy_to_host(where, c.key_quantized, key_quantized_);
    copy_to_host(where, c.value_quantized, value_quantized_);
    copy_to_host(where, c.lengths, lengths_);
    return c;
  }

  // ---- what kernels read ---------------------------------------------------------------------------

  /// One layer as PagedKVParams of device pointers (stable for the cache's life).
  PagedKVParams paged(index_t layer) const {
    planner_.check_layer("kvq::cuda::DeviceKVCache::paged", layer);
    return planner_.paged(layer, key_pool_.get(), value_pool_.get(), exact_.get(), key_table_.get<std::int32_t>(),
                          value_table_.get<std::int32_t>(), key_quantized_.get<std::int32_t>(),
                          value_quantized_.get<std::int32_t>(), lengths_.get<std::int32_t>());
  }

  const CacheConfig& config() const noexcept { return planner_.config(); }
  const DeviceCacheLimits& limits() const noexcept { return planner_.limits(); }
  /// The host half: layouts, rules, exact-row layout, mirror and block ids.
  const AppendPlanner<Policy>& planner() const noexcept { return planner_; }
  /// Bytes upload_plan copies for the last plan (0 before any).
  std::size_t plan_bytes() const noexcept {
    return batch_ == 0 ? 0 : static_cast<std::size_t>(planner_.plan_words(batch_, n_)) * sizeof(std::int32_t);
  }
  index_t planned_batch() const noexcept { return batch_; }
  index_t planned_tokens() const noexcept { return n_; }
  /// Device bytes of the pools, exact rows and tables.
  std::size_t device_bytes() const noexcept {
    return key_pool_.bytes() + value_pool_.bytes() + exact_.bytes() + key_table_.bytes() + value_table_.bytes() +
           key_quantized_.bytes() + value_quantized_.bytes() + lengths_.bytes() + plan_device_.bytes();
  }

 private:
  void check(SequenceId seq, index_t layer, const char* where) const {
    planner_.check_live(where, "seq", seq);
    planner_.check_layer(where, layer);
  }

  AppendArgs launch_args(index_t layer, const exact_type* k, const exact_type* v) const noexcept {
    return planner_.launch_args(layer, batch_, n_, plan_device_.get<std::int32_t>(), k, v, key_pool_.get(),
                                value_pool_.get(), exact_.get(), key_table_.get<std::int32_t>(),
                                value_table_.get<std::int32_t>(), key_quantized_.get<std::int32_t>(),
                                value_quantized_.get<std::int32_t>(), lengths_.get<std::int32_t>(),
                                status_.get<AppendStatusWord>());
  }

  void reset_status(const char* where) {
    const AppendStatusWord clear{};
    detail::check_cuda(where, "cudaMemcpy", cudaMemcpy(status_.get(), &clear, sizeof(clear), cudaMemcpyHostToDevice));
  }

  static void copy_to_device(const char* where, void* dst, const void* src, std::size_t bytes) {
    if (bytes > 0) detail::check_cuda(where, "cudaMemcpy", cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
  }
  /// The first `bytes` bytes of `src` to host memory (kInvalidArgument if src holds fewer).
  static void copy_from_device(const char* where, void* dst, const detail::DeviceBytes& src, std::size_t bytes) {
    if (bytes > src.bytes()) {
      kvq::detail::throw_argument_error(where, "host", kvq::detail::concat("a copy of ", bytes, " bytes"),
                                        kvq::detail::concat("at most the ", src.bytes(), " bytes of the device array"));
    }
    if (bytes > 0) detail::check_cuda(where, "cudaMemcpy", cudaMemcpy(dst, src.get(), bytes, cudaMemcpyDeviceToHost));
  }
  template <class T>
  static void copy_to_host(const char* where, std::vector<T>& dst, const detail::DeviceBytes& src) {
    dst.resize(src.bytes() / sizeof(T));
    if (src.bytes() > 0) detail::check_cuda(where, "cudaMemcpy", cudaMemcpy(dst.data(), src.get(), src.bytes(), cudaMemcpyDeviceToHost));
  }

  AppendPlanner<Policy> planner_;
  detail::DeviceBytes key_pool_, value_pool_, exact_;
  detail::DeviceBytes key_table_, value_table_, key_quantized_, value_quantized_, lengths_;
  detail::DeviceBytes plan_device_;
  detail::PinnedBytes plan_host_;
  detail::DeviceBytes status_;
  detail::Event uploaded_;
  index_t batch_ = 0;  ///< the last plan's batch and n (0: none)
  index_t n_ = 0;
};

}  // namespace cuda
}  // namespace kvq
