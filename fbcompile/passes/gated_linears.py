"""Compute a gated MLP's gate in its output projection's GEMM: ``fbcompile::gated_linear``.

A gated MLP (Llama, Qwen2, Gemma: ``down(act(gate(h)) * up(h))``) ends with what dynamo records as::

    silu = torch.nn.functional.silu(gate, inplace=False)      # or gelu(gate, approximate="tanh")
    mul = silu * up
    down = torch._C._nn.linear(mul, w_down, b_down)

which becomes::

    down = torch.ops.fbcompile.gated_linear(gate, up, w_down, b_down, "silu")

Inductor runs the activation and product as an elementwise kernel of its own before the GEMM; at a
block step's few rows that kernel is a launch of its own (1.6 us per layer and step for a 1.5B model
on the H200, ``benchmarks/results/profile_lm_32k_b1_grouped_h200.md``), and cuBLAS splits the down
projection's long reduction into a second launch anyway. The skinny-GEMM kernel computes
``act(gate) * up`` as it loads its input, rounded once as Inductor's fused kernel rounds it; its down
projection alone was 1.09x cuBLAS at 32 rows (``skinny_linear_h200.md``). Where it applies is
`fbcompile.passes.group_linears.pays`, the rule measured for that kernel; the product or the
activation used elsewhere, dynamic shapes, unsupported operands and autograd-recorded outputs are left
as they are.
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


def _gate_and_up(product: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, str] | None:
    """``(activation node, gate, up, act)`` of ``act(gate) * up`` (either order), or None."""
    if product.op != "call_function" or product.target not in _PRODUCTS or len(product.args) != 2 or product.kwargs:
        return None
    for activated, up in (product.args, reversed(product.args)):
        act = _activation(activated)
        if act is not None and isinstance(up, fx.Node) and len(activated.users) == 1:
            return activated, arg(activated, 0, "input"), up, act
    return None


def gated_linears(gm: fx.GraphModule, where=None) -> list[str]:
    """Rewrite ``gm`` in place where ``where(gate)`` (default :func:`fbcompile.passes.group_linears.pays`)
    holds; returns one line per linear rewritten."""
    where = where or group_linears.pays
    made = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LINEARS:
            continue
        product, weight, bias = linear_operands(node)
        if not isinstance(product, fx.Node) or len(product.users) != 1:
            continue
        found = _gate_and_up(product)
        if found is None:
            continue
        activated, gate, up, act = found
        values = [example(n) for n in (gate, up, weight, node)]
        bias_value = example(bias) if bias is not None else None
        if (any(v is None or not static_layout(v) for v in values) or (bias is not None and bias_value is None)
                or getattr(values[3], "requires_grad", True) or not where(values[0])
                or not gated_linear_supported(values[0], values[1], values[2], bias_value, act)):
            continue
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(torch.ops.fbcompile.gated_linear.default, (gate, up, weight, bias, act))
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        for dead in (node, product, activated):
            gm.graph.erase_node(dead)
        made.append(f"{weight}: {act}({gate}) * {up} computed in the GEMM")
    if made:
        gm.graph.lint()
        gm.recompile()
    return made
