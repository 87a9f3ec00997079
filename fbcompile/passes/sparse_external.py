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

A dual cache (Fast-dLLM: a prefix and a suffix of the block, merged with ``merge_lse``) is one
external part over several key ranges: their tiles are scored one range after another and selected
jointly under one budget (KV entries over the whole external part, see :func:`_tiled`); each range
attends to its own selected tiles, and the residual is the whole external part's.

Keys/values computed from the cache position-wise after the cat (RoPE over ``cat(past_k, k)``:
OLMo-style LLaDA and Dream in Fast-dLLM) would have the reuse graph recompute the transform over the
whole cache at every step. :mod:`.positionwise` proves the ops between the cached rows and the
attention position-wise (:func:`~.positionwise.positionwise_rows`); the reuse step then gathers the
selected rows of the raw cache and of every position table (cos/sin), applies the same ops to them
alone and attends densely over the result (:func:`_gathered_attention`).

Other split sites keep plain block reuse and :func:`sparse_reasons` says why: keys/values computed
in the graph in another form (a projection of the cache, a layout whose KV heads do not lead the key
dim, ...), which sparse reuse would have to recompute over the whole cache at every step.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fbcompile.config import Sparse
from fbcompile.kernels import reference
from fbcompile.ops import AttentionArgs, MergeArgs
from fbcompile.passes.graph_utils import NoExample, example, fill_examples, op_name, same_size, shape, view_base
from fbcompile.passes.positionwise import LayoutError, PositionwiseChain, positionwise_rows
from fbcompile.passes.reuse_external import (SpecializedGraph, cached_parts, copy_graph, merges, taking_cached,
                                             with_outputs)
from fbcompile.passes.split_attention import is_impure


def _ranges(merge: fx.Node) -> list[fx.Node]:
    """The ``attention_lse`` calls of a site's external part, one per cached key range, in key order
    (a dual cache merges a prefix's and a suffix's with ``merge_lse``)."""
    def calls(part: fx.Node) -> list[fx.Node]:  # part: a getitem of the call
        call = part.args[0]
        if call.target is torch.ops.fbcompile.merge_lse.default:
            return calls(call.args[0]) + calls(call.args[2])
        return [call]
    return calls(MergeArgs.of(merge).out_ext)


def _is_input(node: fx.Node) -> bool:
    return view_base(node).op in ("placeholder", "get_attr")


_BROADCASTING = {"add", "sub", "mul", "div", "truediv", "where", "maximum", "minimum"}


def _rows_chain(kv: fx.Node) -> PositionwiseChain | None:
    """None for keys/values read straight from the graph's inputs; else the position-wise ops from the
    cached rows to them (``kv``, ``[B, Hkv, n, D]``), in a form whose rows can be gathered per KV head:
    every op keeps ``[B, Hkv]`` as its leading dims and the keys at dim 2, and the cached rows and every
    position table are right-aligned to it (``cos[n, D]``, ``cos[B, 1, n, D]``), tables read through a
    broadcasting op. Raises :class:`LayoutError` otherwise."""
    if _is_input(kv):
        return None
    chain = positionwise_rows(kv, 2, _cached_rows(kv))
    lead = shape(kv)[:2]

    def gatherable(node: fx.Node, dim: int) -> None:  # what _gather_rows takes
        sizes = shape(node)
        if not (2 <= len(sizes) <= 4 and dim == len(sizes) - 2 and all(
                same_size(a, 1) or same_size(a, b) for a, b in zip(sizes[:-2], lead[4 - len(sizes):]))):
            raise LayoutError(f"'{op_name(node) or node.name}' is not laid out as [B, Hkv, keys, D]")

    gatherable(chain.cat, chain.cat_dim)
    for node, dim in chain.region.items():
        sizes = shape(node)
        if sizes is None:  # chunk / unbind: seen through their elements
            continue
        if dim != 2 or len(sizes) < 3 or _moves_lead(node) or not all(same_size(a, b) for a, b in zip(sizes[:2], lead)):
            raise LayoutError(f"'{op_name(node)}' does not keep the keys/values' [B, Hkv] dims in front of the keys")
    for (consumer, table), use in chain.uses.items():
        if use.kind == "table":
            if op_name(consumer) not in _BROADCASTING or len(shape(consumer)) != 4:
                raise LayoutError(f"a position table is read by '{op_name(consumer)}'")
            gatherable(table, use.dim)
    return chain


def _cached_rows(kv: fx.Node) -> fx.Node:
    """The input (a view of one) ``kv`` is computed from that has the most dims: the cached keys, not a
    position table or a weight (which sit beside them in the same ops, so either would do for the
    rows, but only the keys lead to every op)."""
    inputs, seen, stack = [], set(), [kv]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_input(node):
            inputs.append(node)
        else:
            stack.extend(reversed(node.all_input_nodes))
    tensors = [n for n in inputs if shape(n) is not None]
    if not tensors:
        raise LayoutError(f"'{op_name(kv)}' reads no cached keys/values")
    return max(tensors, key=lambda n: len(shape(n)))


def _moves_lead(node: fx.Node) -> bool:
    """A transpose / permute that moves dim 0 or 1 (which an equal size could hide)."""
    ndim = len(shape(node))
    if op_name(node) == "transpose":
        return bool({d % ndim for d in node.args[1:3]} & {0, 1})
    if op_name(node) == "permute":
        perm = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return [d % ndim for d in perm[:2]] != [0, 1]
    return False


def _key_length(graph: fx.Graph, kv: fx.Node):
    """The keys of an external ``kv`` (``[B, Hkv, n, D]``): an int, or the size of the cached rows it
    is computed from (a node that reads no computed tensor, so the reuse graph computes nothing for it)."""
    length = shape(kv)[2]
    if isinstance(length, int):
        return length
    chain = _rows_chain(kv)
    return graph.call_method("size", (kv, 2) if chain is None else (chain.cat, chain.cat_dim))


def sparse_reasons(gm: fx.GraphModule) -> list[str | None]:
    """Per split site (graph order), why it keeps plain block reuse (None: sparse reuse applies)."""
    reasons = []
    for merge in merges(gm.graph):
        reason = None
        for call in _ranges(merge):
            for kv in AttentionArgs.of(call)[1:3]:
                try:
                    fill_examples(kv)
                    _rows_chain(kv)
                except (LayoutError, NoExample) as error:
                    reason = (f"its external keys/values are computed in the graph ({op_name(kv) or kv.target}) "
                              f"in a form sparse reuse cannot gather: {error}")
        reasons.append(reason)
    return reasons


def _tiled(graph: fx.Graph, merge: fx.Node, sparse: Sparse) -> dict:
    """Turn the site's external ``attention_lse`` calls into ``attention_lse_tiles`` and select the tiles.

    A dual cache's ranges are selected jointly, under one budget: each range's tile mass (a share of
    its own softmax) is weighed by the range's share of the whole external softmax, summed over the
    query rows of each KV head (``sum exp(L_r - L_e)``) - exact per range, the split within a range
    follows the range's own distribution. Returns the selection (``tiles``, over the ranges' tiles
    one after another), its share of the tiles (``tiles_read``) and per range the attention's
    arguments and its own tile indices (``ranges``: ``(args, idx)``, ``-1`` = unused)."""
    calls = _ranges(merge)
    heads = merge.meta["fbcompile_heads"]
    lse_ext = MergeArgs.of(merge).lse_ext
    ranges, masses = [], []
    for call in calls:
        args = AttentionArgs.of(call)
        with graph.inserting_before(call):
            tiled = graph.call_function(torch.ops.fbcompile.attention_lse_tiles.default, (*args, sparse.tile))
        call.replace_all_uses_with(tiled)
        graph.erase_node(call)
        with graph.inserting_before(merge):
            mass = graph.call_function(operator.getitem, (tiled, 2))
            if len(calls) > 1:
                share = graph.call_function(torch.exp, (graph.call_function(operator.sub, (
                    graph.call_function(operator.getitem, (tiled, 1)), lse_ext)),))
                share = graph.call_method("sum", (graph.call_method("flatten", (graph.call_method("unflatten", (
                    graph.call_method("nan_to_num", (share, 0.0)), 1, (heads.kv, -1))), 2)), -1, True))
                mass = graph.call_function(operator.mul, (mass, share))
        ranges.append(args)
        masses.append(mass)
    with graph.inserting_before(merge):
        mass = masses[0] if len(masses) == 1 else graph.call_function(torch.cat, (masses, -1))
        tiles = graph.call_function(torch.ops.fbcompile.select_tiles.default,
                                    (mass, sparse.max_tiles, sparse.mass if sparse.mass is not None else 1.0))
        out = example(MergeArgs.of(merge).out_ext)  # [B, Hq, M, Dv]; emitted keys may have no example value
        tiles.meta["example_value"] = out.new_empty((out.shape[0], heads.kv, sparse.max_tiles), dtype=torch.int32)
        share = graph.call_function(operator.truediv, (
            graph.call_method("sum", (graph.call_function(operator.ge, (tiles, 0)),)),
            graph.call_method("numel", (mass,))))
    indices = [tiles] if len(ranges) == 1 else _range_indices(graph, merge, tiles, ranges, sparse.tile)
    return {"tiles": tiles, "tiles_read": share, "ranges": list(zip(ranges, indices))}


def _range_indices(graph: fx.Graph, merge: fx.Node, tiles: fx.Node, ranges: list, tile: int) -> list[fx.Node]:
    """Each key range's own tile indices in a joint selection over the ranges' tiles one after another."""
    indices, start = [], 0
    with graph.inserting_before(merge):
        for args in ranges:
            length = _key_length(graph, args.k)
            count = -(-length // tile) if isinstance(length, int) else graph.call_function(
                operator.floordiv, (graph.call_function(operator.add, (length, tile - 1)), tile))
            end = start + count if isinstance(start, int) and isinstance(count, int) else graph.call_function(
                operator.add, (start, count))
            inside = graph.call_function(torch.logical_and, (graph.call_function(operator.ge, (tiles, start)),
                                                             graph.call_function(operator.lt, (tiles, end))))
            indices.append(graph.call_function(torch.where, (inside, graph.call_function(operator.sub, (tiles, start)),
                                                             -1)))
            start = end
    return indices


def _selected(graph: fx.Graph, merge: fx.Node, site: dict, sparse: Sparse) -> list[tuple[fx.Node, fx.Node]]:
    """Per key range, ``(O_s, L_s)``: the site's query over the selected tiles of its external keys/values."""
    parts = []
    with graph.inserting_before(merge):
        for args, idx in site["ranges"]:
            chains = [_rows_chain(kv) for kv in (args.k, args.v)]
            if chains == [None, None]:
                call = graph.call_function(torch.ops.fbcompile.sparse_attention_lse.default, (*args, idx, sparse.tile))
            elif same_size(shape(args.k)[2], 0):  # no cached rows to gather (sizes 0 are static)
                call = graph.call_function(torch.ops.fbcompile.attention_lse.default, tuple(args))
            else:
                call = _gathered_attention(graph, args, chains, idx, sparse.tile, sparse.max_tiles * sparse.tile)
            parts.append(tuple(graph.call_function(operator.getitem, (call, i)) for i in range(2)))
    return parts


def _gathered_attention(graph: fx.Graph, args: AttentionArgs, chains: list, idx: fx.Node, tile: int,
                        rows: int) -> fx.Node:
    """``attention_lse`` of the query over the selected tiles ``idx`` of keys/values computed position-wise
    from the cached rows (``chains``, :func:`_rows_chain`; None: read as they are), e.g. RoPE after the cat::

        pos, valid = tile_keys(idx, tile, n)                   # [B, Hkv, rows] key positions
        k_sel = rope(gather(past_k, pos), gather(cos, pos), gather(sin, pos))
        O_s, L_s = fbcompile.attention_lse(q, k_sel, gather(past_v, pos), tile_mask(q, mask, pos, valid, n), scale)

    Only the selected rows are transformed, each with the tables' rows of its own position, instead
    of the whole cache. Plain torch ops: the gathered keys/values and their mask are materialised
    (``rows`` per KV head; the mask ``[B, Hq, M, rows]``) and the dense kernel reads them - correct,
    but a copy and a launch more than the gather kernel over keys read straight from the inputs."""
    length = _key_length(graph, args.k)
    keys = graph.call_function(reference.tile_keys, (idx, tile, length))
    pos, valid = (graph.call_function(operator.getitem, (keys, i)) for i in range(2))
    gather = lambda node, dim: _gather_rows(graph, node, dim, pos)  # noqa: E731
    k, v = (gather(kv, 2) if chain is None else chain.emit_rows(graph, gather(chain.cat, chain.cat_dim), gather, rows)
            for kv, chain in zip((args.k, args.v), chains))
    mask = graph.call_function(reference.tile_mask, (args.q, args.mask, pos, valid, length))
    return graph.call_function(torch.ops.fbcompile.attention_lse.default, (args.q, k, v, mask, args.scale))


def _gather_rows(graph: fx.Graph, node: fx.Node, dim: int, pos: fx.Node) -> fx.Node:
    """Rows ``pos`` (``[B, Hkv, R]``) of ``node`` along ``dim`` (its last but one, right-aligned to
    ``[B, Hkv, n, x]``), per ``[B, Hkv]`` index: ``[B, Hkv, R, x]``."""
    for _ in range(dim, 2):
        node = graph.call_method("unsqueeze", (node, 0))
    node = graph.call_method("expand", (node, graph.call_method("size", (pos, 0)),
                                        graph.call_method("size", (pos, 1)), -1, -1))
    index = graph.call_method("expand", (graph.call_method("unsqueeze", (pos, -1)), -1, -1, -1,
                                         graph.call_method("size", (node, -1))))
    return graph.call_method("gather", (node, 2, index))


def _merged(graph: fx.Graph, parts: list[tuple[fx.Node, fx.Node]]) -> tuple[fx.Node, fx.Node]:
    """One ``(O, L)`` of several over disjoint keys (``merge_lse`` in turn)."""
    merged = parts[0]
    for part in parts[1:]:
        call = graph.call_function(torch.ops.fbcompile.merge_lse.default, (*merged, *part))
        merged = tuple(graph.call_function(operator.getitem, (call, i)) for i in range(2))
    return merged


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
                with graph.inserting_before(merge):
                    selected = _merged(graph, _selected(graph, merge, site, sparse))
                parts["out_ext"], parts["lse_ext"] = _residual(graph, merge, selected)
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
            selected = _selected(graph, merge, site, sparse)
            kept = {"tiles": site["tiles"]}
            with graph.inserting_before(merge):
                external = _merged(graph, selected)
                if sparse.residual:  # the residual's nodes stand for the cached one (taking_cached)
                    residual = _residual(graph, merge, external)
                    kept.update(out_ext=residual[0], lse_ext=residual[1])
                    rest = _merged(graph, [residual, *selected[:-1]])
                    merged = graph.call_function(torch.ops.fbcompile.merge_lse.default, (*rest, *selected[-1]))
                    external = tuple(graph.call_function(operator.getitem, (merged, i)) for i in range(2))
                    if selected[-1][0].args[0].target is torch.ops.fbcompile.sparse_attention_lse.default:
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

    (a dual cache: ``K_e`` is the last key range, ``(O_r, L_r)`` the residual merged with the others').
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
