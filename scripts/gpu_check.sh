#!/usr/bin/env bash
# On the GPU machine: build the CUDA tests, run them, and run compute-sanitizer's memcheck, racecheck and
# initcheck on each (logs under OUT_DIR, default build/gpu-check). Exit status is non-zero when a test fails or a
# sanitizer reports an error.
#
#   bash scripts/gpu_check.sh [OUT_DIR] [TEST_TARGET...]
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/cuda/bin:$PATH
out=${1:-build/gpu-check}; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(kvq_test_cuda_quant kvq_test_cuda_cache kvq_test_cuda_attention)
SAN_ARGS=${SAN_ARGS:-}   # e.g. a Catch2 test-name filter, to run the sanitizers on part of a long test
mkdir -p "$out"
cmake --preset gpu -DKVQ_BUILD_BENCHMARKS=OFF -DKVQ_BUILD_TOOLS=OFF -DKVQ_BUILD_EXAMPLES=OFF > "$out/configure.log" 2>&1 \
  || { tail -30 "$out/configure.log"; exit 1; }
cmake --build build/gpu --target "${targets[@]}" -j "$(nproc)" > "$out/build.log" 2>&1 || { tail -60 "$out/build.log"; exit 1; }
rc=0
for t in "${targets[@]}"; do
  bin=build/gpu/tests/$t
  echo "== $t"
  "$bin" > "$out/$t.log" 2>&1 || rc=1
  tail -3 "$out/$t.log"
  for tool in memcheck racecheck initcheck; do
    timeout "${SAN_TIMEOUT:-300}" compute-sanitizer --tool "$tool" --error-exitcode 9 "$bin" $SAN_ARGS \
      > "$out/$t.$tool.log" 2>&1 || rc=1
    echo "   $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/$t.$tool.log" | tail -1)"
  done
done
exit $rc
