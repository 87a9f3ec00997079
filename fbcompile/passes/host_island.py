"""Move a graph's computation on host inputs out of it, so that the rest can run as a CUDA graph.

Wan's self-attention (Self-Forcing, CausVid, LongLive) reads the frame size off ``grid_sizes``, a CPU
tensor the model builds at every call, right before ``.item()`` breaks the graph::

    grid_sizes = torch.stack([torch.tensor(u.shape[2:], dtype=torch.long) for u in x])   # on the CPU
    ...
    frame_seqlen = math.prod(grid_sizes[0][1:]).item()                                   # graph break

so each layer's graph up to the break (the previous layer's MLP, this layer's projections and norms)
reads a CPU input beside CUDA ones, and cannot be captured. When the ops that read the host inputs form
an *island* - each one reads only host inputs, int inputs, constants and other ops of the island, writes
nothing and computes on the host - and its values leave the graph only as graph outputs, this pass moves
the island into a graph of its own, which runs eagerly before the rest; the rest then no longer reads the
host inputs. Anything else (an island value a device op reads: a CPU scalar multiplying a CUDA tensor, a
host input a device op reads) leaves the graph as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fbcompile.passes.graph_utils import may_write_unseen, mutated_tensor, recorded


@dataclass
class HostIsland:
    """The ops moved out: ``gm`` takes the graph's inputs and returns the graph's outputs at ``outputs``."""

    gm: fx.GraphModule
    outputs: list[int]

    def merge(self, island, rest) -> list:
        """The graph's outputs, from the island's and the rest's (the graph's without the island's)."""
        rest = list(rest)
        at, remaining = dict(zip(self.outputs, island)), iter(rest)
        return [at[i] if i in at else next(remaining) for i in range(len(at) + len(rest))]


def split_host_island(gm: fx.GraphModule, host_inputs: set[int]) -> HostIsland | None:
    """Move the island over the CPU tensor inputs ``host_inputs`` out of ``gm`` (rewritten in place); None,
    ``gm`` untouched, if the ops reading them form none (see the module docstring)."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    sources = {placeholders[i] for i in host_inputs}
    ints = {p for p in placeholders if not isinstance(recorded(p), torch.Tensor)}
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    island: dict[fx.Node, None] = {}
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if node is output or not any(n in sources or n in island for n in inputs):
            continue
        value = recorded(node)
        if (node.op not in ("call_function", "call_method") or mutated_tensor(node) is not None
                or may_write_unseen(node)
                or (isinstance(value, torch.Tensor) and value.device.type != "cpu")
                or not all(n in sources or n in island or n in ints for n in inputs)):
            return None
        island[node] = None
    if not island or any(user not in island and user is not output for node in island for user in node.users):
        return None
    values = list(output.args[0])
    positions = [i for i, value in enumerate(values) if value in island]
    moved = fx.Graph()
    env = {p: moved.placeholder(p.name) for p in placeholders}
    for node in island:
        env[node] = moved.node_copy(node, env.__getitem__)
    moved.output(tuple(env[values[i]] for i in positions))
    output.args = (tuple(v for i, v in enumerate(values) if i not in positions),)
    for node in reversed(island):
        graph.erase_node(node)
    gm.recompile()
    return HostIsland(fx.GraphModule(gm, moved), positions)
