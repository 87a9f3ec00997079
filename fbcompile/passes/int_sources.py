"""Ints a graph computes from its int inputs and its inputs' sizes, as the runtime reads them off a
call's arguments: a static cache's window bounds, a written slice's rows, the expected shape of a
cached part. Shared by the guards (:mod:`.guards`) and the logged writes (:mod:`.slice_writes`).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable

import sympy
import torch
import torch.fx as fx

from fbcompile.passes.graph_utils import same_size


@dataclass(frozen=True)
class SymbolicInt:
    """An int the graph computes from its int inputs and sizes (a static cache's window start
    ``max(0, end - W)`` after ``.item()`` broke the graph): dynamo's expression of it, evaluated on
    the call's arguments."""

    expr: sympy.Expr
    symbols: tuple  # ((symbol, (argument index, dim or None)), ...)
    evaluate: Callable = field(init=False, repr=False, compare=False)  # ints of the symbols -> the int

    def __post_init__(self):
        functions = {"Max": max, "Min": min, "FloorDiv": operator.floordiv, "PythonMod": operator.mod,
                     "Mod": operator.mod, "CleanDiv": operator.floordiv, "ToFloat": float,
                     "FloatTrueDiv": operator.truediv, "IntTrueDiv": operator.truediv, "CeilToInt": math.ceil,
                     "FloorToInt": math.floor, "TruncToInt": math.trunc}
        object.__setattr__(self, "evaluate", sympy.lambdify([s for s, _ in self.symbols], self.expr,
                                                            modules=[functions, "math"]))

    def value(self, args) -> int:
        return int(self.evaluate(*(evaluate_int(src, args) for _, src in self.symbols)))


def evaluate_int(source, args):
    """A size known at compile time (int) or read off the arguments: ``(index, dim)``, dim None for an
    int, or a :class:`SymbolicInt` of them."""
    if isinstance(source, int):
        return source
    if isinstance(source, SymbolicInt):
        return source.value(args)
    index, dim = source
    return args[index] if dim is None else args[index].shape[dim]


def int_source(value, placeholders: list[fx.Node]):
    """An int, int input or int computed in the graph, as :func:`evaluate_int` reads it off the arguments;
    None if it depends on something they do not hold."""
    if isinstance(value, int):
        return value
    if value.op == "placeholder":
        return (placeholders.index(value), None)
    example = value.meta.get("example_value")
    if isinstance(example, int):
        return example
    return _symbolic_int(example, placeholders)


def _symbolic_int(value: torch.SymInt, placeholders: list[fx.Node]) -> SymbolicInt | None:
    """``value``'s expression over the arguments' sizes and ints; None if a symbol is none of them."""
    expr = value.node.expr
    symbols = tuple((symbol, _symbol_source(symbol, placeholders)) for symbol in expr.free_symbols)
    return SymbolicInt(expr, symbols) if all(src is not None for _, src in symbols) else None


def _symbol_source(symbol, placeholders: list[fx.Node]):
    """The ``(argument index, dim or None)`` whose size or int value is ``symbol``, or None."""
    for index, node in enumerate(placeholders):
        value = node.meta.get("example_value")
        sizes = value.shape if isinstance(value, torch.Tensor) else [value] if isinstance(value, torch.SymInt) else []
        for dim, size in enumerate(sizes):
            if isinstance(size, torch.SymInt) and size.node.expr == symbol:
                return (index, dim if isinstance(value, torch.Tensor) else None)
    return None


def size_source(size, placeholders: list[fx.Node]):
    """``size`` as an int, or the (argument index, dim) that holds it at run time (dim None: an int arg)."""
    if isinstance(size, int):
        return size
    for index, node in enumerate(placeholders):
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            for dim, s in enumerate(value.shape):
                if same_size(s, size):
                    return (index, dim)
        elif isinstance(value, torch.SymInt) and same_size(value, size):
            return (index, None)
    return _symbolic_int(size, placeholders)  # e.g. a length padded to a multiple: s0 + (-s0) % 128
