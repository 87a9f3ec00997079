"""Rewrite each splittable attention site into external + internal attention and an exact merge.

For a site whose keys are ``cat([K_e, K_i])`` (values likewise) the pass emits::

    O_e, L_e = fbcompile.attention_lse(q, K_e, V_e, mask[..., :n_e], scale)       # role "external"
    O, _     = fbcompile.attention_merge_lse(q, K_i, V_i, mask[..., n_e:], scale, O_e, L_e)

with ``K_e``/``K_i`` rebuilt as ``[B, Hkv, n, D]`` without GQA replication (see :mod:`.kv_layout`).
Several external parts (a dual cache: prefix and suffix) are combined with ``fbcompile.merge_lse``.
A site whose mask is built per key range (``site.key_mask``: flex masks, flash's causal) gets each part's
mask from it instead of a slice; a tokens-first site (flash-attn) has its query and output transposed; a
used log-sum-exp output is replaced by the merged one.
A buffer the graph writes at the block's positions splits by positions instead of ranges: the
external part is the whole buffer with those positions masked out (see :mod:`.buffer_write`).
The external ``(O_e, L_e)`` nodes carry fake example values so that later passes (reuse) can turn
them into graph inputs. The old attention and whatever only fed it are removed by DCE.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from fbcompile.passes.buffer_write import split_masks
from fbcompile.passes.find_attention import AttentionSite
from fbcompile.passes.positionwise import PositionwisePiece
from fbcompile.passes.static_cache import CacheTail, CacheWindow
from fbcompile.passes.graph_utils import example, mutated_tensor, same_size, shape


@dataclass(frozen=True)
class SiteHeads:
    """Head layout of a split site, kept in its merge node's ``meta["fbcompile_heads"]`` so that later
    passes can compute the external part for some heads only: query head ``h`` reads KV head
    ``h // (query // kv)``; ``mask_dim`` is the mask's heads dim (None: broadcast over heads)."""

    query: int
    kv: int
    mask_dim: int | None


def _external_outputs(graph: fx.Graph, node: fx.Node, like: torch.Tensor) -> tuple[fx.Node, fx.Node]:
    """``(O_e, L_e)`` of a call, with fake example values shaped after the attention output ``like``."""
    out = graph.call_function(operator.getitem, (node, 0))
    lse = graph.call_function(operator.getitem, (node, 1))
    out.meta["example_value"] = like.new_empty(like.shape)
    lse.meta["example_value"] = like.new_empty(like.shape[:-1], dtype=torch.float32)
    return out, lse


def _prepare_mask(graph: fx.Graph, site: AttentionSite) -> fx.Node | None:
    """The site's mask in the ops' convention (bool = attend, float = added to scaled scores)."""
    mask = site.mask
    if mask is None:
        return None
    if site.mask_kind == "masked_fill":
        prepared = graph.call_function(torch.logical_not, (mask,))
    elif site.mask_kind == "additive" and site.mask_scale != 1.0:
        prepared = graph.call_function(operator.mul, (mask, site.mask_scale))
    else:
        return mask
    prepared.meta.update(mask.meta)  # same shape; _key_slice reads it
    return prepared


def _key_slice(graph: fx.Graph, site: AttentionSite, mask: fx.Node | None, start, length):
    if site.key_mask is not None:
        return site.key_mask.emit(graph, start, length)
    if mask is None or same_size(shape(mask)[-1], 1):  # no mask, or one broadcast over the keys
        return mask
    return graph.call_method("narrow", (mask, -1, start, length))


def _internal_mask(graph: fx.Graph, site: AttentionSite, mask, starts: list, lengths: list):
    """The mask over the block's keys: one slice per run of adjacent internal parts (the block and,
    after a dual cache's suffix, zero padding), joined along the keys like the parts themselves."""
    runs: list[list[int]] = []
    for i in site.internal:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    slices = []
    for run in runs:
        length = lengths[run[0]]
        for i in run[1:]:
            length = graph.call_function(operator.add, (length, lengths[i]))
        slices.append(_key_slice(graph, site, mask, starts[run[0]], length))
    if len(slices) == 1 or all(m is slices[0] for m in slices):  # one run, or a mask broadcast over keys
        return slices[0]
    return graph.call_function(torch.cat, (slices, -1))


def _heads(site: AttentionSite) -> SiteHeads:
    mask_dim = None
    if site.key_mask is not None:
        mask_dim = 1 if site.key_mask.per_head else None
    elif site.mask is not None:
        mask_shape = shape(site.mask)
        if len(mask_shape) >= 3 and not same_size(mask_shape[-3], 1):
            mask_dim = len(mask_shape) - 3
    return SiteHeads(query=site.query_heads(), kv=site.kv_heads(), mask_dim=mask_dim)


def _key_ranges(graph: fx.Graph, k_layout) -> tuple[list, list]:
    """Where each cat operand starts along the keys, and its length (ints or emitted nodes)."""
    starts, lengths, offset = [], [], 0
    for i, piece in enumerate(k_layout.pieces):
        length = k_layout.piece_length(i)
        if isinstance(piece, (CacheWindow, CacheTail, PositionwisePiece)):
            length = piece.emit_length(graph)
        elif not isinstance(length, int):
            length = graph.call_method("size", (piece, k_layout.cat_dim))
        starts.append(offset)
        lengths.append(length)
        offset = length if offset == 0 else graph.call_function(operator.add, (offset, length))
    return starts, lengths


def _rewrite_site(graph: fx.Graph, site: AttentionSite) -> None:
    k_layout, v_layout = site.k_layout, site.v_layout
    scale = site.scale if site.scale is not None else 1.0 / math.sqrt(shape(site.q)[-1])
    with graph.inserting_before(site.node):
        query = graph.call_method("transpose", (site.q, 1, 2)) if site.tokens_first else site.q
        mask = _prepare_mask(graph, site)
        writes = site.buffer_writes()
        if writes:  # [buffer without the written positions, the written positions]
            masks = split_masks(graph, writes[0], mask)
        else:
            starts, lengths = _key_ranges(graph, k_layout)

        def canonical(i):
            return (k_layout.emit_canonical(graph, k_layout.pieces[i]),
                    v_layout.emit_canonical(graph, v_layout.pieces[i]))

        out_ext = lse_ext = None
        original = example(site.node)
        if site.tokens_first:
            original = original.transpose(1, 2)
        like = original.new_empty(original.shape, dtype=example(site.q).dtype)
        for i in site.external:
            k, v = canonical(i)
            mask_ext = masks[0] if writes else _key_slice(graph, site, mask, starts[i], lengths[i])
            part = graph.call_function(torch.ops.fbcompile.attention_lse.default, (query, k, v, mask_ext, scale))
            o, lse = _external_outputs(graph, part, like)
            if out_ext is not None:
                merged = graph.call_function(torch.ops.fbcompile.merge_lse.default, (out_ext, lse_ext, o, lse))
                o, lse = _external_outputs(graph, merged, like)
            out_ext, lse_ext = o, lse

        parts = [canonical(i) for i in site.internal]
        k_int = parts[0][0] if len(parts) == 1 else graph.call_function(torch.cat, ([p[0] for p in parts], 2))
        v_int = parts[0][1] if len(parts) == 1 else graph.call_function(torch.cat, ([p[1] for p in parts], 2))
        mask_int = masks[1] if writes else _internal_mask(graph, site, mask, starts, lengths)
        result = graph.call_function(torch.ops.fbcompile.attention_merge_lse.default,
                                     (query, k_int, v_int, mask_int, scale, out_ext, lse_ext))
        result.meta["fbcompile_heads"] = _heads(site)
        out = graph.call_function(operator.getitem, (result, 0))
        if site.tokens_first:
            out = graph.call_method("transpose", (out, 1, 2))
        dtype = example(site.node).dtype
        if dtype != example(site.q).dtype:
            out = graph.call_method("to", (out, dtype))
        if site.lse is not None:
            lse = graph.call_function(operator.getitem, (result, 1))
            if site.lse_factor != 1.0:
                lse = graph.call_function(operator.mul, (lse, site.lse_factor))
            site.lse.replace_all_uses_with(lse)
    site.node.replace_all_uses_with(out)


_VMAP_NESTING = {"_vmap_increment_nesting", "_vmap_decrement_nesting"}


def is_impure(node: fx.Node) -> bool:
    """Kept by DCE: side effects, in-place writes, and the brackets of a vmap region that dynamo inlined
    (flex_attention without a BlockMask builds one; its in-place writes keep the region alive)."""
    return (node.is_impure() or mutated_tensor(node) is not None
            or (node.op == "call_function" and getattr(node.target, "__name__", None) in _VMAP_NESTING))


def split_attention(gm: fx.GraphModule, sites: list[AttentionSite]) -> int:
    """Rewrite every splittable site of ``gm`` in place; returns how many were rewritten."""
    rewritten = 0
    for site in sites:
        if site.splittable:
            _rewrite_site(gm.graph, site)
            rewritten += 1
    if rewritten:
        gm.graph.eliminate_dead_code(is_impure_node=is_impure)
        gm.graph.lint()
        gm.recompile()
    return rewritten
