// SPDX-License-Identifier: Apache-2.0
// kvq: the command-line tool of the kvq library.
#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <cstdio>
#include <exception>

#include "kvq/config.hpp"
#include "kvq/core/error.hpp"
#include "kvq/core/status.hpp"
#include "commands.hpp"

int main(int argc, char** argv) {
  CLI::App app{fmt::format("kvq {}.{}.{}: low-bit KV-cache quantization (KIVI, SKVQ, CSKV)",
                           KVQ_VERSION_MAJOR, KVQ_VERSION_MINOR, KVQ_VERSION_PATCH),
               "kvq"};
  app.require_subcommand(1);
  app.set_version_flag("--version", fmt::format("kvq {}.{}.{}", KVQ_VERSION_MAJOR,
                                                KVQ_VERSION_MINOR, KVQ_VERSION_PATCH));
  const kvq_tool::Command roundtrip = kvq_tool::add_roundtrip(app);
  const kvq_tool::Command policies = kvq_tool::add_policies(app);
  const kvq_tool::Command demo = kvq_tool::add_demo(app);
#if KVQ_TOOL_HAS_LLM
  const kvq_tool::Command eval = kvq_tool::add_eval(app);
  const kvq_tool::Command generate = kvq_tool::add_generate(app);
  const kvq_tool::Command calibrate = kvq_tool::add_calibrate(app);
  const kvq_tool::Command capture = kvq_tool::add_capture(app);
#endif
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (app.got_subcommand("roundtrip")) return roundtrip();
    if (app.got_subcommand("policies")) return policies();
    if (app.got_subcommand("demo")) return demo();
#if KVQ_TOOL_HAS_LLM
    if (app.got_subcommand("eval")) return eval();
    if (app.got_subcommand("generate")) return generate();
    if (app.got_subcommand("calibrate")) return calibrate();
    if (app.got_subcommand("capture")) return capture();
#endif
  } catch (const kvq::Error& e) {
    fmt::print(stderr, "kvq: error ({}): {}\n", kvq::status_name(e.status()), e.what());
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "kvq: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
