"""Attention over a preallocated buffer that the graph writes at the block's positions.

Three ways of writing the block into a full-length buffer are matched, each followed by attention
over the *whole* buffer (``[B, H, N, D]`` or ``[B, N, H, D]``, through the layouts of
:mod:`.kv_layout`):

* HF ``StaticCache`` (``StaticLayer.update``; positions from an in-place counter)::

      cache_position = torch.arange(M) + cumulative_length
      cumulative_length.add_(M)
      keys.index_copy_(2, cache_position, k)             # index_copy_(dim, idx, block)
      F.scaled_dot_product_attention(q, repeat_kv(keys), ..., attn_mask=mask_4d)

* Fast-dLLM's dual cache (positions from a mask, a tensor index)::

      idx = replace_position.nonzero(as_tuple=True)[1]   # usually a graph input (nonzero breaks the graph)
      past_k[:, :, idx] = k                              # setitem, i.e. index_put_
      attention(q, past_k, ...)
  and ``buf.index_put_((None, None, idx), k)``;

* slice assignment with data-dependent bounds (``.item()`` or symbolic ints)::

      buf[:, :, s:e] = k
      attention(q, buf, ...)

The buffer may reach attention through position-wise ops after the write (Fast-dLLM's LLaDA rotates
the whole buffer: ``k = rope(past_k)``): :mod:`.positionwise` proves them, with the buffer standing
for the cat, and each piece below computes them over its own rows (``table_rows``: the tables' rows
for the whole buffer, or at ``pos``).

The split is by key positions: with ``pos`` the written positions,

* external = the whole buffer with the columns ``pos`` hidden (its own mask, or a new bool one);
* internal = the buffer's rows at ``pos`` *read back after the write* (``buf.index_select(dim, pos)``)
  with the site mask's columns at ``pos``.

Reading back makes the split exact even with duplicate indices (only one write per position wins,
whichever it is): the internal part also hides every later occurrence of a repeated position. That
dedup mask is left out where positions are provably distinct (slices, ``arange(..) + offset``).

Proven from the graph, else the site is left untouched: the buffer is a graph input written by
exactly one in-place op (no other write, also through views), along the key-sequence dim, at a 1-D
integer index or a slice; nothing reads the buffer before the write (sizes aside); keys and values
are written at the same positions and read wholly. Reuse is safe when, since the refresh, nothing
outside the graph wrote the buffer (``_version``) and the positions are the same: the guard compares
the graph inputs the positions are computed from (:func:`position_inputs`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from fbcompile.passes.graph_utils import (METADATA_OPS, DependencyGraph, example, is_parameter, mutated_tensor,
                                          op_name, same_size, shape, view_base)

_INDEX_DTYPES = (torch.int64, torch.int32)
_VIEWS = {"getitem", "view", "transpose", "permute", "unsqueeze", "squeeze", "expand", "narrow", "select",
          "unflatten", "mT", "detach", "view_as"}


class BufferWriteError(Exception):
    """The buffer is written or read in a way the split cannot prove exact."""


@dataclass(eq=False)
class BufferWrite:
    """The graph's one in-place write of the block into ``base`` along ``dim``."""

    base: fx.Node
    dim: int
    node: fx.Node                     # the write (index_copy_ / setitem / index_put_)
    index: fx.Node | slice            # 1-D integer tensor, or a slice (bounds: ints or symbolic-int nodes)
    value: fx.Node                    # the block's keys/values
    emitted: fx.Node | None = None    # the positions, once the rewrite emitted them
    same_as: BufferWrite | None = None  # another write proven at the same positions (values' -> keys')

    @property
    def length(self):
        """Buffer length along ``dim``."""
        return shape(self.base)[self.dim]

    @property
    def unique(self) -> bool:
        """Are the positions provably distinct (no dedup mask needed)?"""
        return isinstance(self.index, slice) or _is_offset_arange(self.index)

    def emit_length(self, graph: fx.Graph):
        """The buffer length as an int, or an emitted ``size`` node when it is symbolic."""
        length = self.length
        return length if isinstance(length, int) else graph.call_method("size", (self.base, self.dim))

    def positions(self, graph: fx.Graph) -> fx.Node:
        """The written positions as a 1-D int64 tensor in ``[0, length)`` (negative indices wrapped),
        emitted once."""
        if self.same_as is not None:
            return self.same_as.positions(graph)
        if self.emitted is None:
            if isinstance(self.index, slice):
                device = example(self.base).device
                everything = graph.call_function(torch.arange, (self.emit_length(graph),), {"device": device})
                self.emitted = graph.call_function(operator.getitem, (everything, self.index))
            else:
                index = graph.call_method("long", (self.index,))
                self.emitted = graph.call_function(torch.remainder, (index, self.emit_length(graph)))
        return self.emitted


@dataclass(eq=False)
class _BufferPiece:
    """A cat-piece stand-in over the written buffer (see :class:`~.kv_layout.KVLayout`'s pieces)."""

    write: BufferWrite

    @property
    def base(self) -> fx.Node:
        return self.write.base

    @property
    def dtype(self) -> torch.dtype:
        return example(self.base).dtype

    @property
    def index_name(self) -> str:
        return str(getattr(self.write.index, "name", self.write.index))


class BufferExternal(_BufferPiece):
    """The whole buffer, its written positions hidden by the mask."""

    @property
    def length(self):
        return self.write.length

    def describe(self) -> str:
        return f"{self.base.name} without {self.index_name}"

    def emit(self, graph: fx.Graph) -> fx.Node:
        return self.base

    def emit_length(self, graph: fx.Graph):
        return self.write.emit_length(graph)

    def table_rows(self, graph: fx.Graph, table: fx.Node, dim: int) -> fx.Node:
        """A position table's rows for the whole buffer (keys rotated after the write: all of it)."""
        return table


class BufferBlock(_BufferPiece):
    """The buffer's rows at the written positions, read after the write."""

    @property
    def length(self):
        index, value = self.write.index, shape(self.write.value)
        if isinstance(index, fx.Node):
            return shape(index)[0]
        return value[self.write.dim] if len(value) == len(shape(self.base)) else None  # else broadcast

    def describe(self) -> str:
        return f"{self.base.name}[{self.index_name}]"

    def emit(self, graph: fx.Graph) -> fx.Node:
        return graph.call_method("index_select", (self.base, self.write.dim, self.write.positions(graph)))

    def emit_length(self, graph: fx.Graph):
        length = self.length
        return length if isinstance(length, int) else graph.call_method("size", (self.write.positions(graph), 0))

    def table_rows(self, graph: fx.Graph, table: fx.Node, dim: int) -> fx.Node:
        """A position table's rows at the written positions."""
        return graph.call_method("index_select", (table, dim, self.write.positions(graph)))


def _is_offset_arange(node) -> bool:
    """``torch.arange(..)`` (step 1), plus or minus scalars (ints, symbolic ints, one-element tensors)."""
    if op_name(node) == "arange":
        return node.kwargs.get("step", node.args[2] if len(node.args) > 2 else 1) == 1
    if op_name(node) in ("add", "sub") and len(node.args) == 2:
        a, b = node.args
        if op_name(node) == "add" and op_name(b) == "arange":
            a, b = b, a
        return _is_offset_arange(a) and (example(b) is None or example(b).numel() == 1)
    return False


def _write_target(node: fx.Node, base: fx.Node, ndim: int) -> tuple[int, fx.Node | slice, object] | None:
    """``(dim, index, value)`` if ``node`` writes ``base`` at positions along one dim, else None."""
    name = op_name(node)
    if name == "index_copy_" and node.args[0] is base:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        index = node.kwargs.get("index", node.args[2] if len(node.args) > 2 else None)
        value = node.kwargs.get("source", node.args[3] if len(node.args) > 3 else None)
        return (dim % ndim, index, value) if isinstance(dim, int) else None
    if name == "setitem" and node.args[0] is base:
        index, value = node.args[1], node.args[2]
        index = index if isinstance(index, tuple) else (index,)
        if Ellipsis in index:
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (ndim - len(index) + 1) + index[at + 1:]
        picked = [(d, i) for d, i in enumerate(index) if i != slice(None)]
        if len(picked) != 1 or len(index) > ndim:
            return None
        return picked[0][0], picked[0][1], value
    if name == "index_put_" and node.args[0] is base and not node.kwargs.get("accumulate", False):
        index, value = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("values")
        if len(node.args) > 3 and node.args[3]:
            return None
        picked = [(d, i) for d, i in enumerate(index) if i is not None]
        if not isinstance(index, (tuple, list)) or len(picked) != 1:
            return None
        return picked[0][0], picked[0][1], value
    return None


def buffer_write(base: fx.Node) -> BufferWrite | None:
    """The one write of the block into graph input ``base``; None if the graph does not write it;
    BufferWriteError if it is written, but not in a way the split can prove (see the docstring)."""
    graph = base.graph
    writes = [n for n in graph.nodes if (t := mutated_tensor(n)) is not None and view_base(t) is base]
    if not writes:
        return None
    if len(writes) != 1:
        raise BufferWriteError(f"the buffer {base.name} is written {len(writes)} times in the graph")
    write, ndim = writes[0], len(shape(base) or ())
    target = _write_target(write, base, ndim)
    if target is None:
        raise BufferWriteError(f"the buffer {base.name} is written by '{op_name(write)}', "
                               "not at positions along one dim")
    dim, index, value = target
    if isinstance(index, slice):
        if any(isinstance(b, fx.Node) and example(b) is not None for b in (index.start, index.stop, index.step)):
            raise BufferWriteError("a slice bound is a tensor")
    elif not (isinstance(index, fx.Node) and example(index) is not None and example(index).dim() == 1
              and example(index).dtype in _INDEX_DTYPES):
        raise BufferWriteError("the buffer is written at an index that is not a 1-D integer tensor")
    if not isinstance(value, fx.Node) or example(value) is None:
        raise BufferWriteError("the buffer is written with a constant, not the block's keys/values")
    if _read_before(base, write):
        raise BufferWriteError(f"the buffer {base.name} is read before the graph writes the block")
    return BufferWrite(base=base, dim=dim, node=write, index=index, value=value)


def _read_before(base: fx.Node, write: fx.Node) -> bool:
    """Does anything computed from ``base`` before ``write`` read its data (sizes and views aside)?"""
    order = {n: i for i, n in enumerate(base.graph.nodes)}
    stack, seen = [base], set()
    while stack:
        for user in stack.pop().users:
            if user in seen or user is write or order[user] > order[write] or op_name(user) in METADATA_OPS:
                continue
            seen.add(user)
            if op_name(user) not in _VIEWS or (op_name(user) == "getitem" and not _basic_index(user.args[1])):
                return True
            stack.append(user)  # a view reads nothing; its users may
    return False


def _basic_index(index) -> bool:
    """Indexing that makes a view (no tensor indices)."""
    index = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in index)


def position_inputs(write: BufferWrite, deps: DependencyGraph) -> list[fx.Node]:
    """Graph inputs the written positions are computed from: tensors (compared by value) and
    symbolic ints, parameters aside. Same values -> same positions (the graph is deterministic)."""
    bounds = [write.index] if isinstance(write.index, fx.Node) else \
        [b for b in (write.index.start, write.index.stop, write.index.step) if isinstance(b, fx.Node)]
    found = set()
    for node in bounds:
        found |= {n for n in nx.ancestors(deps.graph, node) | {node} if n.op == "placeholder"}
    graph_inputs = [n for n in write.base.graph.nodes if n.op == "placeholder"]
    return [n for n in graph_inputs if n in found and not is_parameter(n)]


def read_buffer(node: fx.Node):
    """If attention operand chain reaches graph input ``node`` that the graph writes at the block's
    positions, ``(dim, [BufferExternal, BufferBlock])``; None if ``node`` is no written buffer."""
    if node.op != "placeholder" or example(node) is None:
        return None
    write = buffer_write(node)
    if write is None:
        return None
    return write.dim, [BufferExternal(write), BufferBlock(write)]


def check_pair(k_write: BufferWrite, v_write: BufferWrite) -> None:
    """Keys and values must be written at the same positions, into buffers of one length; the values'
    positions are then the keys' (emitted once)."""
    same_index = k_write.index is v_write.index or (
        isinstance(k_write.index, slice) and k_write.index == v_write.index)
    if not same_index:
        raise BufferWriteError("keys and values are written at different positions")
    lengths = (k_write.length, v_write.length)  # symbolic ones: attention itself needs them equal
    if all(isinstance(n, int) for n in lengths) and lengths[0] != lengths[1]:
        raise BufferWriteError("the key and value buffers differ in length")
    v_write.same_as = k_write


def split_masks(graph: fx.Graph, write: BufferWrite, mask: fx.Node | None) -> tuple[fx.Node, fx.Node | None]:
    """``(external mask, internal mask)`` from the site's mask (ops' convention: bool = attend,
    float = added): external hides the written columns, internal takes the columns at the written
    positions (and hides repeats of a position, unless positions are provably distinct)."""
    positions = write.positions(graph)
    device = example(write.base).device
    keep = graph.call_function(torch.ones, (write.emit_length(graph),), {"dtype": torch.bool, "device": device})
    keep = graph.call_method("index_fill", (keep, 0, positions, False))
    is_bool = mask is not None and example(mask).dtype == torch.bool
    internal = mask
    if mask is not None and not same_size(shape(mask)[-1], 1):
        internal = graph.call_method("index_select", (mask, -1, positions))
    if not write.unique:
        column, row = ((positions, (slice(None), None)), (positions, (None, slice(None))))
        same = graph.call_function(operator.eq, (graph.call_function(operator.getitem, column),
                                                 graph.call_function(operator.getitem, row)))
        repeated = graph.call_method("any", (graph.call_method("tril", (same, -1)), -1))
        internal = _restrict(graph, internal, is_bool, graph.call_function(torch.logical_not, (repeated,)))
    return _restrict(graph, mask, is_bool, keep), internal


def _restrict(graph: fx.Graph, mask: fx.Node | None, is_bool: bool, keep: fx.Node) -> fx.Node:
    """``mask`` with the key columns where ``keep`` is False hidden."""
    if mask is None:
        return keep
    if is_bool:
        return graph.call_function(torch.logical_and, (mask, keep))
    return graph.call_function(torch.where, (keep, mask, float("-inf")))
