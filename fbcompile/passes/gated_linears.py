"""Apply a gated MLP's gate where its input projections' GEMM stores: ``fbcompile::gated_linear``.

A gated MLP (Llama, Qwen2, Gemma: ``down(act(gate(h)) * up(h))``) begins with what dynamo records as::

    gate = torch._C._nn.linear(h, w_gate, b_gate)
    silu = torch.nn.functional.silu(gate, inplace=False)      # or gelu(gate, approximate="tanh")
    up = torch._C._nn.linear(h, w_up, b_up)
    mul = silu * up                                            # either operand order

which becomes::

    mul = torch.ops.fbcompile.gated_linear(h, w_gate, w_up, b_gate, b_up, "silu")

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

import torch
import torch.fx as fx
import torch.nn.functional as F

from fbcompile.ops import gated_linear_supported
from fbcompile.passes.graph_utils import LINEARS, arg, example, linear_operands, static_layout
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


def _gated_pair(product: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, str] | None:
    """``(gate linear, activation, up linear, act)`` of ``act(linear(h)) * linear(h)`` (either order),
    each used only there, or None."""
    if product.op != "call_function" or product.target not in _PRODUCTS or len(product.args) != 2 or product.kwargs:
        return None
    for activated, up in (product.args, reversed(product.args)):
        act = _activation(activated)
        if act is None or len(activated.users) != 1:
            continue
        gate = arg(activated, 0, "input")
        if _is_linear(gate) and _is_linear(up, linear_operands(gate)[0]) and up is not gate:
            return gate, activated, up, act
    return None


def gated_linears(gm: fx.GraphModule, where=None) -> list[str]:
    """Rewrite ``gm`` in place where ``where(input)`` (default :func:`fbcompile.passes.group_linears.pays`)
    holds; returns one line per gated pair rewritten."""
    where = where or group_linears.pays
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    made = []
    for product in list(gm.graph.nodes):
        found = _gated_pair(product)
        if found is None:
            continue
        gate, activated, up, act = found
        x, w_gate, b_gate = linear_operands(gate)
        _, w_up, b_up = linear_operands(up)
        values = [example(n) for n in (x, w_gate, w_up, product)]
        biases = [example(b) if b is not None else None for b in (b_gate, b_up)]
        if (any(v is None or not static_layout(v) for v in values)
                or any(b is not None and (v is None or not static_layout(v)) for b, v in zip((b_gate, b_up), biases))
                or any(getattr(example(n), "requires_grad", True) for n in (gate, up, product))
                or not where(values[0])
                or not gated_linear_supported(values[0], values[1], values[2], *biases, act)):
            continue
        # operands defined after the first projection (a weight read late) would be used before defined
        first = min(gate, up, key=order.__getitem__)
        if any(isinstance(n, fx.Node) and order[n] > order[first] for n in (w_gate, w_up, b_gate, b_up)):
            continue
        with gm.graph.inserting_before(first):
            fused = gm.graph.call_function(torch.ops.fbcompile.gated_linear.default,
                                           (x, w_gate, w_up, b_gate, b_up, act))
        fused.meta.update(product.meta)
        product.replace_all_uses_with(fused)
        for dead in (product, activated, gate, up):
            gm.graph.erase_node(dead)
        made.append(f"{w_gate}, {w_up}: {act}(gate) * up applied in their GEMM")
    if made:
        gm.graph.lint()
        gm.recompile()
    return made
