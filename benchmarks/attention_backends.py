"""fbcompile's external-attention Triton kernel against PyTorch's attention backends that return the LSE.

A split part needs its log-sum-exp, which plain SDPA does not return; PyTorch's flash and cuDNN backends
do (``aten._scaled_dot_product_flash_attention`` / ``_scaled_dot_product_cudnn_attention``). A video
chunk attends with thousands of queries per head (3 latent frames of 30 x 52 patches: 4680), where
attention is compute-bound and the Triton split-KV kernels, tuned for a text block's 4-256 rows, may
lose. Per shape (bf16, 12 heads, one KV head per query head, head dim 128): µs of each, medians of
CUDA-graph replays, the FLOP rate, and each backend's output / LSE difference from the Triton kernel's.

    PYTHONPATH=. python benchmarks/attention_backends.py --out benchmarks/results/attention_backends_h200.json
"""
from __future__ import annotations

import argparse
import json
import platform

import torch
import triton
from triton.testing import do_bench_cudagraph

from fbcompile.kernels import triton_attention

HEADS, HEAD_DIM = 12, 128
ROWS = (64, 256, 512, 1024, 2048, 4680)
KEYS = (4680, 32768)


def backends(scale):
    """``name -> fn(q, k, v) -> (out, lse [B, H, M] fp32)``."""
    def flash(q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
        return out, lse[..., :q.shape[2]]

    def cudnn(q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                      scale=scale)[:2]
        return out, lse.reshape(q.shape[:3])

    return {"triton": lambda q, k, v: triton_attention.attention_lse(q, k, v, None, scale),
            "flash": flash, "cudnn": cudnn,
            "sdpa (no LSE)": lambda q, k, v: (torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), None)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    rows = []
    gen = torch.Generator("cuda").manual_seed(0)
    scale = HEAD_DIM ** -0.5
    for n in KEYS:
        k, v = (torch.randn(1, HEADS, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "kv")
        for m in ROWS:
            q = torch.randn(1, HEADS, m, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
            flops = 4 * HEADS * m * n * HEAD_DIM
            row = dict(rows=m, keys=n)
            ref_out, ref_lse = triton_attention.attention_lse(q, k, v, None, scale)
            for name, fn in backends(scale).items():
                try:
                    out, lse = fn(q, k, v)
                    us = do_bench_cudagraph(lambda: fn(q, k, v), rep=30, return_mode="median") * 1e3
                except Exception as e:  # a backend this build or shape does not have
                    row[f"{name}_us"] = f"{type(e).__name__}: {str(e)[:60]}"
                    continue
                row.update({f"{name}_us": round(us, 2), f"{name}_tflops": round(flops / us / 1e6, 1),
                            f"{name}_out_diff": float(f"{((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item():.2g}")})
                if lse is not None:
                    row[f"{name}_lse_diff"] = float(f"{(lse.float() - ref_lse).abs().max().item():.2g}")
            print(row, flush=True)
            rows.append(row)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), heads=HEADS, head_dim=HEAD_DIM, dtype="bfloat16")
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
