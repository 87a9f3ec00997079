"""Per-call CPU cost of fbcompile's dispatcher, without the graph's own cost.

Why it exists: every call of a split graph goes through ``SplitGraphDispatcher.__call__``
(fbcompile/backends/dispatcher.py), which looks up each attention site's cached ``(O_e, L_e)``,
checks its guards (KV tensor identity, ``_version``, shape, query block shape) and, on a refresh,
stores new entries. That is pure Python on the host, paid at every denoising step of every block,
so it has to stay small next to a step's GPU time. This measures it in isolation.

How: the example model (``examples/block_diffusion_lm.make_tiny_model(num_layers=N)``) is optimized
with ``Config(refresh="block", compiler="eager")`` and run for a short ``generate`` while
``SplitGraphDispatcher`` is patched to record its instances and their last arguments. The
dispatcher of the denoising-step graph is then called many times with its real arguments, but with
its ``refresh`` / ``reuse`` callables replaced by stubs that return right-length tuples of tensors
it produced earlier, so only the dispatcher's work is timed (``time.perf_counter_ns`` around each
call, gc disabled):

* ``reuse``: the cached entries are valid, every call takes the reuse path (lookup + guards);
* ``refresh``: the dispatcher's policy is set to ``EveryNPolicy(1)`` (refresh at every call, reason
  "policy"), so every call does lookup + guards + refresh + storing one entry per site;
* ``exact``: the ``ExactDispatcher`` of ``refresh="always"`` graphs (counters only);
* ``stub``: calling a stub directly (the floor: one Python call + timer).

For context it also times the real dispatcher call (real FX graphs, eager, CPU) on the reuse path.

Run from the repository root::

    PYTHONPATH=. python benchmarks/dispatch_overhead.py --out benchmarks/results

It writes ``dispatch_overhead_cpu.{md,json}`` into the output folder.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import torch

import fbcompile
import fbcompile.backends.compiler as fb_compiler
from fbcompile.backends.dispatcher import ExactDispatcher, SplitGraphDispatcher
from fbcompile.backends.policies import EveryNPolicy
from benchmarks.machine import cpu_name
from examples.block_diffusion_lm import make_tiny_model


class _RecordingDispatcher(SplitGraphDispatcher):
    """SplitGraphDispatcher that remembers its instances and the arguments of its last call."""

    instances: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_args = None
        _RecordingDispatcher.instances.append(self)

    def __call__(self, *args):
        self.last_args = args
        return super().__call__(*args)


def time_calls(fn, args, n: int, warmup: int = 200) -> list[int]:
    for _ in range(warmup):
        fn(*args)
    out = [0] * n
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        for i in range(n):
            t0 = clock()
            fn(*args)
            out[i] = clock() - t0
    finally:
        gc.enable()
    return out


def summarize(ns: list[int]) -> dict:
    s = sorted(ns)
    return {"median_us": statistics.median(s) / 1e3, "p90_us": s[int(0.9 * (len(s) - 1))] / 1e3,
            "min_us": s[0] / 1e3, "n": len(s)}


@torch.no_grad()
def measure(num_layers: int, n: int, n_real: int) -> dict:
    _RecordingDispatcher.instances = []
    # Each model is a new compile of the same code object: start from a clean dynamo cache so the
    # earlier models' graphs do not count toward dynamo's recompile limit.
    torch._dynamo.reset()
    original = fb_compiler.SplitGraphDispatcher
    fb_compiler.SplitGraphDispatcher = _RecordingDispatcher
    try:
        model = make_tiny_model(num_layers=num_layers)
        fbcompile.optimize(model, fbcompile.Config(refresh="block", compiler="eager"))
        prompt = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
        model.generate(prompt, num_blocks=3)
    finally:
        fb_compiler.SplitGraphDispatcher = original

    # The denoising-step graph: the split graph with a reuse specialisation that ran most often.
    live = [d for d in _RecordingDispatcher.instances if d.last_args is not None]
    disp = max(live, key=lambda d: d.record.calls)
    args = disp.last_args
    session = disp.session
    n_sites = len(disp.guards)
    num_outputs = disp.refresh.outputs.user
    reuse_graph = disp.steps[0].graph
    real_refresh, real_reuse = disp.refresh.run, reuse_graph.run

    # Real outputs: refresh gives the user outputs + (O_e, L_e) per site; reuse gives the user outputs.
    refresh_out = tuple(real_refresh(*args))
    assert len(refresh_out) == num_outputs + 2 * n_sites, (len(refresh_out), num_outputs, n_sites)
    reuse_out = tuple(refresh_out[:num_outputs])

    # Populate the session cache for these args with the real dispatcher (refresh path).
    session.reset()
    disp(*args)
    assert len(session.cache) >= n_sites

    # Context: real call on the reuse path (graph cost included).
    real = summarize(time_calls(disp, args, n_real, warmup=20))
    reuses_before = disp.record.reuses

    def refresh_stub(*a):
        return refresh_out

    def reuse_stub(*a):
        return reuse_out

    disp.refresh.run, reuse_graph.run = refresh_stub, reuse_stub
    try:
        res = {}
        calls0 = (disp.record.refreshes, disp.record.reuses)
        res["reuse"] = summarize(time_calls(disp, args, n))
        assert disp.record.refreshes == calls0[0], "reuse benchmark took the refresh path"

        policies = disp.policies
        disp.policies = [EveryNPolicy(1)]
        try:
            r0 = disp.record.reuses
            res["refresh"] = summarize(time_calls(disp, args, n))
            assert disp.record.reuses == r0, "refresh benchmark took the reuse path"
        finally:
            disp.policies = policies

        exact = ExactDispatcher(session, disp.record, reuse_stub, "exact mode")
        res["exact"] = summarize(time_calls(exact, args, n))
        res["stub"] = summarize(time_calls(reuse_stub, args, n))
    finally:
        disp.refresh.run, reuse_graph.run = real_refresh, real_reuse
    assert disp.record.reuses > reuses_before
    n_tensor_args = sum(isinstance(a, torch.Tensor) for a in args)
    return {"num_layers": num_layers, "sites": n_sites, "graph_args": len(args), "tensor_args": n_tensor_args,
            "num_outputs": num_outputs, "graphs_compiled": len(session.graphs),
            "cache_len": [a.shape[-2] for a in args if isinstance(a, torch.Tensor) and a.dim() == 4][:1],
            "real_reuse_call": real, **res}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 28])
    ap.add_argument("--calls", type=int, default=20000, help="timed calls per stubbed measurement")
    ap.add_argument("--real-calls", type=int, default=300, help="timed calls of the real (unstubbed) dispatcher")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = []
    for nl in args.layers:
        r = measure(nl, args.calls, args.real_calls)
        results.append(r)
        print(f"layers {nl:3d} sites {r['sites']:3d}: reuse {r['reuse']['median_us']:.2f}/{r['reuse']['p90_us']:.2f} us, "
              f"refresh {r['refresh']['median_us']:.2f}/{r['refresh']['p90_us']:.2f} us, "
              f"exact {r['exact']['median_us']:.2f}/{r['exact']['p90_us']:.2f} us, "
              f"stub {r['stub']['median_us']:.2f} us, real reuse call {r['real_reuse_call']['median_us']:.0f} us "
              f"(median/p90)")

    command = "PYTHONPATH=. python benchmarks/dispatch_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = {"cpu": cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, "dispatch_overhead_cpu")
    with open(base + ".json", "w") as f:
        json.dump({"command": command, "machine": machine, "results": results}, f, indent=1)

    lines = [
        "# fbcompile dispatcher overhead per call (CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, torch {machine['torch']}, Python {machine['python']}. "
        "The machine was shared with other jobs while this ran, so p90 includes some scheduling noise.",
        "",
        "`SplitGraphDispatcher.__call__` of the denoising-step graph of `make_tiny_model(num_layers=N)` "
        "(one rewritten attention site per layer, `Config(refresh=\"block\", compiler=\"eager\")`, batch 1), "
        "called with its real arguments while its `refresh`/`reuse` callables are stubs returning "
        f"pre-computed tensors: {args.calls} timed calls each, `time.perf_counter_ns` per call, gc disabled. "
        "reuse = every call reuses (lookup + guards of every site); refresh = policy `refresh=1` so every call "
        "refreshes (lookup + guards + storing one cache entry per site); exact = the `ExactDispatcher` "
        "(`refresh=\"always\"`); stub = calling the stub alone (timer + one Python call, the floor). "
        "'real reuse call' = the same dispatcher with its real eager FX graph, for scale.",
        "",
        "| layers (sites) | reuse median µs | reuse p90 µs | refresh median µs | refresh p90 µs | exact median µs | stub median µs | real reuse call median µs |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['num_layers']} ({r['sites']}) | {r['reuse']['median_us']:.2f} | {r['reuse']['p90_us']:.2f} | "
                     f"{r['refresh']['median_us']:.2f} | {r['refresh']['p90_us']:.2f} | {r['exact']['median_us']:.2f} | "
                     f"{r['stub']['median_us']:.2f} | {r['real_reuse_call']['median_us']:.0f} |")
    per_site_reuse = [(r["reuse"]["median_us"] - results[0]["reuse"]["median_us"]) / max(1, r["sites"] - results[0]["sites"])
                      for r in results[1:]]
    per_site_refresh = [(r["refresh"]["median_us"] - results[0]["refresh"]["median_us"]) / max(1, r["sites"] - results[0]["sites"])
                        for r in results[1:]]
    if per_site_reuse:
        lines += ["", f"Marginal cost per attention site (vs the {results[0]['num_layers']}-layer model): reuse "
                  + ", ".join(f"{x:.2f}" for x in per_site_reuse) + " µs; refresh "
                  + ", ".join(f"{x:.2f}" for x in per_site_refresh) + " µs (for "
                  + ", ".join(str(r["num_layers"]) for r in results[1:]) + " layers)."]
    lines.append("")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    print("wrote", base + ".{md,json}")


if __name__ == "__main__":
    main()
