"""What a reuse plan costs on the GPU: one block of a 1.5B-shaped model with part of the external
attention recomputed at every step.

Why: a calibrated plan recomputes some heads (or layers) at reuse steps; that is only worth having
if the step time follows the share of KV heads it reads. Per block of ``--steps`` forwards over a
cache of L tokens (bf16, Inductor), compares ``refresh="block"`` (no plan), plans recomputing a
share of the layers or half the KV heads of every layer, a plan recomputing everything, and exact
mode. It first checks the plans' CUDA/Inductor path against the CPU reference path (fp32, eager
graphs) on a 4-layer model of the same head layout: every step's logits.

    PYTHONPATH=. python benchmarks/reuse_plan_e2e.py --out benchmarks/results

(``--variants 0,1,2`` runs some variants only, in that order; ``--previous FILE`` keeps an earlier
run's correctness checks instead of running them again: for a device with a time limit per command.)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform

import torch

import fbcompile
from benchmarks.e2e_block_step import QWEN_1_5B, block, build, make_cache, time_blocks
from examples.block_diffusion_lm import BlockDiffusionConfig, BlockDiffusionLM


def plan(layers: int, kv_heads: int, heads: int, steps: int, recompute_layers: float = 0.0,
         recompute_kv_heads: int = 0) -> fbcompile.ReusePlan:
    """Every step recomputes the first ``recompute_layers`` share of the layers entirely, and the
    first ``recompute_kv_heads`` KV heads of the others."""
    group = heads // kv_heads
    partial = [False] * (recompute_kv_heads * group) + [True] * (heads - recompute_kv_heads * group)
    per_layer = [[False] * heads if i < round(recompute_layers * layers) else partial for i in range(layers)]
    return fbcompile.ReusePlan([[row] * (steps - 1) for row in per_layer])


def check_against_cpu(steps: int, length: int) -> list[dict]:
    """Per-step logits of plan runs: CUDA + Inductor (bf16) vs the CPU eager-graph path (fp32)."""
    shape = dict(QWEN_1_5B, num_layers=4, vocab_size=4096)
    torch.manual_seed(0)
    cpu = BlockDiffusionLM(BlockDiffusionConfig(**shape)).eval()
    gpu = copy.deepcopy(cpu).to("cuda", torch.bfloat16)
    cache = [(torch.randn(1, 2, length, 128), torch.randn(1, 2, length, 128)) for _ in range(4)]
    rows = []
    for name, reuse_plan in [("block", None), ("half the KV heads", plan(4, 2, 12, steps, recompute_kv_heads=1)),
                             ("half the layers", plan(4, 2, 12, steps, recompute_layers=0.5))]:
        torch._dynamo.reset()
        ref = fbcompile.optimize(copy.deepcopy(cpu), fbcompile.Config(reuse_plan=reuse_plan, compiler="eager"))
        fast = fbcompile.optimize(copy.deepcopy(gpu), fbcompile.Config(reuse_plan=reuse_plan))
        gpu_cache = [(k.to("cuda", torch.bfloat16), v.to("cuda", torch.bfloat16)) for k, v in cache]
        x = torch.full((1, shape["block_size"]), 7)
        pos = torch.arange(length, length + shape["block_size"])[None]
        errors = []
        for step in range(steps):
            a = ref(x, past_key_values=cache, position_ids=pos)[0]
            b = fast(x.cuda(), past_key_values=gpu_cache, position_ids=pos.cuda())[0].float().cpu()
            errors.append(((b - a).norm() / a.norm()).item())
            x[0, step] = step + 1
        rows.append(dict(plan=name, max_step_rel_err=float(f"{max(errors):.2e}"),
                         reuses=fbcompile.stats(fast).reuses, external_fraction=round(fbcompile.stats(fast).external_fraction, 4),
                         cpu_external_fraction=round(fbcompile.stats(ref).external_fraction, 4)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def kernel_scaling(lengths=(32768, 131072), heads=(32, 8, 128), block=32) -> list[dict]:
    """The external attention a plan step runs: ``fbcompile::attention_lse`` over the first ``n`` of
    the KV heads, as the plan's graphs call it (``narrow``-ed views of the whole cache); medians of
    CUDA-graph replays."""
    from triton.testing import do_bench_cudagraph

    Hq, Hkv, D = heads
    group, rows = Hq // Hkv, []
    for length in lengths:
        q = torch.randn(1, Hq, block, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, Hkv, length, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        full = torch.ops.fbcompile.attention_lse(q, k, v, None, D ** -0.5)
        for n in (1, 2, 4, 8):
            def run(n=n):
                return torch.ops.fbcompile.attention_lse(q.narrow(1, 0, n * group), k.narrow(1, 0, n),
                                                         v.narrow(1, 0, n), None, D ** -0.5)
            out = run()[0]
            err = ((out.float() - full[0][:, :n * group].float()).norm() / full[0][:, :n * group].float().norm()).item()
            ms = do_bench_cudagraph(run, rep=30, return_mode="median")
            rows.append(dict(L=length, kv_heads_read=f"{n}/{Hkv}", us=round(ms * 1e3, 1),
                             GBps=round(2 * n * length * D * 2 / (ms * 1e-3) / 1e9), rel_err_vs_full=float(f"{err:.1e}")))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--lengths", default="32768")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default=None, help="comma-separated indices of the variants to run")
    parser.add_argument("--previous", default=None, help="JSON of an earlier run whose checks to keep")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    previous = json.load(open(args.previous)) if args.previous else dict(checks=[])
    checks = previous["checks"] or check_against_cpu(args.steps, 4096)
    kernel = previous.get("kernel") or kernel_scaling()
    dtype, cfg, steps = torch.bfloat16, QWEN_1_5B, args.steps
    shape = (cfg["num_layers"], cfg["num_kv_heads"], cfg["num_heads"], steps)
    variants = {
        "block (no plan)": fbcompile.Config(),
        "plan: 1/4 of the layers": fbcompile.Config(reuse_plan=plan(*shape, recompute_layers=0.25)),
        "plan: 1/2 of the layers": fbcompile.Config(reuse_plan=plan(*shape, recompute_layers=0.5)),
        "plan: 1/2 of the KV heads": fbcompile.Config(reuse_plan=plan(*shape, recompute_kv_heads=1)),
        "plan: everything": fbcompile.Config(reuse_plan=plan(*shape, recompute_layers=1.0)),
        "exact (always)": fbcompile.Config(refresh="always"),
    }
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__, python=platform.python_version(),
               command="PYTHONPATH=. python benchmarks/reuse_plan_e2e.py --out DIR", steps=steps,
               model=QWEN_1_5B, dtype="bfloat16")
    rows = []
    chosen = [int(i) for i in args.variants.split(",")] if args.variants else range(len(variants))
    for name, config in [list(variants.items())[i] for i in chosen]:
        torch._dynamo.reset()
        model = fbcompile.optimize(build(dtype), config)
        for length in [int(v) for v in args.lengths.split(",")]:
            cache = make_cache(model, length, dtype)
            reset = (lambda m=model: fbcompile.reset(m)) if config.refresh != "always" else None
            ms = time_blocks(lambda: block(model, cache, steps, length, reset), args.repeats)
            fbcompile.reset(model)
            block(model, cache, steps, length)
            stats = fbcompile.stats(model)
            rows.append(dict(L=length, variant=name, external_fraction=round(stats.external_fraction, 4),
                             ms_per_block=round(ms, 2), ms_per_step=round(ms / steps, 2)))
            print(json.dumps(rows[-1]), flush=True)
            _write(args.out, env, checks, kernel, rows)  # a run cut short keeps what it measured
            del cache
        del model
    print(_write(args.out, env, checks, kernel, rows))


def _write(out, env, checks, kernel, rows) -> str:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "reuse_plan_e2e.json"), "w") as f:
        json.dump(dict(env=env, checks=checks, kernel=kernel, rows=rows), f, indent=1)
    from tabulate import tabulate
    table = tabulate(rows, headers="keys", tablefmt="github")
    with open(os.path.join(out, "reuse_plan_e2e.md"), "w") as f:
        f.write(f"# Reuse plans on the GPU: one block ({env['steps']} steps), 1.5B-shaped model\n\n")
        f.write("\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n")
        f.write("external_fraction: KV heads the external attention read over the block / exact mode's "
                "(the block's first step refreshes).\n\n" + table)
        f.write("\n\nCorrectness: every step's logits, CUDA + Inductor (bf16) vs the CPU eager-graph path "
                "(fp32), 4-layer model of the same head layout, L=4096:\n\n"
                + tabulate(checks, headers="keys", tablefmt="github") + "\n")
        f.write("\nThe external attention of a plan step alone (32 query / 8 KV heads, D=128, 32 queries, bf16; "
                "the first n KV heads as narrowed views), medians of CUDA-graph replays:\n\n"
                + tabulate(kernel, headers="keys", tablefmt="github") + "\n")
    return table


if __name__ == "__main__":
    main()
