// SPDX-License-Identifier: Apache-2.0
// Pins the static_assert that rejects a KIVI residual that is not a multiple of the group
// (ALGORITHMS.md §1.4: KIVI asserts R % G == 0).
#include "kvq/policy/kivi.hpp"

#ifdef KVQ_SHOULD_FAIL_TO_BUILD
using Policy = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 100>;
#else
using Policy = kvq::KiviPolicy<kvq::Bits::k2, kvq::Bits::k2, 32, 96>;
#endif

int main() { return Policy::residual_tokens > 0 ? 0 : 1; }
