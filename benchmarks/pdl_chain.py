"""Programmatic dependent launch (PDL) over a layer step's chain of fbcompile kernels.

At a block's 32 rows each launch of a reuse step is short (2-18 µs), and each pays a fixed cost: the launch,
the programs' setup, the ramp of memory requests, the tail (``linear_tune_h200.md``). With PDL
(``fbcompile.kernels.triton_common.pdl_launch``, Hopper) the next kernel is launched while this one runs
and waits on the device for it to finish, so launch and setup overlap the tail. The ops launch with PDL
where they run their own host code: eagerly, and inside fbcompile's CUDA-graphed graphs (the ops are
opaque to Inductor there).

One layer of Qwen2-1.5B's reuse step per chain link, as the LM runs it at batch 1, block 32, over
weight copies (read from HBM), as a CUDA graph: q/k/v (one launch), the block's attention over itself
merged with a cached external part, o_proj plus the residual, gate/up gated, down plus the residual
(split, with its sum launch); ``--norms`` also runs plain PyTorch RMSNorms between, launched without PDL
as Inductor's kernels are. Each form with PDL off and on (``FBCOMPILE_PDL``, read per device).

    PYTHONPATH=. python benchmarks/pdl_chain.py --out benchmarks/results/pdl_chain_h100.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch

import fbcompile.ops  # noqa: F401  (registers torch.ops.fbcompile)
from fbcompile.kernels import triton_common

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, ROWS = 1536, 8960, 12, 2, 128, 32
LAYERS = 8  # ~750 MB of weights: read from HBM, not L2


def layer_weights(device, dtype):
    def w(n, k):
        return torch.randn(n, k, device=device, dtype=dtype) * 0.02
    return dict(q=w(HIDDEN, HIDDEN), k=w(KV_HEADS * HEAD_DIM, HIDDEN), v=w(KV_HEADS * HEAD_DIM, HIDDEN),
                bq=torch.zeros(HIDDEN, device=device, dtype=dtype), bk=torch.zeros(KV_HEADS * HEAD_DIM, device=device,
                                                                                  dtype=dtype),
                bv=torch.zeros(KV_HEADS * HEAD_DIM, device=device, dtype=dtype),
                o=w(HIDDEN, HIDDEN), gate=w(INTER, HIDDEN), up=w(INTER, HIDDEN), down=w(HIDDEN, INTER))


def rms(x):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


def step(h, layers, ext, norms: bool):
    """One reuse step over ``layers``: the fbcompile ops of each layer (and RMSNorms with ``norms``)."""
    ops = torch.ops.fbcompile
    for w, (out_ext, lse_ext) in zip(layers, ext):
        x = rms(h) if norms else h
        qkv = ops.linear_group(x, [w["q"], w["k"], w["v"]], [w["bq"], w["bk"], w["bv"]])
        q, k, v = qkv.split([HIDDEN, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
        q = q.view(1, ROWS, HEADS, HEAD_DIM).transpose(1, 2)
        k = k.view(1, ROWS, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = v.view(1, ROWS, KV_HEADS, HEAD_DIM).transpose(1, 2)
        a = ops.attention_merge_lse(q, k, v, None, HEAD_DIM ** -0.5, out_ext, lse_ext)[0]
        h = ops.linear_group(a.transpose(1, 2).reshape(1, ROWS, HIDDEN), [w["o"]], [None], h)
        x = rms(h) if norms else h
        g = ops.gated_linear(x, w["gate"], w["up"], None, None, "silu")
        h = ops.linear_group(g, [w["down"]], [None], h)
    return h


def measure(norms: bool, pdl: str, layers, ext, h0):
    from triton.testing import do_bench_cudagraph
    os.environ["FBCOMPILE_PDL"] = pdl
    triton_common._runs_pdl.cache_clear()
    out = step(h0, layers, ext, norms)  # compiles
    ms = do_bench_cudagraph(lambda: step(h0, layers, ext, norms), rep=50, return_mode="median")
    return ms * 1e3 / len(layers), out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    layers = [layer_weights(device, dtype) for _ in range(LAYERS)]
    ext = [(torch.randn(1, HEADS, ROWS, HEAD_DIM, device=device, dtype=dtype),
            torch.randn(1, HEADS, ROWS, device=device, dtype=torch.float32) + 5) for _ in range(LAYERS)]
    h0 = torch.randn(1, ROWS, HIDDEN, device=device, dtype=dtype)
    rows = []
    for norms in (False, True):
        ref = None
        for pdl in ("0", "1", "early"):
            us, out = measure(norms, pdl, layers, ext, h0)
            err = 0.0 if ref is None else ((out.float() - ref).norm() / ref.norm()).item()
            ref = out.float() if ref is None else ref
            rows.append(dict(norms=norms, pdl=pdl, us_per_layer=round(us, 2), rel_err_vs_no_pdl=err))
            print(rows[-1], flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=__import__("triton").__version__, python=platform.python_version(),
                command="PYTHONPATH=. python benchmarks/pdl_chain.py --out " + args.out)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
