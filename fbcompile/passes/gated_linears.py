"""Apply a gated MLP's gate where its input projections' GEMM stores: ``fbcompile::gated_linear``.

A gated MLP (Llama, Qwen2, Gemma: ``down(act(gate(h)) * up(h))``) begins with what dynamo records as::

    gate = torch._C._nn.linear(h, w_gate, b_gate)
    silu = torch.nn.functional.silu(gate, inplace=False)      # or gelu(gate, approximate="tanh")
    up = torch._C._nn.linear(h, w_up, b_up)
    mul = silu * up                                            # either operand order

or, with the two projections' weights stored as one (Phi-3's ``gate_up_proj``)::

    gate_up = torch._C._nn.linear(h, w_gate_up, b_gate_up)
    chunk = gate_up.chunk(2, dim=-1);  gate = chunk[0];  up = chunk[1]
    mul = up * torch.nn.functional.silu(gate)

which becomes::

    mul = torch.ops.fbcompile.gated_linear(h, w_gate, w_up, b_gate, b_up, "silu")

(the halves of a stored pair as views: ``w_gate = w_gate_up[:N]``, ``w_up = w_gate_up[N:]``).

Inductor runs the activation and product as an elementwise kernel of its own after the GEMMs; at a
block step's few rows that kernel is a launch of its own (1.6 us per layer and step for a 1.5B model
on the H200, ``benchmarks/results/profile_lm_32k_b1_grouped_h200.md``). The skinny-GEMM kernel reads
the same rows of both weights in each program (one launch, as the grouped gate/up projections were)
and applies ``act(gate) * up`` to its two accumulators before it stores: the gate is computed once per
output, and half as much is written. (Computing it instead as the down projection loads its input
recomputes it once per program of that GEMM: measured 36 us against 13, ``gated_linears_h200.md``.)
Where it applies is :func:`fbcompile.passes.group_linears.pays`, the rule measured for that kernel;
the projections, activation or product used elsewhere, dynamic shapes, unsupported operands and
autograd-recorded outputs are left as they are. Run it before :func:`group_linears`, which would
otherwise group the two projections without their gate.
"""
from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from fbcompile.ops import gated_linear_supported
from fbcompile.passes.graph_utils import (LINEARS, arg, example, linear_operands, op_name, static_layout,
                                         writes_between)
from fbcompile.passes import group_linears

_PRODUCTS = (operator.mul, torch.mul)


def _activation(node) -> str | None:
    """The :data:`fbcompile.ops.GATES` name of the activation ``node`` computes, or None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if (node.target is F.silu and not arg(node, 1, "inplace", False)) or node.target is torch._C._nn.silu:
        return "silu"
    if node.target is F.gelu and arg(node, 1, "approximate", "none") == "tanh":
        return "gelu_tanh"
    return None


def _is_linear(node, x=None) -> bool:
    """``node`` is a linear call used once (over ``x`` where given)."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target in LINEARS
            and len(node.users) == 1 and (x is None or linear_operands(node)[0] is x))


class _Pair(NamedTuple):
    """A matched gated pair: the activation, its name, the projections' input, the ``(weight, bias,
    rows)`` of the gate and up projections (``rows``: the half of a stored pair, or None for the whole
    weight), and the nodes the fused op replaces besides the product."""

    activated: fx.Node
    act: str
    x: fx.Node
    gate: tuple
    up: tuple
    replaced: tuple


def _halves(gate, up) -> fx.Node | None:
    """The linear whose output ``gate`` and ``up`` are the two halves of (``chunk(2, dim=-1)``), or None."""
    if not all(isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem
               for n in (gate, up)) or gate.args[1:] != (0,) or up.args[1:] != (1,) or gate.args[0] is not up.args[0]:
        return None
    chunk = gate.args[0]
    if op_name(chunk) != "chunk" or len(chunk.users) != 2 or len(gate.users) != 1 or len(up.users) != 1:
        return None
    gate_up = arg(chunk, 0, "input")
    value = example(gate_up)
    dim = arg(chunk, 2, "dim", 0)
    if (arg(chunk, 1, "chunks") != 2 or value is None or dim not in (-1, value.dim() - 1)
            or not _is_linear(gate_up) or value.shape[-1] % 2):
        return None
    return gate_up


def _gated_pair(product: fx.Node) -> _Pair | None:
    """The pair of ``act(linear(h)) * linear(h)`` (either order), or of the two halves of one linear,
    each part used only there, or None."""
    if product.op != "call_function" or product.target not in _PRODUCTS or len(product.args) != 2 or product.kwargs:
        return None
    for activated, up in (product.args, reversed(product.args)):
        act = _activation(activated)
        if act is None or len(activated.users) != 1:
            continue
        gate = arg(activated, 0, "input")
        if _is_linear(gate) and _is_linear(up, linear_operands(gate)[0]) and up is not gate:
            (x, wg, bg), (_, wu, bu) = linear_operands(gate), linear_operands(up)
            return _Pair(activated, act, x, (wg, bg, None), (wu, bu, None), (gate, up))
        gate_up = _halves(gate, up)
        if gate_up is not None:
            x, w, b = linear_operands(gate_up)
            n = example(gate_up).shape[-1] // 2
            return _Pair(activated, act, x, (w, b, slice(None, n)), (w, b, slice(n, None)),
                         (gate, up, gate.args[0], gate_up))
    return None


def _rows_example(node, rows: slice | None) -> torch.Tensor | None:
    """The example value of ``node`` (a weight or bias), or of its ``rows``; None if it has none."""
    value = example(node)
    return value if value is None or rows is None else value[rows]


def _operand(gm: fx.GraphModule, node, rows: slice | None):
    """``node`` (a weight or bias, or None), or its ``rows`` as a view inserted in the graph."""
    if node is None or rows is None:
        return node
    view = gm.graph.call_function(operator.getitem, (node, rows))
    view.meta["example_value"] = _rows_example(node, rows)
    return view


def gated_linears(gm: fx.GraphModule, where=None) -> list[str]:
    """Rewrite ``gm`` in place where ``where(input, [gate_weight, up_weight])`` (default
    :func:`fbcompile.passes.group_linears.pays`) holds; returns one line per gated pair rewritten."""
    where = where or group_linears.pays
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    made = []
    for product in list(gm.graph.nodes):
        pair = _gated_pair(product)
        if pair is None:
            continue
        (w_gate, b_gate, gate_rows), (w_up, b_up, up_rows) = pair.gate, pair.up
        xv = example(pair.x)
        wv = [_rows_example(w_gate, gate_rows), _rows_example(w_up, up_rows)]
        bv = [_rows_example(b_gate, gate_rows), _rows_example(b_up, up_rows)]
        if (xv is None or any(v is None or not static_layout(v) for v in wv)
                or any(b is not None and (v is None or not static_layout(v)) for b, v in zip((b_gate, b_up), bv))
                or not static_layout(xv)
                or getattr(example(product), "requires_grad", True)  # traced with autograd on: keep the ops
                or not where(xv, wv) or not gated_linear_supported(xv, *wv, *bv, pair.act)):
            continue
        # operands defined after the first projection (a weight read late) would be used before defined;
        # a write in place between the projections might change what the second reads
        first, last = min(pair.replaced, key=order.__getitem__), max(pair.replaced, key=order.__getitem__)
        if (any(isinstance(n, fx.Node) and order[n] > order[first] for n in (w_gate, w_up, b_gate, b_up))
                or writes_between(first, last)):
            continue
        with gm.graph.inserting_before(first):
            operands = [_operand(gm, n, rows) for n, rows in
                        ((w_gate, gate_rows), (w_up, up_rows), (b_gate, gate_rows), (b_up, up_rows))]
            fused = gm.graph.call_function(torch.ops.fbcompile.gated_linear.default, (pair.x, *operands, pair.act))
        fused.meta.update(product.meta)
        product.replace_all_uses_with(fused)
        for dead in (product, pair.activated, *pair.replaced):
            gm.graph.erase_node(dead)
        names = f"{w_gate}" if gate_rows is not None else f"{w_gate}, {w_up}"
        made.append(f"{names}: {pair.act}(gate) * up applied in their GEMM")
    if made:
        gm.graph.lint()
        gm.recompile()
    return made
