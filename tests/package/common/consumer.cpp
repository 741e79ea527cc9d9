// SPDX-License-Identifier: Apache-2.0
// A program that uses kvq as an outside project would: quantize one group and read it back,
// then run a KIVI cache through append and attend (and, with the calib component, build CSKV
// factors from weights).
#include <kvq/kvq.hpp>

#ifndef KVQ_CONSUMER_CALIB
#define KVQ_CONSUMER_CALIB 0
#endif
#if KVQ_CONSUMER_CALIB
#include <kvq/calib/latent_factors.hpp>
#endif

#include <cmath>
#include <cstdio>
#include <vector>

int kvq_consumer_cuda_devices();  // consumer_cuda.cu, or the stub below

namespace {

// Attention over a KIVI-2 cache equals the fp64 reference on the same cache.
bool cache_works() {
  using Policy = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 128>;
  kvq::CacheConfig config;
  config.num_layers = 1;
  config.num_kv_heads = 2;
  config.head_dim = 64;
  config.num_blocks = 8;
  kvq::QuantizedKVCache<Policy> cache(config);
  const kvq::SequenceId seq = cache.add_sequence();
  kvq::Rng rng(1);
  std::vector<float> k(300 * 128), v(300 * 128), q(8 * 64), out(8 * 64), ref(8 * 64);
  for (float& x : k) x = rng.normal();
  for (float& x : v) x = rng.normal();
  for (float& x : q) x = rng.normal();
  cache.append(seq, 0, k.data(), v.data(), 300);
  const kvq::index_t shape[2] = {8, 64};
  kvq::attend(cache, seq, 0, kvq::StridedView<const float, 2>(q.data(), shape), kvq::StridedView<float, 2>(out.data(), shape));
  kvq::ref::attend(cache, seq, 0, kvq::StridedView<const float, 2>(q.data(), shape), kvq::StridedView<float, 2>(ref.data(), shape));
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (std::fabs(out[i] - ref[i]) > 1e-4f) return false;
  }
  return cache.bits_per_element() > 0 && cache.bits_per_element() < 16;
}

bool calib_works() {
#if KVQ_CONSUMER_CALIB
  std::vector<float> w(16 * 8);
  kvq::Rng rng(2);
  for (float& x : w) x = rng.normal();
  const kvq::LowRankFactor f = kvq::calib::low_rank_factor(w.data(), 16, 8, 4, kvq::calib::FactorMethod::kSvd, nullptr);
  return f.down.size() == 32 && f.up.size() == 32;
#else
  return true;
#endif
}

}  // namespace

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
  if (!cache_works()) return 4;
  if (!calib_works()) return 5;
  std::printf("kvq %d.%d.%d consumer: 2-bit round trip exact, stream byte 0x%02x, KIVI cache attention ok, "
              "calib %s, cuda devices %d\n",
              KVQ_VERSION_MAJOR, KVQ_VERSION_MINOR, KVQ_VERSION_PATCH, stream[0],
              KVQ_CONSUMER_CALIB ? "ok" : "not linked", kvq_consumer_cuda_devices());
  return stream[0] == 0xE4 ? 0 : 3;
}
