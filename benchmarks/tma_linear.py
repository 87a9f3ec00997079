"""Can a TMA-fed Triton GEMM beat cuBLAS at batch 8's 256 rows (gate/up and down of Qwen2-1.5B)?

At batch 8 a block step multiplies 256 rows by each weight: the GEMMs sit at the H100's ridge (256 FLOP per
weight byte), and cuBLAS takes them at ~37% of the dense bf16 rate (``linear_rows_h100.md``: gate/up 37.4 µs
with the gate's product, down 19.2, against ~16 and ~8 µs of weight reads). fbcompile's skinny-GEMM kernel
(pointer loads, weight rows as the MMA's rows) loses there. This tries the Hopper form: both operands through
TMA descriptors (zero-padded tiles, no masks), ``x`` rows as the MMA's rows, the weight tile transposed in
shared memory, optionally split over the reduction into fp32 partials (as ``linear_partials``: the consumer
sums them), optionally persistent (one program per SM walking the tiles). The kernel lives here, not in the
library, until it wins.

Times: CUDA-graph replays (``triton.testing.do_bench_cudagraph``, median) over distinct layers' weights, µs
per layer; each config checked against ``F.linear`` first.

    PYTHONPATH=. python benchmarks/tma_linear.py --rows 256 --out tma_linear_h100.json
    PYTHONPATH=. python benchmarks/tma_linear.py --rows 256 --shapes gate/up --seconds 220 \\
        --grid block_m=64,128,256 block_n=32,64 persistent=0 num_warps=4,8 num_stages=2,3 --out tma_linear_gated_s2_h100.json

On the H100 the best of either ties cuBLAS within 6% (``benchmarks/results/session43_h100.md``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fbcompile.kernels.triton_common import cdiv, num_sms
from fbcompile.kernels.triton_linear import _gate


@triton.jit
def _tma_linear_kernel(x_desc, w_desc, u_desc, Y, M, N, K, k_per_split, tiles_m, tiles,
                       ACT: tl.constexpr, PARTIAL: tl.constexpr, PERSISTENT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``Y = x @ w.T`` over the ``k`` slice ``pid_k`` owns; ``ACT == 1``: ``silu(x @ w.T) * (x @ u.T)``.
    ``PARTIAL``: fp32 partials at ``Y[pid_k]`` (with ``ACT`` the gate's then the up projection's,
    ``2 N`` per row). Tile order: ``m`` fastest, so the programs sharing a weight tile run together
    and read it from HBM once. ``PERSISTENT``: program ``p`` takes tiles ``p, p + P, ...``."""
    pid_k = tl.program_id(1)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    step = tl.num_programs(0) if PERSISTENT else tiles
    for tile in range(tl.program_id(0), tiles, step):
        off_m = (tile % tiles_m) * BLOCK_M
        off_n = (tile // tiles_m) * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            a = x_desc.load([off_m, k])
            acc = tl.dot(a, w_desc.load([off_n, k]).T, acc)
            if ACT != 0:
                acc_up = tl.dot(a, u_desc.load([off_n, k]).T, acc_up)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if PARTIAL:
            row = 2 * N if ACT != 0 else N
            ptrs = Y + pid_k * M * row + offs_m[:, None] * row + offs_n[None, :]
            tl.store(ptrs, acc, mask=mask)
            if ACT != 0:
                tl.store(ptrs + N, acc_up, mask=mask)
        else:
            y = acc.to(Y.dtype.element_ty)
            if ACT != 0:
                y = _gate(y, acc_up.to(Y.dtype.element_ty), ACT)  # the library kernel's epilogue (SiLU)
            tl.store(Y + offs_m[:, None] * N + offs_n[None, :], y, mask=mask)


def tma_linear(x, w, u=None, *, block_m, block_n, block_k, split_k, persistent, num_warps, num_stages):
    """``x @ w.T`` (or the gated product with ``u``) as bf16, or as fp32 partials ``[split_k, M, N]``
    (``[split_k, M, 2N]`` gated) when ``split_k > 1``."""
    M, K = x.shape
    N = w.shape[0]
    x_desc = TensorDescriptor.from_tensor(x, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(w, [block_n, block_k])
    u_desc = TensorDescriptor.from_tensor(u, [block_n, block_k]) if u is not None else w_desc
    k_per_split = cdiv(cdiv(K, split_k), block_k) * block_k
    splits = cdiv(K, k_per_split)
    partial = splits > 1
    width = 2 * N if (u is not None and partial) else N
    y = (x.new_empty(splits, M, width, dtype=torch.float32) if partial else x.new_empty(M, N))
    tiles_m = cdiv(M, block_m)
    tiles = tiles_m * cdiv(N, block_n)
    programs = min(tiles, max(1, num_sms(x.device) // splits)) if persistent else tiles
    _tma_linear_kernel[(programs, splits)](
        x_desc, w_desc, u_desc, y, M, N, K, k_per_split, tiles_m, tiles,
        ACT=1 if u is not None else 0, PARTIAL=partial, PERSISTENT=persistent,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return y


def finish(y, gated, n, dtype):
    """The ``dtype`` result of :func:`tma_linear`'s output (summing and gating partials as a consumer would)."""
    if y.dim() == 2:
        return y
    s = y.sum(0)
    if gated:
        g, u = s[:, :n].to(dtype).float(), s[:, n:].to(dtype).float()
        return (F.silu(g) * u).to(dtype)
    return s.to(dtype)


SHAPES = {  # name -> (N, K, gated): Qwen2-1.5B's two big GEMMs
    "gate/up": (8960, 1536, True),
    "down": (1536, 8960, False),
}


def configs(gated, quick, overrides):
    """The sweep: 64-wide reduction tiles (the Hopper MMA's natural step); split reductions for the long
    one (down: 8960) only up to the programs that fill the SMs. ``overrides``: ``name -> values``."""
    grid = dict(block_m=(64, 128), block_n=(64, 128, 256), block_k=(64,),
                split_k=(1, 2) if gated else (1, 2, 4, 5, 7), persistent=(False, True), num_warps=(4, 8),
                num_stages=(3, 4))
    grid.update(overrides)
    if quick:
        grid = dict(block_m=(16,), block_n=(16,), block_k=(16,), split_k=(1, 2), persistent=(False, True),
                    num_warps=(4,), num_stages=(2,))
    for values in itertools.product(*grid.values()):
        cfg = dict(zip(grid, values))
        if cfg["persistent"] and cfg["split_k"] > 2:
            continue
        yield cfg


def fits(cfg, gated):
    """Shared memory (~227 KB on the H100) and registers for the accumulators (fp32, per thread)."""
    accs = 2 if gated else 1
    smem = cfg["num_stages"] * cfg["block_k"] * 2 * (cfg["block_m"] + accs * cfg["block_n"])
    regs = accs * cfg["block_m"] * cfg["block_n"] / (32 * cfg["num_warps"])
    return smem <= 220 * 1024 and regs <= 128


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="256")
    ap.add_argument("--shapes", default="gate/up,down")
    ap.add_argument("--layers", type=int, default=8, help="distinct layers' weights")
    ap.add_argument("--top", type=int, default=8, help="configs kept per (rows, shape)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and configs (a CPU check)")
    ap.add_argument("--seconds", type=float, default=240, help="sweep time per (rows, shape); the rest skipped")
    ap.add_argument("--grid", nargs="*", default=[], help="name=v1,v2 replacing the sweep's values (0/1 for persistent)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    overrides = {k: tuple(int(v) for v in vs.split(",")) for k, vs in (a.split("=") for a in args.grid)}
    if "persistent" in overrides:
        overrides["persistent"] = tuple(bool(v) for v in overrides["persistent"])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator(dev).manual_seed(0)
    rows = []
    for name in args.shapes.split(","):
        N, K, gated = SHAPES[name]
        if args.quick:
            N, K = 96, 80
        ws = [(torch.randn(N, K, device=dev, dtype=dtype, generator=g) * 0.02,
               torch.randn(N, K, device=dev, dtype=dtype, generator=g) * 0.02 if gated else None)
              for _ in range(args.layers)]
        for m in map(int, args.rows.split(",")):
            if args.quick:
                m = 40
            x = torch.randn(m, K, device=dev, dtype=dtype, generator=g)

            def cublas():
                if gated:
                    return [F.silu(F.linear(x, w)) * F.linear(x, u) for w, u in ws]
                return [F.linear(x, w) for w, _ in ws]

            refs = [r.float() for r in cublas()]
            results = []
            deadline = time.monotonic() + args.seconds

            def bench(fn):
                if dev != "cuda":
                    fn()
                    return float("nan")
                return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median") * 1e3 / len(ws)

            base = bench(cublas)
            rows.append(dict(rows=m, shape=name, form="cuBLAS" + (" + silu*mul" if gated else ""), us=round(base, 2)))
            print(rows[-1], flush=True)
            for cfg in configs(gated, args.quick, overrides):
                if time.monotonic() > deadline:
                    break
                if not fits(cfg, gated):
                    continue
                run = lambda: [tma_linear(x, w, u, **cfg) for w, u in ws]  # noqa: E731
                try:
                    outs = run()
                    err = max(((finish(o, gated, N, dtype).float() - r).norm() / r.norm()).item() for o, r in zip(outs, refs))
                    us = bench(run)
                    us_sum = us
                    if outs[0].dim() == 3:
                        us_sum = bench(lambda: [finish(tma_linear(x, w, u, **cfg), gated, N, dtype) for w, u in ws])
                    results.append(dict(rows=m, shape=name, form="tma", **cfg, us=round(us, 2),
                                        us_with_sum=round(us_sum, 2), rel_err=float(f"{err:.2e}"),
                                        vs_cublas=round(base / us, 3)))
                except Exception as e:  # noqa: BLE001  (a config Triton refuses is a row, not a crash)
                    results.append(dict(rows=m, shape=name, form="tma", **cfg, error=f"{type(e).__name__}: {str(e)[:120]}"))
            ok = sorted((r for r in results if "us" in r), key=lambda r: r["us"] if r["us"] == r["us"] else 0)
            best_full = sorted((r for r in ok if r["split_k"] == 1), key=lambda r: r["us"])[:2]
            kept = ok[:args.top] + [r for r in best_full if r not in ok[:args.top]]
            errors = [r for r in results if "error" in r]
            bad = [r for r in ok if r["rel_err"] > 1e-2]
            for r in kept:
                print(r, flush=True)
            rows += kept
            rows.append(dict(rows=m, shape=name, form="summary", configs=len(results), errors=len(errors),
                             first_error=errors[0]["error"] if errors else None, above_1e_2=len(bad)))
            print(rows[-1], flush=True)
            with open(args.out, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                               torch=torch.__version__, triton=triton.__version__,
                               command="python " + " ".join(sys.argv), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
