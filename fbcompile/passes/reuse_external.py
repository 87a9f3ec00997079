"""Specialise a split graph into a *refresh* graph and a *reuse* graph.

In a split graph every site ends in::

    O, _ = fbcompile.attention_merge_lse(q, K_i, V_i, mask_i, scale, O_e, L_e)

* refresh graph: the split graph with every site's ``(O_e, L_e)`` appended to the outputs, so the
  caller can keep them;
* reuse graph: every ``(O_e, L_e)`` replaced by a new graph input (placed after the original
  inputs, in site order) and dead code removed, so the external attention - and the read of the
  cached keys/values, unless the graph also returns them - is gone; with a reuse plan, the external
  part of chosen KV heads is recomputed on narrowed views and written over the cached one;
* probe graph (fidelity measurements): the split graph also returning, per site, ``(O_e, L_e)``
  and the internal part alone ``(O_i, L_i)``, so reuse can be simulated beside the exact result.

:func:`taking_cached` is the reuse graph's core, shared with :mod:`.sparse_external` (whose sites
cache the selected KV tiles and a residual instead). Each builder returns a :class:`SpecializedGraph`:
the graph and an :class:`OutputLayout` naming its extra outputs per site (and the cached parts a
reuse graph takes), so the runtime never counts positions.
"""
from __future__ import annotations

import operator

from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch
import torch.fx as fx

from fbcompile.ops import AttentionArgs, MergeArgs
from fbcompile.passes.split_attention import SiteHeads, is_impure


@dataclass(frozen=True)
class SiteSlots:
    """Where one site's parts are among a built graph's outputs (None: not returned)."""

    out_ext: int | None = None   # O_e, the external attention output
    lse_ext: int | None = None   # L_e, its log-sum-exp
    query: int | None = None     # the site's query (the "adaptive" policy's reference)
    out_int: int | None = None   # O_i, the internal part alone (probe graphs)
    lse_int: int | None = None
    tiles: int | None = None     # sparse reuse: the KV tiles selected at the refresh (int32 [B, Hkv, S])
    tiles_read: int | None = None  # sparse reuse: the share of the external KV tiles selected (0-dim)


class SiteParts(NamedTuple):
    """One site's parts of a call's outputs, by name (None: the graph does not return it)."""

    out_ext: torch.Tensor | None = None
    lse_ext: torch.Tensor | None = None
    query: torch.Tensor | None = None
    out_int: torch.Tensor | None = None
    lse_int: torch.Tensor | None = None
    tiles: torch.Tensor | None = None
    tiles_read: torch.Tensor | None = None


@dataclass(frozen=True)
class OutputLayout:
    """A built graph's outputs: the original graph's ``user`` outputs first, then the parts of
    every site (:class:`SiteSlots`, graph order) and, in a reuse graph with a query reference, one
    vector of per-site query drifts."""

    user: int
    sites: tuple[SiteSlots, ...]
    drift: int | None = None

    @cached_property
    def user_only(self) -> bool:
        """The graph returns nothing beyond the original outputs."""
        return self.drift is None and all(slots == SiteSlots() for slots in self.sites)

    def user_outputs(self, outputs) -> tuple:
        return tuple(outputs[: self.user])

    @cached_property
    def kept(self) -> set[int]:
        """Indices of the outputs beyond the user's that the dispatcher keeps (every site part; not the drift)."""
        return {i for indices in self._indices for i in indices if i >= 0}

    def parts(self, outputs) -> list[SiteParts]:
        padded = (*outputs, None)  # index -1: a part the graph does not return
        return [SiteParts._make(map(padded.__getitem__, indices)) for indices in self._indices]

    @cached_property
    def _indices(self) -> list[tuple]:
        """Per site, the output index of each SiteParts field (-1: absent)."""
        return [tuple(-1 if getattr(slots, name) is None else getattr(slots, name) for name in SiteParts._fields)
                for slots in self.sites]


@dataclass
class SpecializedGraph:
    """A graph built from a split graph, with what its extra inputs and outputs are."""

    gm: fx.GraphModule
    outputs: OutputLayout
    cached_inputs: tuple[tuple[str, ...], ...] = ()  # per site (graph order), the cached parts it
    #                                                  takes, by SiteParts name, after the original inputs
    cached_examples: list = field(default_factory=list)  # their example values (for compiling)


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def site_heads(graph: fx.Graph) -> list[SiteHeads]:
    """Head layout of every split site, in graph order."""
    return [m.meta["fbcompile_heads"] for m in merges(graph)]


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _append_outputs(outputs: list, per_site: list[dict]) -> tuple[SiteSlots, ...]:
    """Append each site's named nodes to ``outputs``; returns where they went."""
    slots = []
    for named in per_site:
        slots.append(SiteSlots(**{name: len(outputs) + i for i, name in enumerate(named)}))
        outputs += named.values()
    return tuple(slots)


def with_outputs(gm: fx.GraphModule, per_site: list[dict]) -> SpecializedGraph:
    """``gm`` also returning, per site, the named nodes of ``per_site``."""
    output = _output_node(gm.graph)
    outputs = list(output.args[0])
    user = len(outputs)
    slots = _append_outputs(outputs, per_site)
    output.args = (tuple(outputs),)
    gm.recompile()
    return SpecializedGraph(gm, OutputLayout(user=user, sites=slots))


def merges(graph: fx.Graph) -> list[fx.Node]:
    """The ``attention_merge_lse`` call of every split site, in graph order."""
    merge = torch.ops.fbcompile.attention_merge_lse.default
    return [n for n in graph.nodes if n.op == "call_function" and n.target is merge]


_CACHED = ("out_ext", "lse_ext", "query")  # the SiteParts the runtime keeps per site


def cached_parts(merge: fx.Node, with_query: bool) -> dict:
    """The nodes of a site whose values the runtime keeps: ``O_e``, ``L_e`` (and the query)."""
    args = MergeArgs.of(merge)
    return dict(zip(_CACHED, (args.out_ext, args.lse_ext, args.q)[: 3 if with_query else 2]))


def exact_graph(gm: fx.GraphModule) -> SpecializedGraph:
    """The split graph as it is: only the original outputs."""
    return SpecializedGraph(gm, OutputLayout(user=len(_output_node(gm.graph).args[0]), sites=()))


def refresh_graph(gm: fx.GraphModule, with_query: bool = False) -> SpecializedGraph:
    """A copy of ``gm`` that also returns every site's ``(O_e, L_e)`` (and the query, ``with_query``)."""
    gm = copy_graph(gm)
    return with_outputs(gm, [cached_parts(m, with_query) for m in merges(gm.graph)])


def probe_graph(gm: fx.GraphModule) -> SpecializedGraph:
    """A copy of ``gm`` that also returns ``(O_e, L_e, O_i, L_i, q)`` per site."""
    gm = copy_graph(gm)
    per_site = []
    for node in merges(gm.graph):
        args = MergeArgs.of(node)
        with gm.graph.inserting_after(node):
            internal = gm.graph.call_function(torch.ops.fbcompile.attention_lse.default,
                                              (args.q, args.k, args.v, args.mask, args.scale))
        with gm.graph.inserting_after(internal):
            out_int, lse_int = (gm.graph.call_function(operator.getitem, (internal, i)) for i in range(2))
        per_site.append({**cached_parts(node, with_query=True), "out_int": out_int, "lse_int": lse_int})
    return with_outputs(gm, per_site)


def reuse_graph(gm: fx.GraphModule, with_query: bool = False,
                recompute: list[list[tuple[int, int]]] | None = None) -> SpecializedGraph:
    """A copy of ``gm`` taking every ``(O_e, L_e)`` as inputs (after the original ones, per site).

    ``with_query``: each site also takes the query of its refresh step, and the graph returns one
    more output, the relative change of each site's query since then (the "adaptive" policy's
    drift signal, computed on the device; a vector in site order).
    ``recompute``: per site, ranges ``[start, end)`` of KV heads whose external part is computed
    afresh (with the query heads that read them) and written over the cached one; the graph returns
    the updated ``(O_e, L_e)`` of those sites. Ranges covering every KV head keep the site's full
    external attention (a per-layer "recompute").
    """
    gm = copy_graph(gm)
    return taking_cached(gm, [cached_parts(m, with_query) for m in merges(gm.graph)], recompute)


def taking_cached(gm: fx.GraphModule, cached: list[dict], recompute: list[list[tuple[int, int]]] | None = None
                  ) -> SpecializedGraph:
    """``gm``, changed in place, taking each site's ``cached`` nodes (by SiteParts name) as inputs.

    Every use of a cached node becomes a use of its input, except the query's (``"query"``: the
    refresh step's query, the reference of the drift output); then dead code (the computation of
    the cached parts) is removed. See :func:`reuse_graph` for ``recompute``.
    """
    graph = gm.graph
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    examples, drifts, updates = [], [], []
    for site, (merge, parts) in enumerate(zip(merges(graph), cached)):
        inputs = {}
        for role, node in parts.items():
            with graph.inserting_after(last_placeholder):
                inp = graph.placeholder(f"cached_{role}_{site}")
            inp.meta.update(node.meta)
            examples.append(node.meta.get("example_value"))
            last_placeholder = inputs[role] = inp
        if "query" in parts:
            drifts.append((parts["query"], inputs["query"]))
        ranges = recompute[site] if recompute else []
        heads = merge.meta["fbcompile_heads"]
        if ranges == [(0, heads.kv)]:
            fresh = (parts["out_ext"], parts["lse_ext"])
        else:
            for role, node in parts.items():
                if role != "query":
                    node.replace_all_uses_with(inputs[role])
            fresh = (inputs.get("out_ext"), inputs.get("lse_ext"))
            for start, end in ranges:
                with graph.inserting_before(merge):
                    fresh = _recompute_heads(graph, parts["out_ext"], heads, start, end, fresh)
            if ranges:
                merge.args = MergeArgs.of(merge).with_external(*fresh)
        updates.append(dict(zip(("out_ext", "lse_ext"), fresh)) if ranges else {})
    output = _output_node(graph)
    outputs = list(output.args[0])
    user = len(outputs)
    slots = _append_outputs(outputs, updates)
    drift = None
    if drifts:
        with graph.inserting_before(output):
            ratios = []
            for query, reference in drifts:
                change = graph.call_method("norm", (graph.call_method("float", (
                    graph.call_function(operator.sub, (query, reference)),)),))
                scale = graph.call_method("clamp_min", (graph.call_method("norm", (
                    graph.call_method("float", (reference,)),)), 1e-30))
                ratios.append(graph.call_function(operator.truediv, (change, scale)))
            drift = len(outputs)
            outputs.append(graph.call_function(torch.stack, (ratios,)))
    output.args = (tuple(outputs),)
    graph.eliminate_dead_code(is_impure_node=is_impure)
    graph.lint()
    gm.recompile()
    return SpecializedGraph(gm, OutputLayout(user=user, sites=slots, drift=drift),
                            cached_inputs=tuple(tuple(parts) for parts in cached), cached_examples=examples)


def _recompute_heads(graph: fx.Graph, external_out: fx.Node, heads, start: int, end: int,
                     cached: list) -> tuple[fx.Node, fx.Node]:
    """``cached`` ``(O_e, L_e)`` with KV heads ``[start, end)`` (and their query heads) computed afresh.

    The external part is re-emitted from its ``attention_lse`` calls (and the ``merge_lse`` of a dual
    cache) on ``narrow``-ed query, keys, values and mask - views, so only those heads' KV is read.
    """
    group = heads.query // heads.kv
    q_start, q_len = start * group, (end - start) * group
    lse_op, merge_op = torch.ops.fbcompile.attention_lse.default, torch.ops.fbcompile.merge_lse.default
    emitted = {}

    def emit(node):
        if node not in emitted:
            if node.target is operator.getitem:
                emitted[node] = graph.call_function(operator.getitem, (emit(node.args[0]), node.args[1]))
            elif node.target is merge_op:
                emitted[node] = graph.call_function(merge_op, tuple(emit(a) for a in node.args))
            elif node.target is lse_op:
                q, k, v, mask, scale = AttentionArgs.of(node)
                narrow = lambda t, dim, a, n: graph.call_method("narrow", (t, dim, a, n))  # noqa: E731
                if mask is not None and heads.mask_dim is not None:
                    mask = narrow(mask, heads.mask_dim, q_start, q_len)
                emitted[node] = graph.call_function(lse_op, (
                    narrow(q, 1, q_start, q_len), narrow(k, 1, start, end - start),
                    narrow(v, 1, start, end - start), mask, scale))
            else:
                raise ValueError(f"unexpected node {node.format_node()} in an external attention")
        return emitted[node]

    part = emit(external_out.args[0])  # the getitem's source: the external attention (or merge) call
    span = {"dim": 1, "start": q_start, "end": q_start + q_len}
    return tuple(graph.call_function(torch.slice_scatter, (old, graph.call_function(operator.getitem, (part, i))), span)
                 for i, old in enumerate(cached))
