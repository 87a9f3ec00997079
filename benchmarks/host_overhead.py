"""Host time per denoising step under CUDA graphs, without the GPU: where the Python goes.

On the H200 a graphed block of the 28-layer example LM took 8.0 ms of host time to issue (9 forwards:
~0.9 ms each, `profile_lm_32k_b1_h200.md`) against ~16 ms of GPU work: hidden behind the GPU there,
but the floor for smaller models, shorter contexts or faster GPUs. This measures that host time on
the CPU: the example LM with 28 layers at tiny width (so the model's own work is small), optimized
with ``Config(cuda_graphs=True, compiler="eager")``, and the CUDA-graph capture replaced by a stand-in
whose replay does nothing (the captured outputs stay as they were): what is timed is dynamo's guards,
fbcompile's dispatcher and CUDA-graph bookkeeping, and the workload's own sampling ops.

Per step kind (a block's refresh, its reuse steps): median µs per forward over ``--blocks`` blocks,
and with ``--profile [reuse|refresh]`` the top functions by own time (``cProfile``) over those steps.

    PYTHONPATH=. python benchmarks/host_overhead.py --layers 28 --blocks 20 --profile
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

import fbcompile
from fbcompile.backends import cuda_graphs
from examples.block_diffusion_lm import make_tiny_model


def no_replay_record(run, args, session):
    """A capture whose replay does nothing: only the host path around it is left to time."""
    outputs = run(*args)
    return (lambda call_args: None), outputs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile", nargs="?", const="reuse", choices=("reuse", "refresh"),
                    help="profile the reuse steps (default) or the refresh steps")
    ap.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumulative)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cuda_graphs.DEVICE_TYPE, cuda_graphs.record = "cpu", no_replay_record
    model = make_tiny_model(num_layers=args.layers, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                            intermediate_size=64, vocab_size=64, mask_token_id=63, block_size=8, denoising_steps=args.steps)
    fbcompile.optimize(model, fbcompile.Config(cuda_graphs=True, compiler="eager"))
    cfg = model.config
    with torch.no_grad():
        _, cache = model(torch.randint(0, 60, (1, 64)), use_cache=True)
        x = torch.full((1, cfg.block_size), cfg.mask_token_id)
        pos = torch.arange(64, 64 + cfg.block_size)[None]
        times = {"refresh": [], "reuse": []}
        profiler = cProfile.Profile() if args.profile else None
        for block in range(args.blocks + 3):
            fbcompile.new_request(model)
            for step in range(args.steps):
                timed = block >= 3
                t0 = time.perf_counter()
                profiled = timed and profiler and (step == 0) == (args.profile == "refresh")
                if profiled:
                    profiler.enable()
                model(x, past_key_values=cache, position_ids=pos)
                if profiled:
                    profiler.disable()
                if timed:
                    times["refresh" if step == 0 else "reuse"].append((time.perf_counter() - t0) * 1e6)
    counts = fbcompile.stats(model).cuda_graphs
    print(f"{args.layers} layers, {args.blocks} blocks of {args.steps} steps; CUDA-graph counts {dict(counts)}")
    for kind, ts in times.items():
        print(f"{kind}: median {statistics.median(ts):.0f} µs per forward ({len(ts)} forwards)")
    if profiler:
        stats = pstats.Stats(profiler)
        stats.sort_stats(args.sort).print_stats(30)


if __name__ == "__main__":
    main()
