"""Long-generation memory check (CPU): does fbcompile's own state stay flat over >= 1000 blocks?

Why it exists: with ``refresh="block"`` fbcompile caches every attention site's block-external
result ``(O_e, L_e)``, keyed by the KV tensors, and dynamo compiles graphs as the cache length
changes. Over a long generation neither may grow with the number of blocks: the cache must hold one
entry per attention layer (entries of freed KV tensors are dropped) and the number of compiled
graphs must be bounded (the cache length is dynamic). The example model keeps its whole KV cache
(it grows by one block per block - the model's own memory), so that is measured separately and
subtracted from the process RSS.

The example's ``BlockDiffusionLM.generate`` hands its KV cache to a callback after every block,
where the state is sampled.

Run from the repository root::

    PYTHONPATH=. python benchmarks/long_generate_memory.py --out benchmarks/results

It writes ``long_generate_memory_cpu.{md,json,png}`` into the output folder.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

import fbcompile
from benchmarks.machine import cpu_name
from examples.block_diffusion_lm import make_tiny_model


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for kv in cache for t in kv)


@torch.no_grad()
def run(model, prompt, num_blocks: int, every: int, log=print):
    """``model.generate`` with a sample of fbcompile's state every ``every`` blocks."""
    session = model.__dict__.get("_fbcompile")  # None: plain model (control run)
    samples = []
    t0 = time.perf_counter()

    def sample(blocks_done, cache):
        if blocks_done % every and blocks_done not in (0, num_blocks):
            return
        gc.collect()
        st = fbcompile.stats(model) if session is not None else None
        rss, kv = rss_bytes(), kv_bytes(cache)
        row = {
            "blocks": blocks_done,
            "cache_len": cache[0][0].shape[-2],
            "cached_bytes": session.cached_bytes if session else 0,
            "cache_entries": len(session.cache) if session else 0,
            "compiles": st.compiles if st else 0,
            "refreshes": st.refreshes if st else 0,
            "reuses": st.reuses if st else 0,
            "kv_cache_bytes": kv,
            "rss_bytes": rss,
            "rss_minus_kv_bytes": rss - kv,
            "elapsed_s": round(time.perf_counter() - t0, 2),
        }
        samples.append(row)
        log(f"blocks {blocks_done:5d}  cache_len {row['cache_len']:6d}  cached_bytes {row['cached_bytes']:8d}  "
            f"entries {row['cache_entries']:3d}  compiles {row['compiles']:3d}  "
            f"kv {kv / 2**20:8.2f} MiB  rss-kv {row['rss_minus_kv_bytes'] / 2**20:8.2f} MiB  "
            f"t {row['elapsed_s']:.1f}s")

    model.generate(prompt, num_blocks, on_block=sample)
    return samples


def verdict(samples, warmup_blocks: int):
    """Flat = no growth of cached_bytes / entries after warm-up; compiles bounded = no new graph after it."""
    late = [s for s in samples if s["blocks"] >= warmup_blocks]
    cb = {s["cached_bytes"] for s in late}
    ce = {s["cache_entries"] for s in late}
    co = {s["compiles"] for s in late}
    rss = [s["rss_minus_kv_bytes"] for s in late]
    return {
        "after_blocks": warmup_blocks,
        "cached_bytes_values": sorted(cb),
        "cache_entries_values": sorted(ce),
        "compiles_values": sorted(co),
        "cached_bytes_flat": len(cb) == 1,
        "cache_entries_flat": len(ce) == 1,
        "compiles_bounded": len(co) == 1,
        "rss_minus_kv_growth_bytes": rss[-1] - rss[0],
        "rss_minus_kv_min_max_bytes": [min(rss), max(rss)],
    }


def plot(samples, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s["blocks"] for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    ax.plot(x, [s["cached_bytes"] / 1024 for s in samples], marker=".")
    ax.set_title("fbcompile cached_bytes (KiB)")
    ax = axes[0, 1]
    ax.plot(x, [s["cache_entries"] for s in samples], marker=".", label="cache entries")
    ax.plot(x, [s["compiles"] for s in samples], marker=".", label="compiled graphs")
    ax.set_title("cache entries / compiled graphs")
    ax.legend()
    ax = axes[1, 0]
    ax.plot(x, [s["rss_minus_kv_bytes"] / 2**20 for s in samples], marker=".", label="fbcompile")
    if any(s.get("plain_rss_minus_kv_bytes") is not None for s in samples):
        ax.plot(x, [None if s.get("plain_rss_minus_kv_bytes") is None else s["plain_rss_minus_kv_bytes"] / 2**20
                    for s in samples], marker=".", label="plain model (control)")
    ax.legend()
    ax.set_title("process RSS minus model KV cache (MiB)")
    ax = axes[1, 1]
    ax.plot(x, [s["kv_cache_bytes"] / 2**20 for s in samples], marker=".", color="gray")
    ax.set_title("model's own KV cache (MiB, grows by design)")
    for ax in axes.flat:
        ax.set_xlabel("blocks generated")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--blocks", type=int, default=1000)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--compiler", choices=["eager", "inductor"], default="eager")
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--hidden-size", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps per block")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared CPU)")
    ap.add_argument("--plain", action="store_true",
                    help="control: same loop without fbcompile; writes only long_generate_memory_cpu_plain.json")
    ap.add_argument("--no-control", action="store_true", help="skip the plain-model control run (a subprocess)")
    ap.add_argument("--warmup-blocks", type=int, default=50,
                    help="samples from this block on must show no growth")
    args = ap.parse_args(argv)

    overrides = {}
    if args.num_layers is not None:
        overrides["num_layers"] = args.num_layers
    if args.hidden_size is not None:
        overrides["hidden_size"] = args.hidden_size
    if args.block_size is not None:
        overrides["block_size"] = args.block_size
    if args.steps is not None:
        overrides["denoising_steps"] = args.steps

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = make_tiny_model(**overrides)
    prompt = torch.randint(0, 200, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    if args.plain:
        samples = run(model, prompt, args.blocks, args.every)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "long_generate_memory_cpu_plain.json"), "w") as f:
            json.dump(samples, f)
        return
    control = None
    if not args.no_control:
        # The model's own memory behaviour (allocator growth from the ever-larger KV tensors) without
        # fbcompile, in a fresh process so both RSS curves start alike.
        import subprocess
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            # argparse keeps the last --out, so ours (appended) wins over the user's
            cmd = [sys.executable, os.path.abspath(__file__), "--plain"] + \
                  list(sys.argv[1:] if argv is None else argv) + ["--out", tmp]
            print("control run:", " ".join(cmd[1:]))
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(tmp, "long_generate_memory_cpu_plain.json")) as f:
                control = json.load(f)
    config = fbcompile.Config(refresh="block", compiler=args.compiler)
    fbcompile.optimize(model, config)

    t0 = time.perf_counter()
    samples = run(model, prompt, args.blocks, args.every)
    wall = time.perf_counter() - t0
    if control is not None:
        by_blocks = {c["blocks"]: c for c in control}
        for s in samples:
            c = by_blocks.get(s["blocks"])
            s["plain_rss_minus_kv_bytes"] = c["rss_minus_kv_bytes"] if c else None
    v = verdict(samples, args.warmup_blocks)
    st = fbcompile.stats(model)

    cfg = model.config
    command = "PYTHONPATH=. python benchmarks/long_generate_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    model_desc = {k: getattr(cfg, k) for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                                                "head_dim", "block_size", "denoising_steps")}
    flat = v["cached_bytes_flat"] and v["cache_entries_flat"]
    conclusion = (
        f"fbcompile state is {'FLAT' if flat else 'NOT FLAT'} over {args.blocks} blocks "
        f"(after block {args.warmup_blocks}: cached_bytes in {v['cached_bytes_values']}, "
        f"cache entries in {v['cache_entries_values']}); compiled graphs are "
        f"{'BOUNDED' if v['compiles_bounded'] else 'NOT BOUNDED'} (values {v['compiles_values']}). "
        f"RSS minus the model's KV cache changed by {v['rss_minus_kv_growth_bytes'] / 2**20:+.2f} MiB "
        f"from block {args.warmup_blocks} to {args.blocks} "
        f"(min {v['rss_minus_kv_min_max_bytes'][0] / 2**20:.2f}, max {v['rss_minus_kv_min_max_bytes'][1] / 2**20:.2f} MiB)"
    )
    if control is not None:
        late = [c for c in control if c["blocks"] >= args.warmup_blocks]
        v["plain_rss_minus_kv_growth_bytes"] = late[-1]["rss_minus_kv_bytes"] - late[0]["rss_minus_kv_bytes"]
        conclusion += (f"; the same loop without fbcompile (control, fresh process) changed by "
                       f"{v['plain_rss_minus_kv_growth_bytes'] / 2**20:+.2f} MiB over the same blocks")
        excess = v["rss_minus_kv_growth_bytes"] - v["plain_rss_minus_kv_growth_bytes"]
        conclusion += (f" (difference {excess / 2**20:+.2f} MiB: "
                       + ("not more than the control, so the RSS drift is the model's own allocation pattern - a new, larger KV "
                          "tensor per block - not fbcompile state)." if excess < 4 * 2**20 else
                          "fbcompile's process grows more than the control; investigate)."))
    else:
        conclusion += "."
    print(conclusion)
    print(st)

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, "long_generate_memory_cpu")
    result = {"command": command, "machine": machine, "config": {"refresh": "block", "compiler": args.compiler},
              "model": model_desc, "prompt_len": args.prompt_len, "blocks": args.blocks,
              "wall_s": round(wall, 1), "final_stats": {"compiles": st.compiles, "refreshes": st.refreshes,
                                                       "reuses": st.reuses, "refresh_reasons": st.refresh_reasons},
              "verdict": v, "conclusion": conclusion, "samples": samples}
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)

    lines = [
        "# Long generate: fbcompile memory over many blocks (CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cpus']} CPUs ({machine['torch_threads']} torch threads), "
        f"torch {machine['torch']}, Python {machine['python']}.",
        "",
        f"Model: `make_tiny_model({', '.join(f'{k}={v}' for k, v in overrides.items())})` -> {model_desc}; "
        f"batch 1, prompt {args.prompt_len} tokens; `fbcompile.Config(refresh=\"block\", compiler=\"{args.compiler}\")`. "
        f"Loop = `BlockDiffusionLM.generate` written out (helpers imported from examples/block_diffusion_lm.py). "
        f"Wall time {wall:.0f} s.",
        "",
        "RSS-KV = process RSS minus the bytes of the model's own KV cache tensors (which grow by one block per "
        "block by design). Sampled after `gc.collect()`. 'plain model' = the same loop on the same model "
        "without fbcompile, in a fresh subprocess (control for the allocator's own drift).",
        "",
        "| blocks | cache len | cached_bytes | cache entries | compiles | refreshes | reuses | KV cache (MiB) | RSS (MiB) | RSS-KV (MiB) | plain model RSS-KV (MiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in samples:
        lines.append(f"| {s['blocks']} | {s['cache_len']} | {s['cached_bytes']} | {s['cache_entries']} | "
                     f"{s['compiles']} | {s['refreshes']} | {s['reuses']} | {s['kv_cache_bytes'] / 2**20:.2f} | "
                     f"{s['rss_bytes'] / 2**20:.2f} | {s['rss_minus_kv_bytes'] / 2**20:.2f} | "
                     f"{'-' if s.get('plain_rss_minus_kv_bytes') is None else format(s['plain_rss_minus_kv_bytes'] / 2**20, '.2f')} |")
    lines += ["", f"Final stats: {st.compiles} graphs compiled, {st.refreshes} refresh calls, {st.reuses} reuse "
              f"calls; refresh reasons {st.refresh_reasons}.", "", "**Conclusion:** " + conclusion, "",
              "Plot: `long_generate_memory_cpu.png`.", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    plot(samples, base + ".png",
         f"fbcompile refresh='block' compiler={args.compiler}, {args.blocks} blocks, {model_desc} - torch {torch.__version__} CPU")
    print("wrote", base + ".{md,json,png}")


if __name__ == "__main__":
    main()
