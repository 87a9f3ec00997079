"""GPU benchmark of the split-attention kernels against their two floors (bytes and FLOPs).

For each shape (bf16, batch 1 or ``--batch``: query heads / KV heads / head dim, M block queries, L cached
keys) it checks the external op ``torch.ops.fbcompile.attention_lse`` against a float64 reference (and fp32 inputs at
8K keys) and times it as medians of CUDA-graph replays over rotating input sets (several times the L2,
so every replay reads the KV from HBM). Optionally (``--old-tree``) the same for the kernel of another
checkout, for a before/after table, and the host cost of the op in eager and Inductor-compiled graphs.

Floors: the KV read once (``2 * Hkv * L * D * 2`` bytes) over the measured copy bandwidth, and
``4 * Hq * M * L * D`` FLOPs over the measured bf16 matrix rate. Their ratio is the arithmetic intensity
``GQA * M`` FLOP per KV byte: above the ridge (matrix rate / bandwidth) no kernel can read at HBM speed.

    PYTHONPATH=. python benchmarks/attention.py --out DIR [--old-tree OLD] [--sweep]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

import fbcompile  # noqa: F401  (registers torch.ops.fbcompile.*)
from fbcompile.kernels import triton_attention as ta

PEAK_HBM = {"H200": 4.8e12, "H100": 3.35e12}  # datasheet HBM bandwidth, bytes/s
HEADS = [(32, 8, 128), (12, 2, 128), (8, 4, 256), (8, 4, 512)]  # (query heads, KV heads, head dim)
KEYS = [8192, 32768, 131072]
BLOCKS = [32, 64, 256]
SWEEP = {  # head dim -> overrides of the heuristic's choice, timed at --sweep-keys (M >= 64, >= 128 packed rows,
    #          every M for wide heads), with four split counts around the heuristic's
    128: [{"BLOCK_R": 128, "num_warps": 8}, {"BLOCK_R": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
          {"num_warps": 8}, {"BLOCK_N": 128, "num_stages": 2}, {"num_stages": 2}, {"num_stages": 4},
          {"BLOCK_R": 128, "num_warps": 8, "num_stages": 2}],
    256: [{"num_warps": 8}, {"BLOCK_N": 64}, {"BLOCK_R": 32}, {"num_stages": 3}, {"BLOCK_N": 16},
          {"BLOCK_N": 64, "num_stages": 3}, {"BLOCK_N": 64, "num_stages": 3, "num_warps": 8}],
    512: [{"BLOCK_N": 16, "num_warps": 8}, {"num_warps": 4}, {"BLOCK_R": 32}, {"BLOCK_R": 32, "num_warps": 4},
          {"BLOCK_R": 32, "num_warps": 4, "num_stages": 3}, {"BLOCK_R": 32, "num_warps": 4, "BLOCK_N": 64},
          {"BLOCK_N": 16, "num_stages": 3}],
}


def ceilings() -> dict:
    """Measured copy bandwidth (bytes read + written per second) and bf16 matrix rate (random data)."""
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    copy_ms = do_bench(lambda: y.copy_(x), warmup=10, rep=50, return_mode="median")
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=10, rep=50, return_mode="median")
    return dict(copy_bw=2 * 2 * 1024**3 / (copy_ms * 1e-3), mm_flops=2 * 8192**3 / (mm_ms * 1e-3))


def load_old_kernels(tree: str):
    """The kernel module of another checkout, behind an opaque ``custom_op`` as fbcompile had it."""
    spec = importlib.util.spec_from_file_location(
        "old_triton_attention", os.path.join(tree, "fbcompile", "kernels", "triton_attention.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    @torch.library.custom_op("fbbench::old_attention_lse", mutates_args=())
    def old_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return mod.attention_lse(q, k, v, None, scale)

    @old_lse.register_fake
    def _(q, k, v, scale):
        return q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty(q.shape[:-1], dtype=torch.float32)

    @torch.library.custom_op("fbbench::old_attention_merge_lse", mutates_args=())
    def old_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, o: torch.Tensor,
                  lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mod.attention_merge_lse(q, k, v, None, scale, o, lse)

    old_merge.register_fake(lambda q, k, v, scale, o, lse: (torch.empty_like(o), torch.empty_like(lse)))
    return mod, old_lse, old_merge


def ref64(q, k, v, scale):
    """float64 ``(out, lse)`` with GQA folded into rows (no KV copy)."""
    B, Hq, M, D = q.shape
    Hkv = k.shape[1]
    qg = q.double().reshape(B, Hkv, Hq // Hkv * M, D)
    s = torch.matmul(qg, k.double().transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, -1)
    out = torch.matmul(torch.exp(s - lse[..., None]), v.double())
    return out.reshape(B, Hq, M, -1), lse.reshape(B, Hq, M)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def inputs(hq, hkv, d, m, n, sets, dtype=torch.bfloat16, batch=1):
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
    return [(mk(batch, hq, m, d), mk(batch, hkv, n, d), mk(batch, hkv, n, d)) for _ in range(sets)]


def graph_us(fn, sets) -> float:
    """Median µs of one call, from CUDA-graph replays of one call per input set."""
    return do_bench_cudagraph(lambda: [fn(*s) for s in sets], rep=40, return_mode="median") * 1e3 / len(sets)


def run_shape(hq, hkv, d, m, n, ceil, old, sweep_rows, do_sweep, batch=1):
    kv_bytes = 2 * batch * hkv * n * d * 2
    sets = inputs(hq, hkv, d, m, n, max(1, -(-240 * 2**20 // kv_bytes)), batch=batch)  # >= 4x the 60 MB L2
    scale = d**-0.5
    q, k, v = sets[0]
    o, lse = torch.ops.fbcompile.attention_lse(q, k, v, None, scale)
    ro, rl = ref64(q, k, v, scale)
    row = dict(hq=hq, hkv=hkv, d=d, M=m, L=n, B=batch, err_out=rel_err(o, ro), err_lse=rel_err(lse, rl))
    del ro, rl
    new = lambda q, k, v: torch.ops.fbcompile.attention_lse(q, k, v, None, scale)  # noqa: E731
    row["us"] = graph_us(new, sets)
    if old is not None and d <= 256:
        oo, ol = old[1](q, k, v, scale)
        row["old_err_out"] = rel_err(oo, o)
        row["old_us"] = graph_us(lambda q, k, v: old[1](q, k, v, scale), sets)
    flops = 4 * batch * hq * m * n * d
    floor_us = max(kv_bytes / ceil["copy_bw"], flops / ceil["mm_flops"]) * 1e6
    row.update(intensity=flops / kv_bytes, pct_hbm=100 * kv_bytes / (row["us"] * 1e-6) / ceil["peak_hbm"],
               tflops=flops / (row["us"] * 1e-6) / 1e12, floor_us=floor_us, pct_floor=100 * floor_us / row["us"],
               bound="FLOPs" if flops / ceil["mm_flops"] > kv_bytes / ceil["copy_bw"] else "bytes")
    cfg, splits, _ = ta._plan(q, k, v, True, {})
    row["config"] = dict(cfg, num_splits=splits)
    row.update(refresh_times(sets, scale))
    if do_sweep:
        try:  # plain launches outside a triton_op, as the op body does
            from torch._library.triton import set_wrap_triton_enabled
        except ImportError:
            from contextlib import nullcontext as set_wrap_triton_enabled
        split_counts = sorted({max(1, splits * f // 4) for f in (2, 3, 6, 8)})
        for ov in SWEEP[d] + [{"num_splits": s} for s in split_counts]:
            err = None
            try:
                with set_wrap_triton_enabled(False):
                    err = rel_err(ta._attention(q, k, v, None, scale, **ov)[0], o)
                    us = graph_us(lambda q, k, v: ta._attention(q, k, v, None, scale, **ov), sets)
            except Exception as e:  # noqa: BLE001 - a variant may exceed shared memory or registers
                us = f"{type(e).__name__}"
            sweep_rows.append(dict(hq=hq, hkv=hkv, d=d, M=m, L=n, B=batch, override=ov, us=us, default_us=row["us"],
                                   err_vs_default=err))
            print("sweep", sweep_rows[-1], flush=True)
    del sets
    torch.cuda.empty_cache()
    return row


def refresh_times(sets, scale) -> dict:
    """A refresh step's attention, µs: the external part and the merge of the block's own keys (as many
    as its queries) as two ops, and as one (``attention_refresh_lse``), with the relative difference of
    their results."""
    blocks = [(torch.randn_like(k[:, :, :q.shape[2]]), torch.randn_like(v[:, :, :q.shape[2]])) for q, k, v in sets]
    joined = [(*s, *b) for s, b in zip(sets, blocks)]
    ops = torch.ops.fbcompile

    def two(q, k, v, kb, vb):
        o, lse = ops.attention_lse(q, k, v, None, scale)
        return ops.attention_merge_lse(q, kb, vb, None, scale, o, lse)

    def one(q, k, v, kb, vb):
        return ops.attention_refresh_lse(q, k, v, None, scale, kb, vb, None)

    return dict(two_ops_us=graph_us(two, joined), refresh_us=graph_us(one, joined),
                refresh_vs_two=rel_err(one(*joined[0])[0], two(*joined[0])[0]))


def fp32_checks(ceil_rows):
    """fp32 inputs (ieee dots) against float64, 8K keys, every head dim and M."""
    for hq, hkv, d in HEADS:
        for m in BLOCKS:
            (q, k, v), = inputs(hq, hkv, d, m, 8192, 1, torch.float32)
            o, lse = torch.ops.fbcompile.attention_lse(q, k, v, None, d**-0.5)
            ro, rl = ref64(q, k, v, d**-0.5)
            ceil_rows.append(dict(hq=hq, hkv=hkv, d=d, M=m, L=8192, err_out=rel_err(o, ro), err_lse=rel_err(lse, rl)))
            print("fp32", ceil_rows[-1], flush=True)


def host_costs(old) -> dict:
    """Host µs per call of one split attention (external + fused merge) at a small shape: eager op calls
    and an Inductor-compiled function, new registration vs the old opaque ``custom_op``; and whether
    the compiled code launches the kernels itself."""
    from torch._inductor.utils import run_and_get_code

    (q, k, v), = inputs(32, 8, 128, 32, 2048, 1)
    ki, vi = k[:, :, :32].clone(), v[:, :, :32].clone()
    ops = torch.ops.fbcompile

    def new(q, k, v, ki, vi):
        o, lse = ops.attention_lse(q, k, v, None, 0.088)
        return ops.attention_merge_lse(q, ki, vi, None, 0.088, o, lse)

    fns = {"new eager": new}
    compiled_new = torch.compile(new, fullgraph=True)
    _, code = run_and_get_code(compiled_new, q, k, v, ki, vi)
    src = "\n".join(code)
    result = dict(compiled_launches_kernels="_attn_kernel" in src and "torch.ops.fbcompile" not in src)
    fns["new compiled"] = compiled_new
    if old is not None:
        def old_fn(q, k, v, ki, vi):
            o, lse = old[1](q, k, v, 0.088)
            return old[2](q, ki, vi, 0.088, o, lse)
        fns["old eager"] = old_fn
        fns["old compiled"] = torch.compile(old_fn, fullgraph=True)
    for name, fn in fns.items():
        for _ in range(20):
            fn(q, k, v, ki, vi)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            fn(q, k, v, ki, vi)
        host = (time.perf_counter() - t) / 200 * 1e6
        torch.cuda.synchronize()
        result[f"{name} host us/call"] = round(host, 1)
    print("host", result, flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--old-tree", default=None, help="another checkout whose kernels to compare")
    ap.add_argument("--sweep", action="store_true",
                    help="time tile variants (M >= 64, >= 128 packed rows, or head dims > 128)")
    ap.add_argument("--heads", default=None, help="subset, e.g. 32/8/128,8/4/512")
    ap.add_argument("--blocks", default=None, help="subset of block query counts M, e.g. 32")
    ap.add_argument("--keys", default=None, help="subset of key counts, e.g. 32768,131072")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sweep-keys", default="32768", help="key counts the sweep runs at")
    ap.add_argument("--sweep-overrides", default=None,
                    help='JSON list of overrides the sweep times instead of SWEEP\'s, e.g. \'[{"BLOCK_N": 128}]\'')
    args = ap.parse_args()
    if args.sweep_overrides:
        SWEEP.update({d: json.loads(args.sweep_overrides) for d in SWEEP})
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    meta = dict(device=name, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                sms=torch.cuda.get_device_properties(0).multi_processor_count,
                command="PYTHONPATH=. python " + " ".join(sys.argv),
                peak_hbm=next((v for k, v in PEAK_HBM.items() if k in name), 3.35e12), **ceilings())
    print(meta, flush=True)
    old = load_old_kernels(args.old_tree) if args.old_tree else None
    heads = HEADS if args.heads is None else [tuple(int(x) for x in h.split("/")) for h in args.heads.split(",")]
    rows, sweep_rows, fp32_rows = [], [], []
    t0 = time.time()
    meta["host"] = host_costs(old)
    blocks = BLOCKS if args.blocks is None else [int(x) for x in args.blocks.split(",")]
    keys = KEYS if args.keys is None else [int(x) for x in args.keys.split(",")]
    sweep_keys = [int(x) for x in args.sweep_keys.split(",")]
    meta["batch"] = args.batch
    for hq, hkv, d in heads:
        for m in blocks:
            for n in keys:
                sweep = args.sweep and (m >= 64 or d > 128 or hq // hkv * m >= 128) and n in sweep_keys
                rows.append(run_shape(hq, hkv, d, m, n, meta, old, sweep_rows, sweep, args.batch))
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    fp32_checks(fp32_rows)
    meta["bench_seconds"] = round(time.time() - t0, 1)
    write(args.out, meta, rows, sweep_rows, fp32_rows)


def write(out_dir, meta, rows, sweep_rows, fp32_rows):
    from tabulate import tabulate

    gpu = meta["device"].replace("NVIDIA ", "").split()[0].lower()
    stem = os.path.join(out_dir, f"attention_{gpu}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, sweep=sweep_rows, fp32=fp32_rows), f, indent=1)
    headers = ["Hq/Hkv", "D", "M", "keys", "FLOP/B", "bound", "old µs", "µs", "floor µs", "% floor",
               "% HBM peak", "TFLOP/s", "err out", "err lse", "refresh: 2 ops µs", "1 op µs", "config"]
    table = [[f"{r['hq']}/{r['hkv']}", r["d"], r["M"], f"{r['L'] // 1024}K", round(r["intensity"]), r["bound"],
              f"{r['old_us']:.1f}" if "old_us" in r else "-", f"{r['us']:.1f}", f"{r['floor_us']:.1f}",
              f"{r['pct_floor']:.0f}%", f"{r['pct_hbm']:.0f}%", f"{r['tflops']:.0f}",
              f"{r['err_out']:.1e}", f"{r['err_lse']:.1e}", f"{r['two_ops_us']:.1f}", f"{r['refresh_us']:.1f}",
              " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["config"].items() if k not in ("BLOCK_D", "BLOCK_DV"))]
             for r in rows]
    with open(stem + ".md", "w") as f:
        f.write(f"# External split-attention kernel on {meta['device']}\n\n"
                f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {meta['sms']} SMs. "
                f"Command: `{meta['command']}` ({meta['bench_seconds']} s).\n\n"
                f"Measured ceilings: copy {meta['copy_bw'] / 1e12:.2f} TB/s (datasheet "
                f"{meta['peak_hbm'] / 1e12:.2f}), bf16 matmul {meta['mm_flops'] / 1e12:.0f} TFLOP/s (8192³, "
                f"random data). bf16, B={meta.get('batch', 1)}, `torch.ops.fbcompile.attention_lse` (split-KV "
                "kernel + split reduction), medians of CUDA-graph replays rotating over input sets of >= 240 MB. "
                "floor = max(KV bytes / copy bandwidth, 4·Hq·M·L·D / matmul rate); FLOP/B = GQA·M. "
                "% HBM peak = KV bytes / time over the datasheet bandwidth. `old` = the kernel before this "
                "change (D <= 256 only). Errors: relative L2 vs float64. `refresh`: the external part and the "
                "merge of the block's own keys (M of them) as `attention_lse` + `attention_merge_lse`, and as one "
                "`attention_refresh_lse`.\n\n")
        f.write(tabulate(table, headers, tablefmt="github") + "\n\n")
        f.write("Host cost per split attention (external + fused merge, 32/8 D128 M32 2K keys, no CUDA "
                f"graphs): {json.dumps(meta['host'])}\n\n")
        f.write("fp32 inputs, 8K keys, relative error vs float64 (out, lse): "
                + ", ".join(f"{r['hq']}/{r['hkv']} D{r['d']} M{r['M']}: {r['err_out']:.1e}/{r['err_lse']:.1e}"
                            for r in fp32_rows) + "\n")
        if sweep_rows:
            f.write("\nTile sweep (µs; overrides of the heuristic's choice):\n\n")
            f.write(tabulate([[f"{s['hq']}/{s['hkv']}", s["d"], s["M"], f"{s['L'] // 1024}K", json.dumps(s["override"]),
                               f"{s['default_us']:.1f}", s["us"] if isinstance(s["us"], str) else f"{s['us']:.1f}",
                               "" if s.get("err_vs_default") is None else f"{s['err_vs_default']:.1e}"]
                              for s in sweep_rows], ["Hq/Hkv", "D", "M", "keys", "override", "default µs", "µs",
                                                     "out vs default"],
                             tablefmt="github") + "\n")
    print(tabulate(table, headers, tablefmt="github"), flush=True)


if __name__ == "__main__":
    main()
