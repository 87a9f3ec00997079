"""Command line: ``python -m fbcompile fidelity|calibrate --model pkg.mod:factory --generate pkg.mod:function``.

``calibrate`` writes ``calibration.md`` and ``plan.json``; ``fidelity --plan plan.json`` evaluates it.
``python -m fbcompile bench --workloads pkg.mod:function ...`` runs the end-to-end benchmark
(:mod:`fbcompile.bench`) on the workloads ``function(tiny)`` returns, e.g. ``benchmarks.e2e:workloads``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys


def _load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _refresh(value: str):
    return int(value) if value.isdigit() else value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fbcompile")
    commands = parser.add_subparsers(dest="command", required=True)
    fid = commands.add_parser("fidelity", help="measure reuse vs exact on a model (table, records, plots)")
    cal = commands.add_parser("calibrate", help="measure each head's external drift; write a reuse plan")
    for sub in (fid, cal):
        sub.add_argument("--model", required=True, help="module:callable returning the model")
        sub.add_argument("--generate", required=True, help="module:callable(model) returning token ids")
        sub.add_argument("--refresh", type=_refresh, default="block",
                         help="policy (block, N, tokens, adaptive)")
        sub.add_argument("--out", default=f"{sub.prog.split()[-1]}_out")
    fid.add_argument("--prompt-length", type=int, default=0)
    fid.add_argument("--plan", default=None, help="a plan.json written by calibrate")
    cal.add_argument("--cos", type=float, default=0.85, help="a head reuses where its cos-sim is at least this")
    cal.add_argument("--lse-drift", type=float, default=0.05, help="... and its mean |LSE drift| at most this")
    cal.add_argument("--granularity", choices=("head", "layer"), default="head")
    from fbcompile import bench as bench_module
    bench = commands.add_parser("bench", parents=[bench_module.parser(add_help=False)],
                                help="end-to-end ms per block per variant, vs the memory roofline")
    bench.add_argument("--workloads", required=True, help="module:callable(tiny) returning {name: Workload}")
    args = parser.parse_args(argv)
    sys.path.insert(0, "")
    if args.command == "bench":
        bench_module.run(_load(args.workloads)(args.tiny), args)
        return 0
    from fbcompile import Config, ReusePlan, calibrate, fidelity

    model, generate = _load(args.model)(), _load(args.generate)
    os.makedirs(args.out, exist_ok=True)
    if args.command == "calibrate":
        calibration = calibrate(model, generate, Config(refresh=args.refresh, compiler="eager"))
        plan = calibration.plan(args.cos, args.lse_drift, args.granularity)
        with open(os.path.join(args.out, "calibration.md"), "w") as f:
            f.write(f"```\n{calibration}\n\n{plan}\n```\n")
        plan.save(os.path.join(args.out, "plan.json"))
        print(f"{calibration}\n\n{plan}")
    else:
        plan = ReusePlan.load(args.plan) if args.plan else None
        report = fidelity(model, generate, Config(refresh=args.refresh, reuse_plan=plan, compiler="eager"),
                          out=args.out, prompt_length=args.prompt_length)
        print(report)
    print(f"written to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
