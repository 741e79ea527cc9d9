// SPDX-License-Identifier: Apache-2.0
// The sessions of the baseline (fp16, bf16, fp32, per-token) policies of the registry (llm/any_session.hpp): one translation unit
// per family, so that the tool's policies compile in parallel and once.
#include "llm/any_session.hpp"

namespace kvq::llm {

template std::unique_ptr<AnySession> make_family_session<PolicyFamily::kBaseline>(
    const std::string&, const Model&, int, kvq::ThreadPool*, const kvq::CacheCalibration*);

}  // namespace kvq::llm
