"""Where a block step's weight GEMMs lose bandwidth, and what would win it back (issue #13).

A profile of the example LM at Qwen2-1.5B shape (``profile_lm_32k_b1_h200.md``) spends 11.7 of 16.3 ms
of GPU time per block in cuBLAS GEMMs over [32 rows x 1536] activations, at 39% of HBM bandwidth: the
small projections (k/v: 0.8 MB of weights, q/o: 4.7 MB) take ~5 µs each, as long as a 27 MB one would
need. This times one decoder layer's seven linears (q, k, v with bias; o; gate, up; down) for a block
of M rows in several forms, each over 4 distinct layers' weights (so the weights come from HBM, not L2),
under CUDA-graph replay:

* ``separate``: seven ``F.linear`` calls, as the model issues them (cuBLAS);
* ``fused``: q/k/v as one linear over concatenated weights, gate/up as one: five calls (cuBLAS);
* ``separate-autotune`` / ``fused-autotune``: the same functions under
  ``torch.compile(mode="max-autotune-no-cudagraphs")`` (Inductor's Triton GEMM templates against cuBLAS);
* ``triton``: seven calls of fbcompile's skinny GEMM (``fbcompile.kernels.triton_linear``) at its
  default configs; ``triton-best``: at the best configs of ``--sweep``; ``triton-grouped``: five
  calls, q/k/v in one launch and gate/up in one (the kernel stacks weights without copying them);
  ``triton-gated``: the same, the gate/up launch applying ``silu(gate) * up`` as it stores
  (``Config.gated_linears``), so the activation has no kernel of its own. (In the seventh session the
  down projection computed it as it loaded its input instead: 36 µs per launch, ``gated_linears_h200.md``.)

Every form computes the MLP as models do, ``down(silu(gate) * up)`` (before the seventh session's
``triton-gated`` the forms had no activation: results files older than that time one kernel less).

``--sweep`` first times GEMMs alone (cuBLAS against a grid of the Triton kernel's configs), over as many
weight copies as make 150 MB: each of the layer's shapes, or with ``--sweep-cases`` also the launches
fbcompile makes of them: ``qkv`` and ``gate+up`` stacked, ``gate+up-gated`` with its gate (cuBLAS: the
separate calls, and the activation and product).

Per form: µs per layer, the bandwidth (weight bytes / time), and the compile time. Results are checked
against ``separate`` (relative error).

    python benchmarks/small_m_linear.py --rows 32,256 --out benchmarks/results/small_m_linear_h200.json
    python benchmarks/small_m_linear.py --rows 32,256 --forms separate,triton,triton-best --sweep \
        --out benchmarks/results/skinny_linear_h200.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import itertools

import torch
import torch.nn.functional as F

from fbcompile.kernels import triton_linear as tlin
from gemm_sweep import parse_grid, read_us

HIDDEN, INTER, Q_OUT, KV_OUT = 1536, 8960, 1536, 256
LAYERS = 4


def make_layers(device, dtype):
    g = torch.Generator(device=device).manual_seed(0)
    mk = lambda *s: (torch.randn(*s, device=device, dtype=dtype, generator=g) * 0.02)  # noqa: E731
    layers = []
    for _ in range(LAYERS):
        w = dict(q=mk(Q_OUT, HIDDEN), k=mk(KV_OUT, HIDDEN), v=mk(KV_OUT, HIDDEN), bq=mk(Q_OUT), bk=mk(KV_OUT),
                 bv=mk(KV_OUT), o=mk(HIDDEN, Q_OUT), gate=mk(INTER, HIDDEN), up=mk(INTER, HIDDEN),
                 down=mk(HIDDEN, INTER))
        w["qkv"] = torch.cat([w["q"], w["k"], w["v"]])
        w["bqkv"] = torch.cat([w["bq"], w["bk"], w["bv"]])
        w["gate_up"] = torch.cat([w["gate"], w["up"]])
        layers.append(w)
    return layers


def separate(x, w):
    q, k, v = F.linear(x, w["q"], w["bq"]), F.linear(x, w["k"], w["bk"]), F.linear(x, w["v"], w["bv"])
    o = F.linear(q, w["o"])  # stands in for attention's output (same shape)
    h = F.silu(F.linear(x + o, w["gate"])) * F.linear(x + o, w["up"])
    return F.linear(h, w["down"]) + k.sum() + v.sum()


def fused(x, w):
    q, k, v = F.linear(x, w["qkv"], w["bqkv"]).split([Q_OUT, KV_OUT, KV_OUT], dim=-1)
    o = F.linear(q, w["o"])
    gate, up = F.linear(x + o, w["gate_up"]).split([INTER, INTER], dim=-1)
    return F.linear(F.silu(gate) * up, w["down"]) + k.sum() + v.sum()


def grouped(x, w, gated=False):
    """q/k/v and gate/up each in one launch of the Triton kernel, over the separate weights; ``gated``:
    the gate/up launch applies ``silu(gate) * up`` itself."""
    q, k, v = tlin.linear(x, [w["q"], w["k"], w["v"]], [w["bq"], w["bk"], w["bv"]]).split([Q_OUT, KV_OUT, KV_OUT], -1)
    o = tlin.linear(q, [w["o"]], [None])
    if gated:
        h = tlin.linear(x + o, [w["gate"], w["up"]], [None, None], act="silu")
    else:
        gate, up = tlin.linear(x + o, [w["gate"], w["up"]], [None, None]).split([INTER, INTER], -1)
        h = F.silu(gate) * up
    return tlin.linear(h, [w["down"]], [None]) + k.sum() + v.sum()


def with_linear(linear):
    """``separate`` with ``linear`` in place of ``F.linear``."""
    def form(x, w):
        q, k, v = linear(x, w["q"], w["bq"]), linear(x, w["k"], w["bk"]), linear(x, w["v"], w["bv"])
        o = linear(q, w["o"])
        h = F.silu(linear(x + o, w["gate"])) * linear(x + o, w["up"])
        return linear(h, w["down"]) + k.sum() + v.sum()
    return form


# GEMM cases of --sweep: weight rows (several: stacked in one launch), K, and the gate the input carries
CASES = {"q/o": ((Q_OUT,), HIDDEN, None), "k/v": ((KV_OUT,), HIDDEN, None), "gate/up": ((INTER,), HIDDEN, None),
         "down": ((HIDDEN,), INTER, None), "qkv": ((Q_OUT, KV_OUT, KV_OUT), HIDDEN, None),
         "gate+up": ((INTER, INTER), HIDDEN, None), "gate+up-gated": ((INTER, INTER), HIDDEN, "silu")}
# block_m 0: the default config's rows per program
SWEEP = dict(block_n=(16, 32, 64), block_m=(0,), block_k=(64, 128, 256), split_k=(1, 2, 4, 8), num_warps=(4,),
             num_stages=(3, 5))
SWEEP_BYTES = 150_000_000  # weights per timed case: copies enough that they come from HBM, not L2


def _case_cublas(act):
    """The case as cuBLAS runs it: one ``F.linear`` per weight (gated: the activation and product after)."""
    def run(x, ws):
        ys = [F.linear(x, w) for w in ws]
        return ys if act is None else [F.silu(ys[0]) * ys[1]]
    return run


def sweep(m, device, dtype, rows, cases, grid):
    """µs per launch of each case: cuBLAS, the default Triton config, and the config grid; returns the
    best config per case name."""
    from triton.testing import do_bench_cudagraph

    best = {}
    for name in cases:
        sizes, k, act = CASES[name]
        n = sum(sizes)
        bounds = () if act else tuple(itertools.accumulate(sizes))[:-1]  # a gated pair is not stacked
        copies = max(4, -(-SWEEP_BYTES // (n * k * 2)))
        ws = [[torch.randn(s, k, device=device, dtype=dtype) * 0.02 for s in sizes] for _ in range(copies)]
        x = torch.randn(m, k, device=device, dtype=dtype)
        ref = torch.cat(_case_cublas(act)(x, ws[0]), -1).float()

        def bench(fn):
            return do_bench_cudagraph(lambda: [fn(x, w) for w in ws], rep=10, return_mode="median") * 1e3 / copies

        block_m = tlin.config_for(m, n, k, 132).block_m
        configs = [tlin.LinearConfig(bn, bm or block_m, bk, sk, nw, st)
                   for bn, bm, bk, sk, nw, st in itertools.product(*grid.values())
                   if k // sk >= bk and all(b % bn == 0 for b in bounds)]
        read, programs = read_us(n * k, copies, device, dtype)
        rows.append(dict(rows=m, shape=name, N=n, K=k, config="read only (ceiling)", programs=programs,
                         us=round(read, 2), GBps=round(n * k * 2 / 1e3 / read, 1)))
        print(rows[-1], flush=True)
        results = [("cublas", bench(_case_cublas(act)))]
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        default = tlin.gated_config_for(m, sizes[0], k, sms) if act else tlin.config_for(m, n, k, sms, bounds)
        for cfg in [default] + configs:
            fn = lambda x, w, cfg=cfg: tlin.linear(x, w, [None] * len(w), config=cfg, act=act)  # noqa: E731
            try:
                err = ((fn(x, ws[0]).float() - ref).norm() / ref.norm()).item()
                assert err < 1e-2, f"rel err {err}"
                results.append((cfg, bench(fn)))
            except Exception as e:  # configs that exceed shared memory or registers
                print(f"  skip {cfg}: {type(e).__name__}: {str(e)[:80]}", flush=True)
        cublas_us = results[0][1]
        mb = n * k * 2 / 1e6
        triton_rows = sorted(results[1:], key=lambda r: r[1])
        for label, (cfg, us) in [("default", results[1])] + [(f"best{i + 1}", r) for i, r in enumerate(triton_rows)]:
            row = dict(rows=m, shape=name, N=n, K=k, config=label, **cfg._asdict(), us=round(us, 2),
                       GBps=round(mb * 1e3 / us, 1), vs_cublas=round(cublas_us / us, 2))
            print(row, flush=True)
            rows.append(row)
        rows.append(dict(rows=m, shape=name, N=n, K=k, config="cublas", us=round(cublas_us, 2),
                         GBps=round(mb * 1e3 / cublas_us, 1), vs_cublas=1.0))
        print(rows[-1], flush=True)
        best[name] = triton_rows[0][0]
        del ws
    return best


def weight_bytes(w) -> int:
    return sum(w[n].numel() * w[n].element_size() for n in ("q", "k", "v", "bq", "bk", "bv", "o", "gate", "up", "down"))


def time_us(fn, xs, layers) -> float:
    """Median µs per layer: CUDA-graph replays of one call per layer."""
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(lambda: [fn(x, w) for x, w in zip(xs, layers)], rep=50,
                              return_mode="median") * 1e3 / len(layers)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="32,256", help="block rows M (batch x block), comma-separated")
    ap.add_argument("--forms", default="separate,fused,separate-autotune,fused-autotune",
                    help="of: separate, fused, separate-autotune, fused-autotune, triton, triton-best, triton-grouped, "
                         "triton-gated")
    ap.add_argument("--sweep", action="store_true", help="time each GEMM case over the Triton config grid first")
    ap.add_argument("--sweep-cases", default="q/o,k/v,gate/up,down", help=f"of: {', '.join(CASES)}")
    ap.add_argument("--grid", default="", help="the sweep's config grid, e.g. 'num_warps=4,8 num_stages=4,5' "
                    f"(each key's values replace the default's: {SWEEP})")
    ap.add_argument("--out", default="benchmarks/results/small_m_linear.json")
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    layers = make_layers(device, dtype)
    rows, sweep_rows = [], []
    for m in (int(r) for r in args.rows.split(",")):
        best = sweep(m, device, dtype, sweep_rows, args.sweep_cases.split(","), parse_grid(SWEEP, args.grid)) if args.sweep else {}
        by_shape = {(CASES[name][0][0], CASES[name][1]): cfg for name, cfg in best.items() if len(CASES[name][0]) == 1
                    and CASES[name][2] is None}
        forms = {"separate": separate, "fused": fused, "separate-autotune": separate, "fused-autotune": fused,
                 "triton": with_linear(lambda x, w, b=None: tlin.linear(x, [w], [b])),
                 "triton-best": with_linear(lambda x, w, b=None: tlin.linear(x, [w], [b], config=by_shape.get(tuple(w.shape)))),
                 "triton-grouped": grouped, "triton-gated": lambda x, w: grouped(x, w, gated=True)}
        xs = [torch.randn(m, HIDDEN, device=device, dtype=dtype) for _ in layers]
        ref = separate(xs[0], layers[0]).float()
        for name in args.forms.split(","):
            fn = forms[name]
            compile_s = 0.0
            if name.endswith("-autotune"):
                torch._dynamo.reset()
                fn = torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False)
                t0 = time.perf_counter()
                fn(xs[0], layers[0])
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
            err = ((fn(xs[0], layers[0]).float() - ref).norm() / ref.norm()).item()
            us = time_us(fn, xs, layers)
            row = dict(rows=m, form=name, us_per_layer=round(us, 2), GBps=round(weight_bytes(layers[0]) / us / 1e3, 1),
                       compile_s=round(compile_s, 1), rel_err=float(f"{err:.2g}"))
            print(row, flush=True)
            rows.append(row)
    import triton

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), layer_weight_bytes=weight_bytes(layers[0]),
                command=" ".join(["python benchmarks/small_m_linear.py", *sys.argv[1:]]))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, sweep=sweep_rows), f, indent=1)


if __name__ == "__main__":
    main()
