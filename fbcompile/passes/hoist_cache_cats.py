"""Return ``cat(cache, block)`` outputs as the block alone, for the caller to join.

An HF ``DynamicCache`` updated inside the model makes the graph read its cached keys/values to return
their concatenation with the block (dynamo: ``self.keys`` an input, the ``cat`` an output). A captured
CUDA graph holding that ``cat`` reads the cache at its address, so a cache that is new tensors at every
call (``DynamicCache.crop`` after each denoising step) could never replay, and the ``cat``'s length
follows the cache's. Returning the block instead, and joining it to the cache outside the graph, keeps
the graph's result and frees it from the cache wherever nothing else in it reads the cache (a reuse
graph), or leaves the cache to the attention alone (then :mod:`fbcompile.passes.key_count` may apply).

Pattern (the cached input ``L_past_k_`` one of ``kv``, the ``cat`` used by the output only)::

    cat = torch.cat([L_past_k_, k], dim=-2)
    return (logits, cat)

becomes ``return (logits, k)``, with :class:`Join` ``(output 1, input L_past_k_, dim 2)`` telling the
caller to return ``torch.cat([past_k, output 1], 2)`` instead. Only two-operand ``cat`` nodes whose first
operand is the cached input itself and whose only user is a flat output tuple are rewritten.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from fbcompile.passes.graph_utils import arg, example, op_name


@dataclass(frozen=True)
class Join:
    """The caller returns ``cat([args[input], outputs[output]], dim)`` as output ``output``."""

    output: int
    input: int
    dim: int


def hoist_cache_cats(gm: fx.GraphModule, kv: set[int]) -> list[Join]:
    """Rewrite ``gm`` in place (see the module docstring); the joins the caller must make."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    cached = {placeholders[i]: i for i in kv}
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = output.args[0]
    if not isinstance(values, (tuple, list)):
        return []
    values, joins = list(values), []
    for index, value in enumerate(values):
        if not isinstance(value, fx.Node) or op_name(value) != "cat" or example(value) is None:
            continue
        tensors = arg(value, 0, "tensors")
        if (not isinstance(tensors, (tuple, list)) or len(tensors) != 2 or tensors[0] not in cached
                or not isinstance(tensors[1], fx.Node) or set(value.users) != {output}
                or sum(v is value for v in values) != 1):
            continue
        joins.append(Join(index, cached[tensors[0]], arg(value, 1, "dim", 0) % example(value).dim()))
        values[index] = tensors[1]
    if joins:
        cats = [n for n in output.args[0] if isinstance(n, fx.Node) and n not in values]
        output.args = (type(output.args[0])(values),)
        for cat in cats:
            gm.graph.erase_node(cat)
        gm.recompile()
    return joins
