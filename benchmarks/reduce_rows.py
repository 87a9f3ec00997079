"""Rows per program of the split-KV reduction (``_reduce_kernel``): the LM's exact step at 32 queries.

At Qwen2-1.5B's 12 query / 2 KV heads a block of 32 queries packs 192 rows per KV head; at 32K keys the
external kernel writes 44 splits of fp32 partials per row (8.7 MB), and the reduction that reads them
took 5.3 µs per layer step on the H100 (``profile_lm_32k_b1_h100_s23.md``), launched as 96 programs of
4 rows, fewer than the SMs. Only the grid changes (and, on the GPU, the order of the fp32 sums: the
results differ in rounding, not bit for bit; equal in Triton's interpreter). Times the external attention
with its reduction (CUDA-graph replays, KV beyond L2) at 1-8 rows per program.

    python benchmarks/reduce_rows.py --out benchmarks/results/reduce_rows_h100.json
"""
from __future__ import annotations

import argparse
import json
import platform

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled

from attention import graph_us, inputs
from fbcompile.kernels import triton_attention as ta

SHAPES = [(12, 2, 128, 32, 32768), (12, 2, 128, 32, 131072), (12, 2, 128, 64, 32768), (32, 8, 128, 32, 32768),
          (12, 2, 128, 256, 32768)]  # (query heads, KV heads, head dim, queries, keys)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for hq, hkv, d, m, n in SHAPES:
        sets = inputs(hq, hkv, d, m, n, max(1, -(-240 * 2**20 // (4 * hkv * n * d))))
        q, k, v = sets[0]
        scale = d ** -0.5
        with set_wrap_triton_enabled(False):  # plain launches, as the op body runs them
            ref = ta._attention(q, k, v, None, scale)[0]
            for per_program in (1, 2, 4, 8):
                out = ta._attention(q, k, v, None, scale, REDUCE_ROWS=per_program)[0]
                us = graph_us(lambda q, k, v: ta._attention(q, k, v, None, scale, REDUCE_ROWS=per_program), sets)
                splits = ta._plan(q, k, v, True, {})[1]
                rows.append(dict(hq=hq, hkv=hkv, d=d, M=m, keys=n, splits=splits, reduce_rows=per_program,
                                 us=round(us, 2), equal_to_4=bool(torch.equal(out, ref))))
                print(rows[-1], flush=True)
        del sets
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=triton.__version__, python=platform.python_version(),
                command="python benchmarks/reduce_rows.py --out " + args.out)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
