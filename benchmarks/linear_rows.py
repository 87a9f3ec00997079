"""Which of a decoder layer's GEMMs fbcompile's skinny-GEMM kernel should take, by row count (batch x block).

``fbcompile.passes.group_linears.pays`` decides where one launch of the kernel replaces cuBLAS's calls. This
times each launch fbcompile can make of a layer against what Inductor runs without it (cuBLAS), at 32 to
512 rows (the 8B shape at 64 to 256), over distinct layers' weights (so they come from HBM), as CUDA-graph
replays (``triton.testing.do_bench_cudagraph``, median, µs per layer):

* q/k/v with bias: three ``F.linear`` calls; one over concatenated weights (a copy fbcompile does not
  make, for reference); ``torch.ops.fbcompile.linear_group`` over the three weights where they are;
* o: ``F.linear`` against ``linear_group`` of the one weight;
* gate/up: ``silu(F.linear) * F.linear`` (separate and over concatenated weights) against
  ``torch.ops.fbcompile.gated_linear``;
* down: ``F.linear`` against ``linear_group``.

    PYTHONPATH=. python benchmarks/linear_rows.py --out benchmarks/results/linear_rows_h100.json
    PYTHONPATH=. python benchmarks/linear_rows.py --shape 4096,14336,1024 --rows 64,128,256 \\
        --out benchmarks/results/linear_rows_8b_h100.json
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

import fbcompile.ops  # noqa: F401  (registers torch.ops.fbcompile)

ops = torch.ops.fbcompile


def make_layers(hidden, inter, kv, layers):
    g = torch.Generator("cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02  # noqa: E731
    out = []
    for _ in range(layers):
        w = dict(wq=mk(hidden, hidden), wk=mk(kv, hidden), wv=mk(kv, hidden), bq=mk(hidden), bk=mk(kv), bv=mk(kv),
                 wo=mk(hidden, hidden), wg=mk(inter, hidden), wu=mk(inter, hidden), wd=mk(hidden, inter))
        w.update(wqkv=torch.cat([w["wq"], w["wk"], w["wv"]]), bqkv=torch.cat([w["bq"], w["bk"], w["bv"]]),
                 wgu=torch.cat([w["wg"], w["wu"]]))
        out.append(w)
    return out


def forms(inter):
    """name -> fn(x over the hidden size, x over the MLP's width, weights)."""
    def gated_cat(x, w):
        y = F.linear(x, w["wgu"])
        return F.silu(y[..., :inter]) * y[..., inter:]

    return {
        "q/k/v: cuBLAS, 3 calls": lambda x, xi, w: (F.linear(x, w["wq"], w["bq"]), F.linear(x, w["wk"], w["bk"]),
                                                     F.linear(x, w["wv"], w["bv"])),
        "q/k/v: cuBLAS, concatenated weights": lambda x, xi, w: F.linear(x, w["wqkv"], w["bqkv"]),
        "q/k/v: linear_group": lambda x, xi, w: ops.linear_group(x, [w["wq"], w["wk"], w["wv"]],
                                                                 [w["bq"], w["bk"], w["bv"]]),
        "o: cuBLAS": lambda x, xi, w: F.linear(x, w["wo"]),
        "o: linear_group": lambda x, xi, w: ops.linear_group(x, [w["wo"]], [None]),
        "gate/up: cuBLAS, 2 calls + silu*mul": lambda x, xi, w: F.silu(F.linear(x, w["wg"])) * F.linear(x, w["wu"]),
        "gate/up: cuBLAS, concatenated + silu*mul": lambda x, xi, w: gated_cat(x, w),
        "gate/up: gated_linear": lambda x, xi, w: ops.gated_linear(x, w["wg"], w["wu"], None, None, "silu"),
        "down: cuBLAS": lambda x, xi, w: F.linear(xi, w["wd"]),
        "down: linear_group": lambda x, xi, w: ops.linear_group(xi, [w["wd"]], [None]),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1536,8960,256", help="hidden,intermediate,kv-out (Qwen2-1.5B)")
    ap.add_argument("--rows", default="32,64,128,256,512")
    ap.add_argument("--layers", type=int, default=None, help="distinct layers' weights (default: 8, 3 above 2048)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    hidden, inter, kv = map(int, args.shape.split(","))
    layers = make_layers(hidden, inter, kv, args.layers or (8 if hidden <= 2048 else 3))
    rows = []
    for m in map(int, args.rows.split(",")):
        x = torch.randn(1, m, hidden, device="cuda", dtype=torch.bfloat16)
        xi = torch.randn(1, m, inter, device="cuda", dtype=torch.bfloat16)
        for name, fn in forms(inter).items():
            try:
                us = do_bench_cudagraph(lambda: [fn(x, xi, w) for w in layers], rep=50,
                                        return_mode="median") * 1e3 / len(layers)
                row = dict(rows=m, form=name, us=round(us, 2))
            except Exception as e:  # noqa: BLE001  (a form the kernel refuses is a row, not a crash)
                row = dict(rows=m, form=name, error=f"{type(e).__name__}: {str(e)[:160]}")
            rows.append(row)
            print(row, flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, shape=[hidden, inter, kv],
                       rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
