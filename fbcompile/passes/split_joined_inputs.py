"""Re-expose, as a ``cat``, keys/values that an earlier graph concatenated (a graph break in between).

HF remote code (SDAR style) concatenates the cached keys and then branches on a tensor to pick the
kernel, so the attention lands in the next dynamo graph and reads the concatenation as an input::

    key_states = torch.cat([past_key_states, key_states], dim=-2)     # graph 1 returns it
    if torch.all(attention_mask):                                      # graph break
        attn_output = flash_attn_func(q.transpose(1, 2), key_states.transpose(1, 2), ...)  # graph 2

When the runtime knows the input's provenance at compile time (``hints``: argument index ->
``(dim, block length)``, see :mod:`fbcompile.backends.provenance`), this pass rewrites the input's
uses to::

    n = max(K.size(dim) - block, 0)
    K = torch.cat([K.narrow(dim, 0, n), K.narrow(dim, n, K.size(dim) - n)], dim)  # cached, block

which equals ``K`` for any ``K``, so :mod:`.find_attention` sees a concatenation and splits there.
The second piece is marked as the block (``meta["fbcompile_block"]``): it is internal although it
reads no input the query reads. The input carries ``meta["fbcompile_joined"] = (dim, block)`` so
the guards compare, at run time, the provenance of its first ``n`` positions (a tensor without it
never reuses). A split that no attention site takes is undone (:meth:`JoinedInput.undo`).
"""
from __future__ import annotations

import operator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.fx as fx

from fbcompile.passes.graph_utils import example


@dataclass
class JoinedInput:
    """One rewritten input and the nodes the rewrite added."""

    placeholder: fx.Node
    cat: fx.Node
    added: list[fx.Node]

    def undo(self) -> None:
        self.cat.replace_all_uses_with(self.placeholder)
        for node in reversed([*self.added, self.cat]):
            node.graph.erase_node(node)
        del self.placeholder.meta["fbcompile_joined"]


def _meta(node: fx.Node, value) -> fx.Node:
    node.meta["example_value"] = value
    return node


def split_joined_inputs(gm: fx.GraphModule, hints: dict[int, tuple[int, int]]) -> list[JoinedInput]:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    joined = []
    for index, (dim, block) in sorted(hints.items()):
        node = placeholders[index]
        value = example(node)
        if value is None or value.dim() <= dim:
            continue
        with getattr(value, "fake_mode", None) or nullcontext(), graph.inserting_before(placeholders[-1].next):
            size = value.shape[dim]
            length = _meta(graph.call_method("size", (node, dim)), size)
            start_value = torch.sym_max(size - block, 0)
            start = _meta(graph.call_function(torch.sym_max, (_meta(graph.call_function(
                operator.sub, (length, block)), size - block), 0)), start_value)
            rest = _meta(graph.call_function(operator.sub, (length, start)), size - start_value)
            head = _meta(graph.call_method("narrow", (node, dim, 0, start)), value.narrow(dim, 0, start_value))
            tail = _meta(graph.call_method("narrow", (node, dim, start, rest)),
                         value.narrow(dim, start_value, size - start_value))
            cat = _meta(graph.call_function(torch.cat, ([head, tail], dim)), torch.cat([head.meta["example_value"],
                                                                                        tail.meta["example_value"]], dim))
        tail.meta["fbcompile_block"] = True
        node.meta["fbcompile_joined"] = (dim, block)
        added = [length, start.args[0], start, rest, head, tail]
        node.replace_all_uses_with(cat, delete_user_cb=lambda user: user not in added and user is not cat
                                   and user is not output)
        joined.append(JoinedInput(node, cat, added))
    return joined
