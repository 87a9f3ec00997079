"""Find the graph inputs that a graph writes in place only at slices along one dim, so that the
runtime can log which rows each call wrote.

LongLive's ``_apply_cache_updates`` writes each layer's real cache after every layer ran, in a graph of
its own, long after the attention that read a written clone of it (see :mod:`.static_cache`)::

    kv_cache["k"][:, local_end - s:local_end] = roped_k         # the block's rows, bounds from int inputs

    kv_cache["k"][:, sink:sink + kept] = kv_cache["k"][:, sink + evicted:sink + evicted + kept].clone()  # a roll

Such a write changes the cache's ``_version``, which alone would refresh every site over it. The
runtime instead logs, per call, the rows these writes covered and, for a copy of the tensor's own rows
(a roll), the rows copied (:func:`fbcompile.backends.provenance.log_writes`); a site keeps its cached
part where the logged writes leave the rows outside its block as the clone it read held them
(``SiteGuard.block_rows``, ``SiteGuard.clone_writes``). An input is logged only if every write of it (or
of a view of it) in the graph is ``input[:, ..., a:b] = value`` with int or symbolic-int bounds; anything
else leaves its version changes unexplained, and the sites over it refresh.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fbcompile.passes.graph_utils import may_write_unseen, mutated_tensor, one_dim_slice, op_name, view_base
from fbcompile.passes.int_sources import evaluate_int, int_source


@dataclass(frozen=True)
class SliceWrites:
    """The writes of graph input ``input`` (:func:`slice_rows` each); ``others``: the indices of the other
    inputs the graph writes (an alias of ``input`` among them makes a call's writes unloggable)."""

    input: int
    rows: tuple
    others: tuple[int, ...]

    def rows_written(self, args) -> tuple:
        return rows_written(self.rows, args[self.input].shape, args)


def rows_written(rows: tuple, size: torch.Size, args) -> tuple:
    """``(dim, start, stop, copied)`` per write of :func:`slice_rows` ``rows`` of a tensor of ``size``,
    evaluated on a call's arguments as the slices index (a negative bound counts from the end, a bound past
    the end is clamped); ``copied``: the first row a copy reads, None for any other value (or a copy whose
    rows do not match the written ones one to one, which the write would broadcast)."""
    def evaluate(bounds: tuple, dim: int) -> tuple[int, int]:
        return slice(*(None if b is None else evaluate_int(b, args) for b in bounds)).indices(size[dim])[:2]

    written = []
    for dim, *bounds, copied in rows:
        start, stop = evaluate(bounds, dim)
        source = None
        if copied is not None:
            first, last = evaluate(copied, dim)
            source = first if last - first == stop - start else None
        written.append((dim, start, stop, source))
    return tuple(written)


def slice_writes(gm: fx.GraphModule) -> list[SliceWrites]:
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    writes: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        target = mutated_tensor(node)
        if target is not None:
            writes.setdefault(view_base(target), []).append(node)
    unseen = {view_base(a) for node in gm.graph.nodes if may_write_unseen(node) for a in node.all_input_nodes}
    written = [p for p in placeholders if p in writes or p in unseen]
    found = []
    for tensor in written:
        rows = [slice_rows(write, tensor, placeholders) for write in writes.get(tensor, ())]
        if tensor not in unseen and all(r is not None for r in rows):
            found.append(SliceWrites(placeholders.index(tensor), tuple(rows),
                                     tuple(placeholders.index(p) for p in written if p is not tensor)))
    return found


def slice_rows(write: fx.Node, tensor: fx.Node, placeholders: list[fx.Node]) -> tuple | None:
    """``(dim, start, stop, copied)`` if ``write`` is ``tensor[:, ..., a:b] = value``, else None; each bound
    an int source (:func:`fbcompile.passes.int_sources.int_source`) or None (the slice's default). ``copied``: the
    bounds ``(c, d)`` if ``value`` is ``tensor[:, ..., c:d].clone()`` read with no write of ``tensor``
    between the read and this write (a roll), else None."""
    found = one_dim_slice(write.args[1]) if op_name(write) == "setitem" and write.args[0] is tensor else None
    value = tensor.meta.get("example_value")
    if found is None or not isinstance(value, torch.Tensor) or found[0] >= value.dim():
        return None
    dim, rows = found
    bounds = _bounds(rows, placeholders)
    if bounds is None:
        return None
    copied = _copied_rows(write, tensor, dim)
    return (dim, *bounds, _bounds(copied, placeholders) if copied is not None else None)


def _bounds(rows: slice, placeholders: list[fx.Node]) -> tuple | None:
    bounds = tuple(int_source(b, placeholders) if b is not None else None for b in (rows.start, rows.stop))
    if any(source is None and bound is not None for source, bound in zip(bounds, (rows.start, rows.stop))):
        return None
    return bounds


def _copied_rows(write: fx.Node, tensor: fx.Node, dim: int) -> slice | None:
    """The rows of ``tensor`` that ``write`` copies, if its value is ``tensor[:, ..., c:d].clone()`` along
    ``dim``, taken after the graph's last write of ``tensor`` before ``write``."""
    value = write.args[2]
    read = value.args[0] if isinstance(value, fx.Node) and op_name(value) == "clone" and value.args else None
    if not isinstance(read, fx.Node) or op_name(read) != "getitem" or read.args[0] is not tensor:
        return None
    found = one_dim_slice(read.args[1])
    if found is None or found[0] != dim:
        return None
    nodes = list(tensor.graph.nodes)
    between = nodes[nodes.index(value) + 1:nodes.index(write)]
    if any((t := mutated_tensor(n)) is not None and view_base(t) is tensor for n in between):
        return None
    return found[1]
