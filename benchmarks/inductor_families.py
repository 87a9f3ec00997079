"""Every model family through Inductor: does each graph compile, and does exact mode match the model?

The tests run most families with ``Config(compiler="eager")`` (Inductor's CPU compiles take minutes), so a
graph Inductor cannot compile - which fbcompile then runs without Inductor, with a warning - shows only
here or on the GPU. For each family (the examples' tiny models, transformers' DiffusionGemma, diffusers'
AnyFlow FAR at block scope, Wan as Self-Forcing and LongLive run it): the model's own generation loop,
eagerly and through ``fbcompile.optimize`` with the default compiler, in exact mode (``--mode block``:
block mode, whose output is not expected to equal), and per family: equal or the relative error, graphs
compiled, graphs Inductor could not compile, seconds.

    python benchmarks/inductor_families.py [FAMILY ...] [--mode block] [--out results.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import fbcompile  # noqa: E402


def _prompt(high: int = 200, length: int = 7) -> torch.Tensor:
    return torch.randint(0, high, (1, length), generator=torch.Generator().manual_seed(0))


def _examples():
    from examples import (block_diffusion_lm, dream_lm, fast_dllm_v2_lm, llada_dual_buffer, llada_lm, olmo_llada_lm,
                          sdar_lm, sdar_remote_lm, video_ar_diffusion)
    dllm = dict(gen_length=16, block_size=8, steps=4)
    return {
        "lm": (block_diffusion_lm.make_tiny_model, lambda m: m.generate(_prompt(), num_blocks=3)),
        "dream": (dream_lm.make_tiny_model, lambda m: m.generate(_prompt(), **dllm)),
        "fast_dllm_v2": (fast_dllm_v2_lm.make_tiny_model, lambda m: m.generate(_prompt(), num_blocks=3, sub_block=4)),
        "llada_dual_buffer": (lambda: llada_dual_buffer.make_tiny_model(rotate_after_write=True),
                              lambda m: m.generate(_prompt(), **dllm)),
        "llada": (llada_lm.make_tiny_model, lambda m: m.generate(_prompt(), **dllm)),
        "olmo_llada": (olmo_llada_lm.make_tiny_model, lambda m: m.generate(_prompt(), **dllm)),
        "sdar": (sdar_lm.make_tiny_model, lambda m: m.generate(_prompt(), num_blocks=3)),
        "sdar_remote": (sdar_remote_lm.make_tiny_model, lambda m: m.generate(_prompt(60, 8), gen_blocks=3, steps=4)),
        "video": (video_ar_diffusion.make_tiny_model,
                  lambda m: m.generate(num_chunks=3, generator=torch.Generator().manual_seed(0))),
    }


def _wan(cache_mode: str):
    from examples.wan_causal_video import WanCausalConfig, WanCausalVideo, generate, init_weights
    cfg = WanCausalConfig(cache_frames=6, window_frames=4, sink_frames=1, cache_mode=cache_mode)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 5 * cfg.frames_per_chunk, cfg.in_channels, cfg.height, cfg.width, generator=gen)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen)
    return lambda: init_weights(WanCausalVideo(cfg)), lambda m: generate(m, noise, context)


def _seeded(make):
    torch.manual_seed(0)
    return make()


def _gemma():
    import test_diffusion_gemma as gemma
    ids = _prompt(400, 12)
    return gemma.make_model, lambda m: gemma.generate(m, ids)


def _anyflow():
    import test_anyflow_far as anyflow
    return lambda: anyflow._tiny(num_layers=2), lambda m: torch.stack(anyflow._generate(m, chunks=(1,) * 4))


FAMILIES = {"gemma": _gemma, "anyflow_far": _anyflow, "wan_self_forcing": lambda: _wan("self_forcing"),
            "wan_longlive": lambda: _wan("longlive_deferred")}


def run(name: str, make, generate, mode: str, scope: str) -> dict:
    started = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = generate(_seeded(make))
        model = fbcompile.optimize(_seeded(make), fbcompile.Config(refresh=mode, scope=scope))
        got = generate(model)
    if got.dtype.is_floating_point:
        agreement = f"{((got - expected).norm() / expected.norm()).item():.1e}"
    else:
        agreement = "equal" if torch.equal(got, expected) else "differs"
    failed = [str(w.message) for w in caught if "could not compile" in str(w.message)]
    stats = fbcompile.stats(model)
    return dict(family=name, agreement=agreement, compiles=stats.compiles, without_inductor=stats.uncompiled,
                seconds=round(time.perf_counter() - started), first_failure=failed[0][:120] if failed else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("families", nargs="*", help="default: all")
    p.add_argument("--mode", default="always", choices=["always", "block"])
    p.add_argument("--out", help="also write the table (markdown) here")
    args = p.parse_args(argv)
    cases = {**_examples(), **FAMILIES}
    names = args.families or list(cases)
    rows = []
    for name in names:
        make, generate = cases[name] if isinstance(cases[name], tuple) else cases[name]()
        rows.append(run(name, make, generate, args.mode, "blocks" if name == "anyflow_far" else "model"))
        print(rows[-1], flush=True)
    table = tabulate(rows, headers="keys", tablefmt="github")
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"torch {torch.__version__}, mode {args.mode}, CPU\n\n    python benchmarks/inductor_families.py "
                    f"{' '.join(argv or sys.argv[1:])}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
