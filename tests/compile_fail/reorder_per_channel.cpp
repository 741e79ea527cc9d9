// SPDX-License-Identifier: Apache-2.0
// Pins the static_assert that rejects SKVQ channel reordering on a per-channel stream (groups
// along tokens): a permutation of channels needs groups of channels.
#include "kvq/policy/spec.hpp"

#ifdef KVQ_SHOULD_FAIL_TO_BUILD
using Stream = kvq::QuantizedStream<kvq::Bits::k2, kvq::GroupAxis::kTokens, 32, kvq::MetaFormat::kFp16, 1000,
                                    kvq::ChannelReorder>;
#else
using Stream = kvq::QuantizedStream<kvq::Bits::k2, kvq::GroupAxis::kChannels, 32, kvq::MetaFormat::kFp16, 1000,
                                    kvq::ChannelReorder>;
#endif

int main() { return Stream::transform::kind == kvq::TransformKind::kChannelReorder ? 0 : 1; }
