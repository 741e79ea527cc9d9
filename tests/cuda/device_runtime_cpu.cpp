// SPDX-License-Identifier: Apache-2.0
// The CPU half of kvq_test_cuda_runtime (device_runtime_cpu.hpp).
#include "device_runtime_cpu.hpp"

#include <algorithm>
#include <cstddef>
#include <memory>

#include "llm/any_session.hpp"

namespace kvq_test {

std::vector<int> cpu_greedy_tokens(const kvq::llm::Model& model, int first, const std::string& policy, int steps) {
  const std::unique_ptr<kvq::llm::AnySession> session = kvq::llm::make_session(policy, model, steps, nullptr);
  std::vector<float> logits(static_cast<std::size_t>(model.config.vocab_size));
  std::vector<int> tokens{first};
  for (int i = 0; i < steps; ++i) {
    session->forward(&tokens.back(), 1, logits.data(), false);
    tokens.push_back(static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin()));
  }
  return tokens;
}

std::vector<float> cpu_logits(const kvq::llm::Model& model, const std::string& policy, const std::vector<int>& tokens) {
  const auto n = static_cast<int>(tokens.size());
  const std::unique_ptr<kvq::llm::AnySession> session = kvq::llm::make_session(policy, model, n, nullptr);
  std::vector<float> logits(tokens.size() * static_cast<std::size_t>(model.config.vocab_size));
  session->forward(tokens.data(), n, logits.data(), true);
  return logits;
}

}  // namespace kvq_test
