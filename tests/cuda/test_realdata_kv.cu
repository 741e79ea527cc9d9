// SPDX-License-Identifier: Apache-2.0
// Real K/V on the GPU: SmolLM2-135M's post-RoPE keys, values and queries (Hq = 9, Hkv = 3,
// head_dim 64, GQA 3) captured on the CPU by `kvq capture` (tools/kvq/capture.cpp; 2048 tokens of
// WikiText-2, layers 0, 14 and 29, the queries of the last 8 positions) and carried to the GPU
// machine as .npy, since the model file is too large to carry.
//
// Per layer and policy (fp16; KIVI-2 g32 and KIVI-4 g64, r128: KIVI g128 cannot hold these rows,
// whose 192 channels are no multiple of 128, so the CPU cache rejects it, as checked below): a
// CPU QuantizedKVCache and a DeviceKVCache get the same tokens, a ragged batch of 8 sequences,
// sequence j holding positions 0 .. 2040 + j (the context of captured query j): a prefill chunk
// each, then 37 decode steps of the whole batch in one device launch each (crossing KIVI's flush
// boundaries). The device blocks, exact rows and tables must equal the CPU's byte for byte, and
// GPU decode attention of the batch (the fused kernel, fp16 queries) must equal the CPU's fused
// attention (kvq::attend) within 2e-3 relative (L2 per query head row, the metric of
// test_decode_attention.cu); the reference kernel (fp32 queries) within 1e-4.
//
// Data: KVQ_TEST_DATA_DIR (the repository's .kvdata/smollm2, tests/CMakeLists.txt), or the
// folder the environment variable KVQ_KV_NPY_DIR names; the executable exits 77 (Skipped) when
// it is absent. Write it with scripts/capture_kv.sh.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "kvq/cuda/decode_attention.cuh"
#include "kvq/cuda/device_cache.cuh"
#include "kvq/cuda/reference_decode.cuh"
#include "kvq/io/npy.hpp"
#include "kvq/kvq.hpp"
#include "device_cache_testing.hpp"
#include "gpu_testing.hpp"
#include "kvq_catch.hpp"
#include "test_data_dir.hpp"

namespace {

using kvq::index_t;

using kvq_test::Device;

/// One captured layer: keys and values [tokens][kv_heads][dim] as fp16, queries [q][heads][dim]
/// as fp32 of positions first_query .. first_query + q - 1.
struct Layer {
  int index = 0;
  index_t tokens = 0, kv_heads = 0, heads = 0, dim = 0, queries = 0, first_query = 0;
  std::vector<kvq::Float16> keys, values;
  std::vector<float> q;
};

std::vector<kvq::Float16> to_fp16(const kvq::NpyArray& a) {
  std::vector<kvq::Float16> out(a.data.size());
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = kvq::Float16(a.data[i]);  // exact: the files are fp16
  return out;
}

/// The layers of the capture folder (layerNN_keys.npy, _values.npy, _queries.npy), checked
/// against manifest.json's query positions.
std::vector<Layer> load_layers() {
  const std::filesystem::path dir = kvq_test::test_data_dir();
  std::ifstream mf(dir / "manifest.json");
  REQUIRE(mf.good());
  const std::string manifest((std::istreambuf_iterator<char>(mf)), std::istreambuf_iterator<char>());
  const std::string key = "\"query_positions\": [";
  const std::size_t at = manifest.find(key);
  REQUIRE(at != std::string::npos);
  const long first = std::stol(manifest.substr(at + key.size()));
  std::vector<Layer> layers;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    const std::string name = entry.path().filename().string();
    if (name.size() != 16 || name.rfind("layer", 0) != 0 || name.substr(7) != "_keys.npy") continue;
    Layer l;
    l.index = std::stoi(name.substr(5, 2));
    const std::string stem = (dir / name.substr(0, 7)).string();
    const kvq::NpyArray k = kvq::read_npy(stem + "_keys.npy"), v = kvq::read_npy(stem + "_values.npy");
    const kvq::NpyArray q = kvq::read_npy(stem + "_queries.npy");
    REQUIRE(k.shape.size() == 3);
    REQUIRE(v.shape == k.shape);
    REQUIRE(q.shape.size() == 3);
    REQUIRE(q.shape[2] == k.shape[2]);
    REQUIRE(k.dtype == kvq::NpyDtype::kFloat16);
    l.tokens = k.shape[0];
    l.kv_heads = k.shape[1];
    l.dim = k.shape[2];
    l.queries = q.shape[0];
    l.heads = q.shape[1];
    l.first_query = l.tokens - l.queries;
    REQUIRE(first == l.first_query);
    l.keys = to_fp16(k);
    l.values = to_fp16(v);
    l.q = q.data;
    layers.push_back(std::move(l));
  }
  std::sort(layers.begin(), layers.end(), [](const Layer& a, const Layer& b) { return a.index < b.index; });
  REQUIRE(!layers.empty());
  return layers;
}

const std::vector<Layer>& captured() {
  static const std::vector<Layer> layers = load_layers();
  return layers;
}

template <class Policy>
void check_layer(const Layer& L) {
  using Cache = kvq::QuantizedKVCache<Policy>;
  const index_t width = L.kv_heads * L.dim, nq = L.queries;
  constexpr index_t kSteps = 37;
  kvq::CacheConfig cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = L.kv_heads;
  cfg.head_dim = L.dim;
  std::vector<index_t> lengths;
  index_t total = 0;
  for (index_t j = 0; j < nq; ++j) {
    lengths.push_back(L.first_query + j + 1);
    total += lengths.back();
  }
  cfg.num_blocks = Cache::blocks_for_tokens(1, total, nq) + 4;
  Cache cpu(cfg);
  kvq::cuda::DeviceCacheLimits limits;
  limits.max_slots = nq;
  limits.max_tokens = L.tokens;
  kvq::cuda::DeviceKVCache<Policy> dev(cfg, limits);
  auto row = [&](const std::vector<kvq::Float16>& x, index_t p) { return x.data() + static_cast<std::size_t>(p * width); };

  // Prefill chunks, one sequence at a time, on both.
  std::vector<kvq::SequenceId> seqs;
  Device<kvq::Float16> dk(static_cast<std::size_t>(L.tokens * width)), dv(static_cast<std::size_t>(L.tokens * width));
  for (index_t j = 0; j < nq; ++j) {
    const kvq::SequenceId s = cpu.add_sequence();
    REQUIRE(dev.add_sequence() == s);
    seqs.push_back(s);
    const index_t n = lengths[static_cast<std::size_t>(j)] - kSteps;
    cpu.append(s, 0, row(L.keys, 0), row(L.values, 0), n);
    dev.plan_append(&s, 1, n);
    REQUIRE(dev.upload_plan(nullptr) == kvq::Status::kOk);
    REQUIRE(cudaMemcpy(dk.ptr, row(L.keys, 0), static_cast<std::size_t>(n * width) * 2, cudaMemcpyHostToDevice) == cudaSuccess);
    REQUIRE(cudaMemcpy(dv.ptr, row(L.values, 0), static_cast<std::size_t>(n * width) * 2, cudaMemcpyHostToDevice) == cudaSuccess);
    REQUIRE(dev.append(0, dk.ptr, dv.ptr, nullptr) == kvq::Status::kOk);
  }
  dev.check_status();
  {
    const std::string diff = kvq_test::compare_with_cpu(dev.contents(), dev.planner(), cpu);
    INFO("after the prefills: " << diff);
    REQUIRE(diff.empty());
  }
  // Decode steps of the whole batch: sequence j appends its next position, one launch a step.
  std::vector<kvq::Float16> bk(static_cast<std::size_t>(nq * width)), bv(bk.size());
  for (index_t step = 0; step < kSteps; ++step) {
    for (index_t j = 0; j < nq; ++j) {
      const index_t p = lengths[static_cast<std::size_t>(j)] - kSteps + step;
      cpu.append(seqs[static_cast<std::size_t>(j)], 0, row(L.keys, p), row(L.values, p), 1);
      std::copy_n(row(L.keys, p), width, bk.data() + static_cast<std::size_t>(j * width));
      std::copy_n(row(L.values, p), width, bv.data() + static_cast<std::size_t>(j * width));
    }
    dev.plan_append(seqs.data(), nq, 1);
    REQUIRE(dev.upload_plan(nullptr) == kvq::Status::kOk);
    REQUIRE(cudaMemcpy(dk.ptr, bk.data(), bk.size() * 2, cudaMemcpyHostToDevice) == cudaSuccess);
    REQUIRE(cudaMemcpy(dv.ptr, bv.data(), bv.size() * 2, cudaMemcpyHostToDevice) == cudaSuccess);
    REQUIRE(dev.append(0, dk.ptr, dv.ptr, nullptr) == kvq::Status::kOk);
  }
  dev.check_status();
  const std::string diff = kvq_test::compare_with_cpu(dev.contents(), dev.planner(), cpu);
  INFO("after the decode steps: " << diff);
  REQUIRE(diff.empty());

  // CPU attention of each sequence with its captured query (fp32, and rounded to fp16).
  const index_t heads = L.heads, dim = L.dim;
  const auto qn = static_cast<std::size_t>(nq * heads * dim);
  std::vector<float> q32(L.q.begin(), L.q.begin() + static_cast<std::ptrdiff_t>(qn)), q16f(qn);
  std::vector<kvq::Float16> q16(qn);
  for (std::size_t i = 0; i < qn; ++i) {
    q16[i] = kvq::Float16(q32[i]);
    q16f[i] = q16[i].to_float();
  }
  std::vector<float> ref32(qn), ref16(qn);
  const auto qrow = static_cast<std::size_t>(heads * dim);
  for (index_t j = 0; j < nq; ++j) {
    const std::size_t at = static_cast<std::size_t>(j) * qrow;
    kvq::attend(cpu, seqs[static_cast<std::size_t>(j)], 0, kvq::StridedView<const float, 2>(q32.data() + at, {heads, dim}),
                kvq::StridedView<float, 2>(ref32.data() + at, {heads, dim}));
    kvq::attend(cpu, seqs[static_cast<std::size_t>(j)], 0, kvq::StridedView<const float, 2>(q16f.data() + at, {heads, dim}),
                kvq::StridedView<float, 2>(ref16.data() + at, {heads, dim}));
  }

  // The fused kernel, fp16 queries and outputs.
  std::vector<std::int32_t> slots(seqs.begin(), seqs.end());
  Device<std::int32_t> dslots(slots);
  Device<kvq::Float16> dq16(q16), dout16(qn);
  kvq::cuda::DecodeAttentionArgs a;
  a.kv = dev.paged(0);
  a.q = dq16.ptr;
  a.out = dout16.ptr;
  a.slots = dslots.ptr;
  a.batch = static_cast<std::int32_t>(nq);
  a.num_q_heads = static_cast<std::int32_t>(heads);
  int device = 0, sms = 0;
  REQUIRE(cudaGetDevice(&device) == cudaSuccess);
  REQUIRE(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess);
  a.num_splits = kvq::cuda::decode_splits(a.batch, a.kv.num_kv_heads, static_cast<std::int32_t>(L.tokens / Policy::block_tokens), sms);
  a.workspace_bytes = kvq::cuda::decode_workspace_bytes<Policy>(a.batch, a.num_q_heads, a.kv.num_kv_heads, a.kv.head_dim, a.num_splits);
  Device<std::uint8_t> ws(a.workspace_bytes);
  a.workspace = ws.ptr;
  REQUIRE(kvq::cuda::decode_workspace_clear(ws.ptr, a.workspace_bytes, nullptr) == kvq::Status::kOk);
  const std::string why = kvq::cuda::decode_check<Policy, __half>(a);
  INFO(why);
  REQUIRE(why.empty());
  REQUIRE(kvq::cuda::decode_attention<Policy, __half>(a, nullptr) == kvq::Status::kOk);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  std::vector<kvq::Float16> got16(qn);
  REQUIRE(cudaMemcpy(got16.data(), dout16.ptr, qn * 2, cudaMemcpyDeviceToHost) == cudaSuccess);
  std::vector<float> fused(qn);
  for (std::size_t i = 0; i < qn; ++i) fused[i] = got16[i].to_float();
  const double fused_error = kvq_test::max_row_error(fused.data(), ref16.data(), nq * heads, dim);

  // The reference kernel, fp32 queries and outputs.
  Device<float> dq32(q32), dout32(qn);
  kvq::cuda::DecodeAttentionArgs r = a;
  r.q = dq32.ptr;
  r.out = dout32.ptr;
  REQUIRE(kvq::cuda::reference_decode_check<Policy, float>(r).empty());
  REQUIRE(kvq::cuda::reference_decode_attention<Policy, float>(r, nullptr) == kvq::Status::kOk);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  std::vector<float> reference(qn);
  REQUIRE(cudaMemcpy(reference.data(), dout32.ptr, qn * sizeof(float), cudaMemcpyDeviceToHost) == cudaSuccess);
  const double reference_error = kvq_test::max_row_error(reference.data(), ref32.data(), nq * heads, dim);

  std::printf("SmolLM2 layer %2d, %s, %d sequences of %d..%d tokens: device blocks byte-equal; fused (fp16 q, %d splits) row "
              "error %.2e, reference (fp32 q) %.2e\n",
              L.index, Policy::name().c_str(), static_cast<int>(nq), static_cast<int>(lengths.front()),
              static_cast<int>(lengths.back()), a.num_splits, fused_error, reference_error);
  CAPTURE(L.index, Policy::name(), fused_error, reference_error);
  CHECK(fused_error <= 2e-3);
  CHECK(reference_error <= 1e-4);
}

}  // namespace

TEST_CASE("SmolLM2 K/V captured on the CPU: device caches equal CPU caches byte for byte, GPU attention equals CPU "
          "attention",
          "[cuda][realdata][attention]") {
  for (const Layer& l : captured()) {
    REQUIRE(l.kv_heads == 3);
    REQUIRE(l.heads == 9);
    REQUIRE(l.dim == 64);
    check_layer<kvq::Fp16Policy<kvq::Float16>>(l);
    check_layer<kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 128>>(l);
    check_layer<kvq::KiviPolicy<kvq::Bits::k4, kvq::Bits::k4, 64, 128>>(l);
  }
}

TEST_CASE("SmolLM2's rows of 192 channels: KIVI g128's value groups do not divide them", "[cuda][realdata]") {
  kvq::CacheConfig cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = 3;
  cfg.head_dim = 64;
  cfg.num_blocks = 8;
  using G128 = kvq::KiviPolicy<kvq::Bits::k4, kvq::Bits::k4, 128, 128>;
  CHECK_THROWS_AS(kvq::QuantizedKVCache<G128>(cfg), kvq::Error);
}
