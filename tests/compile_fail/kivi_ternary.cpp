// SPDX-License-Identifier: Apache-2.0
// Pins the static_assert that rejects ternary (1.5-bit) codes in a KIVI policy.
#include "kvq/policy/kivi.hpp"

#ifdef KVQ_SHOULD_FAIL_TO_BUILD
using Policy = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::kTernary, 32, 128>;
#else
using Policy = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k3, 32, 128>;
#endif

int main() { return Policy::group_size == 32 ? 0 : 1; }
