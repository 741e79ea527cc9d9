// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Every code width as a type list, for TEMPLATE_LIST_TEST_CASE.
#pragma once

#include <tuple>
#include <type_traits>

#include "kvq/quant/bits.hpp"

namespace kvq_test {

template <kvq::Bits B>
using BitsC = std::integral_constant<kvq::Bits, B>;

/// Ternary, 2, 3, 4 and 8 bits.
using AllWidths = std::tuple<BitsC<kvq::Bits::kTernary>, BitsC<kvq::Bits::k2>, BitsC<kvq::Bits::k3>,
                             BitsC<kvq::Bits::k4>, BitsC<kvq::Bits::k8>>;

}  // namespace kvq_test
