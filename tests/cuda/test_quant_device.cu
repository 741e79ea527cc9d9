// SPDX-License-Identifier: Apache-2.0
// The quantization core compiled by nvcc and run on the GPU: storage-type conversions over
// every bit pattern, and quantize + pack producing byte-identical streams and metadata to the
// CPU for every width, axis and metadata format.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kvq/cuda/status.cuh"
#include "kvq/kvq.hpp"
#include "cache_testing.hpp"
#include "kvq_catch.hpp"
#include "seeds.hpp"

namespace {

template <class T>
struct DeviceBuffer {
  T* ptr = nullptr;
  std::size_t n = 0;
  explicit DeviceBuffer(std::size_t count) : n(count) {
    REQUIRE(cudaMalloc(&ptr, sizeof(T) * (count ? count : 1)) == cudaSuccess);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr); }
  void upload(const std::vector<T>& v) {
    REQUIRE(cudaMemcpy(ptr, v.data(), sizeof(T) * v.size(), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  std::vector<T> download() const {
    std::vector<T> v(n);
    REQUIRE(cudaMemcpy(v.data(), ptr, sizeof(T) * n, cudaMemcpyDeviceToHost) == cudaSuccess);
    return v;
  }
};

void require_launch_ok() {
  REQUIRE(kvq::cuda::to_status(cudaGetLastError()) == kvq::Status::kOk);
  REQUIRE(kvq::cuda::to_status(cudaDeviceSynchronize()) == kvq::Status::kOk);
}

template <class T>
__global__ void decode_kernel(std::uint32_t count, std::uint32_t* out) {
  const std::uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) {
    out[i] = kvq::float_to_bits(T::from_bits(static_cast<typename T::storage_type>(i)).to_float());
  }
}

template <class T>
__global__ void encode_kernel(const float* x, std::uint32_t count, std::uint32_t* out) {
  const std::uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) {
    out[3 * i + 0] = T::from_float(x[i], kvq::Rounding::kNearestEven).bits();
    out[3 * i + 1] = T::from_float(x[i], kvq::Rounding::kTowardPositive).bits();
    out[3 * i + 2] = T::from_float(x[i], kvq::Rounding::kTowardNegative).bits();
  }
}

template <class T>
void check_conversions(std::uint64_t seed) {
  constexpr std::uint32_t patterns = 1u << T::format::total_bits;
  DeviceBuffer<std::uint32_t> decoded(patterns);
  decode_kernel<T><<<(patterns + 255) / 256, 256>>>(patterns, decoded.ptr);
  require_launch_ok();
  const auto got = decoded.download();
  for (std::uint32_t b = 0; b < patterns; ++b) {
    const float host = T::from_bits(static_cast<typename T::storage_type>(b)).to_float();
    CAPTURE(b);
    if (std::isnan(host)) {
      REQUIRE(std::isnan(kvq::bits_to_float(got[b])));
    } else {
      REQUIRE(got[b] == kvq::float_to_bits(host));
    }
  }
  // Encoding: random bit patterns plus every value of the format and its neighbours.
  kvq::Rng rng(seed);
  std::vector<float> x;
  for (int i = 0; i < 200000; ++i) x.push_back(kvq::bits_to_float(static_cast<std::uint32_t>(rng.next_u64())));
  for (std::uint32_t b = 0; b < patterns; ++b) {
    const float v = T::from_bits(static_cast<typename T::storage_type>(b)).to_float();
    x.push_back(v);
    x.push_back(std::nextafter(v, 1e30f));
    x.push_back(std::nextafter(v, -1e30f));
  }
  DeviceBuffer<float> dx(x.size());
  dx.upload(x);
  DeviceBuffer<std::uint32_t> encoded(3 * x.size());
  const auto n = static_cast<std::uint32_t>(x.size());
  encode_kernel<T><<<(n + 255) / 256, 256>>>(dx.ptr, n, encoded.ptr);
  require_launch_ok();
  const auto enc = encoded.download();
  for (std::size_t i = 0; i < x.size(); ++i) {
    CAPTURE(i, x[i]);
    REQUIRE(enc[3 * i + 0] == T::from_float(x[i], kvq::Rounding::kNearestEven).bits());
    REQUIRE(enc[3 * i + 1] == T::from_float(x[i], kvq::Rounding::kTowardPositive).bits());
    REQUIRE(enc[3 * i + 2] == T::from_float(x[i], kvq::Rounding::kTowardNegative).bits());
  }
}

// One thread per line: quantizes every group of its line into the line's packed stream (lines
// start on byte boundaries, so threads never share a byte).
template <kvq::Bits B, class Meta>
__global__ void quantize_lines_kernel(const float* x, kvq::index_t tokens, kvq::index_t channels,
                                      bool along_tokens, kvq::index_t group, float clip,
                                      std::size_t line_bytes, std::uint8_t* codes,
                                      kvq::GroupParams<Meta>* params, kvq::Status* status) {
  const kvq::index_t line = blockIdx.x * blockDim.x + threadIdx.x;
  const kvq::index_t lines = along_tokens ? channels : tokens;
  if (line >= lines) return;
  const kvq::index_t length = along_tokens ? tokens : channels;
  for (kvq::index_t g = 0; g < length / group; ++g) {
    const float* start = along_tokens ? x + g * group * channels + line : x + line * channels + g * group;
    const kvq::index_t stride = along_tokens ? channels : 1;
    const kvq::Status s = kvq::quantize_group<B>(kvq::StridedLoader<float>{start, stride}, group, clip,
                                                 codes + line * line_bytes, static_cast<std::size_t>(g * group),
                                                 &params[line * (length / group) + g]);
    if (s != kvq::Status::kOk) *status = s;
  }
}

template <kvq::Bits B, class Meta>
void check_quantize(kvq::Rng& rng, kvq::GroupAxis axis, kvq::index_t group) {
  const kvq::index_t tokens = axis == kvq::GroupAxis::kTokens ? group * 4 : 97;
  const kvq::index_t channels = axis == kvq::GroupAxis::kChannels ? group * 3 : 53;
  std::vector<float> x(static_cast<std::size_t>(tokens * channels));
  for (auto& v : x) v = 3.0f * rng.normal() + (rng.below(50) == 0 ? 40.0f : 0.0f);
  const kvq::MatrixQuantSpec spec = kvq_test::make_spec(B, axis, group, 0.96f, kvq::meta_format_of_v<Meta>);
  const auto layout = kvq::plan_matrix(tokens, channels, spec);
  std::vector<std::uint8_t> codes(layout.code_bytes, 0), scales(layout.meta_bytes), zeros(layout.meta_bytes);
  kvq::quantize_matrix(kvq::StridedView<const float, 2>(x.data(), {tokens, channels}), spec,
                       {{codes.data(), codes.size()}, {scales.data(), scales.size()}, {zeros.data(), zeros.size()}});

  DeviceBuffer<float> dx(x.size());
  dx.upload(x);
  DeviceBuffer<std::uint8_t> dcodes(layout.code_bytes);
  REQUIRE(cudaMemset(dcodes.ptr, 0, layout.code_bytes) == cudaSuccess);
  const std::size_t groups = static_cast<std::size_t>(layout.lines * layout.groups_per_line);
  DeviceBuffer<kvq::GroupParams<Meta>> dparams(groups);
  DeviceBuffer<kvq::Status> dstatus(1);
  REQUIRE(cudaMemset(dstatus.ptr, 0, sizeof(kvq::Status)) == cudaSuccess);
  const auto lines = static_cast<unsigned>(layout.lines);
  quantize_lines_kernel<B, Meta><<<(lines + 63) / 64, 64>>>(
      dx.ptr, tokens, channels, axis == kvq::GroupAxis::kTokens, group, spec.clip, layout.line_bytes,
      dcodes.ptr, dparams.ptr, dstatus.ptr);
  require_launch_ok();
  REQUIRE(dstatus.download()[0] == kvq::Status::kOk);
  REQUIRE(dcodes.download() == codes);
  const auto params = dparams.download();
  for (std::size_t g = 0; g < groups; ++g) {
    CAPTURE(g);
    REQUIRE(std::memcmp(&params[g].scale, scales.data() + g * sizeof(Meta), sizeof(Meta)) == 0);
    REQUIRE(std::memcmp(&params[g].zero, zeros.data() + g * sizeof(Meta), sizeof(Meta)) == 0);
  }
}

template <kvq::Bits B>
void check_quantize_all_meta(kvq::Rng& rng) {
  for (auto axis : {kvq::GroupAxis::kTokens, kvq::GroupAxis::kChannels}) {
    for (kvq::index_t group : {32, 64, 128}) {
      CAPTURE(kvq::bits_label(B), kvq::axis_label(axis), group);
      check_quantize<B, kvq::Float16>(rng, axis, group);
      check_quantize<B, kvq::BFloat16>(rng, axis, group);
      check_quantize<B, kvq::Float8E4M3>(rng, axis, group);
    }
  }
}

// One thread per line of one block: the block's rows [block_tokens, width] quantized group by
// group into the addresses the BlockLayout (passed by value) gives, as a device append will.
template <kvq::Bits B, class Meta>
__global__ void encode_block_kernel(kvq::BlockLayout layout, const float* rows, float clip, std::uint8_t* block,
                                    kvq::Status* status) {
  const kvq::index_t line = blockIdx.x * blockDim.x + threadIdx.x;
  if (line >= layout.lines) return;
  const bool per_channel = layout.axis == kvq::GroupAxis::kTokens;
  const kvq::index_t group = layout.line_length / layout.groups_per_line;
  for (kvq::index_t g = 0; g < layout.groups_per_line; ++g) {
    const float* start = per_channel ? rows + g * group * layout.width + line : rows + line * layout.width + g * group;
    kvq::GroupParams<Meta> p{};
    const kvq::Status s = kvq::quantize_group<B>(kvq::StridedLoader<float>{start, per_channel ? layout.width : 1}, group,
                                                 clip, layout.line_codes(block, line),
                                                 static_cast<std::size_t>(g * group), &p);
    if (s != kvq::Status::kOk) *status = s;
    layout.store_group<Meta>(block, line, g, p);
  }
}

template <kvq::Bits B, class Meta>
void check_block_encode(kvq::Rng& rng, kvq::GroupAxis axis, kvq::index_t group) {
  const kvq::index_t block_tokens = 128, width = 1024;  // 8 kv heads x 128
  const kvq::MatrixQuantSpec spec = kvq_test::make_spec(B, axis, group, 1.0f, kvq::meta_format_of_v<Meta>);
  const kvq::StreamLayout l = kvq::make_quantized_layout(block_tokens, width, spec);
  std::vector<float> x(static_cast<std::size_t>(block_tokens * width));
  for (auto& v : x) v = 2.0f * rng.normal() + (rng.below(40) == 0 ? 25.0f : 0.0f);
  std::vector<std::uint8_t> host(l.block_bytes, 0);
  kvq::EncodeFailure failure;
  REQUIRE(kvq::encode_rows(l, {}, spec.clip, host.data(), 0, x.data(), width, block_tokens, &failure) ==
          kvq::Status::kOk);
  DeviceBuffer<float> dx(x.size());
  dx.upload(x);
  DeviceBuffer<std::uint8_t> dblock(l.block_bytes);
  REQUIRE(cudaMemset(dblock.ptr, 0, l.block_bytes) == cudaSuccess);
  DeviceBuffer<kvq::Status> dstatus(1);
  REQUIRE(cudaMemset(dstatus.ptr, 0, sizeof(kvq::Status)) == cudaSuccess);
  const auto lines = static_cast<unsigned>(l.block.lines);
  encode_block_kernel<B, Meta><<<(lines + 63) / 64, 64>>>(l.block, dx.ptr, spec.clip, dblock.ptr, dstatus.ptr);
  require_launch_ok();
  REQUIRE(dstatus.download()[0] == kvq::Status::kOk);
  REQUIRE(dblock.download() == host);
}

}  // namespace

TEST_CASE("a block encoded on the device through BlockLayout is byte-identical to the host codec's",
          "[cuda][layout]") {
  const std::uint64_t seed = kvq_test::case_seed("device block", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  for (auto axis : {kvq::GroupAxis::kTokens, kvq::GroupAxis::kChannels}) {
    for (kvq::index_t group : {32, 64, 128}) {
      CAPTURE(kvq::axis_label(axis), group);
      check_block_encode<kvq::Bits::k2, kvq::Float16>(rng, axis, group);
      check_block_encode<kvq::Bits::k4, kvq::Float16>(rng, axis, group);
      check_block_encode<kvq::Bits::kTernary, kvq::Float8E4M3>(rng, axis, group);
    }
  }
}

TEST_CASE("device conversions equal the host's for every pattern and rounding mode", "[cuda][core]") {
  check_conversions<kvq::Float16>(kvq_test::case_seed("device fp16", 0));
  check_conversions<kvq::BFloat16>(kvq_test::case_seed("device bf16", 0));
  check_conversions<kvq::Float8E4M3>(kvq_test::case_seed("device fp8", 0));
}

TEST_CASE("device quantize + pack is byte-identical to the host", "[cuda][quant]") {
  const std::uint64_t seed = kvq_test::case_seed("device quantize", 0);
  CAPTURE(seed);
  kvq::Rng rng(seed);
  check_quantize_all_meta<kvq::Bits::kTernary>(rng);
  check_quantize_all_meta<kvq::Bits::k2>(rng);
  check_quantize_all_meta<kvq::Bits::k3>(rng);
  check_quantize_all_meta<kvq::Bits::k4>(rng);
  check_quantize_all_meta<kvq::Bits::k8>(rng);
}
