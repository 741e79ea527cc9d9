#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Loops of a SASS listing: each backward branch's range, its instruction count and its HMMAs.

The block loop's dynamic instructions per iteration are its count plus (trips - 1) times each
inner loop's count (bench/gpu/NOTES.md). Without a GPU: cuobjdump comes from PyPI
(`pip download --no-deps nvidia-cuda-cuobjdump`, unzip, bin/cuobjdump), e.g.

  nvcc -std=c++20 -O3 -arch=sm_90a -cubin -Iinclude one.cu -o one.cubin -Xptxas=-v
  cuobjdump -sass one.cubin > one.sass && python3 scripts/sass_loops.py one.sass

where one.cu explicitly instantiates one kernel, e.g.
  template __global__ void kvq::cuda::detail::kivi_decode_kernel<__half, 2, 2, 128, 128, 128>(
      const kvq::cuda::DecodeAttentionArgs);
"""
import re
import sys


def main(path):
    ins = []
    for line in open(path):
        m = re.match(r'\s+/\*([0-9a-f]{4,})\*/\s+(.*?);', line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    index = {a: i for i, (a, _) in enumerate(ins)}
    for i, (a, text) in enumerate(ins):
        m = re.search(r'BRA\s+.*?0x([0-9a-f]+)', text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target <= a and target in index:
            body = ins[index[target]:i + 1]
            hmma = sum('HMMA' in x for _, x in body)
            print(f"loop {target:#x}-{a:#x}: {len(body)} instructions, {hmma} HMMA")


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit('usage: sass_loops.py FILE.sass')
    main(sys.argv[1])
