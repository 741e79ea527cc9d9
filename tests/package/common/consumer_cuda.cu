// SPDX-License-Identifier: Apache-2.0
// Device code of the consumer: the same quantizer compiled by nvcc through kvq::cuda.
#include <kvq/cuda/status.cuh>
#include <kvq/kvq.hpp>

__global__ void consumer_kernel(const float* x, std::uint8_t* stream, kvq::GroupParams<kvq::Float16>* p) {
  kvq::quantize_group<kvq::Bits::k2>(kvq::StridedLoader<float>{x, 1}, 4, 1.0f, stream, 0, p);
}

int kvq_consumer_cuda_devices() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}
