// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The CPU half of kvq_test_cuda_runtime, compiled by the host compiler: the runtime's
///        CPU sessions (llm/any_session.hpp, which includes Eigen, which nvcc cannot compile with
///        kvq's warnings) behind plain declarations that the .cu side calls.
#pragma once

#include <string>
#include <vector>

#include "llm/model.hpp"

namespace kvq_test {

/// Greedy decoding on the CPU session of the registered policy `policy`: `steps` forward steps
/// from `first` (BOS) at positions 0 .. steps - 1; token i + 1 is the argmax of step i's logits.
/// Returns the steps + 1 tokens, `first` included.
std::vector<int> cpu_greedy_tokens(const kvq::llm::Model& model, int first, const std::string& policy, int steps);

/// The logits [tokens.size()][vocab] of `tokens` fed from position 0 (one chunk) to the CPU
/// session of the registered policy `policy`.
std::vector<float> cpu_logits(const kvq::llm::Model& model, const std::string& policy, const std::vector<int>& tokens);

}  // namespace kvq_test
