#!/usr/bin/env bash
# The test command: installs what is missing, fetches the SmolLM2 model for the end-to-end tests
# (scripts/fetch_model.sh; without network it warns and those tests report Skipped), builds
# everything (library header check, tests, tools, examples, benchmarks, and every CUDA translation
# unit when nvcc exists) and runs all tests. GPU tests report Skipped on machines without a GPU.
# Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! scripts/fetch_model.sh >/dev/null; then
  echo "test: warning: the SmolLM2 model could not be fetched; the tests that need it are skipped" >&2
fi
jobs=$(nproc 2>/dev/null || echo 2)
cmake --preset ci
cmake --build --preset ci -j "$jobs"
ctest --preset ci -j "$jobs"
