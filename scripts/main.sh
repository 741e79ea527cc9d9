#!/usr/bin/env bash
# The main job: installs what is missing, builds the kvq tool and runs it on its default input.
# Until `kvq eval` exists this is `kvq demo`: the quantization round-trip table on a generated
# K-like tensor with outlier channels. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
jobs=$(nproc 2>/dev/null || echo 2)
cmake --preset release >/dev/null
cmake --build --preset release -j "$jobs"
exec build/release/tools/kvq demo "$@"
