#!/usr/bin/env bash
# The calibration results of docs/results.md: SKVQ and CSKV calibrated with `kvq calibrate` on
# text disjoint from the evaluation text, scored with `kvq eval --calib`, next to fp16/fp32, KIVI
# and the uncalibrated policies measured in the same run.
#
#   scripts/results_calibration.sh [OUT_DIR]      (default build/results/calibration)
#
# SmolLM2-135M: calibrated on all of Dasher's English text (2048 tokens), evaluated on the first
# 2048 tokens of WikiText-2 test. stories260K: calibrated on the first half of the TinyStories
# sample, evaluated on its second half. SKVQ: every registered K2/V1.5 and K2/V2 policy of the
# model's group sizes x reorder none / cross-head / within-head x clip 0.92 / 0.96 / search; CSKV:
# 50% (25/75 and 50/50) and 80% (10/30) of the channels removed, fp16 and 4-bit latents, x SVD /
# ASVD / refit factors.
# Writes OUT_DIR/{smollm2_wikitext2,stories260k_tinystories}.{txt,json}, the calibrate reports
# (calibrate_*.txt, with the per-layer errors), the tables of docs/results.md (tables.md) and the
# figures docs/img/calibration.png and
# docs/img/cskv_layers.png (tools/plot_calibration.py; python3-matplotlib: scripts/setup.sh --plots).
# About 25 minutes on the 2-core machine, almost all of it the 64 SmolLM2 rows (2 threads each).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-build/results/calibration}"
mkdir -p "$out"
scripts/setup.sh --plots
model="$(scripts/fetch_model.sh | tail -n 1)"
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc 2>/dev/null || echo 2)"
kvq=build/release/tools/kvq
realdata="$(cd .. && pwd)/shared/realdata"
cskv=cskv-k4v4-r25-75-w32,cskv-fp16-r25-75-w32,cskv-k4v4-r50-50-w32,cskv-k4v4-r10-30-w32,cskv-fp16-r10-30-w32

run() {  # run LOG COMMAND...: prints and logs the command and its output
  local log="$1"
  shift
  { echo "\$ $*"; "$@"; } 2>&1 | tee "$log"
}

# study NAME MODEL SKVQ_POLICIES CALIB_TEXT CALIB_PART EVAL_TEXT EVAL_PART [EVAL OPTIONS...]:
# both sweeps calibrated on one text, then one kvq eval of the baselines, the uncalibrated rows
# and every calibration file (NAME_skvq/, NAME_cskv/) on the other, to OUT_DIR/NAME.{txt,json}.
study() {
  local name="$1" model="$2" skvq="$3" calib_text="$4" calib_part="$5" eval_text="$6" eval_part="$7"
  shift 7
  rm -rf "$out/${name}_skvq" "$out/${name}_cskv"
  run "$out/calibrate_${name}_skvq.txt" "$kvq" calibrate --model "$model" --text "$calib_text" --part "$calib_part" \
    --quiet --method skvq --policy "$skvq" --reorder none,cross-head,within-head --clip 0.92,0.96,search \
    --out "$out/${name}_skvq"
  run "$out/calibrate_${name}_cskv.txt" "$kvq" calibrate --model "$model" --text "$calib_text" --part "$calib_part" \
    --quiet --method cskv --policy "$cskv" --factors svd,asvd,refit --out "$out/${name}_cskv"
  local calib=() f
  while IFS= read -r f; do calib+=(--calib "$f"); done < <(find "$out/${name}_skvq" "$out/${name}_cskv" -name '*.kvqc' | sort)
  run "$out/$name.txt" "$kvq" eval --model "$model" --text "$eval_text" --part "$eval_part" --quiet --no-calibrate \
    --policies "fp32,fp16,kivi-k4v4-g32-r128,kivi-k2v2-g32-r128,$skvq,$cskv" "${calib[@]}" "$@" --json "$out/$name.json"
}

study smollm2_wikitext2 "$model" \
  skvq-k2v1.5-g128-w128-s5,skvq-k2v2-g128-w128-s5,skvq-k2v1.5-g32-w128-s5,skvq-k2v2-g32-w128-s5 \
  /usr/share/dasher/training_english_GB.txt all "$realdata/wikitext2/wiki.test.raw" all --tokens 2048
study stories260k_tinystories "$realdata/stories260K/stories260K.bin" skvq-k2v1.5-g8-w128-s5,skvq-k2v2-g8-w128-s5 \
  "$realdata/tinystories/tinystories_val_head.txt" first "$realdata/tinystories/tinystories_val_head.txt" second

python=/usr/bin/python3  # Debian's, which has python3-matplotlib
[ -x "$python" ] || python=python3
"$python" tools/plot_calibration.py --out docs/img/calibration.png \
  "$out/smollm2_wikitext2.json" "$out/stories260k_tinystories.json" \
  --cskv-report "$out/calibrate_smollm2_wikitext2_cskv.txt" --layers-out docs/img/cskv_layers.png \
  --markdown "$out/tables.md"
