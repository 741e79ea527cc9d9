#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Perplexity against measured bits per element for the rows of `kvq eval --json` files, one
panel per file: the calibration figure of docs/results.md (scripts/results_calibration.sh).

    tools/plot_calibration.py --out docs/img/calibration.png EVAL.json [EVAL.json ...]
        [--cskv-report CALIBRATE.txt --layers-out docs/img/cskv_layers.png] [--markdown TABLES.md]

Rows are told apart by policy name and calibration file name (kvq calibrate's sweep names them
<policy>.<reorder>.clip-<clip>.kvqc and <policy>.<factors>.kvqc). SKVQ: colour = channel order,
marker = clip ratio; CSKV: colour = factors, marker = latent format; hollow = uncalibrated.
With --cskv-report (the output of `kvq calibrate --method cskv` for several policies), a second
figure shows the per-layer activation-weighted error of the SVD, ASVD and refit factors.
With --markdown, the tables of docs/results.md are written too (SKVQ: policy x channel order
rows, clip ratio columns; CSKV: policy rows, factor columns; perplexity and dPPL% against fp32).
Needs matplotlib (Debian: python3-matplotlib; scripts/setup.sh --plots installs it).
"""
import argparse
import json
import os
import sys

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REORDER_COLOUR = {"none": "#888888", "cross-head": "#1f77b4", "within-head": "#2ca02c"}
CLIP_MARKER = {"0.92": "o", "0.96": "^", "search": "*"}
# x offsets in bits that separate rows of equal size (the true x is the row's bits/element)
CLIP_SHIFT = {"0.92": -0.015, "0.96": 0.0, "search": 0.015}
REORDER_SHIFT = {"none": -0.05, "cross-head": 0.0, "within-head": 0.05}
FACTOR_COLOUR = {"svd": "#d62728", "asvd": "#ff7f0e", "refit": "#9467bd"}


def variant_of(row):
    """(method, option dict) of a row from its policy and calibration file names."""
    policy = row["policy"]
    name = os.path.basename(row.get("calibration_file") or "")
    rest = name[len(policy) + 1 : -len(".kvqc")] if name.startswith(policy + ".") and name.endswith(".kvqc") else ""
    parts = rest.split(".", 1) if rest else []  # the policy and the clip ratio may hold dots
    if policy.startswith("skvq"):
        if len(parts) == 2 and parts[1].startswith("clip-"):
            return "skvq", {"reorder": parts[0], "clip": parts[1][len("clip-"):]}
        return "skvq", {"reorder": None, "clip": None}
    if policy.startswith("cskv"):
        return "cskv", {"factors": parts[0] if parts else None, "fp16": policy.startswith("cskv-fp16")}
    if policy.startswith("kivi"):
        return "kivi", {}
    return "exact", {}


def panel(ax, data, title):
    rows = data["results"]
    ref = next((r for r in rows if r["policy"] == "fp16"), rows[0])
    ax.axhline(ref["perplexity"], color="black", linestyle="--", linewidth=1)
    ax.annotate(f"fp16 {ref['perplexity']:.2f}", (0.02, ref["perplexity"]), xycoords=("axes fraction", "data"),
                ha="left", va="bottom", fontsize=8)
    for r in rows:
        method, v = variant_of(r)
        x, y = r["bits_per_element"], r["perplexity"]
        if y is None or x is None or method == "exact":
            continue
        if method == "kivi":
            ax.scatter(x, y, marker="s", color="black", s=40, zorder=3)
            ax.annotate(r["policy"].split("-g")[0], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        elif method == "skvq":
            calibrated = v["reorder"] is not None
            colour = REORDER_COLOUR.get(v["reorder"], "#888888")
            marker = CLIP_MARKER.get(v["clip"], "o")
            shift = CLIP_SHIFT.get(v["clip"], 0.0) + REORDER_SHIFT.get(v["reorder"], 0.0)
            ax.scatter(x + shift, y, marker=marker, s=55 if marker == "*" else 30,
                       facecolors=colour if calibrated else "none", edgecolors=colour, zorder=3)
        elif method == "cskv":
            calibrated = v["factors"] is not None
            colour = FACTOR_COLOUR.get(v["factors"], "#d62728")
            ax.scatter(x, y, marker="D" if v["fp16"] else "P", s=35, facecolors=colour if calibrated else "none",
                       edgecolors=colour, zorder=3)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("measured bits per element (windows, sinks, metadata included)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def legend(fig, ncol):
    from matplotlib.lines import Line2D

    def h(marker, colour, label, filled=True):
        return Line2D([], [], linestyle="", marker=marker, markersize=7, markerfacecolor=colour if filled else "none",
                      markeredgecolor=colour, label=label)

    handles = [h("s", "black", "KIVI")]
    handles += [h("o", c, f"SKVQ {k}") for k, c in REORDER_COLOUR.items()]
    handles += [h("o", "#888888", "SKVQ uncalibrated", False)]
    handles += [h(m, "#444444", f"SKVQ clip {k}") for k, m in CLIP_MARKER.items()]
    handles += [h("P", c, f"CSKV {k}, 4-bit") for k, c in FACTOR_COLOUR.items()]
    handles += [h("D", "#444444", "CSKV fp16 latents"), h("P", "#d62728", "CSKV uncalibrated (SVD of W)", False)]
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)


def read_cskv_report(path):
    """{policy: [(layer, K svd, K asvd, K refit, V svd, V asvd, V refit)]} from kvq calibrate's
    CSKV report (one table per written file; the tables of one policy are equal)."""
    tables, policy, rows = {}, None, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if line.startswith("policy  "):
                policy = words[1]
            elif words[:2] == ["layer", "K"] and policy is not None:
                rows = tables.setdefault(policy, [])
                rows.clear()
            elif rows is not None and len(words) == 7 and words[0].isdigit():
                rows.append(tuple([int(words[0])] + [float(w) for w in words[1:]]))
            else:
                rows = None if not words else rows
    return tables


def plot_layers(tables, out):
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True)
    styles = ["-", "--", ":", "-."]
    for ax, stream, first in ((axes[0], "keys", 1), (axes[1], "values", 4)):
        for i, (policy, rows) in enumerate(tables.items()):  # line style by position in --layers-policies
            layers = [r[0] for r in rows]
            for j, method in enumerate(("svd", "asvd", "refit")):
                ax.plot(layers, [r[first + j] for r in rows], styles[i % len(styles)], color=FACTOR_COLOUR[method],
                        label=f"{method}, {policy}", linewidth=1.4)
        ax.set_title(f"CSKV {stream}: relative error |XW - XWAB| / |XW| on the calibration tokens", fontsize=10)
        ax.set_xlabel("layer")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("activation-weighted relative error")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def pct(row):
    return f"{row['perplexity']:.2f} ({row['delta_perplexity_percent']:+.1f}%)"


def markdown_tables(data):
    """The SKVQ and CSKV tables of one kvq eval --json file, as markdown."""
    rows = data["results"]
    ref = next(r for r in rows if r["policy"] == data["reference"])
    lines = [f"{data['model']} on {os.path.basename(data['text'])} ({data['text_part']}, "
             f"{data['scored_tokens']} tokens scored); PPL (dPPL against {data['reference']} "
             f"{ref['perplexity']:.4f})", ""]
    base = [r for r in rows if variant_of(r)[0] in ("exact", "kivi")]
    lines += ["| baseline | bits/elem | PPL (dPPL) |", "|---|---|---|"]
    lines += [f"| {r['policy']} | {r['bits_per_element']:.3f} | {pct(r)} |" for r in base]
    lines += ["", "| SKVQ policy | channel order | bits/elem | uncalibrated | clip 0.92 | clip 0.96 | clip search |",
              "|---|---|---|---|---|---|---|"]
    skvq = [r for r in rows if variant_of(r)[0] == "skvq"]
    for policy in dict.fromkeys(r["policy"] for r in skvq):
        plain = next((r for r in skvq if r["policy"] == policy and variant_of(r)[1]["reorder"] is None), None)
        for order in ("none", "cross-head", "within-head"):
            cells = {variant_of(r)[1]["clip"]: r for r in skvq
                     if r["policy"] == policy and variant_of(r)[1]["reorder"] == order}
            if not cells:
                continue
            bits = next(iter(cells.values()))["bits_per_element"]
            first = pct(plain) if plain and order == "none" else ""
            lines.append(f"| {policy} | {order} | {bits:.3f} | {first} | " +
                         " | ".join(pct(cells[c]) if c in cells else "" for c in ("0.92", "0.96", "search")) + " |")
    lines += ["", "| CSKV policy | bits/elem | SVD of W (uncalibrated) | SVD | ASVD | refit |", "|---|---|---|---|---|---|"]
    cskv = [r for r in rows if variant_of(r)[0] == "cskv"]
    for policy in dict.fromkeys(r["policy"] for r in cskv):
        cells = {variant_of(r)[1]["factors"]: r for r in cskv if r["policy"] == policy}
        bits = next(iter(cells.values()))["bits_per_element"]
        lines.append(f"| {policy} | {bits:.3f} | " +
                     " | ".join(pct(cells[c]) if c in cells else "" for c in (None, "svd", "asvd", "refit")) + " |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("json", nargs="+", help="kvq eval --json files, one panel each")
    p.add_argument("--cskv-report", help="kvq calibrate --method cskv output (per-layer factor errors)")
    p.add_argument("--layers-out", help="the PNG of the per-layer CSKV errors (with --cskv-report)")
    p.add_argument("--markdown", help="also write the tables of docs/results.md to this file")
    p.add_argument("--layers-policies", default="cskv-fp16-r25-75-w32,cskv-fp16-r10-30-w32",
                   help="the policies of the report to draw (default: 50%% and 80%% reduction)")
    a = p.parse_args()
    if bool(a.cskv_report) != bool(a.layers_out):
        p.error("--cskv-report and --layers-out go together")
    data = []
    for path in a.json:
        with open(path, encoding="utf-8") as f:
            data.append(json.load(f))
    fig, axes = plt.subplots(1, len(data), figsize=(6.5 * len(data), 5.8), squeeze=False)
    for ax, d in zip(axes[0], data):
        text = os.path.basename(d["text"])
        panel(ax, d, f"{d['model']} on {text} ({d['text_part']}, {d['scored_tokens']} tokens scored)")
    legend(fig, 5 if len(data) > 1 else 3)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    if a.markdown:
        with open(a.markdown, "w", encoding="utf-8") as f:
            f.write("\n".join(markdown_tables(d) for d in data))
        print(f"wrote {a.markdown}")
    if a.cskv_report:
        tables = read_cskv_report(a.cskv_report)
        wanted = {k: tables[k] for k in a.layers_policies.split(",") if k in tables}
        if not wanted:
            p.error(f"--cskv-report {a.cskv_report}: none of {a.layers_policies} in it (found {sorted(tables)})")
        plot_layers(wanted, a.layers_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
