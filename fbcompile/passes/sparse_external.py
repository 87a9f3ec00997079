"""Sparse external attention guided by the refresh step (MAGE), with FlashBlock residual reuse.

Builds the refresh and reuse graphs of a split graph for ``Config(sparse=Sparse(...))``. At a split
site whose external part is one ``attention_lse`` over keys/values read straight from the graph's
inputs, the refresh graph computes::

    O_e, L_e, mass = fbcompile.attention_lse_tiles(q, K_e, V_e, mask_e, scale, tile)  # + mass per KV tile
    tiles = fbcompile.select_tiles(mass, max_tiles, target)                         # per KV head
    O_s, L_s = fbcompile.sparse_attention_lse(q, K_e, V_e, mask_e, scale, tiles, tile)
    O_r, L_r = fbcompile.subtract_lse(O_e, L_e, O_s, L_s)    # the residual: the other tiles
    O, _ = fbcompile.attention_merge_lse(q, K_i, V_i, mask_i, scale, O_e, L_e)      # exact, as before

and returns ``tiles`` and ``(O_r, L_r)``; the reuse graph takes them as inputs and computes::

    O_s, L_s = fbcompile.sparse_attention_lse(q, K_e, V_e, mask_e, scale, tiles, tile)  # current K_e
    O_x, L_x = fbcompile.merge_lse(O_r, L_r, O_s, L_s)
    O, _ = fbcompile.attention_merge_lse(q, K_i, V_i, mask_i, scale, O_x, L_x)

as one op, ``fbcompile.sparse_attention_merge_lse`` (:func:`_fuse_reuse_step`).

Without residual reuse (plain MAGE) the refresh returns ``(O_e, L_e)`` in place of the residual
(the guards' reference; the reuse graph does not take it) and the reuse graph merges ``(O_s, L_s)``
alone. Budget 0 selects nothing (``"block"`` mode); all tiles leave an empty residual (exact).

Other split sites keep plain block reuse (:func:`sparse_reasons` says why): an external part merged
from several key ranges (a dual cache), or keys/values the graph computes (a projection, RoPE, a
cast) - the reuse graph would recompute them over the whole cache at every step.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fbcompile.config import Sparse
from fbcompile.ops import AttentionArgs, MergeArgs
from fbcompile.passes.graph_utils import example, op_name, view_base
from fbcompile.passes.reuse_external import (SpecializedGraph, cached_parts, copy_graph, merges, taking_cached,
                                             with_outputs)
from fbcompile.passes.split_attention import is_impure


def _external_call(merge: fx.Node) -> fx.Node:
    """The call computing a site's ``(O_e, L_e)``: ``attention_lse``, or a dual cache's ``merge_lse``."""
    return MergeArgs.of(merge).out_ext.args[0]


def sparse_reasons(gm: fx.GraphModule) -> list[str | None]:
    """Per split site (graph order), why it keeps plain block reuse (None: sparse reuse applies)."""
    reasons = []
    for merge in merges(gm.graph):
        call = _external_call(merge)
        reason = None
        if call.target is not torch.ops.fbcompile.attention_lse.default:
            reason = "its external part merges several key ranges (dual cache)"
        else:
            for kv in AttentionArgs.of(call)[1:3]:
                base = view_base(kv)
                if base.op not in ("placeholder", "get_attr"):
                    reason = (f"its external keys/values are computed in the graph ({op_name(base) or base.target}), "
                              "which sparse reuse would redo over the whole cache at every step")
                    break
        reasons.append(reason)
    return reasons


def _tiled(graph: fx.Graph, merge: fx.Node, sparse: Sparse) -> dict:
    """Turn the site's external ``attention_lse`` into ``attention_lse_tiles`` and select the tiles.

    Returns the nodes of the selection (``tiles``), its share of the tiles (``tiles_read``) and, for
    :func:`_selected`, the attention's arguments (``args``)."""
    call = _external_call(merge)
    args = AttentionArgs.of(call)
    with graph.inserting_before(call):
        tiled = graph.call_function(torch.ops.fbcompile.attention_lse_tiles.default, (*args, sparse.tile))
    call.replace_all_uses_with(tiled)
    graph.erase_node(call)
    with graph.inserting_before(merge):
        mass = graph.call_function(operator.getitem, (tiled, 2))
        tiles = graph.call_function(torch.ops.fbcompile.select_tiles.default,
                                    (mass, sparse.max_tiles, sparse.mass if sparse.mass is not None else 1.0))
        out = example(MergeArgs.of(merge).out_ext)  # [B, Hq, M, Dv]; emitted keys may have no example value
        tiles.meta["example_value"] = out.new_empty((out.shape[0], merge.meta["fbcompile_heads"].kv, sparse.max_tiles),
                                                    dtype=torch.int32)
        share = graph.call_function(operator.truediv, (
            graph.call_method("sum", (graph.call_function(operator.ge, (tiles, 0)),)),
            graph.call_method("numel", (mass,))))
    return {"tiles": tiles, "tiles_read": share, "args": args}


def _selected(graph: fx.Graph, merge: fx.Node, site: dict, sparse: Sparse) -> tuple[fx.Node, fx.Node]:
    """``(O_s, L_s)``: the site's query over the selected tiles of its external keys/values."""
    with graph.inserting_before(merge):
        call = graph.call_function(torch.ops.fbcompile.sparse_attention_lse.default,
                                   (*site["args"], site["tiles"], sparse.tile))
        return tuple(graph.call_function(operator.getitem, (call, i)) for i in range(2))


def _residual(graph: fx.Graph, merge: fx.Node, selected: tuple) -> tuple[fx.Node, fx.Node]:
    """``(O_r, L_r)``: the external attention over the tiles not selected, ``O_r`` in ``O_e``'s dtype."""
    external = MergeArgs.of(merge)
    with graph.inserting_before(merge):
        call = graph.call_function(torch.ops.fbcompile.subtract_lse.default,
                                   (external.out_ext, external.lse_ext, *selected))
        out = graph.call_method("to", (graph.call_function(operator.getitem, (call, 0)),
                                       example(external.out_ext).dtype))
        lse = graph.call_function(operator.getitem, (call, 1))
    out.meta["example_value"] = example(external.out_ext)
    lse.meta["example_value"] = example(external.lse_ext)
    return out, lse


def sparse_refresh_graph(gm: fx.GraphModule, sparse: Sparse, reasons: list, with_query: bool = False
                         ) -> SpecializedGraph:
    """A copy of ``gm`` that also returns, per sparse site, the selected tiles, their share and the
    residual (without residual reuse: ``(O_e, L_e)``); other sites' parts as :func:`refresh_graph`."""
    gm = copy_graph(gm)
    graph = gm.graph
    per_site = []
    for merge, reason in zip(merges(graph), reasons):
        parts = cached_parts(merge, with_query)
        if reason is None:
            site = _tiled(graph, merge, sparse)
            if sparse.residual:
                parts["out_ext"], parts["lse_ext"] = _residual(graph, merge, _selected(graph, merge, site, sparse))
            parts.update(tiles=site["tiles"], tiles_read=site["tiles_read"])
        per_site.append(parts)
    return with_outputs(gm, per_site)


def sparse_reuse_graph(gm: fx.GraphModule, sparse: Sparse, reasons: list, with_query: bool = False
                       ) -> SpecializedGraph:
    """A copy of ``gm`` where each sparse site attends to its cached tiles of the current external
    keys/values and merges the cached residual (if kept); other sites as :func:`reuse_graph`."""
    gm = copy_graph(gm)
    graph = gm.graph
    cached, fusable = [], []
    for merge, reason in zip(merges(graph), reasons):
        parts = cached_parts(merge, with_query)
        if reason is None:
            site = _tiled(graph, merge, sparse)
            external = _selected(graph, merge, site, sparse)
            kept = {"tiles": site["tiles"]}
            if sparse.residual:
                residual = _residual(graph, merge, external)
                kept.update(out_ext=residual[0], lse_ext=residual[1])
                with graph.inserting_before(merge):
                    merged = graph.call_function(torch.ops.fbcompile.merge_lse.default, (*residual, *external))
                    external = tuple(graph.call_function(operator.getitem, (merged, i)) for i in range(2))
                fusable.append((merge, merged))
            merge.args = MergeArgs.of(merge).with_external(*external)
            parts = {**kept, **({"query": parts["query"]} if with_query else {})}
        cached.append(parts)
    reuse = taking_cached(gm, cached)
    for merge, merged in fusable:
        _fuse_reuse_step(graph, merge, merged)
    if fusable:
        graph.eliminate_dead_code(is_impure_node=is_impure)
        graph.lint()
        gm.recompile()
    return reuse


def _fuse_reuse_step(graph: fx.Graph, merge: fx.Node, merged: fx.Node) -> None:
    """One op for a sparse site's whole reuse step (on CUDA one kernel instead of four launches)::

        O_s, L_s = fbcompile.sparse_attention_lse(q, K_e, V_e, mask_e, scale, tiles, tile)
        O_x, L_x = fbcompile.merge_lse(O_r, L_r, O_s, L_s)
        O, L = fbcompile.attention_merge_lse(q, K_i, V_i, mask_i, scale, O_x, L_x)
    ->
        O, L = fbcompile.sparse_attention_merge_lse(q, K_e, V_e, mask_e, scale, tiles, tile, K_i, V_i, mask_i, O_r, L_r)
    """
    out_res, lse_res, out_sel, _ = merged.args
    q, k, v, mask, scale, tiles, tile = out_sel.args[0].args
    block = MergeArgs.of(merge)
    with graph.inserting_before(merge):
        fused = graph.call_function(torch.ops.fbcompile.sparse_attention_merge_lse.default, (
            q, k, v, mask, scale, tiles, tile, block.k, block.v, block.mask, out_res, lse_res))
    fused.meta.update(merge.meta)
    merge.replace_all_uses_with(fused)
    graph.erase_node(merge)
