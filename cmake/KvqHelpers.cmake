# SPDX-License-Identifier: Apache-2.0
# Helpers for kvq's own targets (tests, benches, tools, examples). Nothing here touches global
# flags; consumers of kvq::kvq never see these options.

# Warnings for a target of ours; errors too when KVQ_WERROR is on.
function(kvq_target_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wconversion>
      $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<BOOL:${KVQ_WERROR}>>:-Werror>)
  elseif(MSVC)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:/W4 $<$<BOOL:${KVQ_WERROR}>:/WX>>)
  endif()
  if(KVQ_NATIVE_ARCH AND KVQ_HOST_HAS_X86_64_V3)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-march=x86-64-v3>)
  endif()
  if(KVQ_CUDA_ENABLED)
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>
      $<$<AND:$<COMPILE_LANGUAGE:CUDA>,$<BOOL:${KVQ_WERROR}>>:--Werror=all-warnings>)
  endif()
endfunction()

# kvq_add_catch_test(<name> SOURCES <src>... [LIBS <lib>...])
# A host test executable; every TEST_CASE becomes a CTest test.
function(kvq_add_catch_test name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LIBS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE kvq_test_support Catch2::Catch2WithMain ${ARG_LIBS})
  kvq_target_warnings(${name})
  catch_discover_tests(${name} TEST_PREFIX "${name}:" PROPERTIES LABELS host)
endfunction()

# kvq_add_cuda_test(<name> SOURCES <src.cu>... [LIBS <lib>...])
# A GPU test executable with its own main: it exits 77 (reported as Skipped) when no CUDA device
# is usable, so it builds everywhere nvcc exists and runs where a GPU does.
function(kvq_add_cuda_test name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LIBS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES} "${PROJECT_SOURCE_DIR}/tests/support/gpu_main.cpp")
  target_link_libraries(${name} PRIVATE kvq_test_support kvq::cuda Catch2::Catch2 ${ARG_LIBS})
  set_target_properties(${name} PROPERTIES CUDA_STANDARD 17 CUDA_STANDARD_REQUIRED ON)
  kvq_target_warnings(${name})
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES SKIP_RETURN_CODE 77 LABELS cuda)
endfunction()

# kvq_add_failtest(<name> SOURCE <file> REGEX <regex>)
# Compiles <file> twice with the C++ compiler: as is (must succeed: `<name>_ok`) and with
# KVQ_SHOULD_FAIL_TO_BUILD defined (must fail and print <regex>: `<name>_ko`).
function(kvq_add_failtest name)
  cmake_parse_arguments(ARG "" "SOURCE;REGEX" "" ${ARGN})
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    return()
  endif()
  set(cmd ${CMAKE_CXX_COMPILER} -std=c++17 -fsyntax-only -I${PROJECT_SOURCE_DIR}/include
          ${PROJECT_SOURCE_DIR}/${ARG_SOURCE})
  add_test(NAME compile_fail:${name}_ok COMMAND ${cmd})
  add_test(NAME compile_fail:${name}_ko COMMAND ${cmd} -DKVQ_SHOULD_FAIL_TO_BUILD)
  set_tests_properties(compile_fail:${name}_ok PROPERTIES LABELS host)
  set_tests_properties(compile_fail:${name}_ko PROPERTIES LABELS host
    WILL_FAIL FALSE PASS_REGULAR_EXPRESSION "${ARG_REGEX}")
endfunction()
