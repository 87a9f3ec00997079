"""Where PyTorch's flash attention should compute a split part instead of fbcompile's Triton kernels.

A video chunk attends with thousands of queries per head (e.g. 3 latent frames of 30 x 52 patches: 4680),
so its attention is compute-bound; the Triton split-KV kernels are tuned for a text block's 4-256 rows.
This times, for one KV head per query head (bf16, 12 heads, head dim 128), the external part
(``triton_attention.attention_lse``) against ``aten._scaled_dot_product_flash_attention`` with its
log-sum-exp (``fbcompile.ops._flash_attention_lse``), both as medians of CUDA-graph replays, over query
rows and key counts, with the FLOP rate each reaches. ``fbcompile.ops.FLASH_MIN_ROWS`` comes from it.

    PYTHONPATH=. python benchmarks/flash_path.py --out benchmarks/results/flash_path_h200.json
"""
from __future__ import annotations

import argparse
import json
import platform

import torch
import triton
from triton.testing import do_bench_cudagraph

from fbcompile import ops
from fbcompile.kernels import triton_attention

HEADS, HEAD_DIM = 12, 128
ROWS = (64, 256, 512, 1024, 2048, 4680)
KEYS = (4680, 32768)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rows = []
    gen = torch.Generator("cuda").manual_seed(0)
    for n in KEYS:
        k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "kv")
        for m in ROWS:
            q = torch.randn(1, HEADS, m, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            scale = HEAD_DIM ** -0.5
            t_out, t_lse = triton_attention.attention_lse(q, k, v, None, scale)
            f_out, f_lse = ops._flash_attention_lse(q, k, v, scale)
            err = ((t_out.float() - f_out.float()).norm() / f_out.float().norm()).item()
            lse_err = (t_lse - f_lse).abs().max().item()
            flops = 4 * HEADS * m * n * HEAD_DIM
            row = dict(rows=m, keys=n, out_rel_diff=float(f"{err:.2g}"), lse_max_diff=float(f"{lse_err:.2g}"))
            for name, fn in (("triton", lambda: triton_attention.attention_lse(q, k, v, None, scale)),
                             ("flash", lambda: ops._flash_attention_lse(q, k, v, scale))):
                us = do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3
                row.update({f"{name}_us": round(us, 2), f"{name}_tflops": round(flops / us / 1e6, 1)})
            row["flash_speedup"] = round(row["triton_us"] / row["flash_us"], 2)
            print(row, flush=True)
            rows.append(row)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), heads=HEADS, head_dim=HEAD_DIM, dtype="bfloat16",
                flash_min_rows=ops.FLASH_MIN_ROWS)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
