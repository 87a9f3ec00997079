"""Inductor's heuristics, with the one change fbcompile makes for a block step's graphs.

A block step's graph normalises few rows (batch x block: 32 at batch 1) over the hidden size after
each projection: the residual add and RMSNorm that read the GEMM's split-reduction partials
(:mod:`fbcompile.passes.linear_partials`). Inductor makes a row reduction *persistent* (the row in
registers, read once) only up to 1024 elements; above that (Qwen2-1.5B's 1536) its kernel loops over
each row twice, once for the sum of squares and once to normalise, reading the row back. With few rows
there are few programs, each one a serial chain of loads, so the second pass is latency the GPU cannot
hide. :class:`BlockStepChoices` takes the persistent form for such reductions up to
:data:`PERSISTENT_NUMEL` elements a row over at most :data:`FEW_ROWS` rows, and leaves every other
decision to Inductor. On the H100 at Qwen2-1.5B's shape (32K cached tokens, batch 1) that took a block
from 13.64-13.74 to 13.43-13.58 ms (``benchmarks/results/session34_h100.md``).
"""
from __future__ import annotations

import functools

FEW_ROWS = 512            # rows of a block step: batch 16 x block 32
PERSISTENT_NUMEL = 4096   # elements a row a persistent program holds: hidden sizes to an 8B model's


def persistent_row_reduction(inner: bool, rows: int | None, numel: int | None) -> bool:
    """Whether a row reduction (``inner``: over the contiguous last dim) of ``rows`` rows of ``numel``
    elements each (None: not known statically) should be persistent beyond Inductor's own rule."""
    return inner and rows is not None and numel is not None and rows <= FEW_ROWS and numel <= PERSISTENT_NUMEL


@functools.cache
def block_step_choices():
    """An instance of :class:`BlockStepChoices` (made on first use: it subclasses an Inductor class)."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint

    class BlockStepChoices(InductorChoices):
        """Inductor's choices, but persistent row reductions where :func:`persistent_row_reduction` says."""

        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
            from torch._inductor import config
            if config.triton.persistent_reductions and not cooperative_reduction and persistent_row_reduction(
                    features.get_reduction_hint() == ReductionHint.INNER,
                    _static_int(features.numel), _static_int(features.reduction_numel)):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

        def uuid(self) -> str:  # Inductor's cache key (torch versions with ``config.inductor_choices_class``)
            return f"fbcompile.BlockStepChoices:{FEW_ROWS}:{PERSISTENT_NUMEL}"

    return BlockStepChoices()


def _static_int(size) -> int | None:
    """``size`` (an int or a sympy expression) as an int, or None if it is symbolic."""
    try:
        return int(size)
    except TypeError:  # sympy: "Cannot convert symbols to int"
        return None
