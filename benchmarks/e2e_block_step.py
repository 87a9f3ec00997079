"""End-to-end cost of one block (8 denoising steps) of a 1.5B-shaped block-diffusion LM on the GPU.

Why: kernel speed-ups only matter if they survive the whole model: projections, MLPs, Python and
launch overhead. Compares, per block of ``--steps`` forwards over a cache of L tokens:
eager PyTorch, ``torch.compile`` (Inductor), fbcompile exact mode (``refresh="always"``) and
fbcompile FlashBlock mode (``refresh="block"``: 1 refresh + steps-1 reuses). Also checks exact mode
against eager (bf16 relative error of the logits).

    python benchmarks/e2e_block_step.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fbcompile  # noqa: E402
from examples.block_diffusion_lm import BlockDiffusionConfig, BlockDiffusionLM  # noqa: E402

QWEN_1_5B = dict(vocab_size=32000, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                 head_dim=128, intermediate_size=8960, block_size=32, gqa_style="repeat_kv")


def build(dtype):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = BlockDiffusionLM(BlockDiffusionConfig(**QWEN_1_5B, dtype=dtype))
    return model.to(dtype).eval()


def make_cache(model, length, dtype):
    cfg = model.config
    gen = torch.Generator(device="cuda").manual_seed(1)
    shape = (1, cfg.num_kv_heads, length, cfg.head_dim)
    cache = [(torch.randn(shape, generator=gen, device="cuda", dtype=dtype),
              torch.randn(shape, generator=gen, device="cuda", dtype=dtype)) for _ in range(cfg.num_layers)]
    for k, v in cache:  # one compiled graph for every cache length
        torch._dynamo.mark_dynamic(k, 2)
        torch._dynamo.mark_dynamic(v, 2)
    return cache


def block(model, cache, steps, length, before_block=None):
    """One block: ``steps`` forwards of the (all-mask, then partly filled) block over the cache."""
    cfg = model.config
    x = torch.full((1, cfg.block_size), cfg.mask_token_id, device="cuda")
    pos = torch.arange(length, length + cfg.block_size, device="cuda")[None]
    if before_block is not None:
        before_block()
    logits = None
    for step in range(steps):
        logits = model(x, past_key_values=cache, position_ids=pos)[0]
        x[0, step] = step + 1  # the block changes between steps, as a sampler would change it
    return logits


def time_blocks(fn, repeats):
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--lengths", default="8192,32768")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="eager,compile,exact,block",
                        help="comma-separated subset of eager, compile, exact, block")
    parser.add_argument("--tag", default="", help="suffix of the result files, e.g. the code version")
    args = parser.parse_args()
    chosen = set(args.variants.split(","))
    dtype = torch.bfloat16
    rows = []
    torch.set_grad_enabled(False)
    variants = {}
    eager = build(dtype)  # also the reference of the error column
    if "eager" in chosen:
        variants["eager"] = eager
    if "compile" in chosen:
        variants["torch.compile (inductor)"] = torch.compile(build(dtype), dynamic=None)
    if "exact" in chosen:
        variants["fbcompile always (exact)"] = fbcompile.optimize(build(dtype), fbcompile.Config(refresh="always"))
    fb_block = fbcompile.optimize(build(dtype), fbcompile.Config(refresh="block"))
    if "block" in chosen:
        variants["fbcompile block (FlashBlock)"] = fb_block
    for length in [int(v) for v in args.lengths.split(",")]:
        cache = make_cache(eager, length, dtype)
        reference = block(eager, cache, 1, length).float()
        for name, model in variants.items():
            check = block(model, cache, 1, length).float()
            err = ((check - reference).norm() / reference.norm()).item()
            reset = (lambda m=model: fbcompile.reset(m)) if name.startswith("fbcompile block") else None
            ms = time_blocks(lambda m=model, r=reset: block(m, cache, args.steps, length, r), args.repeats)
            rows.append(dict(L=length, variant=name + args.tag, ms_per_block=round(ms, 2),
                             ms_per_step=round(ms / args.steps, 2), first_step_rel_err=float(f"{err:.2e}")))
            print(json.dumps(rows[-1]), flush=True)
        del cache
    stats = fbcompile.stats(fb_block)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__, python=platform.python_version(),
               command="python " + " ".join(sys.argv), steps=args.steps,
               model=QWEN_1_5B, dtype="bfloat16",
               block_mode_stats=dict(compiles=stats.compiles, refreshes=stats.refreshes, reuses=stats.reuses,
                                     refresh_reasons=stats.refresh_reasons))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "e2e_block_step" + args.tag.strip().replace(" ", "_"))
    with open(stem + ".json", "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    from tabulate import tabulate
    table = tabulate(rows, headers="keys", tablefmt="github")
    with open(stem + ".md", "w") as f:
        f.write(f"# One block ({args.steps} denoising steps), 1.5B-shaped block-diffusion LM\n\n")
        f.write("\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
