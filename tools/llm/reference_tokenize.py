#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Reference token ids for a byte-level BPE GGUF model, from Hugging Face `tokenizers`.

Builds a `tokenizers` BPE from the GGUF's own vocabulary and merges (tokenizer.ggml.tokens,
tokenizer.ggml.merges) with the pre-tokenizer that tokenizer.ggml.pre names ("smollm":
Digits(individual_digits) then ByteLevel's GPT-2 regex; "gpt2"/"default": ByteLevel only), no
special-token handling and no BOS: the same contract as kvq's BpeTokenizer::encode. It is an
independent implementation to check kvq's tokenizer against.

Needs: pip install gguf tokenizers numpy

Usage:
  reference_tokenize.py MODEL.gguf "some text" ["more text" ...]
      prints the ids of each string, space separated, one line per string
  reference_tokenize.py MODEL.gguf --file TEXT [--max-bytes N]
      prints the ids of the file's text (its first N bytes, cut back to a UTF-8 character
      boundary), one id per line
  reference_tokenize.py MODEL.gguf --file TEXT [--max-bytes N] --compare IDS
      compares with the whitespace-separated ids in the file IDS (e.g. what kvq printed for the
      same text): prints the token counts, the number of mismatching positions and the first
      mismatch with its context; exits 1 when they differ
"""

import argparse
import sys

import gguf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def _strings(reader, key):
    field = reader.fields[key]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


def _string(reader, key, default=None):
    if key not in reader.fields:
        return default
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def build_tokenizer(path):
    reader = gguf.GGUFReader(path)
    model = _string(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        sys.exit(f"{path}: tokenizer.ggml.model = {model!r}; expected 'gpt2'")
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # kvq keeps the first id of a duplicated token text
    merges = []
    for m in _strings(reader, "tokenizer.ggml.merges"):
        cut = m.find(" ", 1)  # the split rule of kvq and llama.cpp
        merges.append((m[:cut], m[cut + 1:]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    pre = _string(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt2", "default"):
        tok.pre_tokenizer = byte_level
    else:
        sys.exit(f"{path}: tokenizer.ggml.pre = {pre!r}; expected 'smollm', 'gpt2' or 'default'")
    tok.decoder = decoders.ByteLevel()
    return tok


def read_text(path, max_bytes):
    data = open(path, "rb").read()
    if max_bytes is not None and max_bytes < len(data):
        n = max_bytes
        while n > 0 and (data[n] & 0xC0) == 0x80:
            n -= 1
        data = data[:n]
    return data.decode("utf-8")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("texts", nargs="*")
    ap.add_argument("--file")
    ap.add_argument("--max-bytes", type=int)
    ap.add_argument("--compare")
    args = ap.parse_args()
    tok = build_tokenizer(args.model)

    if args.file is None:
        for text in args.texts:
            print(" ".join(str(i) for i in tok.encode(text, add_special_tokens=False).ids))
        return 0

    text = read_text(args.file, args.max_bytes)
    ids = tok.encode(text, add_special_tokens=False).ids
    if args.compare is None:
        sys.stdout.write("".join(f"{i}\n" for i in ids))
        return 0

    theirs = [int(x) for x in open(args.compare).read().split()]
    mismatches = sum(1 for a, b in zip(ids, theirs) if a != b) + abs(len(ids) - len(theirs))
    print(f"{args.file}: {len(text.encode('utf-8'))} bytes, reference {len(ids)} tokens, "
          f"compared {len(theirs)} tokens, {mismatches} mismatching positions")
    if mismatches:
        first = next((k for k, (a, b) in enumerate(zip(ids, theirs)) if a != b), min(len(ids), len(theirs)))
        lo = max(0, first - 5)
        print(f"first mismatch at token {first}:")
        print(f"  reference {ids[lo:first + 5]} = {[tok.decode([i]) for i in ids[lo:first + 5]]}")
        print(f"  compared  {theirs[lo:first + 5]} = {[tok.decode([i]) for i in theirs[lo:first + 5]]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
