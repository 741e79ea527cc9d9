// SPDX-License-Identifier: Apache-2.0
#include "kvq/io/npy.hpp"
#include "kvq/calib/channel_reorder.hpp"
#include "kvq/calib/clip_search.hpp"
#include "kvq/calib/latent_factors.hpp"
#include "kvq/kvq.hpp"

float odr_b_roundtrip(float x) { return kvq::BFloat16(x).to_float(); }
