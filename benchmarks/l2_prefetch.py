"""Probe: prefetch a layer's MLP weights into L2 while its short kernels run.

At batch 1 a block step's weight GEMMs read the weights at ~70% of the HBM bandwidth, and between them
run kernels that read little (the norms, RoPE, a reuse step's attention, the launch-bound q/k/v and
o_proj GEMMs: ~15 us per layer on the H100 in which HBM is mostly idle). The gate/up GEMM that follows
reads 55 MB. If the layer's first launch asks the TMA unit to bring a prefix of the gate/up weights into
L2 (``cp.async.bulk.prefetch.L2``: one instruction per chunk, nothing waits for it), the GEMM finds that
prefix there and reads less from HBM.

``--chain``: 28 layers of Qwen2-1.5B's reuse step at 32 rows (fbcompile's GEMM kernels, the block's
attention merged with a cached external part, the glue in eager PyTorch), one CUDA graph, per layer,
against how many MB of the gate/up weights are prefetched and how.

``--micro``: does a prefetched prefix make a later read of it faster, and what does the prefetch launch
cost, with an idle window (a spin kernel) between them?

    PYTHONPATH=. python benchmarks/l2_prefetch.py --chain --out benchmarks/results/l2_prefetch_chain_h100.json
    PYTHONPATH=. python benchmarks/l2_prefetch.py --micro --out benchmarks/results/l2_prefetch_micro_h100.json

Measured on the H100 (``benchmarks/results/session41_h100.md``): slower, not built.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fbcompile.kernels import triton_attention as ta  # noqa: E402
from fbcompile.kernels import triton_linear as tlin  # noqa: E402

MB = 2**20
_CHUNK = 16384  # bytes per prefetch instruction
_THREADS = 128


@triton.jit
def _prefetch_kernel(A, a_bytes, B, b_bytes, C, c_bytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                     EVICT_LAST: tl.constexpr, LINES: tl.constexpr):
    """Ask L2 for the first ``a_bytes`` of ``A``, ``b_bytes`` of ``B``, ``c_bytes`` of ``C``: each thread
    one chunk of ``CHUNK`` bytes, by one bulk prefetch (TMA) or (``LINES``) one per 128-byte line."""
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * CHUNK
    a_chunks = tl.cdiv(a_bytes, CHUNK)
    b_chunks = tl.cdiv(b_bytes, CHUNK)
    chunk = offs // CHUNK
    in_a = chunk < a_chunks
    in_b = (chunk >= a_chunks) & (chunk < a_chunks + b_chunks)
    base_b = (a_chunks * CHUNK).to(tl.int64)
    base_c = ((a_chunks + b_chunks) * CHUNK).to(tl.int64)
    addr = tl.where(in_a, A.to(tl.int64) + offs,
                    tl.where(in_b, B.to(tl.int64) + (offs - base_b), C.to(tl.int64) + (offs - base_c)))
    left = tl.where(in_a, a_bytes - offs, tl.where(in_b, b_bytes - (offs - base_b), c_bytes - (offs - base_c)))
    size = tl.minimum(left, CHUNK)
    ok = size > 0
    size = tl.maximum(size, 0).to(tl.int32)
    if LINES:
        for line in tl.static_range(CHUNK // 128):
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; "
                "mov.b32 $0, 0; }",
                "=r,l,r", [addr + line * 128, size - line * 128], dtype=tl.int32, is_pure=False, pack=1)
    elif EVICT_LAST:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b64 pol; setp.ne.b32 p, $3, 0; createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
            "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.b32 $0, 0; }",
            "=r,l,r,r", [addr, size, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r,r", [addr, size, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


def prefetch(parts, how="bulk"):
    """One launch asking L2 for ``parts``: up to three ``(tensor, bytes)`` (bytes from the start)."""
    parts = [(t, min(int(n), t.numel() * t.element_size()) // 16 * 16) for t, n in parts]
    parts = (parts + [(parts[0][0], 0)] * 3)[:3]
    total = sum(-(-n // _CHUNK) for _, n in parts)
    grid = (max(1, -(-total // _THREADS)),)
    _prefetch_kernel[grid](parts[0][0], parts[0][1], parts[1][0], parts[1][1], parts[2][0], parts[2][1],
                           CHUNK=_CHUNK, BLOCK=_THREADS, EVICT_LAST=how == "evict_last", LINES=how == "lines",
                           num_warps=_THREADS // 32)


# --------------------------------------------------------------------------- chain


class Layer:
    def __init__(self, hidden=1536, heads=12, kv_heads=2, d=128, inter=8960, rows=32):
        mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16) * 0.02  # noqa: E731
        self.wq, self.wk, self.wv = mk(heads * d, hidden), mk(kv_heads * d, hidden), mk(kv_heads * d, hidden)
        self.bq, self.bk, self.bv = mk(heads * d), mk(kv_heads * d), mk(kv_heads * d)
        self.wo, self.wg, self.wu, self.wd = mk(hidden, heads * d), mk(inter, hidden), mk(inter, hidden), mk(hidden, inter)
        self.n1, self.n2 = torch.ones(hidden, device="cuda", dtype=torch.bfloat16), torch.ones(
            hidden, device="cuda", dtype=torch.bfloat16)
        self.out_ext = torch.randn(1, heads, rows, d, device="cuda", dtype=torch.bfloat16)
        self.lse_ext = torch.randn(1, heads, rows, device="cuda", dtype=torch.float32) + 8
        self.shape = (heads, kv_heads, d, rows)


def _rms(x, w):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w


def layer_step(x, L, plan):
    heads, kv_heads, d, rows = L.shape
    h = _rms(x, L.n1)
    if plan is not None:
        plan(L)
    qkv = tlin.linear_partials(h, [L.wq, L.wk, L.wv], 4, [L.bq, L.bk, L.bv]).sum(0).to(x.dtype)
    q = qkv[:, :heads * d].view(1, rows, heads, d).transpose(1, 2) * 1.0001
    k = qkv[:, heads * d:(heads + kv_heads) * d].view(1, rows, kv_heads, d).transpose(1, 2) * 1.0001
    v = qkv[:, (heads + kv_heads) * d:].view(1, rows, kv_heads, d).transpose(1, 2)
    o, _ = ta.attention_merge_lse(q, k.contiguous(), v.contiguous(), None, d**-0.5, L.out_ext, L.lse_ext)
    x = x + tlin.linear_partials(o.transpose(1, 2).reshape(rows, heads * d), [L.wo], 4).sum(0).to(x.dtype)
    g = tlin.linear(_rms(x, L.n2), [L.wg, L.wu], [None, None], act="silu")
    return x + tlin.linear_partials(g, [L.wd], 5).sum(0).to(x.dtype)


def gate_up_plan(mb, how="bulk", down_mb=0):
    if mb == 0 and down_mb == 0:
        return None

    def plan(L):
        half = mb * MB // 2
        prefetch([(L.wg, half), (L.wu, half), (L.wd, down_mb * MB)], how)
    return plan


def chain(out):
    from triton.testing import do_bench_cudagraph
    layers = [Layer() for _ in range(28)]
    x0 = torch.randn(32, 1536, device="cuda", dtype=torch.bfloat16)
    variants = [("none", gate_up_plan(0)), ("empty launch", lambda L: prefetch([(L.wg, 0)]))]
    variants += [(f"bulk {mb} MB", gate_up_plan(mb)) for mb in (8, 16, 24, 32, 40, 55)]
    variants += [("bulk 24 MB evict_last", gate_up_plan(24, "evict_last")),
                 ("lines 24 MB evict_last", gate_up_plan(24, "lines")),
                 ("bulk 24 MB + down 8 MB", gate_up_plan(24, down_mb=8)),
                 ("bulk 32 MB + down 8 MB", gate_up_plan(32, down_mb=8)),
                 ("none (again)", gate_up_plan(0))]

    def run(plan):
        x = x0
        for L in layers:
            x = layer_step(x, L, plan)
        return x

    ref = run(None)
    rows = []
    for name, plan in variants:
        y = run(plan)
        us = do_bench_cudagraph(lambda: run(plan), rep=200, return_mode="median") * 1e3 / len(layers)
        rows.append(dict(variant=name, us_per_layer=round(us, 2), equal=bool(torch.equal(y, ref))))
        print(rows[-1], flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                command="PYTHONPATH=. python benchmarks/l2_prefetch.py --chain --out " + out)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


# --------------------------------------------------------------------------- micro


def micro(out):
    """Does a prefetched prefix make a later read faster? One CUDA graph per variant: read 256 MB (L2
    flushed), optionally prefetch ``mb`` of ``w``, spin ~``spin`` cycles (the idle window), read ``w``."""
    from triton.testing import do_bench_cudagraph
    flush = torch.empty(256 * MB, device="cuda", dtype=torch.int8)
    ws = [torch.randn(12 * MB, device="cuda", dtype=torch.bfloat16) for _ in range(8)]  # 24 MB each
    sink = torch.empty(len(ws), device="cuda", dtype=torch.float32)
    rows = []
    for how in ("bulk", "lines"):
        for mb in (8, 24):
            for spin in (20000, 60000):
                def seq(pf, read):
                    for i, w in enumerate(ws):
                        flush.sum()
                        if pf:
                            prefetch([(w, mb * MB)], how)
                        torch.cuda._sleep(spin)
                        if read:
                            torch.sum(w[: mb * MB // 2], 0, dtype=torch.float32, out=sink[i])
                t = {(pf, read): do_bench_cudagraph(lambda: seq(pf, read), rep=100, return_mode="median") * 1e3 / len(ws)
                     for pf in (False, True) for read in (False, True)}
                rows.append(dict(how=how, mb=mb, spin=spin, read_us=round(t[False, True] - t[False, False], 2),
                                 read_after_prefetch_us=round(t[True, True] - t[True, False], 2),
                                 prefetch_cost_us=round(t[True, False] - t[False, False], 2)))
                print(rows[-1], flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                command="PYTHONPATH=. python benchmarks/l2_prefetch.py --micro --out " + out)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chain", action="store_true")
    p.add_argument("--micro", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.micro:
        micro(args.out)
    if args.chain:
        chain(args.out)
