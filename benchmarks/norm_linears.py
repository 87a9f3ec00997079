"""What moving a pre-norm layer's RMSNorms and residual adds into its skinny GEMMs costs and saves (issue #13).

Inductor runs ``RMSNorm(h + o_proj(a))`` as a kernel of its own between two GEMMs (2.1-2.4 us per layer
and step for the Qwen2-1.5B-shaped LM on the H200). This times, at Qwen2-1.5B's shapes and 32 rows,
under CUDA-graph replay over 4 layers' weights (so they come from HBM), one layer's weight GEMMs and
norms in three designs:

* ``inductor``: Inductor's add-and-norm kernels, the grouped q/k/v and gated gate/up launches of
  fbcompile's kernel, cuBLAS for o_proj and down (``Config(norm_linears=False)``);
* ``norm-in-load``: the residual adds in the o_proj and down launches' stores, each norm applied by the
  GEMM after it as it loads its input (``NORM == 1``: the input scaled per feature inside the reduction);
* ``scaled-store``: as above, but the GEMM before each norm also stores its result times the norm's
  scale, and the GEMM after it reads that and takes only the rows' sums of squares from the unscaled
  result (``NORM == 2``).

and each launch alone (µs per launch over 150 MB of weight copies). Checked against the ``inductor``
form (relative error).

    python benchmarks/norm_linears.py --out benchmarks/results/norm_linears_h200.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
import torch.nn.functional as F

from fbcompile.kernels import triton_linear as tlin

HIDDEN, INTER, QKV = 1536, 8960, (1536, 256, 256)
LAYERS, ROWS, EPS = 4, 32, 1e-6
LAUNCH_BYTES = 150_000_000


def rms_norm(h, w):
    hf = h.float()
    return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype)


def add_norm(h, o, w):
    s = h + o
    return s, rms_norm(s, w)


def make_layer(device, dtype, g):
    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g) * 0.02  # noqa: E731
    return dict(qkv=[mk(n, HIDDEN) for n in QKV], bqkv=[mk(n) for n in QKV], o=mk(HIDDEN, HIDDEN),
                gate=mk(INTER, HIDDEN), up=mk(INTER, HIDDEN), down=mk(HIDDEN, INTER),
                n1=1 + mk(HIDDEN) * 10, n2=1 + mk(HIDDEN) * 10)


def chain_norm_in_load(h, layers):
    for w in layers:
        q = tlin.linear(h, w["qkv"], w["bqkv"], norm=(w["n1"], EPS))[..., :HIDDEN]
        h2 = tlin.linear(q, [w["o"]], [None], residual=h)
        g = tlin.linear(h2, [w["gate"], w["up"]], [None, None], act="silu", norm=(w["n2"], EPS))
        h = tlin.linear(g, [w["down"]], [None], residual=h2)
    return h


def chain_scaled_store(h, layers):
    hs = h * layers[0]["n1"]
    for i, w in enumerate(layers):
        q = tlin.linear(hs, w["qkv"], w["bqkv"], norm=(w["n1"], EPS), rms_of=h)[..., :HIDDEN]
        h2, h2s = tlin.linear(q, [w["o"]], [None], residual=h, scaled_by=w["n2"])
        g = tlin.linear(h2s, [w["gate"], w["up"]], [None, None], act="silu", norm=(w["n2"], EPS), rms_of=h2)
        h, hs = tlin.linear(g, [w["down"]], [None], residual=h2, scaled_by=layers[(i + 1) % len(layers)]["n1"])
    return h


def chain_inductor(add_norm_compiled):
    def chain(h, layers):
        d = torch.zeros_like(h)
        for w in layers:
            h, x = add_norm_compiled(h, d, w["n1"])
            q = tlin.linear(x, w["qkv"], w["bqkv"])[..., :HIDDEN]
            h2, x2 = add_norm_compiled(h, F.linear(q, w["o"]), w["n2"])
            d = F.linear(tlin.linear(x2, [w["gate"], w["up"]], [None, None], act="silu"), w["down"])
            h = h2
        return h + d
    return chain


def bench_us(fn, copies) -> float:
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3 / copies


def launches(device, dtype, add_norm_compiled):
    """µs per launch of each GEMM form alone."""
    g = torch.Generator(device=device).manual_seed(1)
    rows = []
    x = torch.randn(ROWS, HIDDEN, device=device, dtype=dtype, generator=g) * 3
    xi = torch.randn(ROWS, INTER, device=device, dtype=dtype, generator=g)
    n = 1 + torch.randn(HIDDEN, device=device, dtype=dtype, generator=g) * 0.2
    cases = {"qkv": (list(QKV), HIDDEN), "gate+up-gated": ([INTER, INTER], HIDDEN), "o": ([HIDDEN], HIDDEN),
             "down": ([HIDDEN], INTER)}
    for name, (sizes, k) in cases.items():
        copies = max(4, -(-LAUNCH_BYTES // (sum(sizes) * k * 2)))
        ws = [[torch.randn(s, k, device=device, dtype=dtype, generator=g) * 0.02 for s in sizes] for _ in range(copies)]
        inp = x if k == HIDDEN else xi
        act = "silu" if name.endswith("gated") else None
        nb = [None] * (1 if act else len(sizes)) if not act else [None, None]
        forms = {}
        if name in ("o", "down"):
            forms["cublas"] = lambda w: F.linear(inp, w[0])
            forms["triton"] = lambda w: tlin.linear(inp, w, nb)
            forms["triton+residual"] = lambda w: tlin.linear(inp, w, nb, residual=x)
            forms["triton+residual+scaled"] = lambda w: tlin.linear(inp, w, nb, residual=x, scaled_by=n)
        else:
            forms["triton"] = lambda w: tlin.linear(inp, w, nb, act=act)
            forms["triton+norm-in-load"] = lambda w: tlin.linear(inp, w, nb, act=act, norm=(n, EPS))
            forms["triton+norm-given"] = lambda w: tlin.linear(inp, w, nb, act=act, norm=(n, EPS), rms_of=x)
            for bn, bk in ((16, 64), (32, 64), (32, 128), (64, 64)):
                if any(s % bn for s in sizes[:-1]):
                    continue
                cfg = tlin.LinearConfig(bn, 32, bk, 1, 4, 5)
                forms[f"triton+norm-in-load {bn}x{bk}"] = (
                    lambda w, cfg=cfg: tlin.linear(inp, w, nb, act=act, norm=(n, EPS), config=cfg))
                forms[f"triton+norm-given {bn}x{bk}"] = (
                    lambda w, cfg=cfg: tlin.linear(inp, w, nb, act=act, norm=(n, EPS), rms_of=x, config=cfg))
        for form, fn in forms.items():
            try:
                us = bench_us(lambda: [fn(w) for w in ws], copies)
            except Exception as e:  # a config past shared memory
                print(f"skip {name} {form}: {type(e).__name__}: {str(e)[:80]}", flush=True)
                continue
            rows.append(dict(case=name, form=form, us=round(us, 2)))
            print(rows[-1], flush=True)
        del ws
    compiled_us = bench_us(lambda: [add_norm_compiled(x, x, n) for _ in range(16)], 16)
    rows.append(dict(case="add+RMSNorm", form="inductor", us=round(compiled_us, 2)))
    print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/norm_linears.json")
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    layers = [make_layer(device, dtype, g) for _ in range(LAYERS)]
    add_norm_compiled = torch.compile(add_norm, dynamic=False)
    h = torch.randn(ROWS, HIDDEN, device=device, dtype=dtype, generator=g)
    forms = {"inductor": chain_inductor(add_norm_compiled), "norm-in-load": chain_norm_in_load,
             "scaled-store": chain_scaled_store}
    ref = forms["inductor"](h, layers).float()
    rows = []
    for name, fn in forms.items():
        err = ((fn(h, layers).float() - ref).norm() / ref.norm()).item()
        us = bench_us(lambda: fn(h, layers), LAYERS)
        rows.append(dict(form=name, us_per_layer=round(us, 2), rel_err=float(f"{err:.2g}")))
        print(rows[-1], flush=True)
    per_launch = launches(device, dtype, add_norm_compiled)
    import triton
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                command=" ".join(["python benchmarks/norm_linears.py", *sys.argv[1:]]))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, layers=rows, launches=per_launch), f, indent=1)


if __name__ == "__main__":
    main()
