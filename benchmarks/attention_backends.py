"""fbcompile's external-attention Triton kernel against PyTorch's attention backends that return the LSE.

A split part needs its log-sum-exp, which plain SDPA does not return; PyTorch's flash and cuDNN backends
do (``aten._scaled_dot_product_flash_attention`` / ``_scaled_dot_product_cudnn_attention``). A video
chunk attends with thousands of queries per head (3 latent frames of 30 x 52 patches: 4680), where
attention is compute-bound and the Triton split-KV kernels, tuned for a text block's 4-256 rows, may
lose. Per shape (bf16, 12 heads, one KV head per query head, head dim 128): µs of each, medians of
CUDA-graph replays, the FLOP rate, and each backend's output / LSE difference from the Triton kernel's.
The ``*_count`` rows take the keys' count as a device tensor, as a graph over buffers with spare capacity
does (the Triton kernel reads it; ``cudnn_count`` turns it into a ``-inf`` bias over the padding,
``cudnn_ragged_count`` into the one sequence's length of cuDNN's ragged (nested-tensor) path, batch 1 and
tokens-first memory only; on torch 2.11 its CUDA graph capture fails: ``attention_backends_ragged_h100_s27.json``).
``--spare N`` leaves the last N keys past the count (filled with large values,
so that reading them shows); the counted rows are then compared with the Triton kernel over the count.

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


def cudnn_ragged(q, k, v, key_count, scale):
    """Batch 1 through cuDNN's ragged (nested-tensor) path: one sequence of ``key_count`` keys."""
    tokens = lambda t: t[0].transpose(0, 1)  # [S, H, D], packed only for tokens-first memory
    cum_q = torch.arange(2, dtype=torch.int32, device=q.device) * q.shape[2]  # no host copy: capturable
    cum_k = torch.cat([key_count.new_zeros(1), key_count]).to(torch.int32)
    out, lse = torch.ops.aten._cudnn_attention_forward(tokens(q), tokens(k), tokens(v), None, cum_q, cum_k,
                                                       q.shape[2], k.shape[2], True, scale=scale)[:2]
    return out.transpose(0, 1)[None], lse.reshape(q.shape[2], q.shape[1]).t()[None]


def backends(scale, spare=0):
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
        return lambda q, k, v: fn(q, k, v, torch.full((1,), k.shape[2] - spare, dtype=torch.int32, device=k.device))

    return {"triton": lambda q, k, v: triton_attention.attention_lse(q, k, v, None, scale),
            "triton_count": counted(lambda q, k, v, n: triton_attention.attention_lse(q, k, v, None, scale, n)),
            "flash": flash, "cudnn": cudnn,
            "cudnn_count": counted(cudnn_bias), "cudnn_ragged_count": counted(lambda q, k, v, n: cudnn_ragged(q, k, v, n, scale)),
            "sdpa (no LSE)": lambda q, k, v: (torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale), None)}


def ragged_replay_error(q, k, v, scale) -> str:
    """cuDNN's ragged path captured in a CUDA graph at one key count and replayed at others: the output's
    relative difference from the Triton kernel's at each count (a replay must read the count it finds)."""
    count = torch.full((1,), k.shape[2], dtype=torch.int32, device=k.device)
    fn = lambda: cudnn_ragged(q, k, v, count, scale)
    try:
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, _ = fn()
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:80]}"
    errors = []
    for n in (k.shape[2], k.shape[2] // 2, 1000, 17):
        count.fill_(n)
        graph.replay()
        ref, _ = triton_attention.attention_lse(q, k, v, None, scale, count)
        errors.append(f"{n}: {((out.float() - ref.float()).norm() / ref.float().norm()).item():.2g}")
    return ", ".join(errors)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="queries per head, comma-separated")
    p.add_argument("--keys", default=",".join(map(str, KEYS)), help="keys per head, comma-separated")
    p.add_argument("--spare", type=int, default=0, help="keys past the count in the *_count rows")
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
            if a.spare:
                k[:, :, n - a.spare:] = 30.0
                v[:, :, n - a.spare:] = 30.0
            count = torch.full((1,), n - a.spare, dtype=torch.int32, device="cuda")
            kept = (q, k[:, :, :n - a.spare], v[:, :, :n - a.spare])  # the counted keys alone
            ref = {False: triton_attention.attention_lse(*kept, None, scale),
                   True: triton_attention.attention_lse(q, k, v, None, scale, count)}
            for name, fn in backends(scale, a.spare).items():
                ref_out, ref_lse = ref[name.endswith("_count")]
                args = (q, k, v) if name.endswith("_count") else kept
                try:
                    out, lse = fn(*args)
                    us = do_bench_cudagraph(lambda: fn(*args), rep=30, return_mode="median") * 1e3
                except Exception as e:  # a backend this build or shape does not have
                    row[f"{name}_us"] = f"{type(e).__name__}: {str(e)[:60]}"
                    continue
                row.update({f"{name}_us": round(us, 2), f"{name}_tflops": round(flops / us / 1e6, 1),
                            f"{name}_out_diff": float(f"{((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item():.2g}")})
                if lse is not None:
                    row[f"{name}_lse_diff"] = float(f"{(lse.float() - ref_lse).abs().max().item():.2g}")
            print(row, flush=True)
            rows.append(row)
        if a.layout == "bshd":
            rows.append(dict(keys=n, ragged_replay=ragged_replay_error(randn(1024), k, v, scale)))
            print(rows[-1], flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), heads=HEADS, head_dim=HEAD_DIM, dtype="bfloat16", layout=a.layout,
                spare=a.spare)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
