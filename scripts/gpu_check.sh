#!/usr/bin/env bash
# On the GPU machine: build the CUDA tests, run them, and run compute-sanitizer's memcheck, racecheck and
# initcheck on each (logs under OUT_DIR, default build/gpu-check). Exit status is non-zero when a test fails or a
# sanitizer reports an error. A test that exits 77 (no device, or its data folder absent) counts as skipped.
#
#   bash scripts/gpu_check.sh [OUT_DIR] [TEST_TARGET...]
#
# The Llama runtime (tools/, and with it kvq_test_cuda_runtime) is built when pkg-config finds PCRE2 and Nettle: on the
# GPU machine, after `bash scripts/unpack_debs.sh && source /tmp/debroot/env.sh` (carry .debs, see
# scripts/carry_debs.sh). Real data: KVQ_REALDATA_DIR defaults to .kvdata/realdata when that exists (../shared/realdata
# does not travel); kvq_test_cuda_realdata_kv reads .kvdata/smollm2 (scripts/capture_kv.sh writes both).
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/cuda/bin:$PATH
out=${1:-build/gpu-check}; shift || true
targets=("$@")
tools=OFF
"${PKG_CONFIG:-pkg-config}" --exists libpcre2-8 nettle 2>/dev/null && tools=ON
if [ ${#targets[@]} -eq 0 ]; then
  targets=(kvq_test_cuda_quant kvq_test_cuda_cache kvq_test_cuda_attention kvq_test_cuda_reference kvq_test_cuda_realdata_kv)
  [ "$tools" = ON ] && targets+=(kvq_test_cuda_runtime)
fi
[ -d .kvdata/realdata ] && export KVQ_REALDATA_DIR="${KVQ_REALDATA_DIR:-$PWD/.kvdata/realdata}"
SAN_ARGS=${SAN_ARGS:-}   # e.g. a Catch2 test-name filter, to run the sanitizers on part of a long test
SAN_TOOLS=${SAN_TOOLS-memcheck racecheck initcheck}   # SAN_TOOLS= runs the tests without sanitizers
mkdir -p "$out"
cmake --preset gpu -DKVQ_BUILD_BENCHMARKS=OFF -DKVQ_BUILD_TOOLS=$tools -DKVQ_BUILD_EXAMPLES=OFF > "$out/configure.log" 2>&1 \
  || { tail -30 "$out/configure.log"; exit 1; }
cmake --build build/gpu --target "${targets[@]}" -j "$(nproc)" > "$out/build.log" 2>&1 || { tail -60 "$out/build.log"; exit 1; }
rc=0
for t in "${targets[@]}"; do
  bin=build/gpu/tests/$t
  echo "== $t"
  "$bin" > "$out/$t.log" 2>&1
  status=$?
  tail -3 "$out/$t.log"
  if [ $status -eq 77 ]; then echo "   skipped"; continue; fi
  [ $status -eq 0 ] || rc=1
  for tool in $SAN_TOOLS; do
    timeout "${SAN_TIMEOUT:-300}" compute-sanitizer --tool "$tool" --error-exitcode 9 "$bin" $SAN_ARGS \
      > "$out/$t.$tool.log" 2>&1 || rc=1
    echo "   $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/$t.$tool.log" | tail -1)"
  done
done
exit $rc
