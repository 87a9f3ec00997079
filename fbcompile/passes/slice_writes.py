"""Find the graph inputs that a graph writes in place only at slices along one dim, so that the
runtime can log which rows each call wrote.

LongLive's ``_apply_cache_updates`` writes each layer's real cache after every layer ran, in a graph of
its own, long after the attention that read a written clone of it (see :mod:`.static_cache`)::

    kv_cache["k"][:, local_end - s:local_end] = roped_k         # the block's rows, bounds from int inputs

Such a write changes the cache's ``_version``, which alone would refresh every site over it. The
runtime instead logs, per call, the rows these writes covered (:func:`fbcompile.backends.provenance.
log_writes`), and a site whose external rows lie elsewhere keeps its cached part
(``SiteGuard.block_rows``). An input is logged only if every write of it (or of a view of it) in the
graph is ``input[:, ..., a:b] = value`` with int or symbolic-int bounds; anything else leaves its
version changes unexplained, and the sites over it refresh.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fbcompile.passes.graph_utils import mutated_tensor, one_dim_slice, op_name, view_base
from fbcompile.passes.int_sources import evaluate_int, int_source


@dataclass(frozen=True)
class SliceWrites:
    """The writes of graph input ``input``: per write ``(dim, start, stop)``, each bound an int
    source (see :func:`fbcompile.passes.int_sources.int_source`); ``others``: the indices of the other
    inputs the graph writes (an alias of ``input`` among them makes a call's writes unloggable)."""

    input: int
    rows: tuple
    others: tuple[int, ...]

    def rows_written(self, args) -> tuple:
        """``(dim, start, stop)`` per write, evaluated on a call's arguments as the slices index (a
        negative bound counts from the end, a bound past the end is clamped)."""
        size = args[self.input].shape
        rows = []
        for dim, *bounds in self.rows:
            start, stop = (None if b is None else evaluate_int(b, args) for b in bounds)
            rows.append((dim, *slice(start, stop).indices(size[dim])[:2]))
        return tuple(rows)


def slice_writes(gm: fx.GraphModule) -> list[SliceWrites]:
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    writes: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        target = mutated_tensor(node)
        if target is not None:
            writes.setdefault(view_base(target), []).append(node)
    unseen = {view_base(a) for node in gm.graph.nodes if _writes_unseen(node) for a in node.all_input_nodes}
    written = [p for p in placeholders if p in writes or p in unseen]
    found = []
    for tensor in written:
        rows = [_slice_rows(write, tensor, placeholders) for write in writes.get(tensor, ())]
        if tensor not in unseen and all(r is not None for r in rows):
            found.append(SliceWrites(placeholders.index(tensor), tuple(rows),
                                     tuple(placeholders.index(p) for p in written if p is not tensor)))
    return found


def _writes_unseen(node: fx.Node) -> bool:
    """May ``node`` write a tensor argument in place where :func:`mutated_tensor` cannot tell: an op whose
    schema marks an argument written (a custom op), a higher-order op (a user's Triton kernel)?"""
    target = node.target
    if isinstance(target, torch._ops.HigherOrderOperator):
        return True
    if isinstance(target, torch._ops.OpOverloadPacket):
        overloads = [getattr(target, name) for name in target.overloads()]
    else:
        overloads = [target] if isinstance(target, torch._ops.OpOverload) else []
    return any(a.alias_info is not None and a.alias_info.is_write for op in overloads for a in op._schema.arguments)


def _slice_rows(write: fx.Node, tensor: fx.Node, placeholders: list[fx.Node]) -> tuple | None:
    """``(dim, start source, stop source)`` if ``write`` is ``tensor[:, ..., a:b] = value``, else None."""
    found = one_dim_slice(write.args[1]) if op_name(write) == "setitem" and write.args[0] is tensor else None
    value = tensor.meta.get("example_value")
    if found is None or not isinstance(value, torch.Tensor) or found[0] >= value.dim():
        return None
    dim, rows = found
    bounds = [int_source(b, placeholders) if b is not None else None for b in (rows.start, rows.stop)]
    if any(source is None and bound is not None for source, bound in zip(bounds, (rows.start, rows.stop))):
        return None
    return (dim, *bounds)
