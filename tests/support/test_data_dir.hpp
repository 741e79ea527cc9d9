// SPDX-License-Identifier: Apache-2.0
/// @file
/// @brief The data folder of a test executable that reads files made elsewhere (real models and
///        text, captured K/V): KVQ_TEST_DATA_DIR, a path compiled in, unless the environment
///        variable named by KVQ_TEST_DATA_ENV (also compiled in, optional) is set and non-empty.
///        gpu_main.cpp exits 77 (CTest: Skipped) when this folder is absent.
#pragma once

#include <cstdlib>
#include <string>

namespace kvq_test {

#ifdef KVQ_TEST_DATA_DIR
inline std::string test_data_dir() {
#ifdef KVQ_TEST_DATA_ENV
  if (const char* e = std::getenv(KVQ_TEST_DATA_ENV); e != nullptr && *e != '\0') return e;
#endif
  return KVQ_TEST_DATA_DIR;
}
#endif

}  // namespace kvq_test
