"""Position tables a graph reads at the cached length, for a graph run over buffers with spare capacity.

OLMo/LLaDA (Fast-dLLM) rotate the keys after ``torch.cat([past_k, k])`` with RoPE tables sliced by the
length of cache and block. After the split (:mod:`fbcompile.passes.positionwise`) the external part
rotates the cache with the table's first ``L`` rows, and the queries and the block's keys read its rows
from ``L`` on (``L`` the cached length, ``c`` the block's)::

    cos = cos_table[:, :, :L + c]                                # a position table: row i is cos(i)
    q = rope(q, cos[:, :, L:])                                   # a read at the cached length
    out_e, lse_e = attention_lse(q, rope(past_k, cos.narrow(2, 0, L)), past_v, None, scale)
    k = rope(k, cos.narrow(2, L, c))                             # a read at the cached length

:mod:`fbcompile.passes.key_count` runs such a graph over buffers of a capacity ``C >= n`` (the cache's
``n`` rows first, ``L = C``). The cache's rotation is then still right in its first ``n`` rows, all that
attention with the key count reads; the reads at the cached length are not (rows ``[C, C + c)``).
:func:`table_reads` proves the first and finds the second, which :func:`read_from_count` rewrites to the
rows from the count read on the device::

    q = rope(q, cos.index_select(2, arange(c) + cached_key_count))

Every table must have rows that depend on their index alone, at any size
(:func:`~.positionwise.position_table`: inputs, ``arange(n)``, prefix slices and position-wise ops of
those), read no padded input (its rows past ``n`` are spare), and be read by nothing but other such
tables, the position-wise ops on the cache and the reads at the cached length (anything else could see
its size). A prefix slice that grows with the length (``cos_table[:, :, :L + c]``, ``cos_table`` an
input of fixed rows) must still fit its input at the capacity: :class:`TableLimit` bounds the capacity.
"""
from __future__ import annotations

import contextlib
import functools
import operator
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from fbcompile.passes.graph_utils import NoExample, erase_unused, fill_examples, op_name, recorded
from fbcompile.passes.positionwise import LayoutError, position_table

CAPACITY = sympy.Symbol("capacity", integer=True, positive=True)  # of the buffers a padded graph runs over


@dataclass(frozen=True)
class TableLimit:
    """A prefix slice of an input that takes ``capacity + extra`` of its rows: the capacity is at most its
    rows (``rows``, or argument ``index``'s size along ``dim``) less ``extra`` (an int, or a dynamic block
    length that :meth:`~.key_count.KeyCountInputs.resolve` binds)."""

    index: int | None
    dim: int
    rows: int | None
    extra: object

    def most(self, args) -> int:
        rows = self.rows if self.index is None else args[self.index].shape[self.dim]
        return rows - int(self.extra)


@dataclass
class _Read:
    """``table``'s rows ``[L + offset, L + offset + size)`` along ``dim``, read by ``node`` (``size`` None:
    to ``stop``, else to the table's end)."""

    node: fx.Node
    table: fx.Node
    dim: int
    start: fx.Node
    offset: int
    size: int | fx.Node | None
    rest: tuple | None = None  # a getitem's other entries (new dims, ints), applied after the rows
    stop: fx.Node | None = None  # a symbolic end whose distance from ``start`` is free of the cached
    #                              lengths (Dream's ``cos[:, :, L:L + q_len]``)


@dataclass
class TableReads:
    """What :func:`table_reads` found: the position-wise ops on the cache (``region``), the nodes of the
    position tables sized by a cached length, the reads at the cached length and the capacity limits."""

    region: set = field(default_factory=set)
    tables: set = field(default_factory=set)
    reads: list = field(default_factory=list)
    limits: list = field(default_factory=list)

    @functools.cached_property
    def claimed(self) -> set:
        return self.region | self.tables | {read.node for read in self.reads}

    def feeds_only(self, node: fx.Node) -> bool:
        """Whether ``node`` (a read of a cached length, or size arithmetic of one) is claimed, or a size
        that reaches nothing but claimed nodes (a table's length ``L + c``, a read's start)."""
        claimed = self.claimed
        pending, seen = [node], set()
        while pending:
            n = pending.pop()
            if n in claimed or n in seen:
                continue
            if not isinstance(recorded(n), torch.SymInt) or not n.users:
                return False
            seen.add(n)
            pending += list(n.users)
        return True


def _expr(value):
    return sympy.sympify(value.node.expr if isinstance(value, torch.SymInt) else value)


def _free(value, symbols: set) -> bool:
    value = recorded(value) if isinstance(value, fx.Node) else value
    return isinstance(value, (int, torch.SymInt)) and not _expr(value).free_symbols & symbols


def _offset(start, values: dict) -> int | None:
    """``k`` where ``start`` (a node) is a cached length plus ``k`` at any capacity, else None."""
    value = recorded(start) if isinstance(start, fx.Node) else None
    if not isinstance(value, torch.SymInt):
        return None
    k = sympy.expand(_expr(value).subs(values) - CAPACITY)
    return int(k) if k.is_Integer else None


def _slice_dim(index: tuple, position: int, ndim: int) -> int | None:
    """The input dim entry ``position`` of the index tuple ``index`` (a slice) applies to."""
    explicit = sum(1 for item in index if item is not None and item is not Ellipsis)
    dim = 0
    for item in index[:position]:
        if item is Ellipsis:
            dim += ndim - explicit
        elif item is not None:
            dim += 1
    return dim


def _read_at(node: fx.Node, values: dict) -> _Read | None:
    """``node`` as a read of a tensor's rows at a cached length (``t.narrow(d, L + k, n)``,
    ``t[..., L + k:]``, ``t[..., L + k:L + k2]``, ``t[..., L:L + n]`` with ``n`` symbolic), else None."""
    symbols = set(values)
    name, args = op_name(node), node.args
    if name == "narrow" and len(args) == 4 and not node.kwargs and isinstance(args[1], int):
        table, dim, start, size = args
        offset = _offset(start, values)
        if offset is None or not _free(size, symbols):
            return None
        return _Read(node, table, dim % recorded(table).dim(), start, offset, size)
    if node.target is not operator.getitem or node.kwargs:
        return None
    table, index = args[0], args[1] if isinstance(args[1], tuple) else (args[1],)
    value = recorded(table) if isinstance(table, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return None
    at = [i for i, item in enumerate(index) if isinstance(item, slice) and isinstance(item.start, fx.Node)
          and _offset(item.start, values) is not None]
    if len(at) != 1:
        return None
    item = index[at[0]]
    others = [x for i, x in enumerate(index) if i != at[0]]
    if item.step not in (None, 1) or not all(x is None or x is Ellipsis or isinstance(x, int) or x == slice(None)
                                             for x in others):
        return None
    offset = _offset(item.start, values)
    size, stop = None, None
    if item.stop is not None:
        end = _offset(item.stop, values)
        if end is None:  # a symbolic size: the end less the start is free of the cached lengths
            if not (isinstance(item.stop, fx.Node) and isinstance(recorded(item.stop), torch.SymInt)):
                return None
            distance = sympy.expand(_expr(recorded(item.stop)) - _expr(recorded(item.start)))
            if distance.free_symbols & symbols:
                return None
            stop = item.stop
        elif end < offset:
            return None
        else:
            size = end - offset
    rest = (*index[:at[0]], slice(None), *index[at[0] + 1:])
    trivial = all(x is Ellipsis or x == slice(None) for x in rest)
    return _Read(node, table, _slice_dim(index, at[0], value.dim()), item.start, offset, size,
                 None if trivial else rest, stop)


def _sizes(lengths, symbols: set) -> list[fx.Node]:
    """The reads of the cached lengths and the integer arithmetic computed from them (their users given
    the example values the split did not record)."""
    found, pending = {}, list(lengths)
    while pending:
        n = pending.pop()
        if n in found:
            continue
        found[n] = None
        for user in n.users:
            with contextlib.suppress(NoExample):
                fill_examples(user)
            if isinstance(recorded(user), torch.SymInt) and _expr(recorded(user)).free_symbols & symbols:
                pending.append(user)
    return list(found)


def _sized_by(node: fx.Node, symbols: set) -> bool:
    value = recorded(node)
    return isinstance(value, torch.Tensor) and any(_expr(s).free_symbols & symbols for s in value.shape)


def _ancestors(node: fx.Node) -> set:
    seen, pending = set(), [node]
    while pending:
        n = pending.pop()
        if n not in seen:
            seen.add(n)
            pending += n.all_input_nodes
    return seen


def _limits(slices: list, placeholders: list, values: dict) -> tuple[list[TableLimit], str | None]:
    """The capacity limits of the prefix slices a table's rows pass through (see :class:`TableLimit`)."""
    limits, symbols = [], set(values)
    for node, source, in_dim, dim in slices:
        size = _expr(recorded(node).shape[dim])
        if not size.free_symbols & symbols:
            continue
        extra = sympy.expand(size.subs(values) - CAPACITY)
        source_size = _expr(recorded(source).shape[in_dim]).subs(values)
        if CAPACITY in extra.free_symbols or extra.free_symbols & symbols:
            return [], f"{node.name} slices a position table by a size that does not grow with the cached length"
        if not (sympy.expand(source_size - size.subs(values)).free_symbols & ({CAPACITY} | symbols)):
            continue  # the input grows with the slice: it fits at any capacity as it did at the length
        if source_size.free_symbols & ({CAPACITY} | symbols):
            return [], f"{node.name} slices a position table whose size grows otherwise with the cached length"
        if source_size.is_Integer:
            limits.append(TableLimit(None, in_dim, int(source_size), extra))
        elif source.op == "placeholder":
            limits.append(TableLimit(placeholders.index(source), in_dim, None, extra))
        else:
            return [], f"{node.name} slices a position table of a size known only when the graph runs"
    return limits, None


@dataclass
class _Table:
    """A proved position table: the nodes it is computed through that a cached length sizes, and the
    capacity limits of its prefix slices."""

    nodes: set
    limits: list


def _table(table: fx.Node, dim: int, placeholders: list, values: dict) -> _Table | str:
    """``table`` proved a position table along ``dim`` (see the module docstring), else why not."""
    symbols = set(values)
    try:
        fill_examples(table)
        slices, inputs = position_table(table, dim)
    except (LayoutError, NoExample) as error:
        return str(error)
    if any(_sized_by(n, symbols) for n in inputs):  # a cached input: its rows past the cache's are spare
        return f"position table {table.name} reads an input sized by a cached length"
    limits, why = _limits(slices, placeholders, values)
    if why is not None:
        return why
    return _Table({n for n in _ancestors(table) if n.op != "placeholder" and _sized_by(n, symbols)}, limits)


def table_reads(lengths, region: set, operands: list, placeholders: list, values: dict
                ) -> tuple[TableReads, str | None]:
    """The position tables a graph reads - ``operands``, ``(table, dim)`` of the position-wise ops on the
    cache (``region``), which must be ones (else why not), and the tensors read at a cached length (reads
    of ``lengths``, ``values`` the value of each cached length's symbol at the capacity) that are ones (see
    the module docstring); the others (a mask over cache and block split at the length) are left as they
    are, for :mod:`fbcompile.passes.key_count` to prove otherwise."""
    symbols = set(values)
    candidates = {}
    for size in _sizes(lengths, symbols):
        for user in size.users:
            if user not in region and user not in candidates and (read := _read_at(user, values)) is not None:
                candidates[user] = read
    proved = {}

    def prove(table, dim):
        if (table, dim) not in proved:
            proved[table, dim] = _table(table, dim, placeholders, values)
        return proved[table, dim]

    for table, dim in operands:
        if isinstance(why := prove(table, dim), str):
            return TableReads(), why
    while True:  # drop the reads of tables that are not ones, or are read otherwise, until none is
        reads = {node: read for node, read in candidates.items() if isinstance(prove(read.table, read.dim), _Table)}
        tables = [prove(t, d) for t, d in operands] + [prove(read.table, read.dim) for read in reads.values()]
        nodes = set().union(*(table.nodes for table in tables))
        misread = {}
        for node in nodes:
            for user in node.users:
                if not (user in nodes or user in region or user in reads and user.args[0] is node):
                    misread.setdefault(node, user)
        if not misread:
            break
        for table, dim in operands:
            if (bad := prove(table, dim).nodes & set(misread)):
                node = min(bad, key=str)
                return TableReads(), (f"{misread[node].name} reads {node.name}, a position table sized by a cached "
                                      "length, other than at the cached length or position-wise on the cache")
        candidates = {node: read for node, read in reads.items()
                      if not prove(read.table, read.dim).nodes & set(misread)}
    limits = list(dict.fromkeys(limit for table in tables for limit in table.limits))
    return TableReads(set(region), nodes, list(reads.values()), limits), None


def read_from_count(gm: fx.GraphModule, read: _Read, count: fx.Node) -> None:
    """``t.narrow(d, L + k, n)`` (``t[..., L + k:]``) -> ``t.index_select(d, arange(n) + (count + k))``: the rows
    at the cache's length read on the device, whether the cache is padded or not."""
    graph, table = gm.graph, recorded(read.table)
    like = recorded(count)
    fake = like.fake_mode if getattr(like, "fake_mode", None) else contextlib.nullcontext()
    with graph.inserting_before(read.node), fake:
        size = read.size
        if size is None:  # to a symbolic end, or to the table's end
            end = read.stop
            if end is None:
                end = graph.call_method("size", (read.table, read.dim))
                end.meta["example_value"] = table.shape[read.dim]
            size = graph.call_function(operator.sub, (end, read.start))
            size.meta["example_value"] = recorded(end) - recorded(read.start)
        rows = graph.call_function(torch.arange, (size,), {"device": table.device})
        rows.meta["example_value"] = torch.arange(recorded(size) if isinstance(size, fx.Node) else size,
                                                  device=table.device)
        first = count
        if read.offset:
            first = graph.call_function(operator.add, (count, read.offset))
            first.meta["example_value"] = like + read.offset
        index = graph.call_function(operator.add, (rows, first))
        index.meta["example_value"] = rows.meta["example_value"] + like
        selected = graph.call_method("index_select", (read.table, read.dim, index))
        selected.meta["example_value"] = table.index_select(read.dim, index.meta["example_value"])
        if read.rest is not None:
            picked = selected
            selected = graph.call_function(operator.getitem, (picked, read.rest))
            selected.meta["example_value"] = picked.meta["example_value"][read.rest]
    read.node.replace_all_uses_with(selected)
    erase_unused(graph, read.node)
