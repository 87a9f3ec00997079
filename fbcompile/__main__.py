"""Command line: ``python -m fbcompile fidelity --model pkg.mod:factory --generate pkg.mod:function``."""
from __future__ import annotations

import argparse
import importlib
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
    fid.add_argument("--model", required=True, help="module:callable returning the model")
    fid.add_argument("--generate", required=True, help="module:callable(model) returning token ids")
    fid.add_argument("--refresh", type=_refresh, default="block", help="policy to evaluate (block, N, tokens)")
    fid.add_argument("--prompt-length", type=int, default=0)
    fid.add_argument("--out", default="fidelity_out")
    args = parser.parse_args(argv)
    sys.path.insert(0, "")
    from fbcompile import Config, fidelity

    report = fidelity(_load(args.model)(), _load(args.generate), Config(refresh=args.refresh, compiler="eager"),
                      out=args.out, prompt_length=args.prompt_length)
    print(report)
    print(f"written to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
