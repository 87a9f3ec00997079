"""Merge the rows of several ``e2e.json`` runs (same device and workloads) into one table and plot.

    python benchmarks/merge_e2e.py benchmarks/results/e2e_lm_h200.json benchmarks/results/e2e_lm_table_h200_s13.json \
        --out benchmarks/results/e2e_lm_h200_all

A run given as ``PATH:VARIANTS`` (``fbcompile bench``'s variant names, comma-separated, e.g.
``e2e.json:compile,compile-ro``) contributes only those variants' rows: an older run's baselines beside a
newer run's fbcompile rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fbcompile.bench import VARIANT_NAMES, write_results  # noqa: E402


def merge(paths: list[str]) -> tuple[dict, dict]:
    """(models with their rows from every run, ordered by variant, batch and context; the first run's
    environment with the runs' commands). ``PATH:VARIANTS`` keeps only those variants of that run."""
    order = list(VARIANT_NAMES.values())
    runs, keeps = [], []
    for spec in paths:
        path, _, variants = spec.partition(":")
        runs.append(json.load(open(path)))
        keeps.append({VARIANT_NAMES[v] for v in variants.split(",")} if variants else set(order))
    models: dict = {}
    for run, keep in zip(runs, keeps):
        for name, result in run["models"].items():
            models.setdefault(name, dict(result, rows=[]))["rows"] += [r for r in result["rows"]
                                                                       if r["variant"] in keep]
    for result in models.values():
        result["rows"].sort(key=lambda r: (order.index(r["variant"]), r["batch"], r["context"]))
    env = dict(runs[0]["env"], command=" ; ".join(r["env"]["command"] for r in runs),
               merged_from=", ".join(os.path.basename(p) for p in paths))
    return models, env


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    print("\n".join(write_results(args.out, *merge(args.runs))))
