#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The fp16 baseline of kvq's GPU decode benchmark: PyTorch scaled_dot_product_attention with the
flash and cuDNN backends on the decode shapes of issue #10's targets, and the device's copy
bandwidth, measured in one run. Prints one table and writes the same data as JSON.

    python3 bench/gpu/sdpa_baseline.py [--json FILE] [--quick]

On the GPU machine (PyTorch and Triton installed there). Decode = one query token per sequence:
q [B, Hq, 1, d], k and v [B, Hkv, L, d] (GQA through enable_gqa), random N(0, 1) inputs (never
zeros). Timing: triton.testing.do_bench median with its L2 flush (cold cache) or, for the graph
rows, do_bench_cudagraph (CUDA-graph replay, launch gaps removed). TB/s counts the K and V bytes
an ideal kernel reads once (B * Hkv * L * d * 2 tensors * element size). The copy bandwidth is a
device-to-device copy of 2 GiB, bytes read plus bytes written.
"""
import argparse
import json
import sys

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

# (name, batch, query heads, kv heads, head_dim, tokens, dtype, graph replay): the shapes of the
# targets table (Hq=32, Hkv=8, d=128 unless stated).
CASES = [
    ("llama8b-b1-4k-graph", 1, 32, 8, 128, 4096, torch.float16, True),
    ("llama8b-b1-32k", 1, 32, 8, 128, 32768, torch.float16, False),
    ("llama8b-b1-128k", 1, 32, 8, 128, 131072, torch.float16, False),
    ("llama8b-b1-128k-bf16", 1, 32, 8, 128, 131072, torch.bfloat16, False),
    ("llama8b-b1-1m", 1, 32, 8, 128, 1048576, torch.float16, False),
    ("llama8b-b8-32k", 8, 32, 8, 128, 32768, torch.float16, False),
    ("mha-b1-64k", 1, 32, 32, 128, 65536, torch.float16, False),
    ("smollm2-b64-2k", 64, 9, 3, 64, 2048, torch.float16, False),
    ("smollm2-b64-2k-graph", 64, 9, 3, 64, 2048, torch.float16, True),
]
BACKENDS = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]


def copy_bandwidth(gib=2):
    """Device-to-device copy, bytes read + written per second (median of do_bench)."""
    n = gib * (1 << 30) // 2
    src = torch.randn(n, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def time_case(case, quick):
    name, b, hq, hkv, d, tokens, dtype, graph = case
    if quick:
        tokens = min(tokens, 8192)
    gen = torch.Generator(device="cuda").manual_seed(1234)
    q = torch.randn(b, hq, 1, d, dtype=dtype, device="cuda", generator=gen)
    k = torch.randn(b, hkv, tokens, d, dtype=dtype, device="cuda", generator=gen)
    v = torch.randn(b, hkv, tokens, d, dtype=dtype, device="cuda", generator=gen)
    kv_bytes = 2 * k.numel() * k.element_size()
    # fp32 reference on one sequence's first kv head group: checks each backend computes attention
    group = hq // hkv
    qf, kf, vf = q[0, :group].float(), k[0, 0].float(), v[0, 0].float()
    ref = torch.softmax(qf @ kf.T / d**0.5, dim=-1) @ vf  # [group, 1, d]
    row = {"case": name, "batch": b, "hq": hq, "hkv": hkv, "head_dim": d, "tokens": tokens,
           "dtype": str(dtype).replace("torch.", ""), "graph": graph, "kv_bytes": kv_bytes}
    for label, backend in BACKENDS:
        try:
            with sdpa_kernel([backend]):
                out = sdpa(q, k, v, enable_gqa=True)
                torch.cuda.synchronize()
                err = ((out[0, :group].float() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    raise RuntimeError(f"relative error {err:.2e} against the fp32 reference")
                fn = lambda: sdpa(q, k, v, enable_gqa=True)  # noqa: E731
                if graph:
                    ms = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
                else:
                    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
            row[label] = {"us": ms * 1e3, "tbps": kv_bytes / (ms * 1e-3) / 1e12, "rel_err": err}
        except Exception as e:  # a backend that rejects a shape is reported, not fatal
            row[label] = {"error": str(e).splitlines()[0][:120]}
    timed = [(row[lab]["us"], lab) for lab, _ in BACKENDS if "us" in row[lab]]
    row["best"] = min(timed)[1] if timed else None
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--quick", action="store_true", help="at most 8K tokens per case (a smoke run)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("sdpa_baseline: no CUDA device", file=sys.stderr)
        return 77
    props = torch.cuda.get_device_properties(0)
    copy = copy_bandwidth()
    rows = [time_case(c, a.quick) for c in CASES]
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; "
          f"copy bandwidth (read + write) {copy / 1e12:.2f} TB/s")
    print(f"{'case':<22} {'B':>3} {'Hq/Hkv/d':>10} {'L':>8} {'dtype':>9} {'graph':>5} {'flash us':>9} "
          f"{'cudnn us':>9} {'best':>6} {'TB/s':>6} {'% copy':>7}")
    for r in rows:
        cell = {lab: (f"{r[lab]['us']:.1f}" if "us" in r[lab] else "fail") for lab, _ in BACKENDS}
        best = r[r["best"]] if r["best"] else None
        tbps = f"{best['tbps']:.2f}" if best else "-"
        pct = f"{100 * best['tbps'] * 1e12 / copy:.0f}%" if best else "-"
        print(f"{r['case']:<22} {r['batch']:>3} {r['hq']:>3}/{r['hkv']}/{r['head_dim']:<3} {r['tokens']:>8} "
              f"{r['dtype']:>9} {'yes' if r['graph'] else 'no':>5} {cell['flash']:>9} {cell['cudnn']:>9} "
              f"{r['best'] or '-':>6} {tbps:>6} {pct:>7}")
    for r in rows:
        for lab, _ in BACKENDS:
            if "error" in r[lab]:
                print(f"  {r['case']} {lab}: {r[lab]['error']}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                       "copy_bytes_per_second": copy, "cases": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
