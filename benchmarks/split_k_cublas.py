"""cuBLAS with its reduction split over a batched GEMM: fp32 partials a consumer could sum.

At batch 8 (256 rows) the LM's block step runs its weight GEMMs on cuBLAS, and the down projection
(1536 x 8960) is the slowest for its bytes: cuBLAS tiles its 256 x 1536 output into 96 tiles of 64 x 64,
fewer than the SMs, each with the whole 8960-long reduction (``profile_lm_32k_b8_h100_s29.md``). Cutting
the reduction into ``S`` slices and running them as one strided batched GEMM (``torch.bmm`` over views of
``x`` and the weight, fp32 out: ``aten::bmm.dtype``) gives cuBLAS ``S`` times the tiles; the fp32 partials
``[S, M, N]`` are what ``fbcompile.passes.linear_partials`` already leaves for Inductor to sum inside the
consumer's kernel. This times, per GEMM of a Qwen2-1.5B layer and row count, as CUDA-graph replays over
distinct layers' weights (read from HBM; median, µs per GEMM):

* ``F.linear`` (what runs today at >32 rows);
* the batched GEMM alone for each ``S`` (the sum left to the consumer), and with ``.sum(0)`` and the cast
  as a separate launch (an upper bound on what the sum adds);
* the same with bf16 partials (rounded before the sum: not what fbcompile would run; for reference);

and names the kernels cuBLAS picks, and checks each result against ``F.linear`` in fp32.

    PYTHONPATH=. python benchmarks/split_k_cublas.py --out benchmarks/results/split_k_cublas_h100.json
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

# name -> (N, K) of Qwen2-1.5B's weights
SHAPES = {"down": (1536, 8960), "o": (1536, 1536), "gate": (8960, 1536)}


def batched_partials(x: torch.Tensor, w: torch.Tensor, splits: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``[S, M, N]`` partials of ``x @ w.T`` over ``S`` equal slices of the reduction, one cuBLAS call over
    strided views (no copies: slice ``s`` of ``x`` is ``x[:, s*Ks:(s+1)*Ks]``, of ``w`` its transpose)."""
    m, k = x.shape
    n = w.shape[0]
    ks = k // splits
    a = x.view(m, splits, ks).transpose(0, 1)       # [S, M, Ks], strides (Ks, K, 1)
    b = w.view(n, splits, ks).permute(1, 2, 0)      # [S, Ks, N], strides (Ks, 1, K)
    if out_dtype == x.dtype:
        return torch.bmm(a, b)
    return torch.bmm(a, b, out_dtype=out_dtype)


def kernels_of(fn) -> list[str]:
    """The CUDA kernels one call launches (names cut to 70 characters)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name[:70] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="32,128,256,512")
    ap.add_argument("--shapes", default="down,o,gate")
    ap.add_argument("--splits", default="2,3,4,5,7,8")
    ap.add_argument("--layers", type=int, default=8, help="distinct weights per GEMM, so they come from HBM")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    g = torch.Generator("cuda").manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for _ in range(args.layers)]
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            ref = F.linear(x.float(), ws[0].float())
            forms = {"F.linear": (lambda w: F.linear(x, w), 1)}
            for s in map(int, args.splits.split(",")):
                if k % s:
                    continue
                forms[f"bmm S={s}, fp32 partials"] = (lambda w, s=s: batched_partials(x, w, s, torch.float32), s)
                forms[f"bmm S={s}, fp32 partials + sum"] = (
                    lambda w, s=s: batched_partials(x, w, s, torch.float32).sum(0).to(x.dtype), s)
                forms[f"bmm S={s}, bf16 partials"] = (lambda w, s=s: batched_partials(x, w, s, x.dtype), s)
            for name, (fn, s) in forms.items():
                row = dict(shape=shape, N=n, K=k, rows=m, form=name, splits=s)
                try:
                    out = fn(ws[0])
                    if out.dim() == 3:
                        out = out.float().sum(0)
                    row["rel_err"] = float((out.float() - ref).norm() / ref.norm())
                    row["us"] = round(do_bench_cudagraph(lambda: [fn(w) for w in ws], rep=50,
                                                         return_mode="median") * 1e3 / len(ws), 2)
                    row["GBps"] = round(n * k * 2 / row["us"] / 1e3, 1)
                    row["kernels"] = kernels_of(lambda: fn(ws[0]))
                except Exception as e:  # noqa: BLE001  (a form cuBLAS refuses is a row, not a crash)
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                       command="python benchmarks/split_k_cublas.py " + " ".join(
                           f"--{k} {v}" for k, v in vars(args).items() if k != "out"), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
