// SPDX-License-Identifier: Apache-2.0
// A program that uses kvq as an outside project would: quantize one group and read it back.
#include <kvq/kvq.hpp>

#include <cmath>
#include <cstdio>

int kvq_consumer_cuda_devices();  // consumer_cuda.cu, or the stub below

int main() {
  const float x[4] = {0.0f, 1.0f, 2.0f, 3.0f};
  std::uint8_t stream[1] = {};
  kvq::GroupParams<kvq::Float16> p{};
  if (kvq::quantize_group<kvq::Bits::k2>(kvq::StridedLoader<float>{x, 1}, 4, 1.0f, stream, 0, &p) !=
      kvq::Status::kOk) {
    return 1;
  }
  float y[4];
  kvq::dequantize_group<kvq::Bits::k2>(stream, 0, 4, p, kvq::StridedStorer<float>{y, 1});
  for (int i = 0; i < 4; ++i) {
    if (y[i] != x[i]) return 2;
  }
  std::printf("kvq %d.%d.%d consumer: 2-bit round trip exact, stream byte 0x%02x, cuda devices %d\n",
              KVQ_VERSION_MAJOR, KVQ_VERSION_MINOR, KVQ_VERSION_PATCH, stream[0],
              kvq_consumer_cuda_devices());
  return stream[0] == 0xE4 ? 0 : 3;
}
