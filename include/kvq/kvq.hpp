// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Umbrella header of the host library. Never includes kvq/cuda/ (nvcc-only).
#pragma once

#include "kvq/config.hpp"
#include "kvq/core/bits.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/float_types.hpp"
#include "kvq/core/minifloat.hpp"
#include "kvq/core/random.hpp"
#include "kvq/core/status.hpp"
#include "kvq/core/view.hpp"
#include "kvq/quant/bits.hpp"
#include "kvq/quant/group.hpp"
#include "kvq/quant/matrix.hpp"
#include "kvq/quant/meta_format.hpp"
#include "kvq/quant/pack.hpp"
#include "kvq/quant/params.hpp"
