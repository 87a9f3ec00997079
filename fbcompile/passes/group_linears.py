"""Group the linears that read the same input into one launch: ``fbcompile::linear_group``.

A decoder layer projects one normalised hidden state three times (attention) and another twice
(a gated MLP); dynamo records::

    q = torch._C._nn.linear(h, wq, bq);  k = torch._C._nn.linear(h, wk, bk);  v = torch._C._nn.linear(h, wv, bv)

which becomes::

    qkv = torch.ops.fbcompile.linear_group(h, [wq, wk, wv], [bq, bk, bv])
    q, k, v = torch.split(qkv, [Nq, Nk, Nv], -1)   # views

At a block step's few rows each of those GEMMs is a few microseconds of launch latency and a small
weight read; one launch over all three weights (the kernel reads them where they are: no
concatenated copy) saved 11% of a Qwen2-1.5B layer's GEMM time at 32 rows on an H200, and cost 74%
at 256 rows (``benchmarks/results/skinny_linear_h200.md``). Hence :func:`pays`: CUDA, Hopper (the
only architecture measured), at most :data:`MAX_ROWS` rows. Linears with some other input, a
dynamic shape, operands the kernel does not take, or outputs that autograd records (the grouped op
has no backward) are left as they are.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fbcompile.ops import MAX_LINEAR_GROUP, linear_group_supported
from fbcompile.passes.graph_utils import LINEARS, example, linear_operands, static_layout

MAX_ROWS = 32  # measured faster at 32 rows, slower at 256: skinny_linear_h200.md


def pays(x: torch.Tensor) -> bool:
    """Where one grouped launch was measured faster than the separate cuBLAS calls (for input ``x``)."""
    rows = x.shape.numel() // max(1, x.shape[-1])
    return x.device.type == "cuda" and 0 < rows <= MAX_ROWS and torch.cuda.get_device_capability(x.device)[0] == 9


def group_linears(gm: fx.GraphModule, where=None) -> list[str]:
    """Rewrite ``gm`` in place where ``where(input)`` (default :func:`pays`) holds; returns one line
    per group made (its weights' node names)."""
    where = where or pays
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEARS and isinstance(linear_operands(node)[0], fx.Node):
            by_input.setdefault(linear_operands(node)[0], []).append(node)
    made = []
    for x, linears in by_input.items():
        xv = example(x)
        if xv is None or not static_layout(xv) or not where(xv):
            continue
        for with_bias in (False, True):
            same = [n for n in linears if (linear_operands(n)[2] is not None) == with_bias]
            for start in range(0, len(same) - 1, MAX_LINEAR_GROUP):
                group = same[start:start + MAX_LINEAR_GROUP]
                line = (f"{len(group)} linears over {x.name} in one launch: "
                        + ", ".join(str(linear_operands(n)[1]) for n in group))
                if len(group) > 1 and _rewrite(gm, x, xv, group, order):
                    made.append(line)
    if made:
        gm.graph.lint()
        gm.recompile()
    return made


def _rewrite(gm: fx.GraphModule, x: fx.Node, xv: torch.Tensor, group: list[fx.Node], order: dict) -> bool:
    weights = [linear_operands(n)[1] for n in group]
    biases = [linear_operands(n)[2] for n in group]
    if any(getattr(example(n), "requires_grad", True) for n in group):
        return False  # traced with autograd on: keep the linears' backward
    wv, bv = [example(w) for w in weights], [example(b) if b is not None else None for b in biases]
    if any(v is None or not static_layout(v) for v in wv) or any(b is not None and (v is None or not static_layout(v))
                                                          for b, v in zip(biases, bv)):
        return False
    if not linear_group_supported(xv, wv, bv):
        return False
    first = min(group, key=order.__getitem__)
    if any(isinstance(n, fx.Node) and order[n] > order[first] for n in weights + biases):
        return False  # an operand computed after the first linear: keep the graph's order
    with gm.graph.inserting_before(first):
        stacked = gm.graph.call_function(torch.ops.fbcompile.linear_group.default, (x, weights, biases))
        parts = gm.graph.call_function(torch.split, (stacked, [v.shape[0] for v in wv], -1))
        outs = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(group))]
    for node, out in zip(group, outs):
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    return True
