"""Refresh policies on the trained tiny model: external attention computed vs token agreement.

Why: reuse is an approximation; this measures it on a model that learned something
(``examples/checkpoints/tiny_python_bd.pt``, byte-level Python) instead of random weights:

* FlashBlock's observation: cosine similarity of the external vs internal attention outputs to
  their values at the block's first step, per layer (``fbcompile.fidelity`` with ``refresh="block"``);
* a calibration run (``fbcompile.calibrate``) on prompts from the *training* split, and the reuse
  plans it gives, per head and per layer, at several thresholds (the official video rule first);
* every policy against exact greedy decoding of ``--blocks`` blocks of a *validation* prompt, for
  two decoders - one token committed per step (8 steps per block) and Fast-dLLM-style
  confidence-threshold parallel decoding (SDAR example, a variable number of tokens per step) -
  under two protocols:
  - free-running: the whole generation, as ``fbcompile.fidelity`` defines token agreement (one
    early difference changes everything after it, so this figure is noisy);
  - exact context: every block decoded after the *exact* generation's earlier blocks, so each
    block's agreement measures the approximation alone.

The x axis is the share of the external attention's KV heads that are read (exact: 1); the
``vs fixed`` column is a policy's agreement minus that of the fixed every-N schedules (block, 4,
3, 2, exact) interpolated at the same share: > 0 beats them at equal compute.

    PYTHONPATH=. python benchmarks/fidelity_policies.py --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time

import torch
from tabulate import tabulate

import fbcompile
from benchmarks.machine import cpu_name
from examples.sdar_lm import SDARLM, SDARConfig
from examples.tiny_trained import DEFAULT_CHECKPOINT, load_tiny_trained, stdlib_bytes

FIXED = [("block", {}), (4, {}), (3, {}), (2, {})]
POLICIES = FIXED + [("tokens", {"tokens": 2}), ("adaptive", {"drift": 0.5}), ("adaptive", {"drift": 0.3})]
# (granularity, cos >=, mean |LSE drift| <=); the first is the official FlashBlock video rule
PLANS = [("head", 0.85, 0.05), ("head", 0.97, 0.3), ("head", 0.95, 0.5), ("head", 0.9, 1.0),
         ("layer", 0.97, 0.3), ("layer", 0.95, 0.5), ("layer", 0.9, 1.0)]


def sdar_from_trained(threshold: float) -> SDARLM:
    """The trained weights in the SDAR decoder (whole block bidirectional, threshold unmasking)."""
    trained = load_tiny_trained()
    config = SDARConfig(**{k: getattr(trained.config, k) for k in trained.config.__dataclass_fields__},
                        sub_block_size=trained.config.block_size, intra_block="bidirectional", threshold=threshold)
    model = SDARLM(config)
    model.load_state_dict(trained.state_dict())
    return model.eval()


def in_exact_context(decode_block, exact_ids: torch.Tensor, prompt_length: int, blocks: int, block_size: int):
    """A generate callable that decodes each block after the exact generation's earlier blocks."""
    def generate(model):
        pieces = [exact_ids[:, :prompt_length]]
        for i in range(blocks):
            pieces.append(decode_block(model, exact_ids[:, :prompt_length + i * block_size])[:, -block_size:])
        return torch.cat(pieces, 1)
    return generate


def vs_fixed(rows: list[dict], key: str) -> None:
    """Add ``vs fixed (key)``: agreement minus the fixed schedules' interpolated at the same external share."""
    fixed = sorted(((r["external_fraction"], r[key]) for r in rows if r["family"] == "fixed"), key=lambda p: p[0])
    fixed.append((1.0, 1.0))  # exact mode
    for r in rows:
        x = r["external_fraction"]
        lo = max((p for p in fixed if p[0] <= x), default=fixed[0], key=lambda p: p[0])
        hi = min((p for p in fixed if p[0] >= x), default=fixed[-1], key=lambda p: p[0])
        at = lo[1] if hi[0] == lo[0] else lo[1] + (hi[1] - lo[1]) * (x - lo[0]) / (hi[0] - lo[0])
        r[f"vs_fixed_{key}"] = round(r[key] - at, 4)


def decoders(threshold: float) -> dict:
    """name -> (model factory, decode(model, prompt, blocks))."""
    return {
        "one token per step (8 steps)": (load_tiny_trained, lambda m, p, n: m.generate(p, num_blocks=n, steps=8)),
        f"threshold {threshold} (parallel)": (lambda: sdar_from_trained(threshold),
                                              lambda m, p, n: m.generate(p, num_blocks=n)),
    }


def run_decoder(args, decoder: str):
    """Calibrate, then every policy under both protocols, for one decoder (one process each)."""
    torch.set_num_threads(1)
    factory, decode = decoders(args.threshold)[decoder]
    prompt = stdlib_bytes("val")[: args.prompt_bytes][None].long()
    train = stdlib_bytes("train")
    stride = len(train) // args.calibration_prompts
    calibration_prompts = [train[i * stride:i * stride + args.prompt_bytes][None].long()
                           for i in range(args.calibration_prompts)]
    P, bs = prompt.shape[1], load_tiny_trained().config.block_size
    folder = os.path.join(args.out, "fidelity_tiny_python")
    t0 = time.time()
    calibration = fbcompile.calibrate(factory(), lambda m: [decode(m, p, args.calibration_blocks)
                                                            for p in calibration_prompts])
    seconds = round(time.time() - t0, 1)
    policies = [(r, dict(e), "fixed" if (r, e) in FIXED else str(r)) for r, e in POLICIES]
    policies += [("block", dict(reuse_plan=calibration.plan(cos, drift, granularity),
                                label=f"plan per {granularity} (cos>={cos}, drift<={drift})"),
                  f"plan per {granularity}") for granularity, cos, drift in PLANS]
    with torch.no_grad():
        exact_ids = decode(factory(), prompt, args.blocks)
    protocols = {"free": lambda m: decode(m, prompt, args.blocks),
                 "in_context": in_exact_context(lambda m, p: decode(m, p, 1), exact_ids, P, args.blocks, bs)}
    rows, block_report = [], None
    for refresh, extra, family in policies:
        t0 = time.time()
        label = extra.pop("label", None)
        config = fbcompile.Config(refresh=refresh, compiler="eager", **extra)
        name = label or f"{refresh}" + "".join(f" ({k}={v})" for k, v in extra.items())
        row = dict(decoder=decoder, policy=name, family=family)
        for protocol, generate in protocols.items():
            save = folder if (protocol == "free" and refresh == "block" and not extra
                              and decoder.startswith("one")) else None
            report = fbcompile.fidelity(factory(), generate, config, out=save, prompt_length=P)
            if save:
                block_report = report
            if protocol == "free":
                row.update(external_fraction=round(report.external_fraction, 4),
                           refresh_rate=round(report.refresh_rate, 4),
                           agreement_free=round(report.token_agreement, 4),
                           first_divergence=report.first_divergence,
                           mean_reuse_rel_error=round(sum(r["mean_reuse_rel_error"] for r in report.per_site)
                                                      / len(report.per_site), 4))
            else:
                row["agreement_in_context"] = round(report.token_agreement, 4)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for key in ("agreement_free", "agreement_in_context"):
        vs_fixed(rows, key)
    return rows, (calibration, seconds), block_report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--blocks", type=int, default=100)
    parser.add_argument("--prompt-bytes", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--calibration-prompts", type=int, default=4)
    parser.add_argument("--calibration-blocks", type=int, default=25)
    args = parser.parse_args()
    os.makedirs(os.path.join(args.out, "fidelity_tiny_python"), exist_ok=True)
    names = list(decoders(args.threshold))
    with multiprocessing.get_context("spawn").Pool(len(names)) as pool:  # one process per decoder
        results = pool.starmap(run_decoder, [(args, name) for name in names])
    rows = [row for decoder_rows, _, _ in results for row in decoder_rows]
    calibrations = {name: calibration for name, (_, calibration, _) in zip(names, results)}
    block_report = next(report for _, _, report in results if report is not None)
    env = dict(machine=cpu_name(), torch=torch.__version__, python=platform.python_version(),
               checkpoint=os.path.relpath(DEFAULT_CHECKPOINT), blocks=args.blocks, prompt_bytes=args.prompt_bytes,
               calibration=f"{args.calibration_prompts} training-split prompts x {args.calibration_blocks} blocks",
               command="PYTHONPATH=. python benchmarks/fidelity_policies.py --out benchmarks/results")
    _write(args, env, rows, calibrations, block_report, os.path.join(args.out, "fidelity_tiny_python"), names)


def _write(args, env, rows, calibrations, block_report, folder, names):
    records = os.path.join(folder, "fidelity_records.csv")
    with open(records) as f:
        rows_csv = f.read()
    with open(records, "w") as f:  # the results files name their device (comment line for CSV readers)
        f.write(f"# CPU ({env['machine']}), torch {env['torch']}: {env['command']}\n" + rows_csv)
    from PIL import Image, PngImagePlugin
    image = os.path.join(folder, "fidelity.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", f"CPU ({env['machine']}), torch {env['torch']}: {env['command']}")
    Image.open(image).save(image, pnginfo=info)
    with open(os.path.join(folder, "fidelity.md"), "a") as f:
        f.write(f"\nProduced on CPU ({env['machine']}, torch {env['torch']}, Python {env['python']}) by "
                f"`{env['command']}` (refresh=\"block\", one token per step, {args.blocks} blocks).\n")
    with open(os.path.join(folder, "calibration.md"), "w") as f:
        f.write(f"# Calibration of the tiny model ({env['calibration']})\n\nProduced on CPU ({env['machine']}, "
                f"torch {env['torch']}) by `{env['command']}`.\n")
        for decoder, (calibration, seconds) in calibrations.items():
            f.write(f"\n## {decoder} ({seconds} s)\n\n```\n{calibration}\n```\n\nPer-head cosine similarity "
                    "`[site][step][head]`:\n\n```\n" + "\n".join(
                        f"site {i}: " + "  ".join("/".join(f"{c:.3f}" for c in step) for step in site)
                        for i, site in enumerate(calibration.cos)) + "\n```\n")
            for granularity, cos, drift in PLANS:
                f.write(f"\n{granularity} plan, cos >= {cos}, drift <= {drift}:\n\n```\n"
                        f"{calibration.plan(cos, drift, granularity)}\n```\n")
    with open(os.path.join(args.out, "fidelity_policies.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    with open(os.path.join(args.out, "fidelity_policies.md"), "w") as f:
        f.write("# Refresh policies on the trained tiny model (greedy decoding vs exact)\n\n")
        f.write("\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n")
        f.write("external_fraction: KV heads the external attention read / exact mode's. agreement_free: "
                "token agreement of the whole generation; agreement_in_context: each block decoded after the "
                "exact generation's earlier blocks. vs_fixed_*: agreement minus the fixed every-N schedules' "
                "(interpolated) at the same external_fraction. Calibration tables and plans: "
                "`fidelity_tiny_python/calibration.md`.\n\n")
        f.write(tabulate(rows, headers="keys", tablefmt="github") + "\n\n")
        f.write("Per-layer measurements of `refresh=\"block\"` (one token per step): "
                "`fidelity_tiny_python/fidelity.md`, `.png`, `_records.csv`.\n\n")
        f.write(str(block_report) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4.5 * len(names)), squeeze=False)
    markers = {"fixed": "o-", "tokens": "s", "adaptive": "^", "plan per head": "D", "plan per layer": "v"}
    for axes_row, decoder in zip(axes, names):
        for ax, key in zip(axes_row, ("agreement_in_context", "agreement_free")):
            pts = [r for r in rows if r["decoder"] == decoder]
            for family, marker in markers.items():
                fam = sorted((r for r in pts if r["family"] == family), key=lambda r: r["external_fraction"])
                ax.plot([r["external_fraction"] for r in fam], [r[key] for r in fam], marker, label=family)
            for r in pts:
                ax.annotate(r["policy"].replace("plan per ", "").replace("(", "\n("), (r["external_fraction"], r[key]),
                            fontsize=5)
            ax.set(xlabel="external attention computed (share of exact mode's KV-head reads)",
                   ylabel=f"token agreement ({key.split('_', 1)[1].replace('_', ' ')})", title=decoder)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fidelity_policies.png"), dpi=120,
                metadata={"Description": f"CPU ({env['machine']}), torch {env['torch']}: {env['command']}"})
    print(tabulate(rows, headers="keys"))


if __name__ == "__main__":
    main()
