"""Compute both parts of a split attention in one op where a graph computes the external part itself.

A refresh (or exact) graph computes a split site's external part and merges the block's own part
into it (:mod:`.split_attention`)::

    ext = torch.ops.fbcompile.attention_lse(q, K_e, V_e, mask_e, scale[, key_count])
    O_e, L_e = ext[0], ext[1]                                  # also returned, for the cache
    O, L = torch.ops.fbcompile.attention_merge_lse(q, K_i, V_i, mask_i, scale, O_e, L_e)

and this pass makes it::

    both = torch.ops.fbcompile.attention_refresh_lse(q, K_e, V_e, mask_e, scale, K_i, V_i, mask_i, key_count)
    O, L, O_e, L_e = both[0], both[1], both[2], both[3]

On the Triton kernels the block's keys then take one more split program of the external launch and
its split reduction merges: one launch fewer per site and step (exact mode refreshes at every step).
Elsewhere the op is the two ops it replaces. Reuse graphs take ``(O_e, L_e)`` as inputs and have no
such pair. Run last: the passes before it match the two ops.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

_EXTERNAL = torch.ops.fbcompile.attention_lse.default
_MERGE = torch.ops.fbcompile.attention_merge_lse.default
REFRESH = torch.ops.fbcompile.attention_refresh_lse.default


def _external_of(merge: fx.Node) -> fx.Node | None:
    """The ``attention_lse`` call whose ``(O_e, L_e)`` ``merge`` takes, if its outputs are read only
    through ``getitem`` and it attends the same query at the same scale."""
    out_e, lse_e = merge.args[5:7]
    if not all(isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem
               for n in (out_e, lse_e)):
        return None
    ext = out_e.args[0]
    if lse_e.args[0] is not ext or (out_e.args[1], lse_e.args[1]) != (0, 1):
        return None
    if ext.op != "call_function" or ext.target is not _EXTERNAL:
        return None
    if ext.args[0] is not merge.args[0] or ext.args[4] != merge.args[4]:
        return None
    if any(user.target is not operator.getitem for user in ext.users):
        return None
    return ext


def _place(ext: fx.Node, merge: fx.Node, order: dict) -> fx.Node | None:
    """The node after which the joint call can go: after everything it reads, before everything that
    reads either call's outputs (``None`` if there is no such place)."""
    placeholders = [n for n in order if n.op == "placeholder"]
    inputs = [a for a in (*ext.args, *merge.args[1:4]) if isinstance(a, fx.Node)] + placeholders[-1:]
    readers = [u for item in ext.users for u in item.users if u is not merge] + list(merge.users)
    after = max(inputs, key=order.__getitem__)
    if readers and order[after] >= min(order[u] for u in readers):
        return None
    return after


def fuse_refresh_attention(gm: fx.GraphModule) -> list[str]:
    """Rewrite each matching pair of ``gm`` in place (see the module docstring); returns the names of the
    merges replaced."""
    graph = gm.graph
    fused = []
    for merge in [n for n in graph.nodes if n.op == "call_function" and n.target is _MERGE]:
        ext = _external_of(merge)
        if ext is None:
            continue
        order = {node: i for i, node in enumerate(graph.nodes)}
        after = _place(ext, merge, order)
        if after is None:
            continue
        q, k, v, mask, scale = ext.args[:5]
        key_count = ext.args[5] if len(ext.args) > 5 else None
        with graph.inserting_after(after):
            both = graph.call_function(REFRESH, (q, k, v, mask, scale, *merge.args[1:4], key_count))
        with graph.inserting_after(both):
            parts = {index: graph.call_function(operator.getitem, (both, 2 + index)) for index in (1, 0)}
        merge.replace_all_uses_with(both)  # its getitems 0 and 1 are both's 0 and 1
        graph.erase_node(merge)
        for item in list(ext.users):
            item.replace_all_uses_with(parts[item.args[1]])
            graph.erase_node(item)
        graph.erase_node(ext)
        for part in parts.values():
            if not part.users:
                graph.erase_node(part)
        fused.append(merge.name)
    if fused:
        gm.recompile()
    return fused
