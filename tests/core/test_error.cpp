// SPDX-License-Identifier: Apache-2.0
#include <string>

#include "kvq/core/error.hpp"
#include "kvq/core/status.hpp"
#include "kvq_catch.hpp"

TEST_CASE("argument errors name function, argument, value and expectation", "[core][error]") {
  try {
    kvq::detail::throw_argument_error("kvq::f", "group_size", 0, "a positive divisor of 128");
    FAIL("no error");
  } catch (const kvq::Error& e) {
    REQUIRE(e.status() == kvq::Status::kInvalidArgument);
    REQUIRE(std::string(e.what()) ==
            "kvq::f: argument 'group_size' = 0; expected a positive divisor of 128");
  }
  try {
    kvq::detail::throw_argument_error("kvq::g", "axis", std::string("diagonal"), "'token' or 'channel'",
                                      kvq::Status::kUnsupported);
    FAIL("no error");
  } catch (const kvq::Error& e) {
    REQUIRE(e.status() == kvq::Status::kUnsupported);
    REQUIRE(std::string(e.what()) ==
            "kvq::g: argument 'axis' = 'diagonal'; expected 'token' or 'channel'");
  }
}

TEST_CASE("every status has a name", "[core][error]") {
  for (int s = 0; s <= static_cast<int>(kvq::Status::kRankFailure); ++s) {
    REQUIRE(std::string(kvq::status_name(static_cast<kvq::Status>(s))) != "unknown status");
  }
}
