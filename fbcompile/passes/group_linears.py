"""Group the linears that read the same input into one launch: ``fbcompile::linear_group``.

A decoder layer projects one normalised hidden state three times (attention) and another twice
(a gated MLP); dynamo records::

    q = torch._C._nn.linear(h, wq, bq);  k = torch._C._nn.linear(h, wk, bk);  v = torch._C._nn.linear(h, wv, bv)

which becomes::

    qkv = torch.ops.fbcompile.linear_group(h, [wq, wk, wv], [bq, bk, bv])
    q, k, v = torch.split(qkv, [Nq, Nk, Nv], -1)   # views

At a block step's few rows each of those GEMMs is a few microseconds of launch latency and a small
weight read; one launch over all three weights (the kernel reads them where they are: no
concatenated copy) saved 11% of a Qwen2-1.5B layer's GEMM time at 32 rows on an H200
(``benchmarks/results/skinny_linear_h200.md``). Beyond 32 rows (a batch of blocks) one weight's launch
loses to cuBLAS, but a stacked one still wins while its GEMM is small: Qwen2-1.5B's q/k/v took 6-10 us
against 16-19 for the three cuBLAS calls at 32-512 rows on the H100, its gated gate/up 24-26 against
29-32 at 64-128 rows and 50 against 37 at 256 (``benchmarks/results/linear_rows_h100.md``). Hence
:func:`pays`: CUDA, Hopper (the only architecture measured), at most :data:`MAX_ROWS` rows, or a launch
over several weights of at most :data:`MAX_STACKED_FLOPS`. Linears with some other input, a dynamic
shape, operands the kernel does not take, or outputs that autograd records (the grouped op has no
backward) are left as they are.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fbcompile.ops import MAX_LINEAR_GROUP, linear_group_supported
from fbcompile.passes.graph_utils import LINEARS, example, linear_operands, static_layout, writes_between

MAX_ROWS = 32  # any launch: faster at 32 rows; one weight's slower from 64 (linear_rows_h100.md)
MAX_STACKED_FLOPS = 8e9  # several weights: faster in every case to 7.0 GFLOP, slower at 12.9 and 14.1 (same file)


def pays(x: torch.Tensor, weights: list[torch.Tensor] | None = None) -> bool:
    """Where one launch over ``weights`` (the passes that make a launch of one weight leave them out)
    was measured faster than the separate cuBLAS calls, for input ``x``."""
    rows = x.shape.numel() // max(1, x.shape[-1])
    if x.device.type != "cuda" or rows <= 0 or torch.cuda.get_device_capability(x.device)[0] != 9:
        return False
    return rows <= MAX_ROWS or stacked_pays(rows, [w.shape[0] for w in weights or []], x.shape[-1])


def stacked_pays(rows: int, outputs: list[int], k: int) -> bool:
    """Whether a launch over several weights (``outputs`` rows each, over ``k`` inputs) pays at more than
    :data:`MAX_ROWS` rows: while its GEMM is small enough that cuBLAS's calls, one per weight, cost more
    in latency than the skinny-GEMM kernel loses to cuBLAS in throughput."""
    return len(outputs) > 1 and 2 * rows * sum(outputs) * k <= MAX_STACKED_FLOPS


def group_linears(gm: fx.GraphModule, where=None) -> list[str]:
    """Rewrite ``gm`` in place where ``where(input, weights)`` (default :func:`pays`) holds; returns one
    line per group made (its weights' node names)."""
    where = where or pays
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    made = []
    for linears in linears_by_input(gm):
        if (found := group_input(linears)) is None:
            continue
        x, xv = found
        for with_bias in (False, True):
            same = [n for n in linears if (linear_operands(n)[2] is not None) == with_bias]
            for start in range(0, len(same) - 1, MAX_LINEAR_GROUP):
                group = same[start:start + MAX_LINEAR_GROUP]
                wv = [example(linear_operands(n)[1]) for n in group]
                line = (f"{len(group)} linears over {x.name} in one launch: "
                        + ", ".join(str(linear_operands(n)[1]) for n in group))
                if (len(group) > 1 and all(isinstance(v, torch.Tensor) for v in wv) and where(xv, wv)
                        and _rewrite(gm, x, xv, group, order)):
                    made.append(line)
    if made:
        gm.graph.lint()
        gm.recompile()
    return made


def linears_by_input(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """The linears of ``gm`` grouped by the node they read, each group in graph order, the groups in the
    order of their first linear (so a group over a linear's output comes after that linear's group).
    Rewriting a group replaces its linears' outputs, which a later group may read: take a group's input
    from its linears when its turn comes (:func:`group_input`), not from before."""
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LINEARS and isinstance(linear_operands(node)[0], fx.Node):
            by_input.setdefault(linear_operands(node)[0], []).append(node)
    return list(by_input.values())


def group_input(linears: list[fx.Node]) -> tuple[fx.Node, torch.Tensor] | None:
    """The node ``linears`` read now and its example, if its layout is static; else None."""
    x = linear_operands(linears[0])[0]
    value = example(x)
    return (x, value) if value is not None and static_layout(value) else None


def replaceable(group: list[fx.Node], order: dict) -> tuple[list, list] | None:
    """The examples ``(weights, biases)`` of ``group``'s linears, if one op before the first of them may
    take them all: outputs autograd does not record, weights and biases of static layout, none computed
    after the first linear (the op would read it before it is defined), no write in place between the
    first and the last (it might change what a later one reads); else None."""
    weights = [linear_operands(n)[1] for n in group]
    biases = [linear_operands(n)[2] for n in group]
    if any(getattr(example(n), "requires_grad", True) for n in group):
        return None  # traced with autograd on: keep the linears' backward
    wv, bv = [example(w) for w in weights], [example(b) if b is not None else None for b in biases]
    if any(v is None or not static_layout(v) for v in wv) or any(b is not None and (v is None or not static_layout(v))
                                                          for b, v in zip(biases, bv)):
        return None
    first, last = min(group, key=order.__getitem__), max(group, key=order.__getitem__)
    if any(isinstance(n, fx.Node) and order.get(n, len(order)) > order[first] for n in weights + biases):
        return None  # (a node an earlier rewrite made counts as late)
    return None if writes_between(first, last) else (wv, bv)


def _rewrite(gm: fx.GraphModule, x: fx.Node, xv: torch.Tensor, group: list[fx.Node], order: dict) -> bool:
    weights = [linear_operands(n)[1] for n in group]
    biases = [linear_operands(n)[2] for n in group]
    examples = replaceable(group, order)
    if examples is None or not linear_group_supported(xv, *examples):
        return False
    wv = examples[0]
    first = min(group, key=order.__getitem__)
    with gm.graph.inserting_before(first):
        stacked = gm.graph.call_function(torch.ops.fbcompile.linear_group.default, (x, weights, biases))
        parts = gm.graph.call_function(torch.split, (stacked, [v.shape[0] for v in wv], -1))
        outs = [gm.graph.call_function(operator.getitem, (parts, i)) for i in range(len(group))]
    for node, out in zip(group, outs):
        out.meta.update(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    return True
