#!/usr/bin/env bash
# Issue #10's GPU benchmark, one command on the GPU machine: builds kvq's decode benchmark, runs
# it and PyTorch's SDPA baseline (flash, cuDNN) on the same shapes in the same session, and prints
# the joined table (also as markdown). Results go to OUT_DIR (default build/gpu-bench).
#
#   bash bench/gpu/run.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-build/gpu-bench}
mkdir -p "$out"
cmake -S . -B build/gpu-release -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVQ_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a \
  -DKVQ_BUILD_TESTING=OFF -DKVQ_BUILD_BENCHMARKS=ON -DKVQ_BUILD_TOOLS=OFF -DKVQ_BUILD_EXAMPLES=OFF > "$out/configure.log"
cmake --build build/gpu-release --target kvq_bench_decode -j "$(nproc)" > "$out/build.log"
build/gpu-release/bench/kvq_bench_decode --json "$out/kvq_decode.json" | tee "$out/kvq_decode.txt"
python3 bench/gpu/sdpa_baseline.py --json "$out/sdpa_baseline.json" | tee "$out/sdpa_baseline.txt"
python3 bench/gpu/report.py "$out/kvq_decode.json" "$out/sdpa_baseline.json" | tee "$out/table.txt"
python3 bench/gpu/report.py "$out/kvq_decode.json" "$out/sdpa_baseline.json" --markdown > "$out/table.md"
