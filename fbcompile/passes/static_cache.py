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

LongLive's variant writes a ``clone()`` of the cache, reads it (sink tokens, then the window after
them), and only then writes the real cache the same way::

    temp_k = kv_cache["k"].clone()
    temp_k[:, sink:sink + kept] = temp_k[:, sink + evicted:sink + evicted + kept].clone()  # roll, if any
    temp_k[:, start:end] = roped_key                                      # the block: the clone's last write
    k = torch.cat([temp_k[:, :sink], temp_k[:, a:end]], dim=1)           # each read: [a, b)
    attention(q, k, v)
    kv_cache["k"][:, sink:sink + kept] = kv_cache["k"][:, sink + evicted:sink + evicted + kept].clone()
    kv_cache["k"][:, start:end] = roped_key                               # the same writes, in order

Each read ``clone[a:b]`` is split at ``m = min(max(a, start), b)``: the rows before the block are
external, the rest is read back from the clone at the attention (exact whatever the bounds, also
when a read ends before or after the block). Proven from the graph, else the site is left
untouched: the clone is taken of a graph input before the graph writes that input; the input is
written after the clone by exactly the clone's writes (same slices, same values, or the same
``clone()`` of a slice of its own tensor, read after its previous write), so after the call the
input holds what the clone held at the attention and the version guard below applies to it. Or the
graph does not write the input at all (:attr:`CacheWindow.deferred`): LongLive itself writes the real
cache after every layer ran (its ``_apply_cache_updates``), in another graph. The graphs that write it
there log the rows they wrote and the rows a roll copied (:mod:`.slice_writes`); the guard keeps the
clone's writes at the refresh (``SiteGuard.clone_writes``) and accepts the input's new version only
where the writes logged since leave every row outside the block's rows ``[start, end)`` as the clone
held it: both wrote only the block's rows, or the real cache was rolled as the clone was (a chunk's
first call rolls the clone, LongLive rolls the real cache after it). A roll of another count, a write
elsewhere or one not logged refreshes.

Reuse is safe when the external range holds what it held at the refresh: the runtime compares ``a``
and ``start`` (and a clone's read end) by value (symbolic ones are evaluated from the graph's int
inputs and sizes, see :mod:`.guards`) and the cache's ``_version`` after the graph's own writes. A
graph that also writes the cache elsewhere (a roll, a sink update) changes the external rows itself:
it is split exactly, but always refreshes (:attr:`CacheWindow.rewrites`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fbcompile.passes.graph_utils import (example, mutated_tensor, one_dim_slice, op_name, same_size, shape,
                                         view_base)
from fbcompile.passes.positionwise import LayoutError


def _window_slice(index) -> tuple[int, object, object] | None:
    """``(dim, a, end)`` if ``index`` is ``(:, ..., :, a:end)`` (one slice along the last indexed dim)."""
    found = one_dim_slice(index)
    if found is None or found[1].stop is None:
        return None
    dim, last = found
    return dim, 0 if last.start is None else last.start, last.stop


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
    """``base[..., a:m]`` (``m = max(a, start)``, clamped to the read's end for a clone) of a cache
    whose ``[start, end)`` the graph writes."""

    base: fx.Node          # the tensor read: the cache input, or the clone of it the graph wrote
    source: fx.Node        # the graph input whose content and version stand for the external rows
    dim: int
    start: object          # a: the window's first row (int or symbolic-int node)
    block_start: object    # where the graph's write of the block starts
    end: object            # where the read ends (a cache input: also where the block's write ends)
    block_end: object      # where the graph's write of the block ends
    write: fx.Node         # the write of the block
    writes: tuple          # every write of base and source in the graph (the block's, any roll, mirrors)
    deferred: bool = False  # a clone read, its input not written by this graph (LongLive's deferred write)
    emitted: fx.Node | None = None  # the external slice, once emitted (guards fingerprint it opaquely)
    _split: object = None

    @property
    def cloned(self) -> bool:
        return self.base is not self.source

    @property
    def rewrites(self) -> bool:
        """Does the graph also write the cache outside the block's range (a roll)? A clone's writes
        are counted once (the input's mirror them, unless deferred)."""
        return len(self.writes) > (2 if self.cloned and not self.deferred else 1)

    @property
    def bounds(self) -> tuple:
        """What the external rows depend on besides the cache: ``a``, the block's start and, for a
        clone, where the read ends."""
        return (self.start, self.block_start) + ((self.end,) if self.cloned else ())

    @property
    def length(self):
        split = self.split_value()
        return split - self.start if isinstance(split, int) and isinstance(self.start, int) else None

    @property
    def dtype(self) -> torch.dtype:
        return example(self.base).dtype

    def split_value(self):
        """``m`` if known without emitting a node, else None."""
        if _at_most(self.block_start, self.start):
            return self.start
        if _at_most(self.start, self.block_start) and (not self.cloned or _at_most(self.block_start, self.end)):
            return self.block_start
        if self.cloned and _at_most(self.end, self.block_start):
            return self.end
        return None

    def split(self, graph: fx.Graph):
        """``m = max(a, start)`` (a clone's: ``min(max(a, start), b)``): an int, a bound node, or
        emitted ``sym_max``/``sym_min`` (once). A cache input's read ends at the block's end, so its
        ``max(a, start)`` is never past it."""
        if self._split is None:
            known = self.split_value()
            if known is None:
                known = graph.call_function(torch.sym_max, (self.start, self.block_start))
                if self.cloned:
                    known = graph.call_function(torch.sym_min, (known, self.end))
            self._split = known
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

    def describe_split(self) -> str:
        split = f"max({_name(self.start)}, {_name(self.block_start)})"
        return f"min({split}, {_name(self.end)})" if self.cloned else split

    def describe(self) -> str:
        return f"{self.base.name}[{':, ' * self.dim}{_name(self.start)}:{self.describe_split()}]"


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
        start = window.describe_split() if window.cloned else _name(window.block_start)
        return f"{window.base.name}[{':, ' * window.dim}{start}:{_name(window.end)}]"


def static_cache_read(node: fx.Node):
    """If ``node`` reads ``cache[..., a:end]`` right after the graph wrote ``cache[..., start:end]``
    (or reads ``clone[..., a:b]`` of a cache clone, see the module docstring), ``(dim, [CacheWindow,
    CacheTail])``; None if it is no slice read of an input or of its clone; LayoutError if it is one
    but the writes are not proven (see the module docstring)."""
    if op_name(node) != "getitem" or not isinstance(node.args[0], fx.Node):
        return None
    base = node.args[0]
    source = base if base.op == "placeholder" else _cloned_input(base)
    read = _window_slice(node.args[1])
    if source is None or read is None:
        return None
    dim, start, end = read
    writes = _writes(base)
    if not writes:
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    if any(order[w] > order[node] for w in writes):
        raise LayoutError("a cache read as a slice is written after the read")
    if base is source:
        blocks = []
        for write in writes:
            slot = _window_slice(write.args[1]) if op_name(write) == "setitem" and write.args[0] is base else None
            if slot is not None and slot[0] == dim and _same_value(slot[2], end):
                blocks.append((write, slot[1], slot[2]))
        if len(blocks) != 1:
            raise LayoutError("a cache slice is not read up to the end of the range the graph wrote"
                              if not blocks else "a cache read as a slice is written twice up to its end")
        (write, block_start, block_end), mirrors = blocks[0], ()
    else:
        write, mirrors = writes[-1], _mirrored_writes(base, source, writes, order)
        slot = _window_slice(write.args[1])
        if slot is None or slot[0] != dim:
            raise LayoutError("a cache clone's last write is not a slice along the dim it is read")
        block_start, block_end = slot[1], slot[2]
    if not all(isinstance(b, int) or (isinstance(b, fx.Node) and isinstance(_value(b), torch.SymInt))
               for b in (start, block_start, end, block_end)):
        raise LayoutError("a cache slice bound is not an int")
    # lengths as the bounds say: no bound counts from the end (negative), none is clamped
    value = write.args[2]
    if any(isinstance(b, int) and b < 0 for b in (start, block_start, end, block_end)) or not (
            same_size(shape(node)[dim], _value(end) - _value(start)) and example(value) is not None
            and example(value).dim() == len(shape(node))
            and same_size(shape(value)[dim], _value(block_end) - _value(block_start))):
        raise LayoutError("a cache's window or written range is not as long as its bounds say")
    window = CacheWindow(base=base, source=source, dim=dim, start=start, block_start=block_start, end=end,
                         block_end=block_end, write=write, writes=tuple(writes) + mirrors,
                         deferred=base is not source and not mirrors)
    return dim, [window, CacheTail(window)]


def _writes(tensor: fx.Node) -> list[fx.Node]:
    """The graph's in-place writes of ``tensor`` or its views, in graph order."""
    return [n for n in tensor.graph.nodes if (t := mutated_tensor(n)) is not None and view_base(t) is tensor]


def _cloned_input(node: fx.Node) -> fx.Node | None:
    """The graph input ``node`` is a ``clone()`` of, if it is one."""
    source = node.args[0] if op_name(node) == "clone" and node.args else None
    return source if isinstance(source, fx.Node) and source.op == "placeholder" else None


def _mirrored_writes(clone: fx.Node, source: fx.Node, writes: list[fx.Node], order: dict) -> tuple:
    """The writes of ``source``, proven to repeat the writes of its ``clone`` in order after it was
    taken, so that after the graph ``source`` holds what ``clone`` held once written; () if the graph
    does not write ``source``; LayoutError if it writes it otherwise."""
    mirrors = _writes(source)
    if not mirrors:  # written by another graph, if at all: the guard checks what it logged
        return ()
    previous = {clone: order[clone], source: order[clone]}
    proven = len(mirrors) == len(writes)
    for write, mirror in zip(writes, mirrors) if proven else ():
        proven = all(op_name(w) == "setitem" and w.args[0] is tensor and order[w] > previous[tensor]
                     for tensor, w in ((clone, write), (source, mirror))) \
            and _same_index(write.args[1], mirror.args[1]) \
            and _same_written_value(write.args[2], mirror.args[2], clone, source, previous, order)
        if not proven:
            break
        previous = {clone: order[write], source: order[mirror]}
    if not proven:
        raise LayoutError("a cache clone is read, but this graph does not write the cache as it wrote the clone")
    return tuple(mirrors)


def _same_index(a, b) -> bool:
    a, b = (i if isinstance(i, tuple) else (i,) for i in (a, b))
    return len(a) == len(b) and all(
        x == y if not isinstance(x, slice) else isinstance(y, slice) and all(
            _same_value(getattr(x, f), getattr(y, f)) if getattr(x, f) is not None else getattr(y, f) is None
            for f in ("start", "stop", "step")) for x, y in zip(a, b))


def _same_written_value(a, b, clone: fx.Node, source: fx.Node, previous: dict, order: dict) -> bool:
    """The same node, or the same slice of one (LongLive slices the block's keys anew for the cache
    update), not a view of either cache, which the writes between would change; or ``x[i].clone()``
    of each one's own tensor at the same index, taken after that tensor's previous write (a roll)."""
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    if a is b or (op_name(a) == op_name(b) == "getitem" and a.args[0] is b.args[0]
                  and _same_index(a.args[1], b.args[1])):
        return view_base(a) not in (clone, source)
    for value, tensor in ((a, clone), (b, source)):
        read = value.args[0] if op_name(value) == "clone" and value.args else None
        if not isinstance(read, fx.Node) or op_name(read) != "getitem" or read.args[0] is not tensor \
                or order[value] < previous[tensor]:
            return False
    return _same_index(a.args[0].args[1], b.args[0].args[1])


def check_pair(k_windows: list[CacheWindow], v_windows: list[CacheWindow]) -> None:
    """Keys and values must be windows at the same places of their cats (or neither), pairwise
    with the same bounds."""
    if len(k_windows) != len(v_windows):
        raise LayoutError("only one of keys/values is a static-cache window")
    for k, v in zip(k_windows, v_windows):
        if not all(_same_value(a, b) for a, b in zip((k.start, k.block_start, k.end), (v.start, v.block_start, v.end))):
            raise LayoutError("the key and value caches are written or read at different ranges")
