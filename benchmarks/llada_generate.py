"""Fast-dLLM's LLaDA (or Dream) generation end to end: RoPE applied after the cache's cat.

LLaDA-8B layer shapes (hidden 4096, 32 heads of 128, no GQA, MLP 12288, vocabulary 126464; random bf16
weights) with ``--layers`` of its 32 layers. One ``generate`` (``examples/olmo_llada_lm.py``: LLaDA's
low-confidence remasking, greedy) of ``--gen`` tokens after a ``--prompt``-token prompt, blocks of 32,
``--steps`` steps per block, with Fast-dLLM's prefix cache (each block's first step a full pass, the
others ``x[:, s:]`` over the prefix's keys/values: the query shrinks by a block at every block) or its
dual cache joined by ``torch.cat`` (``--cache dual``). Variants: ``eager``; ``compile``
(``torch.compile``, default mode); fbcompile ``exact`` and ``block`` mode, each also with CUDA graphs
(``exact-cg``, ``block-cg``). Per variant: the first call (compiles, captures), then the median of
``--repeats`` calls with the same prompt (a serving loop's later requests), tokens per second, the
CUDA-graph counts of the last call, and the share of generated tokens equal to the first variant's (eager).
``--model dream``: Fast-dLLM's Dream (``examples/dream_lm.py``, Dream-7B layer shapes: hidden 3584, 28
query / 4 KV heads of 128, MLP 18944, vocabulary 152064) with its prefix cache: the query ``x[:, s:]``,
rotary tables made per call, ``present`` returned at every step.

    python benchmarks/llada_generate.py --prompt 2048 --out benchmarks/results/llada_generate.json
    python benchmarks/llada_generate.py --tiny --device cpu --compiler eager   # the script's code path only
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fbcompile  # noqa: E402
from examples.block_diffusion_lm import init_random_weights  # noqa: E402
from examples.block_diffusion_lm import BlockDiffusionConfig  # noqa: E402
from examples.dream_lm import DreamLM  # noqa: E402
from examples.olmo_llada_lm import OLMoLLaDAConfig, OLMoLLaDALM  # noqa: E402

LLADA_8B = dict(hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128, intermediate_size=12288,
                vocab_size=126464, mask_token_id=126336, rope_theta=500000.0)
DREAM_7B = dict(hidden_size=3584, num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944,
                vocab_size=152064, mask_token_id=151666, rope_theta=1000000.0)
TINY = dict(hidden_size=64, num_heads=4, num_kv_heads=4, head_dim=16, intermediate_size=128, vocab_size=256,
            mask_token_id=255)
BLOCK = 32
VARIANTS = ("eager", "compile", "exact", "block", "exact-cg", "block-cg")


def build(kind: str, shape: dict, layers: int, positions: int, device, dtype) -> OLMoLLaDALM | DreamLM:
    if kind == "dream":
        config, model_cls = BlockDiffusionConfig(**shape, num_layers=layers, block_size=BLOCK), DreamLM
    else:
        config = OLMoLLaDAConfig(**shape, num_layers=layers, max_positions=positions, block_size=BLOCK)
        model_cls = OLMoLLaDALM
    with torch.device(device):
        model = model_cls(config)
    # variance-preserving weights (benchmarks/e2e.py): the example's sharper init makes a deep bf16 forward chaotic
    return init_random_weights(model, seed=0, scales={}).to(dtype).eval()


def variant(model, name: str, compiler: str, config: dict | None = None):
    if name == "eager":
        return model
    model = copy.deepcopy(model)
    if name == "compile":
        model.compile()
        return model
    refresh = "always" if name.startswith("exact") else "block"
    return fbcompile.optimize(model, fbcompile.Config(refresh=refresh, cuda_graphs=name.endswith("-cg"),
                                                      compiler=compiler, **(config or {})))


def timed(fn, device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


@torch.no_grad()
def measure(model, name: str, prompt, run_args: dict, repeats: int, device) -> dict:
    """The first call and the median of ``repeats`` more (the last one's tokens and CUDA-graph counts)."""
    first, tokens = timed(lambda: model.generate(prompt, **run_args), device)
    times = []
    for repeat in range(repeats):
        if repeat == repeats - 1 and name.startswith(("exact", "block")):
            fbcompile.reset(model)  # the last call's counts
        seconds, tokens = timed(lambda: model.generate(prompt, **run_args), device)
        times.append(seconds)
    row = dict(variant=name, first_s=round(first, 3), median_s=round(statistics.median(times), 4),
               forwards=model.last_num_forwards, tokens=tokens)
    if name.startswith(("exact", "block")):
        stats = fbcompile.stats(model)
        row.update(graphs=stats.compiles, reuses=stats.reuses, cuda_graphs=dict(stats.cuda_graphs))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--gen", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per block of 32")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--model", choices=("llada", "dream"), default="llada")
    parser.add_argument("--cache", choices=("prefix", "dual"), default="prefix", help="LLaDA's (Dream: prefix)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compiler", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    torch._dynamo.config.recompile_limit = 64  # the prefix cache's query takes a new length per block
    shape = TINY if args.tiny else DREAM_7B if args.model == "dream" else LLADA_8B
    base = build(args.model, shape, 2 if args.tiny else args.layers, args.prompt + args.gen, device, dtype)
    prompt = torch.randint(0, base.config.vocab_size - 1, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    blocks = args.gen // BLOCK
    run_args = dict(gen_length=args.gen, block_size=BLOCK, steps=blocks * args.steps)
    if args.model == "llada":
        run_args["cache"] = args.cache
    rows, reference = [], None
    for name in args.variants.split(","):
        row = measure(variant(base, name, args.compiler), name, prompt, run_args, args.repeats, device)
        generated = row.pop("tokens")[:, args.prompt:]
        reference = generated if reference is None else reference
        row.update(tokens_per_s=round(args.gen / row["median_s"], 1),
                   agreement=round((generated == reference).float().mean().item(), 4))
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = "Dream-7B" if args.model == "dream" else "LLaDA-8B"
    result = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else str(device),
                  torch=torch.__version__, model=args.model,
                  shape="tiny" if args.tiny else f"{name} layers x {args.layers}",
                  prompt=args.prompt, gen=args.gen, steps_per_block=args.steps,
                  cache=args.cache if args.model == "llada" else "prefix", rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
