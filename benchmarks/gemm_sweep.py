"""What the skinny-GEMM sweeps share: the ceiling they are measured against and their config grids.

The ceiling: how fast one launch streams a weight's bytes and nothing else. A GEMM over a block's few rows is bound by reading its weight once; the datasheet bandwidth is not what
one launch of a few to tens of MB reaches (a launch's start and drain, DRAM refresh). This kernel reads
the weight as one contiguous range, in equal chunks per program, summing it so the loads are not dead;
the best of a few grid sizes is the ceiling a GEMM kernel of the same bytes is measured against.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

GRIDS = (132, 264, 528, 1056)  # programs per launch to try (1, 2, 4, 8 per SM of an H100/H200)


@triton.jit
def _read_kernel(W, Out, numel, per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lo = pid * per_program
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(lo, tl.minimum(lo + per_program, numel), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(W + offs, mask=offs < numel, other=0.0).to(tl.float32)
    tl.store(Out + pid, tl.sum(acc))


def read(w: torch.Tensor, out: torch.Tensor, programs: int, block: int = 2048) -> None:
    """Sum ``w`` (contiguous) in ``programs`` chunks into ``out[:programs]``."""
    per = triton.cdiv(triton.cdiv(w.numel(), programs), block) * block
    _read_kernel[(triton.cdiv(w.numel(), per),)](w, out, w.numel(), per, BLOCK=block, num_warps=8)


def read_us(numel: int, copies: int, device, dtype=torch.bfloat16) -> tuple[float, int]:
    """Best µs per launch reading ``numel`` elements (the bytes of one GEMM's weights, as one range)
    over :data:`GRIDS`, and its grid: CUDA-graph replays of one launch over each of ``copies`` buffers."""
    from triton.testing import do_bench_cudagraph

    bufs = [torch.randn(numel, device=device).to(dtype) for _ in range(copies)]
    out = torch.empty(max(GRIDS), device=device, dtype=torch.float32)
    best = None
    for programs in GRIDS:
        us = do_bench_cudagraph(lambda: [read(w, out, programs) for w in bufs], rep=20,
                                return_mode="median") * 1e3 / copies
        best = min(best or (us, programs), (us, programs))
    return best


def parse_grid(default: dict[str, tuple[int, ...]], spec: str) -> dict[str, tuple[int, ...]]:
    """``default`` with the keys ``spec`` names (``"key=1,2 other=3"``) set to its values."""
    grid = dict(default)
    for item in spec.split():
        key, _, values = item.partition("=")
        if key not in grid:
            raise SystemExit(f"--grid: unknown key {key!r}; keys: {', '.join(grid)}")
        grid[key] = tuple(int(v) for v in values.split(","))
    return grid
