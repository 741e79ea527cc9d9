#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Table of kvq_bench_shard's JSON files (bench/gpu/shard_run.sh): per run, the decode step per
layer (the slowest rank's), its parts, the all-gather's share, the attention's bandwidth against
the copy measured in the same run, and the scaling efficiency against the one-GPU run of the same
tokens per GPU (t1 / tN: 1.0 is perfect weak scaling)."""
import json
import sys


def main(paths):
    runs = []
    for p in paths:
        with open(p) as f:
            ranks = json.load(f)
        slow = max(ranks, key=lambda r: r["graph_step_us"])
        runs.append((p, ranks, slow))
    one_gpu = {}
    for p, ranks, slow in runs:
        if slow["world"] == 1:
            one_gpu[slow["tokens"]] = slow["graph_step_us"]
    print("| run | GPUs | tokens | tokens/GPU | cache GB/GPU | step us (graph) | per layer us | append | attention | all-gather | "
          "gather share | attention TB/s | % copy | efficiency vs 1 GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p, ranks, r in runs:
        w = r["world"]
        per_layer = r["graph_step_us"] / 32
        parts = r["append_us"] + r["attention_us"] + r["gather_us"]
        tbs = r["bytes_per_layer"] / (r["attention_us"] * 1e-6) * 1e-12
        eff = ""
        base = one_gpu.get(r["tokens"] // w)
        if base is not None and w > 1:
            eff = f"{base / r['graph_step_us']:.1%}"
        name = p.rsplit("/", 1)[-1].removesuffix(".json")
        print(f"| {name} | {w} | {r['tokens']} | {r['tokens'] // w} | {r['cache_gb']:.1f} | {r['graph_step_us']:.0f} | "
              f"{per_layer:.1f} | {r['append_us']:.1f} | {r['attention_us']:.1f} | {r['gather_us']:.1f} | "
              f"{r['gather_us'] / parts:.1%} | {tbs:.2f} | {tbs / r['copy_tbs']:.0%} | {eff} |")


if __name__ == "__main__":
    main(sys.argv[1:])
