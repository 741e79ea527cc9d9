# SPDX-License-Identifier: Apache-2.0
# Runs one command-line case:  cmake -DCMD=<words separated by |> -DEXPECT_RC=<n|nonzero> [-DEXPECT=<regex>]
#   [-DGUARD_FILE=<path>] -P run_cli_case.cmake
# GUARD_FILE is created with known content before the run and must be unchanged after it
# (a failed command must not touch its output).
if(GUARD_FILE)
  file(WRITE "${GUARD_FILE}" "kvq guard file\n")
endif()
string(REPLACE "|" ";" CMD "${CMD}")
execute_process(COMMAND ${CMD} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
message("${out}${err}")
if(EXPECT_RC STREQUAL "nonzero")
  if(rc EQUAL 0)
    message(FATAL_ERROR "expected a non-zero exit code, got 0")
  endif()
elseif(NOT rc EQUAL EXPECT_RC)
  message(FATAL_ERROR "expected exit code ${EXPECT_RC}, got ${rc}")
endif()
if(DEFINED EXPECT AND NOT "${out}${err}" MATCHES "${EXPECT}")
  message(FATAL_ERROR "output does not match: ${EXPECT}")
endif()
if(GUARD_FILE)
  file(READ "${GUARD_FILE}" guard)
  if(NOT guard STREQUAL "kvq guard file\n")
    message(FATAL_ERROR "the command changed ${GUARD_FILE}")
  endif()
endif()
