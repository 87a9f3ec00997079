"""Leave a skinny GEMM's split-reduction sum to the kernel that reads its result: ``fbcompile::linear_partials``.

After :mod:`~fbcompile.passes.group_linears` and :mod:`~fbcompile.passes.residual_linears` a decoder
layer's projections read::

    qkv = torch.ops.fbcompile.linear_group(h, [wq, wk, wv], [bq, bk, bv])
    q, k, v = torch.split(qkv, [Nq, Nk, Nv], -1)
    h2 = torch.ops.fbcompile.linear_group(a, [wo], [None], h)          # h + o_proj(a)

which become::

    parts = torch.ops.fbcompile.linear_partials(h, [wq, wk, wv], 4, [bq, bk, bv])  # biases in parts[0]
    q = torch.sum(torch.narrow(parts, -1, 0, Nq), 0).to(h.dtype)
    k = torch.sum(torch.narrow(parts, -1, Nq, Nk), 0).to(h.dtype)
    v = torch.sum(torch.narrow(parts, -1, Nq + Nk, Nv), 0).to(h.dtype)
    h2 = h + torch.sum(torch.ops.fbcompile.linear_partials(a, [wo], 4, [None]), 0).to(a.dtype)

At a block step's 32 rows each program of the GEMM streams its weight rows through a long serial
reduction; four programs per tile, each over a quarter of it, read q/k/v in 4.35 instead of 5.65 us
and o_proj in 4.14 instead of 5.42 (H200, ``benchmarks/results/split_linears_h200.md``), but the
partials need a sum, which as a launch of its own (~1.9 us in a graph) ate the gain. Inductor unrolls
a sum of fewer than 8 terms into the kernel that reads the result anyway (RoPE; the residual add and
RMSNorm), so here it costs no launch: with that consumer o_proj took 6.6 instead of 7.6 us and down
12.2 instead of 13.5. Where it applies is :func:`fbcompile.passes.group_linears.pays` for any launch (at
most 32 rows, the size measured) and a reduction long enough to split
(:func:`fbcompile.ops.linear_partials_splits`); a gated launch (its gate needs the whole sum) is left as
it is.

Each piece of a split launch gets a sum of its own, and the biases ride in the first partial: a sum
read by several consumers (RoPE reads q twice), or one that loads more than Inductor's
``realize_reads_threshold`` (4) terms, is realized as a kernel of its own instead of inlined into
its readers (``benchmarks/results/session37_h100.md``). On the H100 at 32K / batch 1 block mode took
13.59-13.70 against 13.75-14.11 ms per block, alternating (``session38_h100.md``).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from fbcompile.ops import linear_partials_splits, linear_partials_supported
from fbcompile.passes import group_linears
from fbcompile.passes.graph_utils import example, static_layout

_GROUP = torch.ops.fbcompile.linear_group.default


def _operands(node: fx.Node):
    """``(x, weights, biases, residual)`` of a ``linear_group`` call."""
    args = list(node.args) + [None] * (4 - len(node.args))
    residual = node.kwargs.get("residual", args[3])
    return args[0], list(args[1]), list(args[2]), residual


def _call(graph: fx.Graph, target, *args) -> fx.Node:
    """A new call node with its example value (later passes read them), computed under the fake mode
    of its tensor operands."""
    node = graph.call_function(target, args)
    values = fx.node.map_arg(args, example)
    mode = next((v.fake_mode for v in tree_leaves(values) if hasattr(v, "fake_mode")), None)
    if mode is not None:
        with mode:
            node.meta["example_value"] = target(*values)
    return node


def _pieces(node: fx.Node, weights: list[torch.Tensor]) -> list[tuple[fx.Node, int, int]] | None:
    """Where ``node``'s only reader is :mod:`~fbcompile.passes.group_linears`' split into its weights'
    outputs, read only by indexing: each piece's ``getitem`` with its first column and width."""
    sizes = [w.shape[0] for w in weights]
    if len(node.users) != 1:
        return None
    split = next(iter(node.users))
    if (split.target is not torch.split or split.args[1:] != (sizes, -1) or split.kwargs
            or any(u.target is not operator.getitem or not isinstance(u.args[1], int) for u in split.users)):
        return None
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(u, starts[u.args[1]], sizes[u.args[1]]) for u in split.users]


def linear_partials(gm: fx.GraphModule, where=None, splits_for=None) -> list[str]:
    """Rewrite ``gm``'s ``linear_group`` calls in place where ``where(input)`` (default
    :func:`fbcompile.passes.group_linears.pays`) holds and ``splits_for(input, weights)`` (default
    :func:`fbcompile.ops.linear_partials_splits`) is at least 2; returns one line per rewrite."""
    where = where or group_linears.pays
    splits_for = splits_for or linear_partials_splits
    made = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _GROUP:
            continue
        x, weights, biases, residual = _operands(node)
        xv, wv = example(x), [example(w) for w in weights]
        # (the passes that made the launch left alone the linears that autograd records)
        if (xv is None or any(v is None or not static_layout(v) for v in wv) or not static_layout(xv)
                or not where(xv) or not linear_partials_supported(xv, wv, [example(b) for b in biases])):
            continue
        splits = splits_for(xv, wv)
        if splits < 2:
            continue
        graph = gm.graph
        pieces = _pieces(node, wv) if residual is None else None
        with graph.inserting_before(node):
            parts = _call(graph, torch.ops.fbcompile.linear_partials.default, x, weights, splits, biases)
            if pieces is None:
                y = _call(graph, torch.Tensor.to, _call(graph, torch.sum, parts, 0), xv.dtype)
                if residual is not None:
                    y = _call(graph, torch.add, residual, y)
                y.meta.update(node.meta)
                node.replace_all_uses_with(y)
            else:
                for piece, start, rows in pieces:
                    narrow = _call(graph, torch.narrow, parts, -1, start, rows)
                    y = _call(graph, torch.Tensor.to, _call(graph, torch.sum, narrow, 0), xv.dtype)
                    y.meta.update(piece.meta)
                    piece.replace_all_uses_with(y)
                    graph.erase_node(piece)
                graph.erase_node(next(iter(node.users)))
        graph.erase_node(node)
        made.append(f"linear({', '.join(str(w) for w in weights)}) over {splits} partial sums")
    if made:
        gm.graph.lint()
        gm.recompile()
    return made
