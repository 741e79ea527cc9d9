#!/usr/bin/env bash
# Issue #11's benchmark on the GPU machine: builds kvq_bench_shard and runs the Llama-2-7B-shaped
# KIVI-2 g128 decode step sharded over 1, 2 and 4 GPUs (as many as the machine has) at equal
# tokens per GPU (1.5M positions per GPU: 6M on 4 GPUs), then each world size at the largest
# context its GPUs hold; JSON per run and the table under OUT_DIR (default build/gpu-shard).
#
#   bash bench/gpu/shard_run.sh [OUT_DIR] [TOKENS_PER_GPU]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-build/gpu-shard}
per_gpu=${2:-1572864}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0  # NVLink multicast stays off on shared hosts (the device tool's KINDS.md)
cmake -S . -B build/gpu-release -G Ninja -DCMAKE_BUILD_TYPE=Release -DKVQ_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a \
  -DKVQ_BUILD_TESTING=OFF -DKVQ_BUILD_BENCHMARKS=ON -DKVQ_BUILD_TOOLS=OFF -DKVQ_BUILD_EXAMPLES=OFF > "$out/configure.log"
grep "NCCL" "$out/configure.log" || true
cmake --build build/gpu-release --target kvq_bench_shard -j "$(nproc)" > "$out/build.log"
gpus=$(nvidia-smi -L | wc -l)
for world in 1 2 4; do
  [ "$world" -le "$gpus" ] || continue
  build/gpu-release/bench/kvq_bench_shard --world "$world" --tokens $((per_gpu * world)) --json "$out/equal-w$world.json" \
    | tee "$out/equal-w$world.txt"
  build/gpu-release/bench/kvq_bench_shard --world "$world" --json "$out/max-w$world.json" | tee "$out/max-w$world.txt"
done
python3 bench/gpu/shard_report.py "$out"/equal-w*.json "$out"/max-w*.json | tee "$out/table.md"
