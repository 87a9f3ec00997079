"""GPU timings of sparse external attention with residual reuse (issue #15) against plain FlashBlock.

One Qwen2-1.5B-like layer (12 query / 2 KV heads, head dim 128), bf16, B=1, a block of 32 queries over
32K and 128K cached keys, KV tiles of 32 keys. Timed (medians of CUDA-graph replays over rotating
input sets of >= 240 MB, so the KV comes from HBM):

* refresh step: the plain external ``attention_lse``; ``attention_lse_tiles`` (the same plus the tile
  masses: its overhead in %); ``select_tiles``; the residual (``sparse_attention_lse`` + ``subtract_lse``);
* internal only: ``attention_lse`` over the block's 32 keys, and ``attention_merge_lse`` (the block's
  attention fused with the merge against the cached external part: FlashBlock's whole reuse step);
* ``sparse_attention_lse`` at budgets of 0..4096 KV entries, and the sparse reuse step composed of ops
  (sparse + ``merge_lse`` with the residual + ``attention_merge_lse``) and as the one op
  ``sparse_attention_merge_lse`` (the block's keys as one more split of the sparse kernel, the
  residual merged in its reduction), each as a multiple of ``attention_merge_lse`` (issue target:
  <= 1.3x at 512 entries); and ``attention_merge_lse`` over the selected keys gathered beforehand into
  one contiguous KV with the block's (``dense``: the step if the refresh gathered them).

Bandwidth: bytes of K/V read (all keys, or the selected tiles) per second. ``--tiny`` runs small
shapes on the CPU (the reference path, wall-clock medians) as a smoke check of the script; with
``TRITON_INTERPRET=1`` the ``--sweep`` variants run the Triton kernels in the interpreter.
``--chunk-store ptx,tl.store`` (GPU) times the refresh with tile masses once per way the attention kernel
stores its chunk LSEs (inline PTX, the default on NVIDIA GPUs; ``tl.store``), against the plain kernel,
in the graph and per kernel.

    PYTHONPATH=. python benchmarks/sparse_attention.py --out DIR [--tiny] [--sweep] [--chunk-store ptx,tl.store]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

try:  # plain launches outside a triton_op, for the sweep's variants
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:
    from contextlib import nullcontext as set_wrap_triton_enabled

import fbcompile  # noqa: F401  (registers torch.ops.fbcompile.*)
from fbcompile import ops as fbops

OPS = torch.ops.fbcompile
HQ, HKV, D, BLOCK, TILE = 12, 2, 128, 32, 32
BUDGETS = [0, 256, 512, 1024, 4096]  # KV entries attended fresh at a reuse step
KEYS = [32768, 131072]
TINY_KEYS = [1024, 4096]
SWEEP = [dict(num_splits=s, BLOCK_R=r) for s in (1, 4, 8, 16) for r in (16, 32, 64)]  # --sweep: fused step at 512


def time_us(fn, sets) -> float:
    """Median µs of one call: CUDA-graph replays of one call per input set, or wall clock on the CPU."""
    if sets[0][0].is_cuda:
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(lambda: [fn(*s) for s in sets], rep=40, return_mode="median") * 1e3 / len(sets)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for s in sets:
            fn(*s)
        times.append((time.perf_counter() - t0) / len(sets))
    return statistics.median(times) * 1e6


def kernel_us(fn, sets, rounds=5) -> dict:
    """GPU µs per call of each kernel ``fn`` launches (``torch.profiler``; plain launches, no graph)."""
    for s in sets:
        fn(*s)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            for s in sets:
                fn(*s)
        torch.cuda.synchronize()
    per = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name] = per.get(e.name, 0.0) + e.time_range.elapsed_us() / (rounds * len(sets))
    return {name: round(us, 2) for name, us in per.items()}


TILES_SWEEP = [dict(BLOCK_R=r, num_warps=w, num_stages=st) for r in (32, 64) for w in (4, 8) for st in (2, 3)]
DENSE_SWEEP = [dict(BLOCK_R=r, num_stages=st) for r in (16, 32) for st in (2, 3, 4)]  # --sweep: dense step at 512
CHUNK_STORES = {"ptx": True, "tl.store": False}  # --chunk-store name -> the launcher's CHUNK_STORE_PTX


def _compact(k, idx, k_blk):
    """The keys of the selected tiles ``idx`` (all selected: a top-k budget), gathered in tile order,
    then the block's own: the contiguous KV a reuse step would read if its refresh had gathered them."""
    rows = (idx.long().clamp(min=0)[..., None] * TILE + torch.arange(TILE, device=k.device)).flatten(2)
    gathered = k.gather(2, rows[..., None].expand(-1, -1, -1, k.shape[-1]))
    return torch.cat([gathered, k_blk], dim=2).contiguous()


def make_sets(n, device, tiny):
    """Input sets ``(q, k, v, k_blk, v_blk, idx per budget, residual)``, enough to exceed the L2 4x."""
    kv_bytes = 2 * HKV * n * D * 2
    count = 1 if tiny else max(1, -(-240 * 2**20 // kv_bytes))
    scale = D**-0.5
    sets = []
    for _ in range(count):
        mk = lambda *s: torch.randn(*s, device=device, dtype=torch.bfloat16)  # noqa: E731
        q, k, v = mk(1, HQ, BLOCK, D), mk(1, HKV, n, D), mk(1, HKV, n, D)
        out, lse, tile_mass = OPS.attention_lse_tiles(q, k, v, None, scale, TILE)
        idx = {b: OPS.select_tiles(tile_mass, b // TILE, 1.0) for b in BUDGETS}
        residual = {b: OPS.subtract_lse(out, lse, *OPS.sparse_attention_lse(q, k, v, None, scale, i, TILE))
                    for b, i in idx.items()}
        kb, vb = mk(1, HKV, BLOCK, D), mk(1, HKV, BLOCK, D)
        compact = {b: (_compact(k, i, kb), _compact(v, i, vb)) for b, i in idx.items()}
        sets.append((q, k, v, kb, vb, idx, residual, out, lse, tile_mass, compact))
    return sets


def checks(s) -> dict:
    """Relative errors of the kernels' results against the plain PyTorch reference (same device)."""
    q, k, v, kb, vb, idx, res, out, lse, tile_mass, compact = s
    scale = D**-0.5
    ref_out, ref_lse, ref_mass = fbops.reference.attention_lse_tiles(q, k, v, None, scale, TILE)
    plain_out, plain_lse = OPS.attention_lse(q, k, v, None, scale)
    err = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    sp_out, sp_lse = OPS.sparse_attention_lse(q, k, v, None, scale, idx[512], TILE)
    rs_out, rs_lse = fbops.reference.sparse_attention_lse(q, k, v, None, scale, idx[512], TILE)
    step_out, step_lse = OPS.sparse_attention_merge_lse(q, k, v, None, scale, idx[512], TILE, kb, vb, None, *res[512])
    rstep_out, rstep_lse = fbops.reference.sparse_attention_merge_lse(q, k, v, None, scale, idx[512], TILE, kb, vb,
                                                                      None, *res[512])
    dense_out, dense_lse = OPS.attention_merge_lse(q, *compact[512], None, scale, *res[512])
    return dict(tiles_out=err(out, ref_out), tiles_lse=err(lse, ref_lse), tile_mass=err(tile_mass, ref_mass),
                tiles_vs_plain_out=err(out, plain_out), tiles_vs_plain_lse=err(lse, plain_lse),
                sparse512_out=err(sp_out, rs_out), sparse512_lse=err(sp_lse, rs_lse),
                step512_out=err(step_out, rstep_out), step512_lse=err(step_lse, rstep_lse),
                dense512_out=err(dense_out, rstep_out), dense512_lse=err(dense_lse, rstep_lse))


def chunk_store_rows(sets, ta, external_us, stores) -> list:
    """The refresh with tile masses per chunk-LSE store (plain launches): its time in the graph, its
    overhead over the plain external attention, GPU µs per kernel and the tile masses' error."""
    q, k, v = sets[0][:3]
    scale = D**-0.5
    ref_mass = fbops.reference.attention_lse_tiles(q, k, v, None, scale, TILE)[2]
    rows = []
    for store in stores:
        def tiles(q, k, v, *_, ptx=CHUNK_STORES[store]):
            tile_mass = torch.empty(q.shape[0], HKV, -(-k.shape[2] // TILE), device=q.device)
            with set_wrap_triton_enabled(False):
                ta._attention(q, k, v, None, scale, tiles=(TILE, tile_mass), CHUNK_STORE_PTX=ptx)
            return tile_mass

        mass = tiles(q, k, v)
        us = time_us(tiles, sets)
        rows.append(dict(store=store, tiles_us=us, overhead_pct=100 * (us / external_us - 1),
                         kernels=kernel_us(tiles, sets),
                         tile_mass_err=((mass.double() - ref_mass.double()).norm() / ref_mass.double().norm()).item()))
    return rows


def run_keys(n, device, tiny, sweep, chunk_stores=()):
    scale = D**-0.5
    sets = make_sets(n, device, tiny)
    row = dict(keys=n, sets=len(sets), errors=checks(sets[0]))
    ta = fbops.triton_attention if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else None
    t = lambda fn: time_us(fn, sets)  # noqa: E731
    row["external_us"] = t(lambda q, k, v, *_: OPS.attention_lse(q, k, v, None, scale))
    row["tiles_us"] = t(lambda q, k, v, *_: OPS.attention_lse_tiles(q, k, v, None, scale, TILE))
    row["tiles_overhead_pct"] = 100 * (row["tiles_us"] / row["external_us"] - 1)
    if chunk_stores and device == "cuda":
        row["external_kernels"] = kernel_us(lambda q, k, v, *_: OPS.attention_lse(q, k, v, None, scale), sets)
        row["chunk_stores"] = chunk_store_rows(sets, ta, row["external_us"], chunk_stores)
    if sweep and device == "cuda":  # where the tile masses' time goes, and kernel settings for them
        row["external_kernels"] = kernel_us(lambda q, k, v, *_: OPS.attention_lse(q, k, v, None, scale), sets)
        row["tiles_kernels"] = kernel_us(lambda q, k, v, *_: OPS.attention_lse_tiles(q, k, v, None, scale, TILE), sets)
        row["tiles_sweep"] = []
        for ov in TILES_SWEEP:
            with set_wrap_triton_enabled(False):
                plain = t(lambda q, k, v, *_: ta._attention(q, k, v, None, scale, **ov))
                tiles = t(lambda q, k, v, *_: ta._attention(
                    q, k, v, None, scale, tiles=(TILE, torch.empty(1, HKV, -(-n // TILE), device=q.device)), **ov))
            row["tiles_sweep"].append(dict(ov, plain_us=plain, tiles_us=tiles, overhead_pct=100 * (tiles / plain - 1)))
        default_block_t, row["mass_sweep"] = ta._MASS_BLOCK_T, []
        for block_t in (8, 16, 32, 64):  # KV tiles per tile-mass program
            ta._MASS_BLOCK_T = block_t
            tiles = t(lambda q, k, v, *_: OPS.attention_lse_tiles(q, k, v, None, scale, TILE))
            row["mass_sweep"].append(dict(block_t=block_t, tiles_us=tiles,
                                          overhead_pct=100 * (tiles / row["external_us"] - 1)))
        ta._MASS_BLOCK_T = default_block_t
    row["select_512_us"] = t(lambda *s: OPS.select_tiles(s[9], 512 // TILE, 1.0))
    row["select_mass90_us"] = t(lambda *s: OPS.select_tiles(s[9], 4096 // TILE, 0.9))
    row["residual_512_us"] = t(lambda q, k, v, kb, vb, idx, res, out, lse, tm, _: OPS.subtract_lse(
        out, lse, *OPS.sparse_attention_lse(q, k, v, None, scale, idx[512], TILE)))
    row["internal_us"] = t(lambda q, k, v, kb, vb, *_: OPS.attention_lse(q, kb, vb, None, scale))
    row["flashblock_step_us"] = t(lambda q, k, v, kb, vb, idx, res, out, lse, tm, _: OPS.attention_merge_lse(
        q, kb, vb, None, scale, out, lse))
    kv_bytes = 2 * HKV * n * D * 2
    row["external_GBps"] = kv_bytes / row["external_us"] / 1e3
    row["tiles_GBps"] = kv_bytes / row["tiles_us"] / 1e3
    row["budgets"] = []
    for b in BUDGETS:
        br = dict(budget=b)
        br["sparse_us"] = t(lambda q, k, v, kb, vb, idx, *_: OPS.sparse_attention_lse(
            q, k, v, None, scale, idx[b], TILE))
        br["sparse_GBps"] = 2 * HKV * b * D * 2 / br["sparse_us"] / 1e3

        def ops_step(q, k, v, kb, vb, idx, res, *_):
            ext = OPS.merge_lse(*res[b], *OPS.sparse_attention_lse(q, k, v, None, scale, idx[b], TILE))
            return OPS.attention_merge_lse(q, kb, vb, None, scale, *ext)

        def fused_step(q, k, v, kb, vb, idx, res, *_, **overrides):
            if not overrides:
                return OPS.sparse_attention_merge_lse(q, k, v, None, scale, idx[b], TILE, kb, vb, None, *res[b])
            with set_wrap_triton_enabled(False):  # plain launches outside a triton_op, as the op body does
                return ta.sparse_attention_merge_lse(q, k, v, None, scale, idx[b], TILE, kb, vb, None, *res[b],
                                                     **overrides)

        def dense_step(q, k, v, kb, vb, idx, res, out, lse, tm, compact, **overrides):
            if not overrides:
                return OPS.attention_merge_lse(q, *compact[b], None, scale, *res[b])
            with set_wrap_triton_enabled(False):
                return ta._attention(q, *compact[b], None, scale, *res[b], split_keys=False, **overrides)

        br["ops_step_us"] = t(ops_step)
        br["fused_step_us"] = t(fused_step)
        br["dense_step_us"] = t(dense_step)
        for ov in DENSE_SWEEP if sweep and ta is not None and b == 512 else []:
            name = "dense_step_" + "_".join(f"{k.replace('BLOCK_', '').replace('num_', '')}{v}" for k, v in ov.items())
            try:
                br[name + "_us"] = t(lambda *a, ov=ov: dense_step(*a, **ov))
            except Exception as e:  # noqa: BLE001 - a variant may exceed shared memory or registers
                print("dense variant failed", ov, type(e).__name__, flush=True)
        for ov in sweep if ta is not None and b == 512 else []:
            name = "fused_step_" + "_".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in ov.items()) + "_us"
            try:
                br[name] = t(lambda *a, ov=ov: fused_step(*a, **ov))
            except Exception as e:  # noqa: BLE001 - a variant may exceed shared memory or registers
                print("sweep variant failed", ov, type(e).__name__, flush=True)
        for key in [k for k in br if "_step" in k]:
            br[key.replace("_us", "_x_flashblock")] = br[key] / row["flashblock_step_us"]
        row["budgets"].append(br)
        print(n, br, flush=True)
    del sets
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def versions(device) -> dict:
    meta = dict(torch=torch.__version__, python=platform.python_version(), command="PYTHONPATH=. python "
                + " ".join(sys.argv), shape=dict(Hq=HQ, Hkv=HKV, D=D, block=BLOCK, tile=TILE, dtype="bf16"))
    if device == "cuda":
        import triton

        meta.update(device=torch.cuda.get_device_name(), triton=triton.__version__, cuda=torch.version.cuda,
                    sms=torch.cuda.get_device_properties(0).multi_processor_count)
    else:
        from benchmarks.machine import cpu_name

        meta.update(device=cpu_name(), threads=torch.get_num_threads())
    return meta


def write(out_dir, meta, rows):
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "sparse_attention_" + ("cpu_tiny" if meta["tiny"] else
                                                         meta["device"].replace("NVIDIA ", "").split()[0].lower())
                        + ("" if TILE == 32 else f"_tile{TILE}"))
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# Sparse external attention with residual reuse on {meta['device']}", "",
             f"torch {meta['torch']}" + (f", triton {meta['triton']}, CUDA {meta['cuda']}" if "triton" in meta else "")
             + f". Command: `{meta['command']}` ({meta['seconds']} s). Layer: {HQ} q / {HKV} kv heads, D {D}, "
             f"block {BLOCK}, tile {TILE}, bf16, B=1. Medians of "
             + ("CUDA-graph replays over rotating input sets (>= 240 MB)." if "triton" in meta else
                "wall-clock calls (CPU reference path: a smoke check, not a measurement)."), "",
             "| keys | external µs | +tile mass µs (overhead) | GB/s ext / tiles | internal µs "
             "| FlashBlock step µs | select 512 µs | residual 512 µs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['keys'] // 1024}K | {r['external_us']:.1f} | {r['tiles_us']:.1f} "
                     f"({r['tiles_overhead_pct']:+.1f}%) | {r['external_GBps']:.1f} / {r['tiles_GBps']:.1f} | "
                     f"{r['internal_us']:.1f} | {r['flashblock_step_us']:.1f} | {r['select_512_us']:.1f} | "
                     f"{r['residual_512_us']:.1f} |")
    step_keys = [k for k in rows[0]["budgets"][0] if k.endswith("_x_flashblock")]
    lines += ["", "Per budget (KV entries attended fresh); `x FB` = reuse step time / FlashBlock reuse step "
              "(`attention_merge_lse`); `ops` = sparse_attention_lse + merge_lse + attention_merge_lse, `fused` = "
              "sparse_attention_merge_lse (one kernel + its reduction; one launch with 1 split); `dense` = "
              "attention_merge_lse over the selected tiles' keys gathered beforehand into one contiguous KV with "
              "the block's (what a reuse step costs if the refresh gathers them); `--sweep` adds variants of the "
              "fused step (N splits, M rows per program) and of the dense step (rows, stages) at 512, in a table "
              "of their own.",
              "", "| keys | budget | sparse µs | sparse GB/s | " + " | ".join(
                  k.replace("_x_flashblock", "").replace("_step", "") + " µs (x FB)" for k in step_keys) + " |",
              "|---|---|---|---|" + "---|" * len(step_keys)]
    for r in rows:
        for b in r["budgets"]:
            lines.append(f"| {r['keys'] // 1024}K | {b['budget']} | {b['sparse_us']:.1f} | {b['sparse_GBps']:.1f} | "
                         + " | ".join(f"{b[k.replace('_x_flashblock', '_us')]:.1f} ({b[k]:.2f}x)" for k in step_keys)
                         + " |")
    sweep = [(r["keys"], k, b[k], b[k.replace("_us", "_x_flashblock")]) for r in rows for b in r["budgets"]
             for k in b if k.startswith(("fused_step_", "dense_step_")) and k.endswith("_us")
             and k not in ("fused_step_us", "dense_step_us")]
    if sweep:
        lines += ["", "| keys | step at 512, variant | µs | x FB |", "|---|---|---|---|"]
        lines += [f"| {n // 1024}K | {k[:-3]} | {us:.1f} | {x:.2f}x |" for n, k, us, x in sweep]
    store_rows = [r for r in rows if "chunk_stores" in r]
    if store_rows:
        lines += ["", "Chunk-LSE stores of the tile masses (`--chunk-store`; plain launches; GPU µs per call by "
                  "kernel from the profiler; overhead in the graph against the plain external attention):", "",
                  "| keys | chunk store | in the graph µs (overhead) | `_attn_kernel` µs | `_reduce_kernel` µs "
                  "| tile mass rel. error |", "|---|---|---|---|---|---|"]
        for r in store_rows:
            ext = r["external_kernels"]
            lines.append(f"| {r['keys'] // 1024}K | none (plain kernel) | {r['external_us']:.1f} | "
                         f"{ext.get('_attn_kernel', float('nan')):.2f} | {ext.get('_reduce_kernel', float('nan')):.2f} "
                         "| - |")
            lines += [f"| {r['keys'] // 1024}K | {c['store']} | {c['tiles_us']:.1f} ({c['overhead_pct']:+.1f}%) | "
                      f"{c['kernels'].get('_attn_kernel', float('nan')):.2f} | "
                      f"{c['kernels'].get('_reduce_kernel', float('nan')):.2f} | {c['tile_mass_err']:.1e} |"
                      for c in r["chunk_stores"]]
    for r in rows:
        if "tiles_kernels" in r:
            lines += ["", f"{r['keys'] // 1024}K, GPU µs per call by kernel (profiler, plain launches): external "
                      + ", ".join(f"`{k[:40]}` {v}" for k, v in r["external_kernels"].items()) + "; with tile masses "
                      + ", ".join(f"`{k[:40]}` {v}" for k, v in r["tiles_kernels"].items()), "",
                      "| settings | plain µs | with tile masses µs | overhead |", "|---|---|---|---|"]
            lines += [f"| R{v['BLOCK_R']} w{v['num_warps']} s{v['num_stages']} | {v['plain_us']:.1f} | "
                      f"{v['tiles_us']:.1f} | {v['overhead_pct']:+.1f}% |" for v in r["tiles_sweep"]]
            lines += ["", "| KV tiles per tile-mass program | with tile masses µs | overhead |", "|---|---|---|"]
            lines += [f"| {v['block_t']} | {v['tiles_us']:.1f} | {v['overhead_pct']:+.1f}% |" for v in r["mass_sweep"]]
    lines += ["", "Relative errors vs the PyTorch reference on the same inputs: "
              + "; ".join(f"{r['keys'] // 1024}K " + ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
                          for r in rows), ""]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines), flush=True)


def main():
    global TILE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU: a smoke check of the script")
    ap.add_argument("--keys", default=None, help="comma-separated cached-key counts (default 32K,128K)")
    ap.add_argument("--sweep", action="store_true", help="also time variants of the fused reuse step at 512")
    ap.add_argument("--tile", type=int, default=TILE, help=f"keys per KV tile (default {TILE}; fbcompile.Sparse's: 64)")
    ap.add_argument("--chunk-store", default="", help="comma-separated chunk-LSE stores to time with the tile masses "
                    f"(GPU): {', '.join(CHUNK_STORES)}")
    args = ap.parse_args()
    chunk_stores = [x for x in args.chunk_store.split(",") if x]
    if set(chunk_stores) - set(CHUNK_STORES):
        ap.error(f"--chunk-store takes {', '.join(CHUNK_STORES)}")
    TILE = args.tile
    device = "cpu" if args.tiny else "cuda"
    torch.manual_seed(0)
    keys = [int(x) for x in args.keys.split(",")] if args.keys else TINY_KEYS if args.tiny else KEYS
    meta = dict(versions(device), tiny=args.tiny)
    t0 = time.time()
    rows = [run_keys(n, device, args.tiny, SWEEP if args.sweep else [], chunk_stores) for n in keys]
    meta["seconds"] = round(time.time() - t0, 1)
    write(args.out, meta, rows)


if __name__ == "__main__":
    main()
