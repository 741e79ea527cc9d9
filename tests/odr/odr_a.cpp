// SPDX-License-Identifier: Apache-2.0
#include "kvq/io/npy.hpp"
#include "kvq/calib/channel_reorder.hpp"
#include "kvq/calib/clip_search.hpp"
#include "kvq/calib/latent_factors.hpp"
#include "kvq/kvq.hpp"

float odr_b_roundtrip(float x);

int main() {
  const float a = kvq::Float16(0.5f).to_float();
  return (a == 0.5f && odr_b_roundtrip(0.25f) == 0.25f) ? 0 : 1;
}
