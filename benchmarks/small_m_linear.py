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
  ``torch.compile(mode="max-autotune-no-cudagraphs")`` (Inductor's Triton GEMM templates against cuBLAS).

Per form: µs per layer, the bandwidth (weight bytes / time), and the compile time. Results are checked
against ``separate`` (relative error).

    python benchmarks/small_m_linear.py --rows 32,256 --out benchmarks/results/small_m_linear_h200.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

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
    h = F.linear(x + o, w["gate"]) * F.linear(x + o, w["up"])
    return F.linear(h, w["down"]) + k.sum() + v.sum()


def fused(x, w):
    q, k, v = F.linear(x, w["qkv"], w["bqkv"]).split([Q_OUT, KV_OUT, KV_OUT], dim=-1)
    o = F.linear(q, w["o"])
    gate, up = F.linear(x + o, w["gate_up"]).split([INTER, INTER], dim=-1)
    return F.linear(gate * up, w["down"]) + k.sum() + v.sum()


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
    ap.add_argument("--out", default="benchmarks/results/small_m_linear.json")
    args = ap.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    layers = make_layers(device, dtype)
    forms = {"separate": separate, "fused": fused}
    rows = []
    for m in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(m, HIDDEN, device=device, dtype=dtype) for _ in layers]
        ref = separate(xs[0], layers[0]).float()
        for name, fn in list(forms.items()) + [(n + "-autotune", f) for n, f in forms.items()]:
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
                command="python benchmarks/small_m_linear.py --rows " + args.rows)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
