"""fbcompile's external-attention Triton kernel against PyTorch's attention backends that return the LSE.

A split part needs its log-sum-exp, which plain SDPA does not return; PyTorch's flash and cuDNN backends
do (``aten._scaled_dot_product_flash_attention`` / ``_scaled_dot_product_cudnn_attention``). A video
chunk attends with thousands of queries per head (3 latent frames of 30 x 52 patches: 4680), where
attention is compute-bound and the Triton split-KV kernels, tuned for a text block's 4-256 rows, may
lose. Per shape (bf16, 12 heads, one KV head per query head, head dim 128): µs of each, medians of
CUDA-graph replays, the FLOP rate, and each backend's output / LSE difference from the Triton kernel's.
The ``*_count`` rows take the keys' count as a device tensor, as a graph over buffers with spare capacity
does (the Triton kernel reads it; fbcompile's cuDNN path turns it into a ``-inf`` bias over the padding).

    PYTHONPATH=. python benchmarks/attention_backends.py --out benchmarks/results/attention_backends_h200.json
    PYTHONPATH=. python benchmarks/attention_backends.py --layout bshd --rows 256,1024,4096,4680 --out ...
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

    def cudnn(q, k, v, bias=None):
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, False, False,
                                                                      scale=scale)[:2]
        return out, lse.reshape(q.shape[:3])

    def cudnn_bias(q, k, v, key_count):  # -inf over the keys past the count
        padding = torch.arange(k.shape[2], device=k.device) >= key_count.reshape(())
        bias = torch.zeros(1, 1, 1, k.shape[2], dtype=q.dtype, device=q.device).masked_fill(padding, float("-inf"))
        return cudnn(q, k, v, bias)

    def counted(fn):  # the form of a graph over buffers with spare capacity: a key count on the device
        return lambda q, k, v: fn(q, k, v, torch.full((1,), k.shape[2], dtype=torch.int32, device=k.device))

    return {"triton": lambda q, k, v: triton_attention.attention_lse(q, k, v, None, scale),
            "triton_count": counted(lambda q, k, v, n: triton_attention.attention_lse(q, k, v, None, scale, n)),
            "flash": flash, "cudnn": cudnn,
            "cudnn_count": counted(cudnn_bias),
            "sdpa (no LSE)": lambda q, k, v: (torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), None)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="queries per head, comma-separated")
    p.add_argument("--keys", default=",".join(map(str, KEYS)), help="keys per head, comma-separated")
    p.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd",
                   help="memory order of q/k/v: bshd is a [B, S, H, D] tensor seen as [B, H, S, D] (the video DiT's)")
    a = p.parse_args()
    rows = []
    gen = torch.Generator("cuda").manual_seed(0)
    scale = HEAD_DIM ** -0.5
    def randn(length):
        shape = (1, HEADS, length, HEAD_DIM) if a.layout == "bhsd" else (1, length, HEADS, HEAD_DIM)
        t = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
        return t if a.layout == "bhsd" else t.transpose(1, 2)

    for n in map(int, a.keys.split(",")):
        k, v = randn(n), randn(n)
        for m in map(int, a.rows.split(",")):
            q = randn(m)
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
                python=platform.python_version(), heads=HEADS, head_dim=HEAD_DIM, dtype="bfloat16", layout=a.layout)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
