// SPDX-License-Identifier: Apache-2.0
// Pins the message of the static_assert that rejects an unsupported code width.
#include "kvq/quant/bits.hpp"

#ifdef KVQ_SHOULD_FAIL_TO_BUILD
constexpr kvq::Bits kWidth = static_cast<kvq::Bits>(5);
#else
constexpr kvq::Bits kWidth = kvq::Bits::k4;
#endif

int main() { return kvq::BitsTraits<kWidth>::max_code == 15 ? 0 : 1; }
