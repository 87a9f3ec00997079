"""How much of a CUDA-graphed block is GPU work and how much is the host's lead before it, unprofiled.

``profile_block.py`` answers this under ``torch.profiler``, which slows the host and shows idle gaps the
unprofiled block does not have (a 0.46 ms gap before the refresh graph's first kernel there; the
replay call itself takes 11-17 µs: ``benchmarks/results/session33_h100.md``). Here, per variant with
CUDA graphs (``block-ro``, ``exact-ro``) of a workload of ``benchmarks/e2e.py``, with CUDA events only:

* ``block_ms``: the block as ``fbcompile.bench`` times it (median of ``--blocks``), before the forward
  pre-hook the per-step host times below need is registered;
* ``block_hooked_ms``, ``first_replay_lead_ms``: with that hook, the block, and the time from its start
  to its first graph replay (an event recorded just before it, on a GPU with nothing queued: the host's
  time to get there);
* ``graphs_ms``: the block's graph replays issued back to back, with no host work between (the GPU
  time the block cannot go below), and ``per_graph_ms``, each replay alone;
* ``host_to_replay_us``: per forward, the host from the model's forward pre-hook to its (first) replay
  call; ``replay_call_us``, per replay, the call itself.

    python benchmarks/block_exposure.py --model lm --context 32k --variants block-ro --out benchmarks/results/exposure
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.e2e import workloads  # noqa: E402
from fbcompile import new_request, reset, stats  # noqa: E402
from fbcompile.backends import cuda_graphs  # noqa: E402
from fbcompile.bench import _ints, environment, make_variant, parser as bench_parser, resolve_bandwidth  # noqa: E402

_log: list | None = None  # while a block is measured: (replay, event before it, host time before, after)


def _recording_replays(record):
    """``cuda_graphs.record`` whose replays note an event and the host time around each call into
    ``_log`` while it is a list."""
    def wrapped_record(run, args, session):
        replay, outputs = record(run, args, session)

        def logged(call_args):
            if _log is None:
                return replay(call_args)
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            t0 = time.perf_counter()
            replay(call_args)
            _log.append((replay, event, t0, time.perf_counter()))
        return logged, outputs
    return wrapped_record


def _median(values) -> float:
    return round(statistics.median(values), 4)


def _timed(fn, before=None) -> float:
    """ms of ``fn()`` between CUDA events (``before()`` runs first, untimed)."""
    if before is not None:
        before()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def exposure(workload, built, variant: str, context: int, batch: int, warmup: int, blocks: int) -> dict:
    global _log
    model = make_variant(variant, built, "inductor")
    block = workload.prepare(model, context, batch)
    reset(model)
    for _ in range(warmup):
        new_request(model)
        block.run()
    torch.cuda.synchronize()
    plain = [_timed(block.run, lambda: new_request(model)) for _ in range(blocks)]
    forwards: list[float] = []  # after the plain blocks: a hook costs host time
    model.register_forward_pre_hook(lambda module, inputs: forwards.append(time.perf_counter()))
    steps = []
    for _ in range(blocks):
        new_request(model)
        forwards.clear()
        _log = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        block.run()
        end.record()
        end.synchronize()
        log, _log = _log, None
        steps.append(dict(lead=start.elapsed_time(log[0][1]), total=start.elapsed_time(end),
                          replays=[r for r, *_ in log],
                          host=[(min(t0 for _, _, t0, _ in log if t0 >= f) - f) * 1e6 for f in forwards
                                if any(t0 >= f for _, _, t0, _ in log)],
                          call=[(t1 - t0) * 1e6 for _, _, t0, t1 in log]))
    sequence = steps[-1]["replays"]

    def replay_all():
        for replay in sequence:
            replay(None)
    graphs = [_timed(replay_all) for _ in range(blocks)]
    per_graph = [_median(_timed(lambda: replay(None)) for _ in range(5)) for replay in sequence]
    n = len(sequence)
    row = dict(variant=variant, context=context, batch=batch, blocks=blocks, block_ms=_median(plain),
               block_hooked_ms=_median(s["total"] for s in steps),
               first_replay_lead_ms=_median(s["lead"] for s in steps), graphs_ms=_median(graphs), graphs_per_block=n,
               per_graph_ms=per_graph,
               host_to_replay_us=[round(statistics.median(s["host"][j] for s in steps))
                                  for j in range(min(len(s["host"]) for s in steps))],
               replay_call_us=[round(statistics.median(s["call"][j] for s in steps)) for j in range(n)],
               cuda_graphs=dict(stats(model).cuda_graphs or {}))
    torch._dynamo.reset()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lm")
    p.add_argument("--context", default="32k")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", default="block-ro,exact-ro")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--out", default="benchmarks/results/exposure")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    cuda_graphs.record = _recording_replays(cuda_graphs.record)
    w = workloads()[args.model]
    env = environment(device, resolve_bandwidth("auto", device)[1],
                      bench_parser().parse_args(["--compiler", "inductor", "--repeats", str(args.blocks)]))
    env["command"] = "python " + " ".join(sys.argv)
    rows = []
    with torch.no_grad():
        for variant in args.variants.split(","):
            rows.append(exposure(w, w.build(device, torch.bfloat16), variant, _ints(args.context)[0], args.batch,
                                 args.warmup, args.blocks))
            print(json.dumps(rows[-1]), flush=True)
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out + ".json", "w") as f:
                json.dump(dict(env=env, model=args.model, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
