// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief Includes Catch2 v3 when present, v2 otherwise; tests use only what both spell alike.
#pragma once

#if __has_include(<catch2/catch_test_macros.hpp>)
#include <catch2/catch_test_macros.hpp>
#include <catch2/catch_template_test_macros.hpp>
#include <catch2/generators/catch_generators_all.hpp>
#include <catch2/matchers/catch_matchers_floating_point.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#define KVQ_CATCH_MAJOR 3
/// A matcher for REQUIRE_THROWS_WITH: the message contains `text`.
#define KVQ_CONTAINS(text) Catch::Matchers::ContainsSubstring(text)
#else
#include <catch2/catch.hpp>
#define KVQ_CATCH_MAJOR 2
#define KVQ_CONTAINS(text) Catch::Matchers::Contains(text)
#endif
