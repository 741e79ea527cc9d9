#!/usr/bin/env bash
# The test command: installs what is missing, builds everything (library header check, tests,
# tools, examples, benchmarks, and every CUDA translation unit when nvcc exists) and runs all
# tests. GPU tests report Skipped on machines without a GPU. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
jobs=$(nproc 2>/dev/null || echo 2)
cmake --preset ci
cmake --build --preset ci -j "$jobs"
ctest --preset ci -j "$jobs"
