// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The subcommands of the kvq tool: each registers its options on a CLI11 app and
///        returns the function that runs it.
#pragma once

#include <functional>

namespace CLI {
class App;
}

namespace kvq_tool {

/// A registered subcommand's body; returns the process exit code.
using Command = std::function<int()>;

/// `kvq roundtrip`: quantize a 2-D .npy array and write the dequantized result (matrix mode), or
/// run K/V dumps through a QuantizedKVCache of a registered policy (cache mode, --policy).
Command add_roundtrip(CLI::App& app);

/// `kvq policies`: the registered policies with their nominal and measured bits per element.
Command add_policies(CLI::App& app);

/// `kvq eval`: perplexity of a real model with each cache policy (decode semantics).
Command add_eval(CLI::App& app);

/// `kvq generate`: greedy generation on a quantized cache, streamed.
Command add_generate(CLI::App& app);

/// `kvq calibrate`: SKVQ or CSKV calibration on a real model, written as a calibration file.
Command add_calibrate(CLI::App& app);

/// `kvq capture`: real keys, values and queries of a model as .npy files (for GPU tests).
Command add_capture(CLI::App& app);

/// `kvq demo`: the round-trip table on a generated K-like tensor with outlier channels.
Command add_demo(CLI::App& app);

}  // namespace kvq_tool
