#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Independent check of kvq's forward pass (fp32 KV cache) against llama.cpp.

kvq evaluates a text with `kvq eval --policies fp32 --per-token OUT.tsv`, which writes the token
ids it evaluated and, for every scored position, log p(token | tokens before it). This script feeds
the same ids to llama.cpp (through PyPI's llama-cpp-python), computes the same log-probabilities
from llama.cpp's logits (log-softmax in float64) and compares them position by position. It also
tokenizes the same text with llama.cpp and says whether its ids equal kvq's.

Two llama.cpp references are compared with kvq:
  native    the GGUF as it is (Q4_1 weights, a Q8_0 embedding). llama.cpp's CPU matmul then
            quantizes the activations to Q8_1 before the dot products, which kvq does not do (it
            dequantizes the weights to float32 and multiplies in float32). On SmolLM2-135M and 255
            wikitext-2 positions that alone moves llama.cpp's log-probabilities by 0.06 on average
            and up to ~0.5 (llama.cpp F32 vs Q4_1; batch 1 vs batched Q4_1 differ as much), so this
            reference only catches gross errors.
  f32       a copy of the GGUF whose tensors llama.cpp itself dequantized to F32
            (llama_model_quantize with ftype ALL_F32, in a temporary directory): the same weights
            kvq uses, multiplied in float32. This is the like-for-like reference; PASS/FAIL is
            judged on it (`--judge` to change). llama.cpp against itself on it (threads 1 vs 2,
            batch 1 vs 32 vs 512) differs by at most ~1e-5.
Both use an F32 KV cache (type_k/type_v = GGML F32), no flash attention, and plain CPU weight
buffers (no AMX / repacked weights, see plain_cpu_weights). `--noise-floor` prints llama.cpp
against itself under other thread / batch settings.

Install (once, outside the repository; llama-cpp-python compiles llama.cpp, 10-20 min on 2 cores):

    python3 -m venv /tmp/llamacpp_venv
    CMAKE_BUILD_PARALLEL_LEVEL=2 /tmp/llamacpp_venv/bin/pip install llama-cpp-python==0.3.36 numpy

Run (after scripts/main.sh or `cmake --preset release && cmake --build --preset release`, and
scripts/fetch_model.sh, which prints the model path):

    /tmp/llamacpp_venv/bin/python tools/llm/compare_llamacpp.py \\
        --kvq build/release/tools/kvq \\
        --model ~/.cache/kvq/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text /work/shared/realdata/wikitext2/wiki.test.raw --tokens 256 [--noise-floor]

or, with a TSV that `kvq eval ... --per-token OUT.tsv` already wrote: `--tsv OUT.tsv` (then
--kvq and --tokens are not used). TSV format: a header `policy<TAB>position<TAB>token<TAB>logprob`,
then one row per position of the evaluated sequence; logprob is `-` where the position is not
scored (the first token). Exit status: 0 on PASS, 1 on FAIL, 2 on a usage or runtime error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

DEFAULT_MODEL = os.path.join(
    os.environ.get("KVQ_MODEL_CACHE")
    or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvq"),
    "SmolLM2-135M-Instruct.Q4_1.gguf",
)
GGML_TYPE_F32 = 0
LLAMA_FTYPE_ALL_F32 = 0


@dataclass
class KvqRun:
    windows: list[list[int]]  # the token ids of each window (each scored on a fresh cache)
    logprobs: np.ndarray  # float64, the windows' positions one after another; NaN where unscored

    @property
    def ids(self) -> list[int]:
        return [t for w in self.windows for t in w]


def fail(message: str) -> NoReturn:
    print(f"compare_llamacpp: error: {message}", file=sys.stderr)
    sys.exit(2)


def read_tsv(path: str, policy: str) -> KvqRun:
    """Rows of `policy`: columns policy, [window,] position, token, logprob (by header name)."""
    rows: list[tuple[int, int, int, float]] = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        try:
            col = {name: header.index(name) for name in ("policy", "position", "token", "logprob")}
        except ValueError:
            fail(f"{path}: the header is {header!r}, expected policy, position, token, logprob columns")
        window_col = header.index("window") if "window" in header else None
        for line in f:
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("\t")
            if fields[col["policy"]] != policy:
                continue
            lp = fields[col["logprob"]]
            rows.append((int(fields[window_col]) if window_col is not None else 0,
                         int(fields[col["position"]]), int(fields[col["token"]]),
                         math.nan if lp in ("-", "", "nan") else float(lp)))
    if not rows:
        fail(f"{path}: no rows for policy {policy!r}")
    rows.sort()
    windows: list[list[int]] = []
    for w in sorted({r[0] for r in rows}):
        positions = [r[1] for r in rows if r[0] == w]
        if positions != list(range(len(positions))):
            fail(f"{path}: the positions of policy {policy!r} in window {w} are not 0..{len(positions) - 1}")
        windows.append([r[2] for r in rows if r[0] == w])
    return KvqRun(windows=windows, logprobs=np.array([r[3] for r in rows], dtype=np.float64))


def run_kvq(kvq: str, model: str, text: str, tokens: int, window: int | None, policy: str,
            tsv: str) -> None:
    cmd = [kvq, "eval", "--model", model, "--text", text, "--tokens", str(tokens),
           "--policies", policy, "--per-token", tsv, "--quiet"]
    if window is not None:
        cmd += ["--window", str(window)]
    print("kvq:      " + " ".join(cmd), flush=True)
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout)
        fail(f"kvq eval exited with status {result.returncode}")
    for line in result.stdout.splitlines():
        print("  | " + line)


@contextlib.contextmanager
def quiet():
    """Sends what llama.cpp writes to stdout/stderr (quantization log, vocab-only warnings) away."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def plain_cpu_weights() -> None:
    """Makes llama.cpp keep the weights in plain CPU buffers (model param use_extra_bufts=false).

    Extra buffer types are repacked weight layouts and, on CPUs with AMX, the AMX matmul; llama.cpp
    0.3.36's AMX path crashed (SIGSEGV in ggml_backend_amx_mul_mat) on the Sapphire-Rapids-class
    machine this was written on, and both change the arithmetic. Llama() does not expose the
    parameter, so the default-params function it calls is wrapped.
    """
    import llama_cpp.llama_cpp as C

    if getattr(C.llama_model_default_params, "_kvq_plain", False):
        return
    if "use_extra_bufts" not in {f[0] for f in C.llama_model_params._fields_}:
        return
    original = C.llama_model_default_params

    def default_params():
        p = original()
        p.use_extra_bufts = False
        return p

    default_params._kvq_plain = True
    C.llama_model_default_params = default_params


def load_llama(model: str, n_threads: int, n_batch: int, n_ctx: int):
    import llama_cpp

    plain_cpu_weights()
    kwargs = dict(model_path=model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                  logits_all=True, n_threads=n_threads, n_threads_batch=n_threads,
                  flash_attn=False, verbose=False, n_gpu_layers=0)
    # An fp32 KV cache, as kvq's fp32 policy, where this version lets us choose it.
    params = llama_init_params()
    if "type_k" in params and "type_v" in params:
        kwargs.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    return llama_cpp.Llama(**kwargs)


def llama_init_params() -> set[str]:
    import inspect

    import llama_cpp

    return set(inspect.signature(llama_cpp.Llama.__init__).parameters)


def llama_logprobs(model: str, ids: list[int], n_threads: int, n_batch: int) -> np.ndarray:
    """log p(ids[i] | ids[:i]) from llama.cpp's logits; NaN at position 0."""
    n_ctx = max(512, 1 << (len(ids) - 1).bit_length())
    llm = load_llama(model, n_threads, min(n_batch, n_ctx), n_ctx)
    try:
        llm.reset()
        llm.eval(ids)
        scores = getattr(llm, "scores", None)
        if scores is None:
            scores = llm._scores
        logits = np.asarray(scores[: len(ids)], dtype=np.float64)  # [n, vocab]
    finally:
        if hasattr(llm, "close"):
            llm.close()
    out = np.full(len(ids), math.nan)
    z = logits[:-1]
    mx = z.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(z - mx).sum(axis=1))
    out[1:] = z[np.arange(len(ids) - 1), np.asarray(ids[1:])] - lse
    return out


def windowed(model: str, windows: list[list[int]], n_threads: int, n_batch: int) -> np.ndarray:
    """llama_logprobs of each window (a fresh context each), one after another."""
    return np.concatenate([llama_logprobs(model, w, n_threads, n_batch) for w in windows])


def llama_tokenize(model: str, text_path: str, n: int) -> list[int]:
    """llama.cpp's ids for a prefix of the text long enough for n tokens (cut at a line end)."""
    with open(text_path, "rb") as f:
        data = f.read()
    cut = min(len(data), max(1 << 16, 64 * n))
    if cut < len(data):
        nl = data.rfind(b"\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut
    import llama_cpp

    plain_cpu_weights()
    with quiet():  # a vocab-only model warns about its n_ctx_train of 0
        llm = llama_cpp.Llama(model_path=model, n_ctx=64, vocab_only=True, verbose=False)
    try:
        return llm.tokenize(data[:cut], add_bos=False, special=False)
    finally:
        if hasattr(llm, "close"):
            llm.close()


def dequantize_to_f32(model: str, out_path: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.pure = True
    if hasattr(params, "output_tensor_type"):
        params.output_tensor_type = GGML_TYPE_F32
    if hasattr(params, "token_embedding_type"):
        params.token_embedding_type = GGML_TYPE_F32
    with quiet():
        rc = llama_cpp.llama_model_quantize(model.encode(), out_path.encode(), ctypes.byref(params))
    if rc != 0 or not os.path.exists(out_path):
        fail(f"llama_model_quantize could not write an F32 copy of {model} (status {rc})")


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    mask = ~(np.isnan(a) | np.isnan(b))
    d = np.abs(a[mask] - b[mask])
    pos = np.nonzero(mask)[0]
    i = int(np.argmax(d))
    return float(d.max()), float(d.mean()), int(pos[i])


def ppl(lp: np.ndarray) -> float:
    return float(math.exp(-np.nanmean(lp)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="GGUF model (default: %(default)s)")
    ap.add_argument("--text", default="/work/shared/realdata/wikitext2/wiki.test.raw")
    ap.add_argument("--tokens", type=int, default=256, help="tokens kvq evaluates (default 256)")
    ap.add_argument("--window", type=int, help="passed to kvq eval (windows on fresh caches)")
    ap.add_argument("--kvq", default="build/release/tools/kvq", help="the kvq binary")
    ap.add_argument("--tsv", help="use this `kvq eval --per-token` TSV instead of running kvq")
    ap.add_argument("--policy", default="fp32", help="the kvq policy to compare (default fp32)")
    ap.add_argument("--tolerance", type=float, default=1e-2, help="max |Δ logprob| for PASS")
    ap.add_argument("--reference", choices=("native", "f32", "both"), default="both",
                    help="llama.cpp on the GGUF as is, on an F32 dequantized copy, or both")
    ap.add_argument("--judge", choices=("native", "f32"), default=None,
                    help="which reference PASS/FAIL is judged on (default: f32 when run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--noise-floor", action="store_true",
                    help="also compare llama.cpp with itself (1 thread; batches of 1 and 32)")
    args = ap.parse_args()

    try:
        import llama_cpp
    except ImportError:
        fail("llama_cpp is not importable: run this with the python of a venv that has "
             "llama-cpp-python (see the top of this file)")
    if not os.path.exists(args.model):
        fail(f"the model {args.model} does not exist (scripts/fetch_model.sh)")

    with tempfile.TemporaryDirectory(prefix="kvq_compare_") as tmp:
        tsv = args.tsv
        if tsv is None:
            if not os.path.exists(args.kvq):
                fail(f"the kvq binary {args.kvq} does not exist (or pass --tsv)")
            tsv = os.path.join(tmp, "per_token.tsv")
            run_kvq(args.kvq, args.model, args.text, args.tokens, args.window, args.policy, tsv)
        kvq = read_tsv(tsv, args.policy)
        ids = kvq.ids
        n_scored = int(np.count_nonzero(~np.isnan(kvq.logprobs)))
        print(f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}; model {args.model}")
        print(f"kvq: {len(ids)} tokens in {len(kvq.windows)} window(s), {n_scored} scored, policy "
              f"{args.policy}, perplexity {ppl(kvq.logprobs):.6f}")

        # Tokenization.
        ref_ids = llama_tokenize(args.model, args.text, len(ids))[: len(ids)]
        windows = kvq.windows
        if ref_ids == ids:
            print(f"tokenization: EQUAL (the first {len(ids)} ids of llama.cpp's tokenization of "
                  f"{args.text})")
        else:
            first = next((i for i, (x, y) in enumerate(zip(ref_ids, ids)) if x != y),
                         min(len(ref_ids), len(ids)))
            print(f"tokenization: DIFFERENT, first at position {first}: kvq "
                  f"{ids[first:first + 8]} llama.cpp {ref_ids[first:first + 8]}")

        refs: dict[str, np.ndarray] = {}
        if args.reference in ("native", "both"):
            refs["native"] = windowed(args.model, windows, args.threads, 512)
        if args.reference in ("f32", "both"):
            f32_model = os.path.join(tmp, "model-f32.gguf")
            dequantize_to_f32(args.model, f32_model, args.threads)
            refs["f32"] = windowed(f32_model, windows, args.threads, 512)

        print()
        if len(windows) > 1:
            print("(positions are counted across the windows, one after another)")
        print(f"{'kvq vs llama.cpp':<28} {'scored':>6} {'max |Δ|':>10} {'mean |Δ|':>10} "
              f"{'at pos':>6} {'ppl kvq':>10} {'ppl llama.cpp':>13}")
        results: dict[str, float] = {}
        for name, ref in refs.items():
            mx, mean, pos = compare(kvq.logprobs, ref)
            results[name] = mx
            label = "GGUF as is" if name == "native" else "F32-dequantized GGUF"
            print(f"{name + ' (' + label + ')':<28} {n_scored:>6} {mx:>10.3e} {mean:>10.3e} "
                  f"{pos:>6} {ppl(kvq.logprobs):>10.5f} {ppl(ref):>13.5f}")

        if args.noise_floor:
            print()
            print("llama.cpp vs itself (noise floor)")
            for name, ref in refs.items():
                model = args.model if name == "native" else os.path.join(tmp, "model-f32.gguf")
                for threads, batch in ((1, 512), (args.threads, 32), (args.threads, 1)):
                    other = windowed(model, windows, threads, batch)
                    mx, mean, pos = compare(ref, other)
                    print(f"  {name}: threads {args.threads} batch 512 vs threads {threads} "
                          f"batch {batch}: max |Δ| {mx:.3e}, mean |Δ| {mean:.3e} at {pos}")
            if "native" in refs and "f32" in refs:
                mx, mean, pos = compare(refs["native"], refs["f32"])
                print(f"  native vs f32 (Q8_1 activations vs float32): max |Δ| {mx:.3e}, "
                      f"mean |Δ| {mean:.3e} at {pos}")

        judge = args.judge or ("f32" if "f32" in results else "native")
        if judge not in results:
            fail(f"--judge {judge} needs --reference {judge} or both")
        ok = results[judge] <= args.tolerance
        print()
        print(f"{'PASS' if ok else 'FAIL'}: max |Δ logprob| against llama.cpp ({judge}) "
              f"{results[judge]:.3e} {'<=' if ok else '>'} tolerance {args.tolerance:g}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
