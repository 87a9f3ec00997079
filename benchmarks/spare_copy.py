"""How fast a new cache can be copied into buffers with spare capacity (``fbcompile/backends/cuda_graphs.py``).

On the H200 the copy fbcompile does now (one ``torch._foreach_copy_`` into ``narrow`` views of the buffers,
which are strided) ran at ~1.65 TB/s: 4.6 ms of a 36.5 ms block at 128K cached tokens
(``benchmarks/results/grow_cache_h200.md``). This times ways to make the same copy, for the example LM's
cache (28 layers, keys and values ``[B, 2, L, 128]`` bf16, buffers of ``spare_capacity(L)`` rows):

* ``narrow``: what fbcompile does: ``_foreach_copy_`` into the narrowed buffers;
* ``pieces``: ``_foreach_copy_`` over the contiguous ``[L, 128]`` piece of every (batch, head), which takes
  the multi-tensor fast path;
* ``loop``: one ``copy_`` per tensor.

Per way and shape: ms per copy of the whole cache (median of CUDA-event timings), the bandwidth (bytes
read plus written per second) and the host time per call. Each way's result is checked against ``narrow``.

    python benchmarks/spare_copy.py --out benchmarks/results/spare_copy_h200.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fbcompile.backends.cuda_graphs import spare_capacity  # noqa: E402

LAYERS, HEADS, DIM = 28, 2, 128


def ways(buffers, sources, length):
    """The copy strategies, each a function of no arguments."""
    narrowed = [b.narrow(2, 0, length) for b in buffers]
    pieces_dst = [b[i, h, :length] for b in buffers for i in range(b.shape[0]) for h in range(b.shape[1])]
    pieces_src = [s[i, h] for s in sources for i in range(s.shape[0]) for h in range(s.shape[1])]

    def loop():
        for d, s in zip(narrowed, sources):
            d.copy_(s)
    return {"narrow": lambda: torch._foreach_copy_(narrowed, sources),
            "pieces": lambda: torch._foreach_copy_(pieces_dst, pieces_src),
            "loop": loop}


def time_way(fn, repeats: int) -> tuple[float, float]:
    """Median device ms and mean host ms per call."""
    fn()
    torch.cuda.synchronize()
    device, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        host.append(time.perf_counter() - t0)
        end.synchronize()
        device.append(start.elapsed_time(end))
    device.sort()
    return device[len(device) // 2], 1e3 * sum(host) / len(host)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="32768,131072")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for batch in map(int, args.batches.split(",")):
        for length in map(int, args.contexts.split(",")):
            capacity = spare_capacity(length)
            sources = [torch.randn(batch, HEADS, length, DIM, device="cuda", dtype=torch.bfloat16)
                       for _ in range(2 * LAYERS)]
            buffers = [torch.empty(batch, HEADS, capacity, DIM, device="cuda", dtype=torch.bfloat16)
                       for _ in range(2 * LAYERS)]
            moved = 2 * sum(t.nbytes for t in sources)  # read and written
            for name, fn in ways(buffers, sources, length).items():
                for b in buffers:
                    b.zero_()
                ms, host_ms = time_way(fn, args.repeats)
                exact = all(torch.equal(b.narrow(2, 0, length), s) for b, s in zip(buffers, sources))
                rows.append(dict(way=name, batch=batch, context=length, capacity=capacity, ms=round(ms, 3),
                                 tb_per_s=round(moved / ms / 1e9, 2), host_ms=round(host_ms, 3), exact=exact))
                print(rows[-1], flush=True)
            del sources, buffers
            torch.cuda.empty_cache()
    if args.out:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, command="python " + " ".join(sys.argv))
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
