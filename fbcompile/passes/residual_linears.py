"""Add a residual stream where the linear before it stores: ``fbcompile::linear_group(..., residual)``.

A pre-norm decoder layer (Llama, Qwen2, Mistral) ends its attention and its MLP alike; dynamo records::

    out = torch._C._nn.linear(x, w, b)        # o_proj or down_proj, used only here
    h = residual + out                         # either operand order

which becomes::

    h = torch.ops.fbcompile.linear_group(x, [w], [b], residual)

Inductor fuses the add with the RMSNorm after it into one kernel, so the add costs no launch of its
own; what this buys is the projection itself: at a block step's 32 rows fbcompile's skinny-GEMM kernel
read the down projection in 11.7 us with the add against cuBLAS's 12.6 without, and o_proj in 5.6
against 5.3 (H200, ``benchmarks/results/norm_linears_h200.md``). (Moving the RMSNorm too, into the
next GEMM's load, was measured slower: same file.) Where it applies is
:func:`fbcompile.passes.group_linears.pays` for a launch of one weight (at most 32 rows); a residual of
another shape or dtype (a broadcast), a linear used elsewhere or whose operands are written in place
before the sum, dynamic shapes, unsupported operands and autograd-recorded outputs are left as they are.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fbcompile.ops import linear_group_supported
from fbcompile.passes import group_linears
from fbcompile.passes.graph_utils import LINEARS, example, linear_operands, static_layout, writes_between

_ADDS = (operator.add, torch.add)


def _residual_sum(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(linear, residual)`` where ``node`` is ``residual + linear(...)`` (either order, no ``alpha``),
    the linear used only there; else None."""
    if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs:
        return None
    for out, residual in (node.args, reversed(node.args)):
        if (isinstance(out, fx.Node) and out.op == "call_function" and out.target in LINEARS
                and len(out.users) == 1 and isinstance(residual, fx.Node) and residual is not out):
            return out, residual
    return None


def residual_linears(gm: fx.GraphModule, where=None) -> list[str]:
    """Rewrite ``gm`` in place where ``where(input)`` (default :func:`fbcompile.passes.group_linears.pays`)
    holds; returns one line per residual sum rewritten."""
    where = where or group_linears.pays
    made = []
    for node in list(gm.graph.nodes):
        match = _residual_sum(node)
        if match is None:
            continue
        linear, residual = match
        x, w, b = linear_operands(linear)
        xv, wv, bv, rv = example(x), example(w), example(b), example(residual)
        if (xv is None or wv is None or rv is None or (b is not None and bv is None)
                or not all(static_layout(v) for v in (xv, wv, bv, rv))
                or getattr(example(node), "requires_grad", True)  # traced with autograd on: keep the ops
                or example(node).dtype != xv.dtype
                or not where(xv) or not linear_group_supported(xv, [wv], [bv], residual=rv)
                or writes_between(linear, node)):  # the GEMM, at the sum, would read what is written there
            continue
        with gm.graph.inserting_before(node):  # every operand is defined before the sum
            fused = gm.graph.call_function(torch.ops.fbcompile.linear_group.default, (x, [w], [b], residual))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        gm.graph.erase_node(linear)
        made.append(f"{residual} + linear({w}) in its GEMM")
    if made:
        gm.graph.lint()
        gm.recompile()
    return made
