"""Prove that a mask a graph computes from the cached length is the same at any length it runs at.

:mod:`fbcompile.passes.key_count` runs a graph over buffers of a capacity ``C`` instead of the cache's
``n`` keys: the graph's cached length ``L`` is then ``C``, not ``n``. A mask the graph builds from ``L``
and splits into its cached part (read by attention with the key count, which keeps its columns
``k < n``) and the block's part (its columns ``L + j``) computes the same at ``C`` as at ``n`` if

* each column ``k < n`` is the same for every ``L >= n``, and
* each column ``L + j`` is the same for every ``L``,

reading an input over the cache and the block as key_count pads it (its cached part at ``[0, n)``, the
block's at ``[L, L + c)``). HF's ``create_causal_mask`` over a cache (``transformers`` masking_utils)::

    kv = torch.arange(L + c)[None, None, None, :]      # key positions
    q = (torch.arange(c) + L)[None, None, :, None]     # query positions (cache_position)
    mask = (kv <= q) & padding_mask[batch, kv]         # padding_mask: [B, L + c], an input
    attention_lse(q, cache_k, cache_v, mask.narrow(-1, 0, L), ...)     # the cached part
    attention_merge_lse(q, k, v, mask.narrow(-1, L, c), ...)           # the block's

At a cached column ``k``: ``k <= L + i`` holds for every ``L > k``, and ``padding_mask`` holds its cached
column ``k``. At a block's column ``L + j``: ``L + j <= L + i`` is ``j <= i``, and ``padding_mask`` holds
the block's column ``j`` at ``L + j``. So the mask may be computed at ``C``. A block mask joined to a
cached part of ones (``cat([ones(c, L), inner], -1)``) passes the same way; a sliding window
(``kv > q - w``: a cached column's value changes with ``L``) or block-causal positions (``kv // b``) do
not. Those are proved in *count mode* instead (``MaskEvaluator(count=True)``): the graph reads the
length's values from the key count ``n`` (:func:`values_from_count`: ``q = arange(c) + n``, and the
block's key positions ``C + j`` become ``n + j``), and each column is then the same as at ``n``, the
sizes staying those of the capacity. Otherwise the graph keeps the cache unpadded.

The proof evaluates the mask symbolically, one element at a time (:class:`MaskEvaluator`): positions are
affine expressions of ``L`` and the element's indices, a comparison is decided where its sign is the same
over every length (:func:`_compare`), and anything else it reads is an opaque function of what it reads;
the element is the same at every length if ``L`` is gone from the result. Ops outside this small set
(reductions, reshapes, anything with an effect) make the proof fail, with the reason.
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Callable

import sympy
import torch
import torch.fx as fx

from fbcompile.passes.graph_utils import op_name, recorded

LENGTH = sympy.Symbol("L", integer=True)   # the graph's cached length: the cache's n, or a capacity >= n
CACHED = sympy.Symbol("n", integer=True)   # the cache's own length
_SPARE = sympy.Symbol("w", integer=True)   # L - n >= 0
_KEY = sympy.Symbol("k", integer=True)     # a cached column: 0 <= k < n
_BLOCK = sympy.Symbol("j", integer=True)   # a block's column past L: 0 <= j < c
_REST = sympy.Symbol("u", integer=True)    # n - k - 1 >= 0 (cached columns), n >= 0 (block's columns)


class Unproved(Exception):
    """The mask may differ between lengths, or is computed in a way this proof does not follow."""


@dataclass
class _Elements:
    """A tensor as its shape and its element at given indices."""

    shape: tuple
    at: Callable[[tuple], sympy.Basic]


@dataclass
class _Region:
    """The columns an element is taken from, with the bounds of every index symbol (None: unbounded)."""

    substitutions: dict
    bounds: dict


def _region(cached: bool, indices: dict) -> _Region:
    """Cached columns (``k`` with ``n = k + 1 + u``) or the block's (``L + j``), both ``L = n + w``."""
    cached_length = _KEY + 1 + _REST if cached else _REST
    bounds = {_SPARE: None, _REST: None, **({_KEY: None} if cached else {}),
              **{symbol: None if top is None else sympy.sympify(top) for symbol, top in indices.items()}}
    return _Region({LENGTH: CACHED + _SPARE, CACHED: cached_length}, bounds)


def _range(expr, region: _Region) -> tuple | None:
    """``(low, high)`` of ``expr`` over the region (None: not affine in its symbols). An index bounded by
    a dynamic size (``j < c``, the block's length a symbol) is taken at both ends of its range (the
    extremes of an affine function), the size itself at least 1 (the element exists)."""
    expr = sympy.expand(sympy.sympify(expr).subs(LENGTH, region.substitutions[LENGTH]).subs(region.substitutions))
    dynamic = {symbol: top for symbol, top in region.bounds.items() if top is not None and top.free_symbols}
    sizes = set().union(*(top.free_symbols for top in dynamic.values())) - set(region.bounds)
    if not expr.free_symbols <= set(region.bounds) | sizes:
        return None
    low, high = sympy.oo, -sympy.oo
    for ends in itertools.product(*[(0, top) for top in dynamic.values()]):
        corner = sympy.expand(expr.subs(dict(zip(dynamic, ends))).subs({s: s + 1 for s in sizes}))
        span = _affine_range(corner, {**region.bounds, **dict.fromkeys([*dynamic, *sizes])})
        if span is None:
            return None
        low, high = min(low, span[0]), max(high, span[1])
    return low, high


def _affine_range(expr, bounds: dict) -> tuple | None:
    """``(low, high)`` of ``expr``, each symbol in ``[0, its bound]`` (None: unbounded)."""
    coefficients = {symbol: expr.coeff(symbol) for symbol in expr.free_symbols}
    low = high = expr - sum(c * s for s, c in coefficients.items())
    if low.free_symbols or not all(c.is_number for c in coefficients.values()):
        return None  # a product or a floor of the symbols
    for symbol, coefficient in coefficients.items():
        top = bounds[symbol]
        reach = coefficient * top if top is not None else sympy.oo if coefficient > 0 else -sympy.oo
        low, high = low + min(0, reach), high + max(0, reach)
    return low, high


_DECIDE = {
    operator.le: lambda low, high: True if high <= 0 else False if low > 0 else None,
    operator.lt: lambda low, high: True if high < 0 else False if low >= 0 else None,
    operator.ge: lambda low, high: True if low >= 0 else False if high < 0 else None,
    operator.gt: lambda low, high: True if low > 0 else False if high <= 0 else None,
    operator.eq: lambda low, high: False if low > 0 or high < 0 else True if low == high == 0 else None,
    operator.ne: lambda low, high: True if low > 0 or high < 0 else False if low == high == 0 else None,
}
_RELATION = {operator.le: sympy.Le, operator.lt: sympy.Lt, operator.ge: sympy.Ge, operator.gt: sympy.Gt,
             operator.eq: sympy.Eq, operator.ne: sympy.Ne}


def _compare(compare, a, b, region: _Region):
    """``compare(a, b)``, decided where it holds or fails over the whole region; else as a relation (which,
    if it involves ``L``, fails the proof)."""
    difference = sympy.expand(sympy.sympify(a) - sympy.sympify(b))
    span = _range(difference, region)
    decided = _DECIDE[compare](*span) if span is not None else None
    if decided is not None:
        return sympy.true if decided else sympy.false
    return _RELATION[compare](difference, 0)


_COMPARISONS = {"le": operator.le, "lt": operator.lt, "ge": operator.ge, "gt": operator.gt, "eq": operator.eq,
                "ne": operator.ne}
_ARITHMETIC = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "floordiv": operator.floordiv}
_LOGICAL = {"and_": sympy.And, "logical_and": sympy.And, "bitwise_and": sympy.And,
            "or_": sympy.Or, "logical_or": sympy.Or, "bitwise_or": sympy.Or}
_NOT = ("invert", "logical_not", "bitwise_not")


def _number(value):
    """A boolean element as the number arithmetic on it sees (a bool mask times a scale)."""
    boolean = (sympy.core.relational.Relational, sympy.logic.boolalg.BooleanFunction, sympy.logic.boolalg.BooleanAtom)
    return sympy.Piecewise((1, value), (0, True)) if isinstance(value, boolean) else value  # (a Symbol is Boolean too)


def _value(node):
    return recorded(node) if isinstance(node, fx.Node) else node


class MaskEvaluator:
    """Elements of the graph's tensors, as expressions of ``L`` and their indices.

    ``lengths``: the symbols of the cached length and of the inputs over cache and block, as expressions
    of ``L``; ``split``: inputs over the cache and the block, ``node -> (dim, block length)``; ``cone``: the
    nodes that depend on the length."""

    def __init__(self, lengths: dict, split: dict, cone: set, count: bool = False):
        self.lengths, self.split, self.cone = lengths, split, cone
        self.count = count  # evaluate the mask as :func:`values_from_count` rewrites it
        self.region: _Region | None = None
        self._memo: dict = {}

    def _sym(self, value):
        """A size as an expression of ``L`` (other symbols, such as a dynamic block length, are the same at
        every cached length)."""
        return sympy.sympify(value.node.expr if isinstance(value, torch.SymInt) else value).subs(self.lengths)

    def scalar(self, arg):
        """An integer argument (a node of the graph or a constant) as an expression of ``L``."""
        value = _value(arg)
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
            raise Unproved(f"{getattr(arg, 'name', arg)} is not an integer")
        return self._sym(value)

    def shape(self, node: fx.Node) -> tuple:
        return tuple(self._sym(s) for s in _value(node).shape)

    def tensor(self, node) -> _Elements:
        if not isinstance(node, fx.Node) or not isinstance(_value(node), torch.Tensor):
            value = self.scalar(node) if isinstance(node, fx.Node) else sympy.sympify(node)
            if self.count:  # a length read as a value: the count's
                value = value.subs(LENGTH, CACHED)
            return _Elements((), lambda index: value)
        if node not in self._memo:
            self._memo[node] = self._elements(node)
        return self._memo[node]

    def _broadcast(self, node, shape: tuple) -> Callable:
        """Elements of ``node`` broadcast to ``shape`` (trailing dimensions aligned; size 1 read at 0)."""
        elements = self.tensor(node)
        own = elements.shape
        skip = len(shape) - len(own)
        return lambda index: elements.at(tuple(0 if size == 1 else i for size, i in zip(own, index[skip:])))

    def _elements(self, node: fx.Node) -> _Elements:
        """Elements of ``node``: an input over cache and block as padded, a node of the cone followed, any
        other node followed where it can be, else an opaque function of its indices."""
        shape, value = self.shape(node), _value(node)
        if node in self.split:
            return self._split_input(node, shape)
        if node in self.cone:
            return self._computed(node, shape)
        if any(s.has(LENGTH) for s in shape):
            raise Unproved(f"{node.name} is sized by the cached length without reading it")
        try:  # reads nothing of the length: the same at any length, followed where it can be (an arange)
            return self._computed(node, shape)
        except Unproved:
            function = sympy.Function(f"value_of_{node.name}")
            if value.dtype == torch.bool:
                return _Elements(shape, lambda index: sympy.Eq(function(*index), 1))
            return _Elements(shape, lambda index: function(*index))

    def _computed(self, node: fx.Node, shape: tuple) -> _Elements:
        """Elements of ``node`` from its op and arguments, or :class:`Unproved` for an op not followed."""
        name, value, args = op_name(node), _value(node), node.args
        if node.target is torch.arange:
            if value.dtype.is_floating_point or set(node.kwargs) - {"device", "dtype"} or not 1 <= len(args) <= 2:
                raise Unproved(f"{node.name}: only integer aranges with a start and an end are followed")
            start = self.scalar(args[0]) if len(args) == 2 else sympy.Integer(0)
            if self.count and start.has(LENGTH):  # positions after the cache: from the count
                start = start.subs(LENGTH, CACHED)
            elif self.count and self.scalar(args[-1]).has(LENGTH):  # key positions: the block's from the count
                return _Elements(shape, lambda index: self._key_position(node, start + index[0]))
            return _Elements(shape, lambda index: start + index[0])
        if name in ("ones", "zeros", "full", "new_ones", "new_zeros", "new_full", "ones_like", "zeros_like"):
            fill = {"ones": 1, "zeros": 0}.get(name.removeprefix("new_").removesuffix("_like"))
            if fill is None:
                fill = args[-1] if name == "new_full" or name == "full" else None
            if not isinstance(fill, (int, float, bool)):
                raise Unproved(f"{node.name} fills with a value not known statically")
            constant = sympy.sympify(bool(fill)) if value.dtype == torch.bool else sympy.sympify(fill)
            return _Elements(shape, lambda index: constant)
        if node.kwargs and name != "to" and not (name == "cat" and set(node.kwargs) == {"dim"}):
            raise Unproved(f"{node.name} ({name}) takes keyword arguments this proof does not follow")
        if name in _COMPARISONS or name in _ARITHMETIC or name in _LOGICAL:
            a, b = (self._broadcast(x, shape) for x in args)
            if name in _COMPARISONS:
                compare = _COMPARISONS[name]
                return _Elements(shape, lambda index: _compare(compare, a(index), b(index), self.region))
            if name in _LOGICAL:
                if value.dtype != torch.bool:
                    raise Unproved(f"{node.name} is a bitwise op on integers")
                return _Elements(shape, lambda index: _LOGICAL[name](a(index), b(index)))
            if value.dtype == torch.bool or value.dtype.is_floating_point and name == "floordiv":
                raise Unproved(f"{node.name} ({name}) on {value.dtype}")
            return _Elements(shape, lambda index: _ARITHMETIC[name](_number(a(index)), _number(b(index))))
        if name in _NOT or name == "neg":
            a = self._broadcast(args[0], shape)
            if name in _NOT and value.dtype != torch.bool:
                raise Unproved(f"{node.name} is a bitwise not on integers")
            return _Elements(shape, (lambda index: sympy.Not(a(index))) if name in _NOT else (lambda index: -a(index)))
        if name == "to" or name in ("bool", "int", "long", "float"):
            return self._converted(node, shape)
        if name in ("expand", "expand_as", "contiguous"):
            return _Elements(shape, self._broadcast(args[0], shape))
        if name == "unsqueeze":
            return self._indexed(node, args[0], (*[slice(None)] * (args[1] % len(shape)), None))
        if name == "getitem":
            return self._indexed(node, args[0], args[1] if isinstance(args[1], tuple) else (args[1],))
        if name == "narrow":
            return self._narrowed(node, shape)
        if name == "cat":
            return self._joined(node, shape)
        if name == "where":
            condition, a, b = (self._broadcast(x, shape) for x in args)
            return _Elements(shape, lambda index: sympy.Piecewise((a(index), condition(index)), (b(index), True)))
        raise Unproved(f"{node.name} ({name}) is not followed by the proof")

    def _key_position(self, node: fx.Node, position):
        """``position`` of an ``arange`` up to the cached length as :func:`values_from_count` remaps it: kept
        below ``L`` (the cache and its spare rows), ``position - L + n`` from ``L`` on (the block)."""
        below = _compare(operator.lt, position, LENGTH, self.region)
        if below is sympy.true:
            return position
        if below is sympy.false:
            return position - LENGTH + CACHED
        raise Unproved(f"{node.name} is read at {position}, not proved on one side of the cached length")

    def _split_input(self, node: fx.Node, shape: tuple) -> _Elements:
        """An input over the cache and the block, padded: its cached column ``p < n`` and the block's
        column ``j`` at ``L + j``, elements of the same ``[..., n + c]`` input at every length."""
        dim, extra = self.split[node]
        function = sympy.Function(f"value_of_{node.name}")

        def at(index):
            column = index[dim]
            if _compare(operator.lt, column, CACHED, self.region) is sympy.true:
                logical = column
            elif (_compare(operator.ge, column, LENGTH, self.region) is sympy.true
                  and _compare(operator.lt, column, LENGTH + extra, self.region) is sympy.true):
                logical = column - LENGTH + CACHED
            else:
                raise Unproved(f"{node.name} is read at a column ({column}) not proved to be its cached or block part")
            element = function(*index[:dim], logical, *index[dim + 1:])
            return sympy.Eq(element, 1) if boolean else element
        boolean = _value(node).dtype == torch.bool
        return _Elements(shape, at)

    def _converted(self, node: fx.Node, shape: tuple) -> _Elements:
        """A dtype conversion: bool to a number and back followed, others opaque."""
        source = self.tensor(node.args[0])
        before, after = _value(node.args[0]).dtype, _value(node).dtype
        if before == after:
            return source
        if after == torch.bool:
            return _Elements(shape, lambda index: sympy.Ne(source.at(index), 0) if before != torch.bool else source.at(index))
        if before == torch.bool:
            return _Elements(shape, lambda index: _number(source.at(index)))
        function = sympy.Function(f"as_{str(after).removeprefix('torch.')}")
        return _Elements(shape, lambda index: function(source.at(index)))

    def _indexed(self, node: fx.Node, source: fx.Node, items: tuple) -> _Elements:
        """``source[items]``: ``None``, ``...`` and full slices, or index tensors (a gather)."""
        own = self.tensor(source).shape
        if any(isinstance(i, fx.Node) for i in items):
            if not all(isinstance(i, fx.Node) for i in items) or len(items) > len(own):
                raise Unproved(f"{node.name} mixes index tensors with other indices")
            shape = self.shape(node)
            width = len(shape) - (len(own) - len(items))
            gathers = [self._broadcast(i, shape[:width]) for i in items]
            at = self.tensor(source).at

            def gathered(index):
                picked = [g(index[:width]) for g in gathers]
                for position, size in zip(picked, own):  # a negative index would wrap around a length
                    if not (_compare(operator.ge, position, 0, self.region) is sympy.true
                            and _compare(operator.lt, position, size, self.region) is sympy.true):
                        raise Unproved(f"{node.name} gathers at {position}, not proved within [0, {size})")
                return at((*picked, *index[width:]))
            return _Elements(shape, gathered)
        if Ellipsis in items:
            spot = items.index(Ellipsis)
            fill = len(own) - sum(1 for i in items if i is not None and i is not Ellipsis)
            items = (*items[:spot], *[slice(None)] * fill, *items[spot + 1:])
        picks, dim = [], 0  # for each output dimension: the source dimension it reads (None: a new one)
        for item in items:
            if item is None:
                picks.append(None)
            elif item == slice(None):
                picks.append(dim)
                dim += 1
            else:
                raise Unproved(f"{node.name} indexes with {item!r}")
        picks += range(dim, len(own))
        at = self.tensor(source).at
        return _Elements(self.shape(node), lambda index: at(tuple(i for i, p in zip(index, picks) if p is not None)))

    def _narrowed(self, node: fx.Node, shape: tuple) -> _Elements:
        """``narrow(source, dim, start, length)``: the source read ``start`` further along ``dim``."""
        source, dim, start = node.args[0], node.args[1], node.args[2]
        dim %= len(shape)
        offset, at = self.scalar(start) if isinstance(start, fx.Node) else sympy.sympify(start), self.tensor(source).at

        def narrowed(index):
            if _compare(operator.ge, offset, 0, self.region) is not sympy.true:  # a negative start wraps around
                raise Unproved(f"{node.name} starts at {offset}, not proved >= 0")
            return at((*index[:dim], index[dim] + offset, *index[dim + 1:]))
        return _Elements(shape, narrowed)

    def _joined(self, node: fx.Node, shape: tuple) -> _Elements:
        """``cat(parts, dim)``: each element from the part its index is proved to fall in."""
        parts = node.args[0]
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(shape)
        sized = [(self.tensor(p), self.shape(p)[dim]) for p in parts]

        def at(index):
            offset = sympy.Integer(0)
            for elements, size in sized:
                inside = _compare(operator.lt, index[dim], offset + size, self.region)
                if inside is sympy.true:
                    return elements.at((*index[:dim], index[dim] - offset, *index[dim + 1:]))
                if inside is not sympy.false:
                    raise Unproved(f"{node.name} joins parts at a column not proved on one side of each element")
                offset += size
            raise Unproved(f"{node.name} is read past its end")
        return _Elements(shape, at)


def prove_same_at_any_length(evaluator: MaskEvaluator, narrow: fx.Node, cached: bool) -> None:
    """Raise :class:`Unproved` unless ``narrow``, the cached part (``cached``: columns ``[0, L)``) or the
    block's part (``[L, L + c)``) of a mask the graph computes, is the same at every length."""
    source = narrow.args[0]
    shape = evaluator.shape(source)
    dim = narrow.args[1] % len(shape)
    indices = [sympy.Symbol(f"i{d}", integer=True) for d in range(len(shape))]
    bounds = {}
    for d, size in enumerate(shape):
        if d != dim:
            if size.has(LENGTH):
                raise Unproved(f"{source.name} has another dimension sized by the cached length")
            bounds[indices[d]] = size - 1
    indices[dim] = _KEY if cached else LENGTH + _BLOCK
    if not cached:
        block = sympy.expand(shape[dim] - LENGTH)
        if block.has(LENGTH):
            raise Unproved(f"{source.name} is not sized as the cache and a block")
        bounds[_BLOCK] = block - 1
    evaluator.region = _region(cached, bounds)
    element = evaluator.tensor(source).at(tuple(indices))
    if element.subs(LENGTH, CACHED + _SPARE).has(_SPARE):
        raise Unproved(f"the {'cached' if cached else 'block'} part of {source.name} changes with the cached "
                       f"length ({element})")


_BROADCAST_OPS = set(_COMPARISONS) | set(_ARITHMETIC) | set(_LOGICAL) | set(_NOT) | {"neg", "where"}


def values_from_count(gm: fx.GraphModule, cone: set, symbols: set, length: Callable, count: fx.Node) -> None:
    """Rewrite the nodes of ``cone`` (masks a proof in count mode, ``MaskEvaluator(count=True)``, proved)
    to read the cached length's value from ``count`` (a one-element device tensor) where they read it as
    a value, as that proof evaluates them; sizes keep the length ``L`` (any of ``symbols``, which all
    take its value; ``length(graph)`` emits a read of it)::

        arange(L + a, L + b)           ->  arange(L + a, L + b) + (count - L)       # positions after the cache
        arange(a, L + c)               ->  r = arange(a, L + c); where(r < L, r, r + (count - L))   # key positions
        kv > (q - w) + L (L a value)   ->  kv > (q - w) + (count + (L - L))

    Over buffers of a capacity ``C >= n`` (``L = C``, ``count = n``) the cache's columns keep their
    positions and the block's columns ``C + j`` get ``n + j``: the mask the graph computed over the
    cache alone."""
    graph = gm.graph

    def has_length(value) -> bool:
        return isinstance(value, torch.SymInt) and bool(symbols & sympy.sympify(value.node.expr).free_symbols)

    for node in [n for n in graph.nodes if n in cone]:
        if node.target is torch.arange:
            start, end = (_value(node.args[0]) if len(node.args) == 2 else 0), _value(node.args[-1])
            if not (has_length(start) or has_length(end)):
                continue
            users = list(node.users)
            with graph.inserting_before(node.next):  # (in the order they are made)
                shift = graph.call_function(operator.sub, (count, length(graph)))
                moved = graph.call_function(operator.add, (node, shift))
                if not has_length(start):  # key positions
                    below = graph.call_function(operator.lt, (node, length(graph)))
                    moved = graph.call_function(torch.where, (below, node, moved))
            for user in users:
                user.replace_input_with(node, moved)
            continue
        if op_name(node) not in _BROADCAST_OPS or not isinstance(_value(node), torch.Tensor):  # (sizes stay)
            continue
        for arg in [a for a in node.all_input_nodes if has_length(_value(a))]:
            with graph.inserting_before(node):
                rest = graph.call_function(operator.sub, (arg, length(graph)))
                value = graph.call_function(operator.add, (count, rest))
            node.replace_input_with(arg, value)
