"""Take the merge out of an ``attention_merge_lse`` that runs on cuDNN, so that Inductor fuses it.

``attention_merge_lse`` is one op: the Triton kernels merge the external part in their epilogue. Where
the internal part runs on cuDNN instead (thousands of query rows per head: a video chunk), the op's body
merges with plain PyTorch ops; under fbcompile's CUDA graphs the ops stay opaque to Inductor, so those
run as some ten elementwise kernels of their own (on the H100, ~40 ms of a Wan-1.3B chunk at 32K cached
tokens: ``benchmarks/results/profile_wan_32k_h100_s27.md``). Matched, where the kernel analysis
(:func:`fbcompile.passes.attention_kernels.kernels_of`) puts the call on cuDNN::

    merged = torch.ops.fbcompile.attention_merge_lse(q, k, v, mask, scale, out_e, lse_e)
    out, lse = merged[0], merged[1]

rewritten as the same computation in two ops, the merge traced into plain PyTorch
(:func:`fbcompile.ops.merge_lse`), which Inductor fuses into one kernel::

    inner = torch.ops.fbcompile.attention_lse(q, k, v, mask, scale)
    merged = torch.ops.fbcompile.merge_lse(out_e, lse_e, inner[0], inner[1])
    out, lse = merged[0].type_as(q), merged[1]

A call whose result is used other than through its two items is left as it is.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

_MERGED = torch.ops.fbcompile.attention_merge_lse.default


def merge_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``attention_merge_lse`` calls of ``gm`` (a graph without any needs no kernel analysis)."""
    return [node for node in gm.graph.nodes if node.op == "call_function" and node.target is _MERGED]


def split_cudnn_merges(gm: fx.GraphModule, on_cudnn: frozenset[str]) -> list[str]:
    """Rewrite the ``attention_merge_lse`` calls of ``gm`` named in ``on_cudnn`` in place; returns the
    names of those rewritten."""
    rewritten = []
    for node in merge_calls(gm):
        if not (node.name in on_cudnn and len(node.args) == 7 and not node.kwargs):
            continue
        items = list(node.users)
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1) for u in items):
            continue
        q, k, v, mask, scale, out_e, lse_e = node.args
        with gm.graph.inserting_before(node):
            inner = gm.graph.call_function(torch.ops.fbcompile.attention_lse.default, (q, k, v, mask, scale))
            merged = gm.graph.call_function(torch.ops.fbcompile.merge_lse.default, (
                out_e, lse_e, gm.graph.call_function(operator.getitem, (inner, 0)),
                gm.graph.call_function(operator.getitem, (inner, 1))))
            out = gm.graph.call_method("type_as", (gm.graph.call_function(operator.getitem, (merged, 0)), q))
            lse = gm.graph.call_function(operator.getitem, (merged, 1))
        for item in items:
            item.replace_all_uses_with(out if item.args[1] == 0 else lse)
            gm.graph.erase_node(item)
        gm.graph.erase_node(node)
        rewritten.append(node.name)
    if rewritten:
        gm.recompile()
    return rewritten
