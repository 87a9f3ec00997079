"""flash-attn's forward calls read by their schema's argument names (:mod:`fbcompile.passes.flash_ops`): given
positionally, by keyword or defaulted alike, and a fork's extra arguments matched while at their defaults."""
from __future__ import annotations

import torch
import torch.fx as fx

from fbcompile.passes.flash_ops import FlashCall
from fbcompile.passes.graph_utils import op_arguments


@torch.library.custom_op("fbcompile_test::fork_forward", mutates_args=())
def fork_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_new: torch.Tensor | None = None,
                 softmax_scale: float | None = None, causal: bool = False, window_size_left: int = -1,
                 num_splits: int = 1, deterministic: bool = False,
                 arbitrary_func: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A flash-attn 3 fork's forward: the upstream arguments (some), then two of its own, defaulted."""
    raise NotImplementedError("only traced")


def _call(*args, **kwargs) -> fx.Node:
    graph = fx.Graph()
    q = graph.placeholder("q")
    return graph.call_function(torch.ops.fbcompile_test.fork_forward.default, (q, q, q, *args), kwargs)


def test_arguments_are_bound_by_name_with_the_defaults():
    arguments, defaults = op_arguments(_call(None, 0.5, causal=True))
    assert arguments["k_new"] is None and arguments["softmax_scale"] == 0.5 and arguments["causal"] is True
    assert arguments["window_size_left"] == -1 and arguments["deterministic"] is False
    assert defaults == dict(k_new=None, softmax_scale=None, causal=False, window_size_left=-1, num_splits=1,
                            deterministic=False, arbitrary_func=None)
    assert op_arguments(_call(unknown=1)) is None  # not this schema's argument
    assert op_arguments(_call(*[None] * 8)) is None  # more arguments than the schema has


def test_a_forks_own_arguments_split_only_at_their_defaults():
    def unsplittable(node):
        return FlashCall(node, 3, False, *op_arguments(node)).unsplittable()

    assert unsplittable(_call(softmax_scale=0.5, causal=True, num_splits=4, deterministic=False)) is None
    assert unsplittable(_call(deterministic=True)) == ("deterministic", True, False)
    assert unsplittable(_call(window_size_left=8)) == ("window_size_left", 8, -1)
    node = _call()
    node.update_kwarg("arbitrary_func", node.args[0])
    assert unsplittable(node) == ("arbitrary_func", node.args[0], None)
