"""Split reductions whose sum Inductor fuses into the consumer: is a skinny GEMM faster as fp32 partials?

At a block's 32 rows a small projection costs ~5 µs however small (``skinny_linear_h200.md``): each
program streams its weight rows through a long serial reduction. Splitting the reduction shortens that
chain but needs a sum; as a kernel of its own (``_sum_splits_kernel``, ~1.9 µs in a graph) it ate the
gain, except at the down projection. ``fbcompile::linear_partials`` leaves the sum to the graph, where
Inductor folds a sum of up to 8 terms into the kernel that reads the result anyway (RoPE, add + RMSNorm).

Two measurements, Qwen2-1.5B shapes, bf16, CUDA-graph replays over weight copies (read from HBM):

1. the GEMM alone: ``linear`` at its default config (with its sum kernel where it splits) against
   ``linear_partials`` over a grid of configs (``--grid``), and a read-only launch of the same bytes;
2. the GEMM and its consumer under ``torch.compile`` (``--combo``: with Inductor's combo kernels, as
   fbcompile compiles for CUDA), as a block step runs them: q/k/v with RoPE into the block's attention
   (also with each projection's partials summed on their own); o_proj and down with the residual add and
   the next RMSNorm. Today's form (``linear_group``, the residual added in the store) against partials
   summed by Inductor, with the number of kernels Inductor generated.

    PYTHONPATH=. python benchmarks/split_linears.py --out benchmarks/results/split_linears_h200.json
    (TORCH_LOGS=output_code shows whether each sum fused)
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform

import torch
import torch.nn.functional as F

import fbcompile.ops  # noqa: F401  (registers torch.ops.fbcompile)
from fbcompile.kernels import triton_linear as tlin
from gemm_sweep import parse_grid, read_us

HIDDEN, INTER, Q_OUT, KV_OUT, HEADS, KV_HEADS, HEAD_DIM = 1536, 8960, 1536, 256, 12, 2, 128
CASES = {"qkv": ((Q_OUT, KV_OUT, KV_OUT), HIDDEN), "o": ((HIDDEN,), Q_OUT), "down": ((HIDDEN,), INTER)}
GRID = dict(block_n=(16, 32, 64), block_k=(64, 128), splits=(1, 2, 4, 8), num_warps=(4,), num_stages=(5,))
COPY_BYTES = 150_000_000  # weights per timed case: enough copies that they come from HBM, not L2


def bench_us(fn, calls: int) -> float:
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3 / calls


def weight_copies(sizes, k, dtype, device):
    copies = max(4, -(-COPY_BYTES // (sum(sizes) * k * 2)))
    return [[torch.randn(s, k, device=device, dtype=dtype) * 0.02 for s in sizes] for _ in range(copies)]


def gemm_alone(m, dtype, device, rows, cases, grid):
    for name in cases:
        sizes, k = CASES[name]
        ws = weight_copies(sizes, k, dtype, device)
        x = torch.randn(m, k, device=device, dtype=dtype)
        ref = torch.cat([F.linear(x, w) for w in ws[0]], -1).float()
        n = sum(sizes)
        bounds = tuple(itertools.accumulate(sizes))[:-1]
        none = [None] * len(sizes)
        today = bench_us(lambda: [tlin.linear(x, w, none) for w in ws], len(ws))
        cfg = tlin.config_for(m, n, k, 132, bounds)
        rows.append(dict(part="gemm", case=name, form="linear (today)", config=cfg._asdict(), us=round(today, 2)))
        print(rows[-1], flush=True)
        read, programs = read_us(n * k, len(ws), device, dtype)
        rows.append(dict(part="gemm", case=name, form="read only (ceiling)", programs=programs, us=round(read, 2)))
        print(rows[-1], flush=True)
        results = []
        for bn, bk, sp, nw, st in itertools.product(*grid.values()):
            if any(b % bn for b in bounds) or k // sp < bk:
                continue
            c = tlin.LinearConfig(bn, 32 if m > 16 else 16, bk, sp, nw, st)
            try:
                err = ((tlin.linear_partials(x, ws[0], sp, config=c).sum(0) - ref).norm() / ref.norm()).item()
                assert err < 1e-2, err
                results.append((bench_us(lambda: [tlin.linear_partials(x, w, sp, config=c) for w in ws], len(ws)), c))
            except Exception as e:  # configs over the shared memory or registers
                print(f"  skip {c}: {type(e).__name__}: {str(e)[:80]}", flush=True)
        results.sort(key=lambda r: r[0])
        default = tlin.partials_config_for(m, n, k, tlin.partials_splits(m, n, k, 132), 132, bounds)
        for us, c in results:
            rows.append(dict(part="gemm", case=name, form="partials", config=c._asdict(), us=round(us, 2),
                             default=c == default))
            print(rows[-1], flush=True)
        del ws


def rope(t, cos, sin):
    t1, t2 = t.chunk(2, dim=-1)
    return t * cos + torch.cat([-t2, t1], dim=-1) * sin


def qkv_chain(partials: int, per_weight: bool = False):
    """q/k/v (one launch, biases), RoPE from position ids, the block's attention over itself.
    ``per_weight``: each projection's partials summed on their own (``p[..., a:b].sum(0)``) instead of
    the whole group's sum split afterwards, so no consumer reads a slice of one summed buffer (the
    biases are in the first partial)."""
    def run(x, ws, bs, pos, inv_freq):
        if partials and per_weight:
            p = torch.ops.fbcompile.linear_partials(x, ws, partials, bs)
            bounds = [0, Q_OUT, Q_OUT + KV_OUT, Q_OUT + 2 * KV_OUT]
            q, k, v = (p[..., a:e].sum(0).to(x.dtype) for a, e in zip(bounds, bounds[1:]))
        else:
            if partials:
                y = torch.ops.fbcompile.linear_partials(x, ws, partials, bs).sum(0).to(x.dtype)
            else:
                y = torch.ops.fbcompile.linear_group(x, ws, bs)
            q, k, v = y.split([Q_OUT, KV_OUT, KV_OUT], -1)
        freqs = pos[:, :, None].float() * inv_freq
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
        b, m = x.shape[:2]
        q = q.view(b, m, HEADS, HEAD_DIM).transpose(1, 2)
        k = k.view(b, m, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = v.view(b, m, KV_HEADS, HEAD_DIM).transpose(1, 2)
        return torch.ops.fbcompile.attention_lse(rope(q, cos, sin), rope(k, cos, sin), v, None, HEAD_DIM ** -0.5)[0]
    return run


def norm_chain(partials: int):
    """A projection, the residual add and the next RMSNorm (both outputs kept, as the layer keeps them)."""
    def run(x, ws, h, norm_w):
        if partials:
            h = h + torch.ops.fbcompile.linear_partials(x, ws, partials, [None] * len(ws)).sum(0).to(x.dtype)
        else:
            h = torch.ops.fbcompile.linear_group(x, ws, [None], h)
        hf = h.float()
        return h, (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * norm_w
    return run


def chains(m, dtype, device, rows, cases, combo):
    """µs per chain under ``torch.compile`` (``combo``: with Inductor's combo kernels, as fbcompile compiles
    for CUDA), and how many kernels Inductor generated for it."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.config.cache_size_limit = 64
    torch._inductor.config.combo_kernels = combo
    for name in cases:
        sizes, k = CASES[name]
        ws = weight_copies(sizes, k, dtype, device)
        x = torch.randn(1, m, k, device=device, dtype=dtype)
        n = sum(sizes)
        default = tlin.partials_splits(m, n, k, 132)
        if name == "qkv":
            bs = [torch.randn(s, device=device, dtype=dtype) * 0.02 for s in sizes]
            pos = torch.arange(32768, 32768 + m, device=device)[None]
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM))
            args = lambda w: (x, w, bs, pos, inv_freq)  # noqa: E731
            make = qkv_chain
        else:
            h = torch.randn(1, m, HIDDEN, device=device, dtype=dtype)
            norm_w = torch.randn(HIDDEN, device=device, dtype=dtype)
            args = lambda w: (x, w, h, norm_w)  # noqa: E731
            make = norm_chain
        ref = None
        forms = [(s, False) for s in [0] + sorted({2, 4, 8, default})] + ([(default, True)] if name == "qkv" else [])
        for splits, per_weight in forms:
            fn = torch.compile(make(splits, per_weight) if per_weight else make(splits), fullgraph=True, dynamic=False)
            out, code = run_and_get_code(fn, *args(ws[0]))
            out = out[-1] if isinstance(out, tuple) else out
            ref = out.float() if ref is None else ref
            err = ((out.float() - ref).norm() / ref.norm()).item()
            us = bench_us(lambda: [fn(*args(w)) for w in ws], len(ws))
            form = "today" if not splits else f"partials {splits}" + (", per-weight sums" if per_weight else "")
            rows.append(dict(part="chain", case=name, form=form, combo_kernels=combo, default=splits == default,
                             us=round(us, 2), inductor_kernels=sum(c.count("@triton.jit") for c in code),
                             rel_err_vs_today=err))
            print(rows[-1], flush=True)
        del ws


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--parts", default="gemm,chain")
    p.add_argument("--cases", default=",".join(CASES), help=f"GEMMs of both parts, of: {', '.join(CASES)}")
    p.add_argument("--grid", default="", help="config grid of the gemm part, e.g. 'splits=4,5 num_warps=4,8' "
                   f"(each key's values replace the default's: {GRID})")
    p.add_argument("--combo", action="store_true", help="chains with Inductor's combo kernels (fbcompile's default on CUDA)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    device, dtype = "cuda", torch.bfloat16
    rows = []
    if "gemm" in a.parts:
        gemm_alone(a.rows, dtype, device, rows, a.cases.split(","), parse_grid(GRID, a.grid))
    if "chain" in a.parts:
        chains(a.rows, dtype, device, rows, a.cases.split(","), a.combo)
    import triton
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), rows=a.rows, dtype="bfloat16")
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
