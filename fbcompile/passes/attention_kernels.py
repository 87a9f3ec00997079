"""Which implementation runs each attention part of a compiled graph (``fbcompile.explain`` shows it).

The ops pick the Triton kernels, cuDNN or the plain PyTorch reference from their inputs' devices, dtypes
and static sizes (:func:`fbcompile.ops.attention_kernel`); the nodes of a rewritten graph carry no
example values, so a copy of the graph is first run on fake tensors of its example inputs. An analysis
only: the graph is not changed. :func:`fbcompile.passes.key_count.add_key_count` reads it too (a part on
cuDNN takes no key count).

    out_e, lse_e = torch.ops.fbcompile.attention_lse(q, past_k, past_v, None, 0.088)          # -> "Triton"
    out, lse = torch.ops.fbcompile.attention_merge_lse(q, k, v, None, 0.088, out_e, lse_e)    # -> "Triton"

An ``attention_refresh_lse`` call (:mod:`.refresh_attention`) holds both parts: ``"<name>.external"`` and
``"<name>.internal"``, each as the op it stands for would run it.
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fbcompile.ops import attention_kernel
from fbcompile.passes.graph_utils import copy_module, traced_value

# All start (q, k, v, mask, scale); attention_lse may end with the key count (fbcompile.passes.key_count),
# attention_refresh_lse goes on with the block's (k, v, mask) and the key count.
_OPS = (torch.ops.fbcompile.attention_lse.default, torch.ops.fbcompile.attention_merge_lse.default,
        torch.ops.fbcompile.attention_refresh_lse.default)


def fake_inputs(example_inputs: list) -> tuple[FakeTensorMode, list]:
    """Fake copies of a graph's example inputs (sizes, strides, dtypes, devices; no data kept alive):
    tensors of static sizes, and a symbolic int dynamo passes as a symbol of a shape environment of the
    analysis's own (what the kernels tell at trace time stays unknown for it), since a guard made on
    dynamo's symbol would land in dynamo's environment and specialize the graph (on torch 2.11 a
    ``size()`` call on a tensor sized by one guarded it: a recompile at every cache length)."""
    shapes = ShapeEnv()
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=shapes)  # constants (get_attr) stay real
    return mode, [mode.from_tensor(x, static_shapes=True) if isinstance(x, torch.Tensor) else
                  _own_symbol(shapes, traced_value(x), i) if isinstance(x, torch.SymInt) else
                  traced_value(x) if isinstance(x, torch.SymBool) else x for i, x in enumerate(example_inputs)]


def _own_symbol(shapes: ShapeEnv, value: int, index: int) -> torch.SymInt:
    return shapes.create_symintnode(shapes.create_symbol(value, ConstantSource(f"input_{index}")), hint=value)


def attention_parts(gm: fx.GraphModule) -> list[fx.Node]:
    """The ``attention_lse`` / ``attention_merge_lse`` / ``attention_refresh_lse`` calls of ``gm``."""
    return [node for node in gm.graph.nodes if node.op == "call_function" and node.target in _OPS]


def kernels_of(gm: fx.GraphModule, mode: FakeTensorMode, inputs: list) -> dict[str, str]:
    """The implementation of each attention part of ``gm``, by node name (``{"attention_lse": "Triton",
    ...}``), from a copy of ``gm`` run on the fake inputs (``gm``'s nodes stay as they are); raises if
    the graph cannot run on them."""
    copy = copy_module(gm)
    FakeTensorProp(copy, mode).propagate_dont_convert_inputs(*inputs)

    def value(arg):
        return arg.meta["val"] if isinstance(arg, fx.Node) else arg

    kernels = {}
    for node in attention_parts(copy):
        q, k, v, mask = map(value, node.args[:4])
        if node.target is _OPS[2]:
            k_blk, v_blk, mask_blk, key_count = map(value, node.args[5:9])
            kernels[f"{node.name}.external"] = attention_kernel(q, k, v, mask, key_count)
            kernels[f"{node.name}.internal"] = attention_kernel(q, k_blk, v_blk, mask_blk)
            continue
        key_count = value(node.args[5]) if node.target is _OPS[0] and len(node.args) > 5 else None
        kernels[node.name] = attention_kernel(q, k, v, mask, key_count)
    return kernels


def attention_kernels(gm: fx.GraphModule, mode: FakeTensorMode, inputs: list) -> Counter:
    """Attention parts of ``gm`` per implementation, ``{"Triton": 56, ...}`` (see :func:`kernels_of`)."""
    return Counter(kernels_of(gm, mode, inputs).values())
