"""Ops on host inputs moved out of a graph, so that the rest can be captured (Wan's CPU ``grid_sizes``).

The graphs are traced over fake CUDA tensors (no GPU needed) beside a CPU one; the moved-out island and
the rest then run on real CPU tensors and must give the graph's outputs.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from fbcompile.passes.host_island import split_host_island


def _traced(fn, *shapes):
    """``fn`` traced over a fake CUDA ``x`` and a fake CPU ``grid`` (int64), and real CPU inputs like them."""
    with FakeTensorMode():
        fakes = (torch.empty(shapes[0], device="cuda"), torch.empty(shapes[1], dtype=torch.long))
    gm = make_fx(fn, tracing_mode="fake")(*fakes)
    real = (torch.randn(shapes[0]), torch.randint(1, 5, shapes[1]))
    return gm, real


def _frame_size(x, grid):  # Wan: the layer's projections, and the frame size read off grid_sizes
    return torch.tanh(x) * 2, grid[0][1:].prod()


def _two_reads(x, grid):
    return grid[0].sum(), x + 1, grid[0][1:].prod() * 3


@pytest.mark.parametrize("fn,moved", [(_frame_size, [1]), (_two_reads, [0, 2])])
def test_the_island_moves_out_and_the_outputs_are_the_graphs(fn, moved):
    gm, args = _traced(fn, (2, 6), (1, 3))
    expected = gm(*args)
    island = split_host_island(gm, {1})
    assert island is not None and island.outputs == moved
    assert not [n for n in gm.graph.nodes if n.op != "placeholder" and n.op != "output"
                and any(a.name.startswith("grid") for a in n.all_input_nodes)]  # the rest reads no host input
    got = island.merge(island.gm(*args), gm(*args))
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def _scales_a_device_tensor(x, grid):  # a CPU scalar read by a CUDA op: the island would feed the rest
    return x * grid[0][1:].prod()


def _writes_the_host_input(x, grid):
    grid.add_(1)
    return x + 1, grid.sum()


def _moves_to_the_device(x, grid):
    return x + grid.to(x.device).sum()


@pytest.mark.parametrize("fn", [_scales_a_device_tensor, _writes_the_host_input, _moves_to_the_device],
                         ids=["feeds-a-device-op", "writes-the-input", "moves-to-the-device"])
def test_anything_else_leaves_the_graph_as_it_is(fn):
    gm, _ = _traced(fn, (2, 3), (1, 3))
    code = gm.code
    assert split_host_island(gm, {1}) is None
    assert gm.code == code


def test_a_graph_without_ops_on_the_host_inputs_has_no_island():
    gm, _ = _traced(lambda x, grid: (x * 2,), (2, 3), (1, 3))
    assert split_host_island(gm, {1}) is None
