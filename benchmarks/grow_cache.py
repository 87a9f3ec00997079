"""ms per block under CUDA graphs over a cache that grows by a ``torch.cat`` at every block (HF
``DynamicCache``, ``generate``), against the same cache kept as the same tensors.

The example LM at Qwen2-1.5B shape (bf16, random weights), block 32, 8 steps; the cache starts at
``--context`` tokens. Variants: ``block-ro`` (block mode) and ``exact-ro`` (exact mode), both with
``cuda_graphs=True``, and ``compile`` (``torch.compile``, default mode: the baseline); settings: ``grown`` (every block joins one block of keys/values: new tensors, a new
length; the graphs switch to buffers with spare capacity) and ``same`` (the cache stays the same tensors,
``fbcompile.new_request`` before each block so that each block refreshes: the refresh graph is captured
over them); ``grown-mask`` (as ``grown``, with a mask over cache and block passed in, all keys visible:
the mask goes into spare capacity with the cache), ``grown-positions`` (as ``grown``, no positions
passed: the model computes them from the cache's length, the graphs from the key count) and
``grown-built-mask`` (as ``grown``, the model wrapped to build an all-visible mask from the cache's length
as HF's ``create_causal_mask`` compares positions: the graphs compute it at the capacity). ``--warmup``
blocks (compiles, captures), then the median of
``--blocks`` timed blocks with their CUDA-graph counts, and the relative error of the last timed block's
first-step logits against the model without fbcompile on the same cache; ``--profile`` adds the top
operators (CUDA and CPU time) of one more block.

    python benchmarks/grow_cache.py --context 32k
    python benchmarks/grow_cache.py --tiny --device cpu --compiler eager   # the script's code path only
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fbcompile  # noqa: E402
from benchmarks.e2e import QWEN_1_5B, TINY_LM, build_lm  # noqa: E402

STEPS = 8
VARIANTS = {"block-ro": "block", "exact-ro": "always", "compile": None}


def grow(cache, block: int):
    """The cache with one more block of keys/values (its last block again): new tensors, as ``torch.cat``
    in a ``DynamicCache`` makes them."""
    return [tuple(torch.cat([t, t[:, :, -block:]], dim=-2) for t in kv) for kv in cache]


def profile_block(model, cache, grown: bool, device) -> dict:
    """The top operators of one more block by CUDA and by CPU time (torch.profiler tables)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = model.config
    x = torch.full((1, cfg.block_size), cfg.mask_token_id, device=device)
    context = cache[0][0].shape[-2]
    pos = torch.arange(context, context + cfg.block_size, device=device)[None]
    if not grown:
        fbcompile.new_request(model)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for step in range(STEPS):
            model(x, past_key_values=cache, position_ids=pos)
            x[:, step] = step + 1
        if grown:
            grow(cache, cfg.block_size)
        torch.cuda.synchronize()
    table = prof.key_averages()
    return dict(profile_cuda=table.table(sort_by="cuda_time_total", row_limit=12),
                profile_cpu=table.table(sort_by="cpu_time_total", row_limit=12))


class BuiltMaskLM(torch.nn.Module):
    """The LM, given a mask it builds from the cached length as HF does (key positions against query
    positions; every key visible: the cache, and the whole block for block diffusion)."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.config = lm, lm.config

    def forward(self, x, past_key_values, **kwargs):
        length, block = past_key_values[0][0].shape[-2], x.shape[1]
        keys = torch.arange(length + block, device=x.device)[None, None, None, :]
        queries = (torch.arange(block, device=x.device) + length)[None, None, :, None]
        return self.lm(x, past_key_values=past_key_values, attention_mask=keys < queries + block, **kwargs)


def block_inputs(cfg, context: int, setting: str, device) -> dict:
    """The keyword arguments of a block's calls besides its tokens and cache, as ``setting`` passes them."""
    if setting.endswith("-positions"):
        return {}
    kwargs = dict(position_ids=torch.arange(context, context + cfg.block_size, device=device)[None])
    if setting.endswith("-mask") and not setting.endswith("-built-mask"):  # (a built mask: the model's own)
        kwargs["attention_mask"] = torch.ones(1, 1, cfg.block_size, context + cfg.block_size, dtype=torch.bool,
                                              device=device)
    return kwargs


def time_blocks(model, reference, cache, warmup: int, blocks: int, setting: str, device) -> tuple[dict, list]:
    """Median ms of ``blocks`` blocks after ``warmup`` ones, the CUDA-graph counts of the timed ones and
    the error of the last block's first step; and the cache after them."""
    optimized = not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    cfg = built_config(model)
    grown = setting.startswith("grown")
    times, error = [], None
    for index in range(warmup + blocks):
        if index == warmup and optimized:
            fbcompile.reset(model)
        if not grown and optimized:  # a new cache refreshes by itself; the same one must be told
            fbcompile.new_request(model)
        x = torch.full((1, cfg.block_size), cfg.mask_token_id, device=device)
        kwargs = block_inputs(cfg, cache[0][0].shape[-2], setting, device)
        last = index == warmup + blocks - 1
        expected = reference(x, past_key_values=cache, **kwargs)[0].float() if last else None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for step in range(STEPS):
            logits = model(x, past_key_values=cache, **kwargs)[0]
            if step == 0 and last:
                error = ((logits.float() - expected).norm() / expected.norm()).item()  # one sync, in the last block
            x[:, step] = step + 1
        if grown:
            cache = grow(cache, cfg.block_size)
        end.record()
        end.synchronize()
        if index >= warmup:
            times.append(start.elapsed_time(end))
    times.sort()
    counts = dict(fbcompile.stats(model).cuda_graphs) if optimized else {}
    return dict(ms=times[len(times) // 2], rel_err_vs_eager=error, counts=counts), cache


def built_config(model):
    """The example LM's config, through a ``torch.compile`` wrapper too."""
    return getattr(model, "_orig_mod", model).config


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", default="32k")
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--settings", default="grown,same")
    p.add_argument("--compiler", default="inductor")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's (a shorter compile)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--profile", action="store_true", help="profile one more block (CUDA)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":  # the script's code path only: no CUDA graphs (fbcompile warns), no timing that means much
        torch.cuda.Event = _WallClockEvent
    context = int(args.context[:-1]) * 1024 if args.context.endswith("k") else int(args.context)
    shape = dict(TINY_LM if args.tiny else QWEN_1_5B)
    if args.layers:
        shape["num_layers"] = args.layers
    built = build_lm(shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = built.config
    gen = torch.Generator(device).manual_seed(1)
    kv_shape = (1, cfg.num_kv_heads, context, cfg.head_dim)
    cache = [tuple(torch.randn(kv_shape, generator=gen, device=device, dtype=built.lm_head.weight.dtype)
                   for _ in "kv") for _ in range(cfg.num_layers)]
    for k, v in cache:  # one compiled graph for every length (a mask over cache and block ties them: maybe)
        torch._dynamo.maybe_mark_dynamic(k, 2)
        torch._dynamo.maybe_mark_dynamic(v, 2)
    rows = []
    print(f"{'variant':10} {'setting':15} {'ms/block':>9} {'rel err':>8}  CUDA-graph counts of the timed blocks")
    with torch.no_grad():
        for variant in args.variants.split(","):
            for setting in args.settings.split(","):
                lm = BuiltMaskLM(copy.deepcopy(built)) if setting.endswith("-built-mask") else copy.deepcopy(built)
                if VARIANTS[variant] is None:
                    model = torch.compile(lm, backend=args.compiler)
                else:
                    model = fbcompile.optimize(lm, fbcompile.Config(refresh=VARIANTS[variant], cuda_graphs=True,
                                                                    compiler=args.compiler))
                t0 = time.time()
                timed, last_cache = time_blocks(model, built, cache, args.warmup, args.blocks, setting, device)
                row = dict(variant=variant, setting=setting, context=context, **timed)
                row["seconds"] = round(time.time() - t0, 1)
                if args.profile and device.type == "cuda" and VARIANTS[variant] is not None:
                    row.update(profile_block(model, last_cache, setting.startswith("grown"), device))
                    print(row["profile_cuda"], row["profile_cpu"], sep="\n", flush=True)
                rows.append(row)
                print(f"{variant:10} {setting:15} {row['ms']:9.2f} {row['rel_err_vs_eager']:8.1e}  {row['counts']}",
                      flush=True)
                del model
                torch._dynamo.reset()
    if args.out:
        meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                    command="python " + " ".join(sys.argv), shape=shape, block=cfg.block_size, steps=STEPS)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


class _WallClockEvent:
    """``torch.cuda.Event`` on the CPU."""

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end) -> float:
        return (end.t - self.t) * 1e3


if __name__ == "__main__":
    main()
