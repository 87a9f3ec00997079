"""flash-attn's forward calls read by their schema's argument names (:mod:`fbcompile.passes.flash_ops`): given
positionally, by keyword or defaulted alike, and a fork's extra arguments matched while at their defaults."""
from __future__ import annotations

import torch
import torch.fx as fx

from fbcompile.passes.flash_ops import FlashCall, flash_call
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


@torch.library.custom_op("_flash_attn3_0badc0de_dirty::_flash_attn_forward", mutates_args=())
def hub_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_new: torch.Tensor | None = None,
                cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                softmax_scale: float | None = None, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel hub build of flash-attn 3's forward (its arguments cut short), in the build's namespace."""
    raise NotImplementedError("only traced")


@torch.library.custom_op("_flash_attn3_0badc0de_dirty::_flash_attn_varlen_forward", mutates_args=())
def hub_mislabelled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An op with flash-attn's name and namespace but not its arguments."""
    raise NotImplementedError("only traced")


@torch.library.custom_op("fbcompile_test::_flash_attn_forward", mutates_args=())
def other_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, softmax_scale: float,
                  causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn 2's name and arguments in a namespace that is not flash-attn's."""
    raise NotImplementedError("only traced")


def _op_call(op, *args, **kwargs) -> fx.Node:
    graph = fx.Graph()
    q = graph.placeholder("q")
    return graph.call_function(op, (q, q, q, *args), kwargs)


def test_the_version_is_read_from_the_schema_in_any_flash_attn_namespace():
    call = flash_call(_op_call(torch.ops._flash_attn3_0badc0de_dirty._flash_attn_forward.default, causal=True))
    assert (call.version, call.packed, call.arguments["causal"]) == (3, False, True)
    node = _op_call(torch.ops._flash_attn3_0badc0de_dirty._flash_attn_forward.default, None)
    node.update_kwarg("cu_seqlens_q", node.args[0])
    assert flash_call(node).packed
    assert flash_call(_op_call(torch.ops._flash_attn3_0badc0de_dirty._flash_attn_varlen_forward.default)) is None
    assert flash_call(_op_call(torch.ops.fbcompile_test._flash_attn_forward.default, 0.0, 0.5, False)) is None
