"""Sparse external attention (MAGE) with and without FlashBlock residual reuse, on the trained tiny model:
token agreement with exact greedy decoding vs the budget of KV entries attended at reuse steps.

``Config(sparse=fbcompile.Sparse(budget=b, tile=16, residual=r))`` decodes ``--blocks`` blocks of
``--prompts`` validation prompts (batched), one token committed per step (8 steps per block), under two
protocols (as ``benchmarks/fidelity_policies.py``):

* free-running: the whole generation vs the exact one (one early difference changes what follows);
* exact context: every block decoded after the exact generation's earlier blocks, so each block's
  agreement measures the approximation alone.

Budget 0 with residual reuse is FlashBlock's ``"block"`` mode, a budget covering the whole context is
exact; without residual reuse the tiles not selected at the block's first step are dropped (plain
MAGE-style sparse attention, the baseline FlashBlock's residual reuse improves on). ``read_at_reuse``:
the share of the external KV a reuse step attends to (measured, ``fbcompile.stats``).

    PYTHONPATH=. python benchmarks/sparse_fidelity.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from tabulate import tabulate

import fbcompile
from benchmarks.machine import cpu_name
from examples.tiny_trained import DEFAULT_CHECKPOINT, load_tiny_trained, stdlib_bytes

def decode(model, prompt: torch.Tensor, blocks: int) -> torch.Tensor:
    return model.generate(prompt, num_blocks=blocks, steps=8)


def agreement(ids: torch.Tensor, exact: torch.Tensor, prompt_length: int) -> float:
    return (ids[:, prompt_length:] == exact[:, prompt_length:]).float().mean().item()


def in_exact_context(model, exact: torch.Tensor, prompt_length: int, blocks: int, block_size: int) -> torch.Tensor:
    """Each block decoded after the exact generation's earlier blocks (prefilled as a prompt)."""
    return torch.cat([decode(model, exact[:, :prompt_length + i * block_size], 1)[:, -block_size:]
                      for i in range(blocks)], 1)


def measure(model, prompt: torch.Tensor, exact: torch.Tensor, blocks: int, block_size: int) -> dict:
    """Agreement under both protocols (``exact``: the exact model's generations under each), and what
    the external attention read."""
    P = prompt.shape[1]
    with torch.no_grad():
        free = agreement(decode(model, prompt, blocks), exact["free"], P)
        in_context = agreement(in_exact_context(model, exact["free"], P, blocks, block_size), exact["in_context"], 0)
    stats = fbcompile.stats(model)
    shares = [s.sparse_read for s in stats.sites if s.sparse_read is not None]
    return dict(agreement_free=round(free, 4), agreement_in_context=round(in_context, 4),
                read_at_reuse=round(sum(shares) / len(shares), 4) if shares else None,
                external_fraction=round(stats.external_fraction, 4))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-bytes", type=int, default=192)
    parser.add_argument("--tile", type=int, default=16)
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 16, 32, 64, 128, 256, 512])
    args = parser.parse_args()
    torch.set_num_threads(1)
    val = stdlib_bytes("val")
    stride = len(val) // args.prompts
    prompt = torch.stack([val[i * stride:i * stride + args.prompt_bytes] for i in range(args.prompts)]).long()
    block_size = load_tiny_trained().config.block_size
    with torch.no_grad():
        exact = {"free": decode(load_tiny_trained(), prompt, args.blocks)}
        exact["in_context"] = in_exact_context(load_tiny_trained(), exact["free"], prompt.shape[1], args.blocks,
                                               block_size)
    rows = []
    for residual in (True, False):
        for budget in args.budgets:
            t0 = time.time()
            config = fbcompile.Config(compiler="eager",
                                      sparse=fbcompile.Sparse(budget=budget, tile=args.tile, residual=residual))
            row = dict(method="sparse + residual" if residual else "sparse only", budget=budget,
                       **measure(fbcompile.optimize(load_tiny_trained(), config), prompt, exact, args.blocks, block_size),
                       seconds=round(time.time() - t0, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    block = dict(method='"block" (FlashBlock)', budget=0,
                 **measure(fbcompile.optimize(load_tiny_trained(), fbcompile.Config(compiler="eager")), prompt, exact,
                           args.blocks, block_size))
    rows.append(block)
    context = args.prompt_bytes + args.blocks * block_size
    env = dict(device=f"CPU ({cpu_name()})", torch=torch.__version__, python=platform.python_version(),
               checkpoint=os.path.relpath(DEFAULT_CHECKPOINT), prompts=f"{args.prompts} validation prompts of "
               f"{args.prompt_bytes} bytes", blocks=args.blocks, context=f"{args.prompt_bytes}..{context} bytes",
               tile=args.tile, decoder="greedy, one token per step (8 steps per block)",
               command="PYTHONPATH=. python " + " ".join(sys.argv))
    _write(args.out, env, rows)


def _write(out: str, env: dict, rows: list[dict]) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sparse_fidelity_cpu.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    with open(os.path.join(out, "sparse_fidelity_cpu.md"), "w") as f:
        f.write("# Sparse external attention vs budget on the trained tiny model (token agreement with exact)\n\n")
        f.write("\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n")
        f.write("budget: KV entries per KV head attended afresh at reuse steps (tiles of "
                f"{env['tile']}). agreement_free: the whole generation; agreement_in_context: each block decoded "
                "after the exact generation's earlier blocks. read_at_reuse: share of the external KV a reuse "
                "step attends to; external_fraction: external KV read over all calls / exact mode's.\n\n")
        f.write(tabulate(rows, headers="keys", tablefmt="github") + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    block = next(r for r in rows if r["method"].startswith('"block"'))
    for ax, key, title in zip(axes, ("agreement_in_context", "agreement_free"), ("exact context", "free-running")):
        for method, style in (("sparse + residual", "o-"), ("sparse only", "s--")):
            points = [(r["budget"], r[key]) for r in rows if r["method"] == method]
            ax.plot([max(b, 8) for b, _ in points], [a for _, a in points], style, label=method)
        ax.axhline(block[key], color="gray", lw=0.8, ls=":", label='"block" (budget 0)')
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (KV entries per KV head; 0 drawn at 8)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("token agreement with exact decoding")
    axes[0].legend()
    fig.suptitle(f"tiny trained model, {env['device']}, torch {env['torch']}\n{env['command']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sparse_fidelity_cpu.png"), dpi=120,
                metadata={"Description": f"{env['device']}, torch {env['torch']}: {env['command']}"})


if __name__ == "__main__":
    main()
