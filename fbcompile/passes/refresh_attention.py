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
Elsewhere the op is the two ops it replaces. The joint call stands where the merge stood, so the
external part is computed later than it was: a pair with an in-place write between the two calls (Fast-dLLM
v2 writes its block cache after the external part, and a cache may share memory with the block) stays
as it is. Reuse graphs take ``(O_e, L_e)`` as inputs and have no such pair. Run last: the passes before
it match the two ops.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fbcompile.passes.graph_utils import may_write_unseen, mutated_tensor

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


def _joinable(ext: fx.Node, merge: fx.Node) -> bool:
    """Whether the joint call can stand where ``merge`` is: no node between the two calls writes in place
    (the external part would read its keys after a write it came before; the pass cannot tell which
    tensors share memory) or reads the external part (it would then come before it)."""
    parts = set(ext.users)
    node = ext.next
    while node is not merge:
        if node.op == "output":  # merge before ext: not this pattern
            return False
        if (node not in parts and (mutated_tensor(node) is not None or may_write_unseen(node)
                                   or node.op == "call_module" or any(a in parts for a in node.all_input_nodes))):
            return False
        node = node.next
    return True


def fuse_refresh_attention(gm: fx.GraphModule) -> list[str]:
    """Rewrite each matching pair of ``gm`` in place (see the module docstring); returns the names of the
    merges replaced."""
    graph = gm.graph
    fused = []
    for merge in [n for n in graph.nodes if n.op == "call_function" and n.target is _MERGE]:
        ext = _external_of(merge)
        if ext is None:
            continue
        if not _joinable(ext, merge):
            continue
        q, k, v, mask, scale = ext.args[:5]
        key_count = ext.args[5] if len(ext.args) > 5 else None
        with graph.inserting_before(merge):
            both = graph.call_function(REFRESH, (q, k, v, mask, scale, *merge.args[1:4], key_count))
            parts = {index: graph.call_function(operator.getitem, (both, 2 + index)) for index in (0, 1)}
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
