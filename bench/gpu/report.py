#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Joins kvq_bench_decode's JSON with sdpa_baseline.py's JSON (the same run on the GPU machine)
into issue #10's table: shape, kvq us, best SDPA us and backend, speedup, bytes kvq read, its
TB/s and % of the copy bandwidth measured in the same run, and the ideal speedup from the byte
ratio (fp16 K and V bytes / bytes kvq read).

    python3 bench/gpu/report.py KVQ.json SDPA.json [--markdown]
"""
import json
import sys


def print_table(head, rows, markdown):
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        for r in [head] + rows:
            print("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths))))


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    markdown = "--markdown" in sys.argv
    kvq = json.load(open(args[0], encoding="utf-8"))
    sdpa = json.load(open(args[1], encoding="utf-8"))
    base = {c["case"]: c for c in sdpa["cases"]}
    copy = kvq["copy_bytes_per_second"]
    head = ["case", "B", "Hq/Hkv/d", "tokens", "kvq us", "SDPA us", "backend", "speedup", "MB read", "TB/s", "% copy",
            "ideal"]
    rows = []
    for c in kvq["cases"]:
        b = base.get(c["baseline"])
        if b is None or not b.get("best"):
            continue
        best = b["best"]
        sdpa_us = b[best]["us"]
        fp16_bytes = 2.0 * c["batch"] * c["hkv"] * c["tokens"] * c["dim"] * 2
        tbs = c["bytes"] / (c["us"] * 1e-6) / 1e12
        rows.append([c["name"], str(c["batch"]), "%d/%d/%d" % (c["hq"], c["hkv"], c["dim"]), str(c["tokens"]),
                     "%.1f" % c["us"], "%.1f" % sdpa_us, best, "%.2fx" % (sdpa_us / c["us"]), "%.1f" % (c["bytes"] / 1e6),
                     "%.2f" % tbs, "%.0f%%" % (100 * tbs * 1e12 / copy), "%.2fx" % (fp16_bytes / c["bytes"])])
    print("%s; copy bandwidth %.2f TB/s (kvq run), %.2f TB/s (PyTorch run)" %
          (kvq["device"], copy / 1e12, sdpa["copy_bytes_per_second"] / 1e12))
    print_table(head, rows, markdown)
    appends = kvq.get("append", [])
    if not appends:
        return
    # Append per decode step against the attention of the same shape (one layer each).
    attention = {c["name"]: c["us"] for c in kvq["cases"]}
    head = ["append per decode step", "B", "Hkv/d", "tokens", "plan us (host)", "upload us", "append us", "max us",
            "idle-GPU us", "attention us", "append / attention"]
    rows = []
    for a in appends:
        att = attention.get(a["attention_case"])
        rows.append([a["name"], str(a["batch"]), "%d/%d" % (a["hkv"], a["dim"]), str(a["tokens"]), "%.2f" % a["plan_us"],
                     "%.2f" % a["upload_us"], "%.2f" % a["append_us"], "%.2f" % a["append_max_us"],
                     "%.2f" % a["idle_append_us"] if "idle_append_us" in a else "-",
                     "%.1f" % att if att else "-", "%.1f%%" % (100 * a["append_us"] / att) if att else "-"])
    print()
    print_table(head, rows, markdown)


if __name__ == "__main__":
    main()
