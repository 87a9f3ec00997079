"""Where a first call's time goes: one fbcompile (or torch.compile) variant of Fast-dLLM's Dream/LLaDA
generation (``benchmarks/llada_generate.py``'s models), its first ``generate`` under cProfile.

Prints the Inductor compiles (how many, their seconds), dynamo's and Inductor's timed phases
(``torch._dynamo.utils.compile_times``), fbcompile's graph count, and the functions with the most cumulative time, so that a first call slower than
``torch.compile``'s can be read down to what it spends on.

    python benchmarks/first_call.py --model dream --layers 4 --variant exact-cg --top 60
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fbcompile  # noqa: E402
from llada_generate import BLOCK, DREAM_7B, LLADA_8B, TINY, build, variant  # noqa: E402


def count_inductor_compiles() -> list[float]:
    """The seconds of each Inductor compile from now on (fbcompile's graphs and ``torch.compile``'s both
    go through ``compile_fx``; block mode compiles a refresh and a reuse graph per dynamo graph)."""
    from torch._inductor import compile_fx as module

    seconds, compile_fx = [], module.compile_fx

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return compile_fx(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    module.compile_fx = timed
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("llada", "dream"), default="dream")
    parser.add_argument("--variant", default="exact-cg")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--gen", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--config", default="", help="extra Config fields, e.g. combo_kernels=False")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--top", type=int, default=50, help="functions to list (0: no cProfile)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch._dynamo.config.recompile_limit = 64
    shape = TINY if args.tiny else DREAM_7B if args.model == "dream" else LLADA_8B
    dtype = torch.float32 if args.tiny else torch.bfloat16
    base = build(args.model, shape, args.layers, args.prompt + args.gen, device, dtype)
    overrides = dict(item.split("=") for item in args.config.split(",") if item)
    model = variant(base, args.variant, "inductor", {k: v == "True" if v in ("True", "False") else v
                                                     for k, v in overrides.items()})
    prompt = torch.randint(0, base.config.vocab_size - 1, (1, args.prompt), device=device)
    blocks = args.gen // BLOCK
    run_args = dict(gen_length=args.gen, block_size=BLOCK, steps=blocks * args.steps)
    inductor = count_inductor_compiles()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    with torch.no_grad():
        if args.top:
            profiler.runcall(model.generate, prompt, **run_args)
        else:
            model.generate(prompt, **run_args)
        if device.type == "cuda":
            torch.cuda.synchronize()
    print(f"{args.variant}: first call {time.perf_counter() - start:.1f} s; {len(inductor)} Inductor compiles, "
          f"{sum(inductor):.1f} s")
    if args.variant not in ("compile", "eager"):
        print(fbcompile.stats(model))
    print(torch._dynamo.utils.compile_times(repr="str", aggregate=True))
    if not args.top:
        return
    for order, count in (("cumulative", args.top), ("tottime", args.top // 2)):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(count)
        print(text.getvalue())


if __name__ == "__main__":
    main()
