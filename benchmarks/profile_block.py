"""Where one block's time goes, per variant: host time to issue it, GPU busy time, idle gaps, top kernels.

A block that takes much longer than its roofline is either host-bound (the GPU waits between
kernels: busy time well below the block's time) or slow on the GPU (busy time close to it, spent in
the kernels listed). One block of a workload of ``benchmarks/e2e.py`` after warm-up blocks, under
``torch.profiler``; per variant a row and its top kernels by GPU time.

    python benchmarks/profile_block.py --model lm --context 32k --batch 8 --variants block,exact,block-ro \
        --out benchmarks/results/profile_lm

``--host BLOCKS`` measures the host instead: time per forward (a block's first apart) and cProfile.

``--exposure BLOCKS`` splits a CUDA-graphed block (``block-ro``, ``exact-ro``) unprofiled instead, with CUDA
events only: the profiler slows the host and shows idle gaps the unprofiled block does not have (0.46 ms
before the refresh graph's first kernel, where the replay call itself takes 11-17 µs:
``benchmarks/results/session33_h100.md``). Per variant:

* ``block_ms``: the block as ``fbcompile.bench`` times it (``time_block``, median of BLOCKS), before the
  forward pre-hook the per-step host times below need is registered;
* ``block_hooked_ms``, ``first_replay_lead_ms``: with that hook, the block, and the time from its start to
  its first graph replay (an event recorded just before it, on a GPU with nothing queued: the host's
  time to get there);
* ``graphs_ms``: the block's graph replays issued back to back, with no host work between (the GPU time
  the block cannot go below), and ``per_graph_ms``, each replay alone;
* ``host_to_replay_us``: per forward, the host from the model's forward pre-hook to its first replay
  call; ``replay_call_us``, per replay, the call itself.

    python benchmarks/profile_block.py --model lm --context 32k --variants block-ro --exposure 12 \
        --out benchmarks/results/exposure_lm
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import pstats
import statistics
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.e2e import workloads  # noqa: E402
from fbcompile import new_request, reset, stats  # noqa: E402
from fbcompile.backends import cuda_graphs  # noqa: E402
from fbcompile.bench import FBCOMPILE_VARIANTS, environment, make_variant, parser as bench_parser, \
    resolve_bandwidth, time_block, _ints  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals (µs in, ms out)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e3


def profile_variant(workload, built, variant: str, context: int, batch: int, warmup: int, top: int,
                    sequence: int = 0, gaps: int = 0, ops: int = 0) -> dict:
    model = make_variant(variant, copy.deepcopy(built), "inductor")
    fb = variant in FBCOMPILE_VARIANTS
    block = workload.prepare(model, context, batch)
    t0 = time.perf_counter()
    for _ in range(warmup):
        if fb:
            new_request(model)
        block.run()
    _sync()
    warm_s = time.perf_counter() - t0
    if fb:
        reset(model)
        new_request(model)
    _sync()
    t0 = time.perf_counter()
    block.run()
    issued = time.perf_counter() - t0
    _sync()
    wall = time.perf_counter() - t0
    if fb:
        new_request(model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA], record_shapes=ops > 0) as prof:
        block.run()
        _sync()
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = [(e.time_range.start, e.time_range.end) for e in gpu]
    span = (max(e for _, e in intervals) - min(s for s, _ in intervals)) / 1e3 if intervals else 0.0
    kernels: dict[str, list] = {}
    for e in gpu:
        k = kernels.setdefault(e.name[:90], [0, 0.0])
        k[0] += 1
        k[1] += e.time_range.elapsed_us() / 1e3
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
    ordered = sorted(gpu, key=lambda e: e.time_range.start)[-sequence:] if sequence else []
    ends = [ordered[0].time_range.start] + [e.time_range.end for e in ordered[:-1]] if ordered else []
    by_start = sorted(gpu, key=lambda e: e.time_range.start)
    idle, busy_until = [], float("-inf")
    for a, b in zip(by_start, by_start[1:]):
        busy_until = max(busy_until, a.time_range.end)
        idle.append((b.time_range.start - busy_until, a.name[:60], b.name[:60]))
    idle = sorted(idle, reverse=True)[:gaps]
    cpu_start = min((e.time_range.start for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU),
                    default=None)
    row = dict(variant=variant, context=context, batch=batch, warmup_s=round(warm_s, 1),
               block_ms=round(wall * 1e3, 2), host_issue_ms=round(issued * 1e3, 2),
               gpu_busy_ms=round(busy_ms(intervals), 2), gpu_span_ms=round(span, 2), kernels=len(gpu),
               top=[dict(kernel=name, count=c, ms=round(ms, 3)) for name, (c, ms) in ranked],
               sequence=[dict(kernel=e.name[:90], us=round(e.time_range.elapsed_us(), 2),
                              gap_us=round(e.time_range.start - end, 2)) for e, end in zip(ordered, ends)],
               gaps=[dict(idle_us=round(g, 1), after=a, before=b) for g, a, b in idle],
               host_lead_ms=round((by_start[0].time_range.start - cpu_start) / 1e3, 3)
               if by_start and cpu_start is not None else None)
    if ops:  # the host ops launched outside the CUDA graphs' replays, with their GPU time and input shapes
        ranked_ops = sorted((e for e in prof.key_averages(group_by_input_shape=True) if e.device_time_total > 0),
                            key=lambda e: -e.device_time_total)[:ops]
        row["ops"] = [dict(op=e.key, count=e.count, device_ms=round(e.device_time_total / 1e3, 3),
                           shapes=str(e.input_shapes)[:240]) for e in ranked_ops]
    if fb:
        s = stats(model)
        row.update(refreshes=s.refreshes, reuses=s.reuses, cuda_graphs=dict(s.cuda_graphs or {}))
    del model, block
    torch._dynamo.reset()
    return row


def _host_sections():
    """``(class, method)`` pairs whose host time ``--host`` reports per kind of forward: the dispatcher's
    steps, the CUDA-graph wrapper's, the session cache's, and the replay itself."""
    from fbcompile.backends.cuda_graphs import CapturedGraph
    from fbcompile.backends.dispatcher import SplitGraphDispatcher
    from fbcompile.backends.session import Session
    return ([(SplitGraphDispatcher, m) for m in ("__call__", "_lookup", "_refresh", "_keep", "_reuse", "_count_step")]
            + [(CapturedGraph, m) for m in ("__call__", "_counted", "_key", "_replay", "_copy_out", "_recycle")]
            + [(Session, m) for m in ("drop", "store")] + [(torch.cuda.CUDAGraph, "replay")])


def host_variant(workload, built, variant: str, context: int, batch: int, warmup: int, blocks: int,
                 top: int) -> dict:
    """Host time per forward, a block's first (the refresh in block mode) apart from the others: from
    the module's forward pre-hook to its forward hook (dynamo's guards, fbcompile's dispatcher, the
    replay's bookkeeping; the GPU is not waited for). ``blocks`` timed blocks; as many with the time
    of each of :func:`_host_sections` summed; as many under ``cProfile`` (own time per function)."""
    model = make_variant(variant, copy.deepcopy(built), "inductor")
    fb = variant in FBCOMPILE_VARIANTS
    block = workload.prepare(model, context, batch)
    for _ in range(warmup):
        if fb:
            new_request(model)
        block.run()
    _sync()
    times: dict[str, list[float]] = {"first": [], "other": []}
    sections: dict[str, dict[str, float]] = {"first": {}, "other": {}}
    profiles = {"first": cProfile.Profile(), "other": cProfile.Profile()}
    state = dict(index=0, t0=0.0, mode="plain")

    def kind() -> str:
        return "first" if state["index"] == 0 else "other"

    def before(module, args, kwargs=None):
        if state["mode"] == "profile":
            profiles[kind()].enable()
        state["t0"] = time.perf_counter()

    def after(module, args, output, kwargs=None):
        elapsed = time.perf_counter() - state["t0"]
        if state["mode"] == "profile":
            profiles[kind()].disable()
        elif state["mode"] == "plain":
            times[kind()].append(elapsed * 1e6)
        state["index"] += 1

    def timed(name, method):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                into = sections[kind()]
                into[name] = into.get(name, 0.0) + time.perf_counter() - t0
        return run

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    originals = [(cls, name, cls.__dict__[name]) for cls, name in _host_sections()]
    try:
        for mode in ("plain", "sections", "profile"):
            state["mode"] = mode
            if mode == "sections":
                for cls, name, method in originals:
                    setattr(cls, name, timed(f"{cls.__name__}.{name}", method))
            for _ in range(blocks):
                if fb:
                    new_request(model)
                state["index"] = 0
                block.run()
                _sync()
            for cls, name, method in originals:
                setattr(cls, name, method)
    finally:
        for cls, name, method in originals:
            setattr(cls, name, method)
        for h in handles:
            h.remove()
    per_block = {"first": blocks, "other": blocks * max(len(times["other"]) // max(len(times["first"]), 1), 1)}
    row = dict(variant=variant, context=context, batch=batch, blocks=blocks,
               first_forward_us=round(statistics.median(times["first"]), 1),
               other_forwards_us=round(statistics.median(times["other"]), 1),
               sections_us={k: {name: round(t / per_block[k] * 1e6, 1) for name, t in sorted(v.items())}
                            for k, v in sections.items()})
    for name, prof in profiles.items():
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
        row[f"profile_{name}"] = text.getvalue()
    del model, block
    torch._dynamo.reset()
    return row


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


def _timed(fn) -> float:
    """ms of ``fn()`` between CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def exposure(workload, built, variant: str, context: int, batch: int, warmup: int, blocks: int) -> dict:
    """``--exposure``'s row for one variant (see the module docstring); ``built`` becomes the variant."""
    global _log
    model = make_variant(variant, built, "inductor")
    block = workload.prepare(model, context, batch)
    reset(model)
    for _ in range(warmup):
        new_request(model)
        block.run()
    _, block_ms = time_block(block.run, lambda: new_request(model), blocks, torch.device("cuda"))
    forwards: list[float] = []  # registered after block_ms: a hook costs host time
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
    row = dict(variant=variant, context=context, batch=batch, blocks=blocks, block_ms=round(block_ms, 4),
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
    p.add_argument("--variants", default="block,exact,block-ro,exact-ro")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--sequence", type=int, default=0,
                   help="also list the block's last N GPU events in order, with the idle gap before each")
    p.add_argument("--gaps", type=int, default=0,
                   help="also list the block's N longest idle gaps on the GPU (and the host's lead before its first kernel)")
    p.add_argument("--ops", type=int, default=0,
                   help="also list the N host ops with the most GPU time, by input shapes (those outside the CUDA "
                        "graphs' replays: input copies, uncaptured graphs)")
    p.add_argument("--host", type=int, default=0, metavar="BLOCKS",
                   help="instead: host time per forward (a block's first apart) over BLOCKS blocks, then cProfile")
    p.add_argument("--exposure", type=int, default=0, metavar="BLOCKS",
                   help="instead: a CUDA-graphed block's GPU work against the host's lead before it, unprofiled, "
                        "over BLOCKS blocks")
    p.add_argument("--tiny", action="store_true", help="small shapes, on the CPU (a check of the script)")
    p.add_argument("--out", default="benchmarks/results/profile")
    args = p.parse_args(argv)
    if args.exposure and args.tiny:
        p.error("--exposure times CUDA graphs: it needs a GPU")
    device = torch.device("cpu" if args.tiny else "cuda")
    w = workloads(args.tiny)[args.model]
    env = environment(device, resolve_bandwidth("auto", device)[1],
                      bench_parser().parse_args(["--compiler", "inductor", "--repeats", "1"]))
    dtype = torch.float32 if args.tiny else torch.bfloat16
    env["dtype"] = str(dtype)
    rows = []
    with torch.no_grad():
        built = None if args.exposure else w.build(device, dtype)
        if args.exposure:  # its replays note events: before any graph is captured
            cuda_graphs.record = _recording_replays(cuda_graphs.record)
        for variant in args.variants.split(","):
            if args.exposure:  # a model of its own per variant: the hook it adds stays
                rows.append(exposure(w, w.build(device, dtype), variant, _ints(args.context)[0], args.batch,
                                     args.warmup, args.exposure))
            elif args.host:
                rows.append(host_variant(w, built, variant, _ints(args.context)[0], args.batch, args.warmup,
                                         args.host, args.top))
            else:
                rows.append(profile_variant(w, built, variant, _ints(args.context)[0], args.batch, args.warmup,
                                            args.top, args.sequence, args.gaps, args.ops))
            write(args.out, env, args, rows)
            print(json.dumps(summary(rows[-1])), flush=True)


SUMMARY_SKIPS = ("top", "sequence", "gaps", "ops", "sections_us", "profile_first", "profile_other")  # long fields


def summary(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in SUMMARY_SKIPS}


def block_lines(r: dict) -> list[str]:
    """A profiled variant's markdown: its summary, top kernels, event sequence and idle gaps."""
    lines = [f"## {r['variant']}", "", "    " + json.dumps(summary(r)), ""]
    lines += ["| kernel | count | ms |", "|---|---|---|"]
    lines += [f"| `{t['kernel']}` | {t['count']} | {t['ms']} |" for t in r["top"]] + [""]
    if r.get("sequence"):
        lines += [f"The block's last {len(r['sequence'])} GPU events in order:", "",
                  "| kernel | µs | idle before, µs |", "|---|---|---|"]
        lines += [f"| `{t['kernel']}` | {t['us']} | {t['gap_us']} |" for t in r["sequence"]] + [""]
    if r.get("ops"):
        lines += ["Host ops with the most GPU time (outside the replays), by input shapes:", "",
                  "| op | count | GPU ms | input shapes |", "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['count']} | {o['device_ms']} | `{o['shapes']}` |" for o in r["ops"]] + [""]
    if r.get("gaps"):
        lines += [f"The block's {len(r['gaps'])} longest idle gaps on the GPU (the host's lead before its first "
                  f"kernel: {r['host_lead_ms']} ms):", "", "| idle µs | after | before |", "|---|---|---|"]
        lines += [f"| {g['idle_us']} | `{g['after']}` | `{g['before']}` |" for g in r["gaps"]] + [""]
    return lines


def host_lines(r: dict) -> list[str]:
    """A ``--host`` variant's markdown: its summary, host time per section, cProfile listings."""
    first, other = r["sections_us"]["first"], r["sections_us"]["other"]
    lines = [f"## {r['variant']}", "", "    " + json.dumps(summary(r)), ""]
    lines += ["Host µs per forward in each section (inclusive; nested sections counted in each):", "",
              "| section | block's first forward | each other forward |", "|---|---|---|"]
    lines += [f"| `{name}` | {first.get(name, 0)} | {other.get(name, 0)} |" for name in sorted({*first, *other})]
    for name in ("first", "other"):
        lines += ["", f"cProfile, own time, the blocks' {name} forwards:", "", "```", r[f"profile_{name}"].strip(), "```"]
    return lines + [""]


def write(out: str, env: dict, args, rows: list[dict]) -> None:
    """``rows`` as ``out.json`` and ``out.md``."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(dict(env=env, model=args.model, rows=rows), f, indent=1)
    title = ("A block's GPU work and the host's lead" if args.exposure else "Host time per forward" if args.host
             else "Where one block's time goes")
    lines = [f"# {title}: {args.model}, context {args.context}, batch {args.batch}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()] + [""]
    for r in rows:
        if args.exposure:
            lines += [f"## {r['variant']}", "", "    " + json.dumps(r), ""]
        else:
            lines += host_lines(r) if args.host else block_lines(r)
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
