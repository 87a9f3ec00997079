"""Find the graph outputs that concatenate a cached input with this call's block, and those that an
attention's keys/values are computed from.

An HF ``DynamicCache`` updated inside the graph, or keys/values handed on across a graph break, look
to dynamo like (``self.keys`` an input, the result an output)::

    self.keys = torch.cat([self.keys, key_states], dim=-2)

The runtime records each such output's provenance (:mod:`fbcompile.backends.provenance`): its first
``P.size(dim)`` positions are the input ``P``. That holds for any ``cat`` whose first operand is an
input, whatever the other operands are, unless the graph writes ``P`` or the ``cat`` in place (the
runtime reads ``P``'s version after the call): those are left out.

A model may also return the keys/values it attends over for the loop to cut its cache from
(Fast-dLLM's Dream returns its un-rotated ``present = (k, v)`` at every call and keeps
``k[:, :s]`` of the block's full pass as the cache): :func:`kv_outputs` finds those outputs, and
the runtime notes which tensors they were (a cache cut from them is no commit).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from fbcompile.passes.find_attention import match_attention
from fbcompile.passes.graph_utils import arg, example, mutated_tensor, op_name, view_base


@dataclass(frozen=True)
class CatOutput:
    """Output ``output`` of the graph is ``cat([argument source, ...], dim)``."""

    output: int
    source: int
    dim: int


def cat_outputs(gm: fx.GraphModule) -> list[CatOutput]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    written = {view_base(t) for t in map(mutated_tensor, gm.graph.nodes) if t is not None}
    found = []
    for index, value in enumerate(output.args[0] if isinstance(output.args[0], (tuple, list)) else ()):
        if not isinstance(value, fx.Node) or op_name(value) != "cat" or example(value) is None:
            continue
        tensors = arg(value, 0, "tensors")
        first = tensors[0] if isinstance(tensors, (tuple, list)) and len(tensors) >= 2 else None
        if (isinstance(first, fx.Node) and first in placeholders and example(first) is not None
                and not {first, value} & written):
            found.append(CatOutput(index, placeholders.index(first), arg(value, 1, "dim", 0) % example(value).dim()))
    return found


def kv_outputs(gm: fx.GraphModule) -> list[int]:
    """Indices of the graph outputs an attention's keys or values are computed from (the output node
    itself is an ancestor of the attention's key or value operand)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else ()
    returned = {v: i for i, v in enumerate(values) if isinstance(v, fx.Node) and example(v) is not None}
    if not returned:
        return []
    found, seen = [], set()
    stack = [n for site in match_attention(gm) for n in (site.k, site.v)]
    while stack:
        node = stack.pop()
        if node in seen or node.op in ("placeholder", "get_attr"):
            continue
        seen.add(node)
        if node in returned:
            found.append(returned[node])
        stack.extend(node.all_input_nodes)
    return sorted(found)
