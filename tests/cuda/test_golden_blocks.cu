// SPDX-License-Identifier: Apache-2.0
// Golden block vectors on the GPU (tests/golden/README.md): the fixed inputs of every case that
// kvq::cuda::DeviceKVCache implements (fp16, bf16, KIVI 2-bit g32 and 4-bit g128, r128) appended
// on the device (a prefill chunk, then decode steps, each through plan_append / upload_plan /
// append) must give exactly the counts, block bytes and exact rows checked into
// tests/golden/blocks.golden, the file the CPU test tests/cache/test_golden_blocks.cpp checks the
// host cache against. The device arrays are copied back (contents()) and read through the
// planner's PagedKVParams of those host copies, with the CPU test's code (golden_blocks.hpp).
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "golden_cases.hpp"
#include "kvq/cuda/device_cache.cuh"
#include "kvq_catch.hpp"

namespace {

using kvq::index_t;

void require_cuda(cudaError_t err) {
  INFO(cudaGetErrorString(err));
  REQUIRE(err == cudaSuccess);
}

/// Device input buffers and a stream, released at the end of the case.
template <class E>
struct DeviceInputs {
  cudaStream_t stream = nullptr;
  E* k = nullptr;
  E* v = nullptr;
  explicit DeviceInputs(std::size_t numbers) {
    require_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    require_cuda(cudaMalloc(&k, numbers * sizeof(E)));
    require_cuda(cudaMalloc(&v, numbers * sizeof(E)));
  }
  DeviceInputs(const DeviceInputs&) = delete;
  DeviceInputs& operator=(const DeviceInputs&) = delete;
  ~DeviceInputs() {
    cudaFree(k);
    cudaFree(v);
    cudaStreamDestroy(stream);
  }
};

/// The case run on the device cache: its record, read from the device arrays copied back.
template <class P>
kvq_golden::Record device_record() {
  using E = typename P::exact_type;
  using S = kvq_golden::Schedule<P>;
  const kvq::CacheConfig cfg = kvq_golden::config_of<P>();
  kvq::cuda::DeviceCacheLimits limits;
  limits.max_slots = 2;
  limits.max_tokens = S::prefill + S::decode;
  limits.max_batch = 1;
  limits.max_append_tokens = S::prefill;
  kvq::cuda::DeviceKVCache<P> cache(cfg, limits);
  const index_t width = cfg.num_kv_heads * cfg.head_dim;
  DeviceInputs<E> in(static_cast<std::size_t>(S::prefill * width));
  const kvq::SequenceId seq = cache.add_sequence();
  auto step = [&](index_t t0, index_t n) {
    cache.plan_append(&seq, 1, n);
    const std::vector<E> k = kvq_golden::input_rows<E>(0, t0, n, width), v = kvq_golden::input_rows<E>(1, t0, n, width);
    require_cuda(cudaMemcpyAsync(in.k, k.data(), k.size() * sizeof(E), cudaMemcpyHostToDevice, in.stream));
    require_cuda(cudaMemcpyAsync(in.v, v.data(), v.size() * sizeof(E), cudaMemcpyHostToDevice, in.stream));
    REQUIRE(cache.upload_plan(in.stream) == kvq::Status::kOk);
    REQUIRE(cache.append(0, in.k, in.v, in.stream) == kvq::Status::kOk);
    require_cuda(cudaStreamSynchronize(in.stream));  // the host rows are rebuilt next step
    cache.check_status();
  };
  step(0, S::prefill);
  for (index_t t = S::prefill; t < S::prefill + S::decode; ++t) step(t, 1);
  kvq::cuda::DeviceCacheContents c = cache.contents();
  // The layer's PagedKVParams over the host copies: the device layout, addresses rebased.
  const kvq::PagedKVParams kv = cache.planner().paged(0, c.key_pool.data(), c.value_pool.data(), c.exact.data(),
                                                      c.key_table.data(), c.value_table.data(), c.key_quantized.data(),
                                                      c.value_quantized.data(), c.lengths.data());
  return kvq_golden::record_of(kvq_golden::case_of<P>(), kv, seq);
}

const std::vector<kvq_golden::Record>& golden() {
  static const std::vector<kvq_golden::Record> records = kvq_golden::read_file(KVQ_GOLDEN_FILE);
  return records;
}

template <class P>
void require_golden() {
  const kvq_golden::Record got = device_record<P>();
  CAPTURE(got.name, got.shape, KVQ_GOLDEN_FILE);
  const kvq_golden::Record* want = kvq_golden::find(golden(), got.name);
  REQUIRE(want != nullptr);
  const std::string diff = kvq_golden::compare(got, *want);
  INFO(diff);
  REQUIRE(diff.empty());
  REQUIRE(got.keys.blocks >= 1);
  REQUIRE(got.values.blocks >= 1);
}

}  // namespace

TEST_CASE("golden on the GPU: fp16 and bf16 device blocks equal the checked-in bytes", "[cuda][golden]") {
  require_golden<kvq_golden::Fp16>();
  require_golden<kvq_golden::Bf16>();
}

TEST_CASE("golden on the GPU: KIVI 2-bit g32 and 4-bit g128 (r128) device blocks equal the checked-in bytes",
          "[cuda][golden]") {
  require_golden<kvq_golden::Kivi2g32>();
  require_golden<kvq_golden::Kivi4g128>();
}
