"""Attention over a window of a preallocated cache whose tail the graph has just written.

Self-Forcing's ``CausalWanSelfAttention`` (and CausVid, LongLive, ...) keeps a ``[B, capacity, H, D]``
cache per layer, writes the chunk's keys at the end of the cache's used part and attends over a
window ending there; when the cache is full it first rolls it left in place, keeping sink tokens::

    kv_cache["k"][:, sink:sink + kept] = kv_cache["k"][:, sink + evicted:sink + evicted + kept].clone()  # roll
    kv_cache["k"][:, local_end - s:local_end] = roped_key                 # the block: [start, end)
    k = kv_cache["k"][:, max(0, local_end - window):local_end]           # the window: [a, end)
    attention(q, k, v)

The bounds are ints or symbolic ints (after ``.item()`` breaks the graph, dynamo's resumed graph gets
the indices as int inputs and computes the bounds in the graph). A prefix read ``cache[:, :end]`` is
the window with ``a = 0``. With ``m = max(a, start)`` the window is split into

* external = ``cache[a:m]`` (:class:`CacheWindow`): the rows before the block, read at the attention;
* internal = ``cache[m:end]`` (:class:`CacheTail`): the rows the graph wrote, *read back* at the
  attention, so the split is exact whatever the bounds (``m`` also covers a window shorter than the
  block).

Proven from the graph, else the site is left untouched: the cache is a graph input read by one
basic slice along one dim; exactly one in-place write of the graph ends where the read ends (the
block), at a slice along the same dim, of a tensor as long as that slice; every write of the cache
in the graph comes before the read; the read and the block are as long as their bounds say (dynamo
traced them with non-negative, unclamped bounds and guards that they stay so).

Reuse is safe when the external range holds what it held at the refresh: the runtime compares ``a``
and ``start`` by value (symbolic ones are evaluated from the graph's int inputs and sizes, see
:mod:`.guards`) and the cache's ``_version`` after the graph's own writes. A graph that also writes
the cache elsewhere (a roll, a sink update) changes the external rows itself: it is split exactly,
but always refreshes (:attr:`CacheWindow.rewrites`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fbcompile.passes.graph_utils import example, mutated_tensor, op_name, same_size, shape, view_base
from fbcompile.passes.positionwise import LayoutError


def _window_slice(index) -> tuple[int, object, object] | None:
    """``(dim, a, end)`` if ``index`` is ``(:, ..., :, a:end)`` (one slice along the last indexed dim)."""
    index = index if isinstance(index, tuple) else (index,)
    if not index or not all(i == slice(None) for i in index[:-1]):
        return None
    last = index[-1]
    if not isinstance(last, slice) or last.step is not None or last.stop is None:
        return None
    return len(index) - 1, 0 if last.start is None else last.start, last.stop


def _name(bound) -> str:
    return str(getattr(bound, "name", bound))


def _value(bound):
    return bound.meta.get("example_value") if isinstance(bound, fx.Node) else bound


def _same_value(a, b) -> bool:
    if a is b:
        return True
    a, b = _value(a), _value(b)
    return a is not None and b is not None and same_size(a, b)


def _at_most(a, b) -> bool:
    """Is ``a <= b`` known at compile time (ints, or provably for symbolic ints)?"""
    a, b = _value(a), _value(b)
    if isinstance(a, int) and isinstance(b, int):
        return a <= b
    return a is not None and b is not None and bool(statically_known_true(a <= b))


@dataclass(eq=False)
class CacheWindow:
    """``base[..., a:m]`` (``m = max(a, start)``) of a cache whose ``[start, end)`` the graph writes."""

    base: fx.Node
    dim: int
    start: object          # a: the window's first row (int or symbolic-int node)
    block_start: object    # where the graph's write of the block starts
    end: object            # where the write and the read end
    write: fx.Node         # the write of the block
    writes: tuple          # every write of the cache in the graph (the block's and any roll)
    emitted: fx.Node | None = None  # the external slice, once emitted (guards fingerprint it opaquely)
    _split: object = None

    @property
    def rewrites(self) -> bool:
        """Does the graph also write the cache outside the block's range (a roll)?"""
        return len(self.writes) > 1

    @property
    def bounds(self) -> tuple:
        """What the external rows depend on besides the cache: ``a`` and the block's start."""
        return self.start, self.block_start

    @property
    def length(self):
        split = self.split_value()
        return split - self.start if isinstance(split, int) and isinstance(self.start, int) else None

    @property
    def dtype(self) -> torch.dtype:
        return example(self.base).dtype

    def split_value(self):
        """``m`` if known without emitting a node, else None."""
        if _at_most(self.start, self.block_start):
            return self.block_start
        if _at_most(self.block_start, self.start):
            return self.start
        return None

    def split(self, graph: fx.Graph):
        """``m = max(a, start)``: an int, a bound node, or an emitted ``sym_max`` (once)."""
        if self._split is None:
            known = self.split_value()
            self._split = known if known is not None else graph.call_function(
                torch.sym_max, (self.start, self.block_start))
        return self._split

    def _slice(self, graph: fx.Graph, start, stop) -> fx.Node:
        index = (slice(None),) * self.dim + (slice(start, stop),)
        return graph.call_function(operator.getitem, (self.base, index))

    def _length(self, graph: fx.Graph, start, stop):
        if isinstance(start, int) and isinstance(stop, int):
            return stop - start
        return graph.call_function(operator.sub, (stop, start))

    def emit(self, graph: fx.Graph) -> fx.Node:
        self.emitted = self._slice(graph, self.start, self.split(graph))
        return self.emitted

    def emit_length(self, graph: fx.Graph):
        return self._length(graph, self.start, self.split(graph))

    def describe(self) -> str:
        start = _name(self.start)
        return f"{self.base.name}[{':, ' * self.dim}{start}:max({start}, {_name(self.block_start)})]"


@dataclass(eq=False)
class CacheTail:
    """``base[..., m:end]``: the rows of the block the graph wrote, read back at the attention."""

    window: CacheWindow

    @property
    def length(self):
        split = self.window.split_value()
        end = self.window.end
        return end - split if isinstance(split, int) and isinstance(end, int) else None

    @property
    def dtype(self) -> torch.dtype:
        return self.window.dtype

    def emit(self, graph: fx.Graph) -> fx.Node:
        return self.window._slice(graph, self.window.split(graph), self.window.end)

    def emit_length(self, graph: fx.Graph):
        return self.window._length(graph, self.window.split(graph), self.window.end)

    def describe(self) -> str:
        window = self.window
        return f"{window.base.name}[{':, ' * window.dim}{_name(window.block_start)}:{_name(window.end)}]"


def static_cache_read(node: fx.Node):
    """If ``node`` reads ``cache[..., a:end]`` right after the graph wrote ``cache[..., start:end]``,
    ``(dim, [CacheWindow, CacheTail])``; None if it is no slice read of an input; LayoutError if it
    is one but the writes are not proven (see the module docstring)."""
    if op_name(node) != "getitem" or node.args[0].op != "placeholder":
        return None
    read = _window_slice(node.args[1])
    if read is None:
        return None
    base = node.args[0]
    dim, start, end = read
    writes = [n for n in node.graph.nodes if (t := mutated_tensor(n)) is not None and view_base(t) is base]
    if not writes:
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    if any(order[w] > order[node] for w in writes):
        raise LayoutError("a cache read as a slice is written after the read")
    blocks = []
    for write in writes:
        slot = _window_slice(write.args[1]) if op_name(write) == "setitem" and write.args[0] is base else None
        if slot is not None and slot[0] == dim and _same_value(slot[2], end):
            blocks.append((write, slot[1]))
    if len(blocks) != 1:
        raise LayoutError("a cache slice is not read up to the end of the range the graph wrote"
                          if not blocks else "a cache read as a slice is written twice up to its end")
    write, block_start = blocks[0]
    if not all(isinstance(b, int) or (isinstance(b, fx.Node) and isinstance(_value(b), torch.SymInt))
               for b in (start, block_start, end)):
        raise LayoutError("a cache slice bound is not an int")
    # lengths as the bounds say: no bound counts from the end (negative), none is clamped
    value = write.args[2]
    if any(isinstance(b, int) and b < 0 for b in (start, block_start, end)) or not (
            same_size(shape(node)[dim], _value(end) - _value(start)) and example(value) is not None
            and example(value).dim() == len(shape(node)) and same_size(shape(value)[dim], _value(end) - _value(block_start))):
        raise LayoutError("a cache's window or written range is not as long as its bounds say")
    window = CacheWindow(base=base, dim=dim, start=start, block_start=block_start, end=end, write=write,
                         writes=tuple(writes))
    return dim, [window, CacheTail(window)]


def check_pair(windows: list[CacheWindow]) -> None:
    """Keys and values must both be windows (or neither) with the same bounds."""
    if not windows:
        return
    if len(windows) != 2:
        raise LayoutError("only one of keys/values is a static-cache window")
    k, v = windows
    if not all(_same_value(a, b) for a, b in zip((k.start, k.block_start, k.end), (v.start, v.block_start, v.end))):
        raise LayoutError("the key and value caches are written or read at different ranges")
