"""Refresh policies on the trained tiny model: how often they refresh vs how often tokens agree.

Why: reuse is an approximation; this measures it on a model that learned something
(``examples/checkpoints/tiny_python_bd.pt``, byte-level Python) instead of random weights:

* FlashBlock's observation: cosine similarity of the external vs internal attention outputs to
  their values at the block's first step, per layer (``fbcompile.fidelity`` with ``refresh="block"``);
* greedy decoding over ``--blocks`` blocks with each policy vs exact: token agreement and refresh
  rate, for two decoders - one token committed per step (8 steps per block), and Fast-dLLM-style
  confidence-threshold parallel decoding (SDAR example, a variable number of tokens per step),
  where FlashBlock's "refresh after tau committed tokens" differs from a fixed every-N schedule.

    PYTHONPATH=. python benchmarks/fidelity_policies.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import fbcompile
from benchmarks.machine import cpu_name
from examples.sdar_lm import SDARLM, SDARConfig
from examples.tiny_trained import DEFAULT_CHECKPOINT, load_tiny_trained, stdlib_bytes

POLICIES = [("block", {}), (4, {}), (2, {}), ("tokens", {"tokens": 4}), ("tokens", {"tokens": 2}),
            ("adaptive", {"drift": 0.5}), ("adaptive", {"drift": 0.3}), ("adaptive", {"drift": 0.15})]


def sdar_from_trained(threshold: float) -> SDARLM:
    """The trained weights in the SDAR decoder (whole block bidirectional, threshold unmasking)."""
    trained = load_tiny_trained()
    config = SDARConfig(**{k: getattr(trained.config, k) for k in trained.config.__dataclass_fields__},
                        sub_block_size=trained.config.block_size, intra_block="bidirectional", threshold=threshold)
    model = SDARLM(config)
    model.load_state_dict(trained.state_dict())
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--blocks", type=int, default=100)
    parser.add_argument("--prompt-bytes", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    prompt = stdlib_bytes("val")[: args.prompt_bytes][None].long()
    P = prompt.shape[1]
    decoders = {
        "one token per step (8 steps)": (load_tiny_trained, lambda m: m.generate(prompt, num_blocks=args.blocks, steps=8)),
        f"threshold {args.threshold} (parallel)": (lambda: sdar_from_trained(args.threshold),
                                                   lambda m: m.generate(prompt, num_blocks=args.blocks)),
    }
    rows, folder = [], os.path.join(args.out, "fidelity_tiny_python")
    for decoder, (factory, generate) in decoders.items():
        for refresh, extra in POLICIES:
            t0 = time.time()
            config = fbcompile.Config(refresh=refresh, compiler="eager", **extra)
            save = folder if (refresh == "block" and decoder.startswith("one")) else None
            report = fbcompile.fidelity(factory(), generate, config, out=save, prompt_length=P)
            name = f"{refresh}" + "".join(f" ({k}={v})" for k, v in extra.items())
            rows.append(dict(decoder=decoder, policy=name, refresh_rate=round(report.refresh_rate, 4),
                             token_agreement=round(report.token_agreement, 4),
                             first_divergence=report.first_divergence, calls=report.calls,
                             mean_cos_external=round(sum(r["mean_cos_external"] for r in report.per_site) / len(report.per_site), 4),
                             mean_cos_internal=round(sum(r["mean_cos_internal"] for r in report.per_site) / len(report.per_site), 4),
                             mean_reuse_rel_error=round(sum(r["mean_reuse_rel_error"] for r in report.per_site) / len(report.per_site), 4),
                             seconds=round(time.time() - t0, 1)))
            print(json.dumps(rows[-1]), flush=True)
            if save:
                block_report = report
    env = dict(machine=cpu_name(), torch=torch.__version__, python=platform.python_version(),
               checkpoint=os.path.relpath(DEFAULT_CHECKPOINT), blocks=args.blocks, prompt_bytes=P,
               command="PYTHONPATH=. python benchmarks/fidelity_policies.py --out benchmarks/results")
    os.makedirs(args.out, exist_ok=True)
    records = os.path.join(folder, "fidelity_records.csv")
    with open(records) as f:
        rows_csv = f.read()
    with open(records, "w") as f:  # the results files name their device (comment line for CSV readers)
        f.write(f"# CPU ({env['machine']}), torch {env['torch']}: {env['command']}\n" + rows_csv)
    with open(os.path.join(folder, "fidelity.md"), "a") as f:
        f.write(f"\nProduced on CPU ({env['machine']}, torch {env['torch']}, Python {env['python']}) by "
                f"`{env['command']}` (refresh=\"block\", one token per step, {args.blocks} blocks).\n")
    with open(os.path.join(args.out, "fidelity_policies.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    from tabulate import tabulate
    with open(os.path.join(args.out, "fidelity_policies.md"), "w") as f:
        f.write("# Refresh policies on the trained tiny model (greedy decoding vs exact)\n\n")
        f.write("\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n")
        f.write(tabulate(rows, headers="keys", tablefmt="github") + "\n\n")
        f.write("Per-layer measurements of `refresh=\"block\"` (one token per step): "
                "`fidelity_tiny_python/fidelity.md`, `.png`, `_records.csv`.\n\n")
        f.write(str(block_report) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for decoder in decoders:
        pts = [r for r in rows if r["decoder"] == decoder]
        ax.plot([r["refresh_rate"] for r in pts], [r["token_agreement"] for r in pts], "o", label=decoder)
        for r in pts:
            ax.annotate(r["policy"], (r["refresh_rate"], r["token_agreement"]), fontsize=6)
    ax.set(xlabel="refresh rate (refresh calls / calls)", ylabel="token agreement with exact",
           title=f"tiny_python_bd, {args.blocks} blocks")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fidelity_policies.png"), dpi=120,
                metadata={"Description": f"CPU ({env['machine']}), torch {env['torch']}: {env['command']}"})
    print(tabulate(rows, headers="keys"))


if __name__ == "__main__":
    main()
