"""Piecewise CUDA graphs: a compiled graph whose cached keys/values move at every block, run as captured
segments around uncaptured pieces that read the moving tensors.

A refresh graph over a cache that grows by a ``torch.cat`` per block (HF ``DynamicCache``) gets new
key/value tensors - new addresses, new length - at every block, so a whole-graph capture, whose replay
reads its inputs at fixed addresses, could never replay (:mod:`.cuda_graphs`). Such a graph is split
(:func:`split_pieces`) at the nodes that read the moving tensors (the cached keys/values, and inputs
that moved with them: an attention mask as long as the cache), found by what they read at the call
that triggers the split (not by name):

* **moving pieces**: each node one of whose arguments shares memory with a moving input (the external
  attention ``fbcompile::attention_lse(q, k_cache, v_cache, ...)``, a ``torch.cat`` of the cache that a
  graph returns, a view of the cache or mask and what reads it), with the ``getitem``\\ s of its
  outputs. They run uncaptured, as the graph's own Python code: a couple of kernel launches per
  layer.
* **segments**: the runs of nodes between them (projections, norms, MLPs, the merges: most kernels),
  each compiled with the graph's compile function (Inductor, or the FX graph with ``compiler="eager"``)
  and wrapped in a :class:`.cuda_graphs.CapturedGraph` of its own: parameters and buffers taken by
  address, activations copied in, outputs copied out. A segment reads no moving tensor, so its replay
  key stays the same from block to block: it is captured once (at its second call) for all blocks.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch.fx.node import map_arg


@dataclass
class Piece:
    """Nodes of the parent graph run as one unit: ``inputs`` (parent nodes) in, ``outputs`` out."""
    gm: fx.GraphModule
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    moving: bool
    run: Callable = None


def node_values(gm: fx.GraphModule, args) -> tuple[object, dict[fx.Node, object]]:
    """Run ``gm`` node by node on ``args``: its outputs, and every node's value (placeholders included)."""
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    outputs = interpreter.run(*args)
    return outputs, interpreter.env


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def moving_nodes(gm: fx.GraphModule, values: dict, moving_inputs: list[torch.Tensor]) -> set[fx.Node]:
    """Nodes that read memory of ``moving_inputs`` (given ``values``, every node's value at one call),
    and the ``getitem``\\ s of their outputs, so that pieces exchange tensors."""
    storages = {t.untyped_storage().data_ptr() for t in moving_inputs}
    moving: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        read = [t for n in node.all_input_nodes for t in _tensors(values.get(n))]
        if any(t.untyped_storage().data_ptr() in storages for t in read) or (
                node.target is operator.getitem and node.args[0] in moving):
            moving.add(node)
    return moving


def split_pieces(gm: fx.GraphModule, moving: set[fx.Node]) -> list[Piece]:
    """``gm``'s nodes in order, cut into maximal runs of moving and of other nodes; each run a graph of
    its own, reading the parent values it needs (``get_attr`` constants copied in) and returning those
    read after it."""
    runs: list[tuple[bool, list[fx.Node]]] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if not runs or runs[-1][0] != (node in moving):
            runs.append((node in moving, []))
        runs[-1][1].append(node)
    pieces = []
    for index, (is_moving, nodes) in enumerate(runs):
        inside = set(nodes)
        later = {n for _, rest in runs[index + 1:] for m in rest for n in m.all_input_nodes}
        later |= set(next(iter(gm.graph.find_nodes(op="output"))).all_input_nodes)
        graph, env, inputs = fx.Graph(), {}, []

        def value(n: fx.Node) -> fx.Node:
            if n not in env:
                if n.op == "get_attr":
                    env[n] = graph.node_copy(n)
                else:
                    inputs.append(n)
                    env[n] = graph.placeholder(n.name)
                    env[n].meta = dict(n.meta)
            return env[n]

        for node in nodes:
            for n in node.all_input_nodes:
                if n not in inside:
                    value(n)
            env[node] = graph.node_copy(node, env.__getitem__)
        outputs = [n for n in nodes if n in later]
        graph.output(tuple(env[n] for n in outputs))
        pieces.append(Piece(fx.GraphModule(gm, graph), inputs, outputs, is_moving))
    return pieces


class PiecewiseGraph:
    """``gm`` run as its pieces: moving pieces uncaptured, segments through ``wrap(compile_segment(...))``.

    ``values``: every node's value at the call that makes the split (:func:`node_values`, placeholders
    included); ``moving``: the argument indices of the moving inputs; ``static``: argument indices
    taken by address (parameters, buffers); ``compile_segment(gm, example_inputs)``: the graph's compile
    function; ``wrap(run, gm, static)``: the capture of a segment."""

    def __init__(self, gm: fx.GraphModule, values: dict, moving: set[int], static: set[int],
                 compile_segment: Callable, wrap: Callable):
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        kv = [t for i in moving for t in _tensors(values[placeholders[i]])]
        self.pieces = split_pieces(gm, moving_nodes(gm, values, kv))
        static_nodes = {placeholders[i] for i in static}
        examples = _example_values(gm, placeholders, values)
        for piece in self.pieces:
            if piece.moving:
                piece.run = piece.gm.forward
            else:
                run = compile_segment(piece.gm, [examples[n] for n in piece.inputs])
                piece.run = wrap(run, piece.gm, {i for i, n in enumerate(piece.inputs) if n in static_nodes})
        self._placeholders = placeholders
        self._constants = {n: values[n] for n in gm.graph.find_nodes(op="get_attr")}
        self._output = next(iter(gm.graph.find_nodes(op="output"))).args[0]

    def __call__(self, *args):
        env = dict(zip(self._placeholders, args))
        env.update(self._constants)
        for piece in self.pieces:
            env.update(zip(piece.outputs, piece.run(*[env[n] for n in piece.inputs])))
        return map_arg(self._output, env.__getitem__)


def _example_values(gm: fx.GraphModule, placeholders: list[fx.Node], values: dict) -> dict:
    """Example inputs to compile segments with: fake values (symbolic sizes) in dynamo's fake mode,
    propagated from the placeholders' ``example_value`` (a placeholder a pass added, without one: its
    value at the splitting call, made fake); the splitting call's values where the graph has no fake
    mode (not traced by dynamo)."""
    from torch._guards import detect_fake_mode

    examples = [n.meta.get("example_value") for n in placeholders]
    fake_mode = detect_fake_mode([a for a in examples if isinstance(a, torch.Tensor)])
    if fake_mode is None:
        return values
    fake_args = [example if example is not None else _made_fake(values[n], fake_mode)
                 for n, example in zip(placeholders, examples)]
    with fake_mode:
        _, fake_values = node_values(gm, fake_args)
    return fake_values


def _made_fake(value, fake_mode):
    """``value`` in ``fake_mode`` (its sizes static) if a tensor."""
    return fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
