"""Memoise Inductor's analysis of what fbcompile's Triton kernels write.

Inductor learns which tensors a ``wrap_triton`` launch writes by compiling the kernel to TTIR and
reading its stores (``identify_accessed_tensors``): twice per launch site (functionalization, then
the Inductor IR) and without a cache. A 28-layer model has a few hundred launch sites of fbcompile's
kernels across its refresh and reuse graphs, nearly all with the same arguments, so the same
analysis ran hundreds of times (the grouped linears alone added 43 s to the first call of the
Qwen2-1.5B-shaped LM on an H200: ``benchmarks/results/skinny_linear_h200.md``).

The analysis depends on the kernel and on its arguments' types, dtypes, sizes, strides and values
(and the TMA descriptors') only; :func:`install` caches it under exactly those, for kernels defined in ``fbcompile`` (other
kernels are analysed as before). Arguments it cannot key exactly bypass the cache.

The analysis cannot read stores made by inline PTX (``tl.inline_asm_elementwise``): it then takes every
argument as written, and functionalization clones them all before the launch (the KV cache included).
fbcompile kernels that store through inline PTX switch it with a constexpr (``_PTX_STORES``) between
that and ``tl.store`` with the same accesses: they are analysed in their ``tl.store`` form.
"""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("fbcompile")

_MAX_ENTRIES = 4096


def _argument_key(value):
    """A hashable description of one kernel argument that determines its analysis; None if unknown."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(map(str, value.shape)), tuple(map(str, value.stride())))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return (type(value).__name__, value)
    if isinstance(value, torch.SymInt):
        return ("symint", str(value))
    get_dtype, get_size, get_stride = (getattr(value, n, None) for n in ("get_dtype", "get_size", "get_stride"))
    if get_dtype and get_size and get_stride:  # an Inductor IR buffer
        try:
            return (type(value).__name__, get_dtype(), tuple(map(str, get_size())), tuple(map(str, get_stride())))
        except Exception:  # a layout without fixed strides yet
            return None
    return None


# Constexprs of fbcompile kernels that store through inline PTX instead of ``tl.store``.
_PTX_STORES = ("CHUNK_STORE_PTX",)


def _in_fbcompile(kernel) -> bool:
    return (getattr(getattr(kernel, "fn", kernel), "__module__", None) or "").startswith("fbcompile.")


def _as_tl_stores(kernel, kwargs: dict) -> dict:
    """``kwargs`` with the kernel's inline-PTX stores switched to ``tl.store`` (same accesses)."""
    if not _in_fbcompile(kernel) or not any(kwargs.get(name) for name in _PTX_STORES):
        return kwargs
    return dict(kwargs, **{name: False for name in _PTX_STORES if name in kwargs})


def _key(kernel, kwargs: dict, rest: tuple):
    fn = getattr(kernel, "fn", kernel)
    if not _in_fbcompile(kernel):
        return None
    parts = []
    for name in sorted(kwargs):
        part = _argument_key(kwargs[name])
        if part is None:
            return None
        parts.append((name, part))
    try:
        return (id(fn), tuple(parts), repr(rest))
    except Exception:
        return None


# The analysis' name: torch >= 2.10 (reads and writes), and before (writes only); same arguments.
_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")


def install() -> None:
    """Wrap the analysis this torch has with the cache (and the ``tl.store`` forms); idempotent."""
    from torch._higher_order_ops import triton_kernel_wrap

    name = next((n for n in _ANALYSES if hasattr(triton_kernel_wrap, n)), None)
    if name is None:
        log.info("no Triton kernel analysis found in this torch: not cached")
        return
    original = getattr(triton_kernel_wrap, name)
    if getattr(original, "fbcompile_memo", None) is not None:
        return
    cache: dict = {}

    @functools.wraps(original)
    def analysis(kernel, kwargs, *rest):
        kwargs = _as_tl_stores(kernel, kwargs)
        key = _key(kernel, kwargs, rest)
        if key is None:
            return original(kernel, kwargs, *rest)
        if key not in cache:
            if len(cache) >= _MAX_ENTRIES:
                cache.clear()
            cache[key] = original(kernel, kwargs, *rest)
        return cache[key]

    analysis.fbcompile_memo = cache
    setattr(triton_kernel_wrap, name, analysis)
