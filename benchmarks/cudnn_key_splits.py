"""The external part of a text block's attention on cuDNN, its keys split over extra heads, against the Triton kernel.

The external part of a block of ``M`` queries over ``L`` cached keys has ``GQA * M`` rows per KV head (192 for
Qwen2-1.5B's 12 / 2 heads and a block of 32), too few for cuDNN's fused attention, which gives each 128 rows of
a head one program that walks all the keys (``attention_backends_h200.md``: 0.16-0.49x the Triton kernel at
64-256 rows). Here the rows of a KV head's query heads are packed into one head (a view of ``q``), the keys are
cut into ``S`` slices that become ``S`` heads (a view of ``k`` / ``v``: ``[B, Hkv, L, D]`` read as ``[B * Hkv,
S, L / S, D]``: batch and KV head as one batch dim, the slices as heads), the packed queries are given once per
slice (copied, or a view of stride 0), and the ``S`` partial results are combined by their LSEs. Timed (bf16,
medians of CUDA-graph replays, each replay over 8 distinct caches so that the KV comes from HBM): the Triton op
as fbcompile runs it today, cuDNN's call alone, the query copy, and the whole (copy, cuDNN, combine compiled by
Inductor), with the whole's error against the Triton op, and the Triton kernel over one slice's keys less one in
one split (what a key count's partial last slice would cost).

    PYTHONPATH=. python benchmarks/cudnn_key_splits.py --out benchmarks/results/cudnn_key_splits_h100.json
"""
from __future__ import annotations

import argparse
import json
import math
import platform

import torch
import triton

import fbcompile  # noqa: F401  (registers torch.ops.fbcompile.*)
from benchmarks.attention import graph_us  # median µs of one call, CUDA-graph replays of one call per cache
from fbcompile.kernels import triton_attention

CACHES = 8
CASES = [  # (batch, query heads, KV heads, head dim, block queries, keys)
    (1, 12, 2, 128, 32, 32768), (1, 12, 2, 128, 32, 131072), (8, 12, 2, 128, 32, 32768),
    (8, 12, 2, 128, 32, 131072), (1, 12, 2, 128, 64, 32768), (1, 8, 4, 256, 32, 32768), (1, 8, 4, 256, 64, 32768),
]


def packed_queries(q: torch.Tensor, hkv: int, splits: int, copy: bool = True) -> torch.Tensor:
    """``[B, Hq, M, D]`` as ``[B * Hkv, S, GQA * M, D]``: each KV head's query rows packed into one head, the
    same for every slice: copied, or a view with stride 0 across the slices."""
    B, Hq, M, D = q.shape
    packed = q.reshape(B * hkv, 1, Hq // hkv * M, D).expand(B * hkv, splits, Hq // hkv * M, D)
    return packed.contiguous() if copy else packed


def cudnn_slices(qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, splits: int, scale: float):
    """cuDNN over the ``S`` key slices (``[B, Hkv, L, D]`` read as ``[B * Hkv, S, L / S, D]``, a view):
    ``(out [B * Hkv, S, R, D], lse [B * Hkv, S, R])``."""
    B, hkv, L, D = k.shape
    ks, vs = (t.reshape(B * hkv, splits, L // splits, t.shape[-1]) for t in (k, v))
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(qs, ks, vs, None, True, 0.0, False, False,
                                                                  scale=scale)[:2]
    return out, lse.reshape(qs.shape[:3])


def combine(out: torch.Tensor, lse: torch.Tensor, hq: int, hkv: int, splits: int):
    """The ``S`` slices' results as one ``(out [B, Hq, M, D], lse [B, Hq, M])``."""
    _, _, R, D = out.shape
    B = out.shape[0] // hkv
    top = lse.amax(1, keepdim=True)
    w = torch.exp(lse - top)
    total = w.sum(1)
    o = (w[..., None] * out.float()).sum(1) / total[..., None]
    M = R * hkv // hq
    return o.to(out.dtype).reshape(B, hq, M, D), (top.squeeze(1) + torch.log(total)).reshape(B, hq, M)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--splits", default="", help="key slices to try, comma-separated (default: those giving "
                   "about 1/2, 1, 2 and 4 programs of 128 rows per SM)")
    a = p.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    torch._dynamo.config.recompile_limit = 1024  # a recompile (another slice count) must not fall back to eager
    combined = torch.compile(combine, dynamic=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), python=platform.python_version(), caches=CACHES)
    rows = []
    for B, hq, hkv, D, M, L in CASES:
        scale = D ** -0.5
        q = torch.randn(B, hq, M, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        caches = [(q, *(torch.randn(B, hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "kv"))
                  for _ in range(CACHES)]
        flops = 4 * B * hq * M * L * D
        kv_bytes = 2 * B * hkv * L * D * 2
        triton_us = graph_us(lambda q, k, v: torch.ops.fbcompile.attention_lse(q, k, v, None, scale), caches)
        ref_out, ref_lse = torch.ops.fbcompile.attention_lse(*caches[0], None, scale)
        row = dict(batch=B, heads=f"{hq}/{hkv}", head_dim=D, queries=M, keys=L, triton_us=round(triton_us, 2),
                   triton_tflops=round(flops / triton_us / 1e6), triton_hbm_tbps=round(kv_bytes / triton_us / 1e6, 2))
        per_slice = B * hkv * -(-(hq // hkv * M) // 128)  # cuDNN's programs per slice
        wave = 1 << max(0, round(math.log2(max(1, sms / per_slice))))
        for S in map(int, a.splits.split(",")) if a.splits else sorted({max(1, wave // 2), wave, 2 * wave, 4 * wave}):
            if L % S:
                continue
            for copied in (True, False):
                name = f"S{S}" + ("" if copied else "_view")
                try:
                    qs = packed_queries(q, hkv, S, copied)
                    core = graph_us(lambda q, k, v: cudnn_slices(qs, k, v, S, scale), caches)
                    copy = graph_us(lambda q, k, v: packed_queries(q, hkv, S, copied), caches)

                    def whole(q, k, v):
                        return combined(*cudnn_slices(packed_queries(q, hkv, S, copied), k, v, S, scale), hq, hkv, S)
                    out, lse = whole(*caches[0])
                    total = graph_us(whole, caches)
                    n = L // S  # a count's tail: the keys of its last, partial slice (at most n - 1), one split
                    tail = graph_us(lambda q, k, v: triton_attention.attention_lse(
                        q, k[:, :, :n - 1], v[:, :, :n - 1], None, scale, num_splits=1), caches)
                except Exception as e:  # a shape or layout this cuDNN build does not take
                    row[name] = f"{type(e).__name__}: {str(e)[:80]}"
                    continue
                err = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
                row[name] = dict(cudnn_us=round(core, 2), copy_us=round(copy, 2), whole_us=round(total, 2),
                                 tail_us=round(tail, 2),
                                 whole_tflops=round(flops / total / 1e6), out_err=float(f"{err:.2g}"),
                                 lse_err=float(f"{(lse - ref_lse).abs().max().item():.2g}"),
                                 out_strides=list(cudnn_slices(qs, *caches[0][1:], S, scale)[0].stride()))
        print(row, flush=True)
        rows.append(row)
        del caches
        torch.cuda.empty_cache()
        with open(a.out, "w") as f:  # after each case: a run cut short keeps what it measured
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
