# SPDX-License-Identifier: Apache-2.0
# Decides whether CUDA is enabled (KVQ_ENABLE_CUDA = AUTO | ON | OFF) and sets KVQ_CUDA_ENABLED.
# nvcc without a GPU is enough: kernels and GPU tests compile everywhere and the tests skip at
# run time where no device exists. The architecture defaults to 90a (H100/H200); `native` is
# never used because it fails on machines without a GPU.
set(KVQ_CUDA_ENABLED OFF)
string(TOUPPER "${KVQ_ENABLE_CUDA}" _kvq_cuda_mode)
if(NOT _kvq_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "KVQ_ENABLE_CUDA='${KVQ_ENABLE_CUDA}': expected AUTO, ON or OFF")
endif()
if(NOT _kvq_cuda_mode STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 90a)
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(KVQ_CUDA_ENABLED ON)
    message(STATUS "kvq: CUDA enabled (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES})")
  elseif(_kvq_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "KVQ_ENABLE_CUDA=ON but no CUDA compiler was found (put nvcc on PATH or set CUDACXX)")
  else()
    message(STATUS "kvq: CUDA disabled (no nvcc found)")
  endif()
endif()
