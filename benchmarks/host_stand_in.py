"""Host time of each step of a block before its CUDA graph is launched, on the CPU (no GPU needed).

A block's first step starts after the loop's sync, so its host time before the replay is GPU idle time
in every block (``profile_lm_32k_b1_h100_s23.md``: 13.7 ms of GPU work in a 14.3 ms block). This runs
the e2e LM at its real depth (28 layers, small widths) under ``Config(cuda_graphs=True)`` with the
capture stood in for (``cuda_graphs.record``: the graph runs once; a replay only notes the time), as
``fbcompile.bench`` runs a block (``new_request`` before it), and splits each step's time from the
module's pre-hook to the replay: to the dispatcher (dynamo's guards and frame), to the CUDA-graph
wrapper (fbcompile's lookup), to its replay (key, input copies). ``--guard-filter`` drops some of
dynamo's guards (``torch.compile``'s ``guard_filter_fn``; unsafe, to measure what they cost).

    python benchmarks/host_stand_in.py --refresh block --out benchmarks/results/host_stand_in_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fbcompile  # noqa: E402
from benchmarks.e2e import build_lm, prepare_lm  # noqa: E402
from fbcompile.backends import cuda_graphs, dispatcher  # noqa: E402

SHAPE = dict(vocab_size=256, hidden_size=64, num_layers=28, num_heads=12, num_kv_heads=2, head_dim=16,
             intermediate_size=128, block_size=32)
FILTERS = {  # guard_filter_fn: which of dynamo's guards to keep
    "none": None,
    "param-tensors": lambda entries: [not (e.guard_type in ("TENSOR_MATCH", "TYPE_MATCH") and "_parameters" in e.name)
                                      for e in entries],
    "modules": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
    "all": torch.compiler.skip_all_guards_unsafe,
}
MARKS = ("forward", "dispatcher", "wrapper", "replay")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refresh", default="block")
    parser.add_argument("--guard-filters", default="none,param-tensors,modules,all")
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    marks = []

    def stand_in(run, run_args, session):
        return (lambda call_args: marks.append(("replay", time.perf_counter()))), run(*run_args)

    def noted(cls, name, label):
        method = getattr(cls, name)

        def call(self, *a, **k):
            marks.append((label, time.perf_counter()))
            return method(self, *a, **k)
        setattr(cls, name, call)

    cuda_graphs.DEVICE_TYPE, cuda_graphs.record = "cpu", stand_in
    noted(dispatcher.SplitGraphDispatcher, "__call__", "dispatcher")
    noted(cuda_graphs.CapturedGraph, "_call", "wrapper")
    plain_compile = torch.compile
    torch.set_grad_enabled(False)
    rows = []
    for name in args.guard_filters.split(","):
        keep = FILTERS[name]
        torch.compile = (lambda f, **kw: plain_compile(f, options={"guard_filter_fn": keep}, **kw)) \
            if keep is not None else plain_compile  # as fbcompile.optimize calls it
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = fbcompile.optimize(build_lm(SHAPE, "cpu", torch.float32),
                                   fbcompile.Config(refresh=args.refresh, cuda_graphs=True, compiler="eager"))
        block = prepare_lm(8, model, 256, 1)
        model.register_forward_pre_hook(lambda module, inputs: marks.append(("forward", time.perf_counter())))
        for timed in (False, True):
            marks.clear()
            for _ in range(args.blocks if timed else 6):
                fbcompile.new_request(model)
                block.run()
        calls = []
        for label, t in marks:
            if label == "forward":
                calls.append({})
            calls[-1].setdefault(label, t)
        for step in range(8):
            steps = [c for c in calls[step::8] if all(m in c for m in MARKS)]
            row = dict(guard_filter=name, refresh=args.refresh, step=step, calls=len(steps))
            for a, b in zip(MARKS, MARKS[1:]):
                row[f"{a}_to_{b}_us"] = round(statistics.median((c[b] - c[a]) * 1e6 for c in steps))
            row["to_replay_us"] = round(statistics.median((c["replay"] - c["forward"]) * 1e6 for c in steps))
            rows.append(row)
            print(row, flush=True)
    torch.compile = plain_compile
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cpus=os.cpu_count(), command="python " + " ".join(sys.argv))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
