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
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fbcompile.passes.split_attention import SiteHeads, is_impure


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def external_results(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """``(O_e, L_e)`` of every split site, in graph order."""
    merge = torch.ops.fbcompile.attention_merge_lse.default
    return [(n.args[5], n.args[6]) for n in graph.nodes if n.op == "call_function" and n.target is merge]


def site_heads(graph: fx.Graph) -> list[SiteHeads]:
    """Head layout of every split site, in graph order."""
    return [m.meta["fbcompile_heads"] for m in _merges(graph)]


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _with_outputs(gm: fx.GraphModule, extra) -> tuple[fx.GraphModule, int]:
    output = _output_node(gm.graph)
    outputs = tuple(output.args[0])
    output.args = (outputs + tuple(extra),)
    gm.recompile()
    return gm, len(outputs)


def _merges(graph: fx.Graph) -> list[fx.Node]:
    merge = torch.ops.fbcompile.attention_merge_lse.default
    return [n for n in graph.nodes if n.op == "call_function" and n.target is merge]


def refresh_graph(gm: fx.GraphModule, with_query: bool = False) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` that also returns every ``(O_e, L_e)`` (and the query, ``with_query``);
    returns it and the original output count."""
    gm = _copy(gm)
    extra = [n for m in _merges(gm.graph) for n in (m.args[5], m.args[6], m.args[0])[: 3 if with_query else 2]]
    return _with_outputs(gm, extra)


def probe_graph(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` that also returns ``(O_e, L_e, O_i, L_i, q)`` per site; and the original output count."""
    gm = _copy(gm)
    extra = []
    for node in _merges(gm.graph):
        with gm.graph.inserting_after(node):
            internal = gm.graph.call_function(torch.ops.fbcompile.attention_lse.default, node.args[:5])
        with gm.graph.inserting_after(internal):
            parts = [gm.graph.call_function(operator.getitem, (internal, i)) for i in range(2)]
        extra += [node.args[5], node.args[6], *parts, node.args[0]]
    return _with_outputs(gm, extra)


def reuse_graph(gm: fx.GraphModule, with_query: bool = False,
                recompute: list[list[tuple[int, int]]] | None = None) -> tuple[fx.GraphModule, list, list[int]]:
    """A copy of ``gm`` taking every ``(O_e, L_e)`` as inputs; returns it, their example values and
    the sites whose external part it (partly) recomputes.

    ``with_query``: each site also takes the query of its refresh step, and the graph returns one
    more output, the largest relative change of a site's query since then (the "adaptive" policy's
    drift signal, computed on the device).
    ``recompute``: per site, ranges ``[start, end)`` of KV heads whose external part is computed
    afresh (with the query heads that read them) and written over the cached one; the graph returns
    the updated ``(O_e, L_e)`` of those sites after the original outputs. Ranges covering every KV
    head keep the site's full external attention (a per-layer "recompute").
    """
    gm = _copy(gm)
    graph = gm.graph
    last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
    examples, drifts, updated, updates = [], [], [], []
    for site, merge in enumerate(_merges(graph)):
        nodes = (merge.args[5], merge.args[6], merge.args[0])[: 3 if with_query else 2]
        inputs = []
        for role, node in zip(("out", "lse", "query"), nodes):
            with graph.inserting_after(last_placeholder):
                inp = graph.placeholder(f"cached_external_{role}_{site}")
            inp.meta.update(node.meta)
            examples.append(node.meta.get("example_value"))
            last_placeholder = inp
            inputs.append(inp)
        if with_query:
            drifts.append((nodes[2], inputs[2]))
        ranges = recompute[site] if recompute else []
        heads = merge.meta["fbcompile_heads"]
        if ranges == [(0, heads.kv)]:
            fresh = (nodes[0], nodes[1])
        else:
            fresh = inputs[:2]
            for start, end in ranges:
                with graph.inserting_before(merge):
                    fresh = _recompute_heads(graph, nodes[0], heads, start, end, fresh)
            merge.args = merge.args[:5] + tuple(fresh)
        if ranges:
            updated.append(site)
            updates += fresh
    output = _output_node(graph)
    extra = list(updates)
    if drifts:
        with graph.inserting_before(output):
            ratios = []
            for query, reference in drifts:
                change = graph.call_method("norm", (graph.call_method("float", (
                    graph.call_function(operator.sub, (query, reference)),)),))
                scale = graph.call_method("clamp_min", (graph.call_method("norm", (
                    graph.call_method("float", (reference,)),)), 1e-30))
                ratios.append(graph.call_function(operator.truediv, (change, scale)))
            extra.append(graph.call_method("amax", (graph.call_function(torch.stack, (ratios,)),)))
    output.args = (tuple(output.args[0]) + tuple(extra),)
    graph.eliminate_dead_code(is_impure_node=is_impure)
    graph.lint()
    gm.recompile()
    return gm, examples, updated


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
                q, k, v, mask, scale = node.args
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
