"""Rewrite flash-attn's varlen forward over sequences of equal lengths as its batched forward.

Wan's ``flash_attention`` (Self-Forcing, CausVid, LongLive: the Wan video models wherever flash-attn is
installed) packs the batch into the tokens and passes equal lengths::

    q_lens = torch.tensor([lq] * b, dtype=torch.int32).to(device=q.device, non_blocking=True)
    cu_seqlens_q = torch.cat([q_lens.new_zeros([1]), q_lens]).cumsum(0, dtype=torch.int32).to(q.device)
    out = flash_attn_varlen_func(q.flatten(0, 1).to(dtype), k.flatten(0, 1).to(dtype), v.flatten(0, 1).to(dtype),
                                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q=lq, max_seqlen_k=lk).unflatten(0, (b, lq))

which dynamo records as ``torch.ops.flash_attn._flash_attn_varlen_forward(q_packed, k_packed, v_packed, cu_q,
cu_k, lq, lk, ...)``. With every sequence ``lq`` queries and ``lk`` keys long, sequence ``i`` is rows
``[i * lq, (i + 1) * lq)`` of the packed tensors: the call is flash-attn's batched forward on the unpacked
ones, which this pass emits instead::

    r = torch.ops.flash_attn._flash_attn_forward(q.to(dtype), k.to(dtype), v.to(dtype), dropout_p, scale, ...)
    out, softmax_lse = r[0].flatten(0, 1), r[1].transpose(0, 1).flatten(1)   # varlen's lse is [H, b * lq]

flash-attn 3's call with ``cu_seqlens`` (Wan's ``flash_attn_interface`` path) becomes the same op without
them. Either way :mod:`.match_flash` finds it and :mod:`.find_attention` traces ``k`` to the cache it concatenates.
Proven from the graph, else the call stays as it is and the report says why
(``node.meta["fbcompile_varlen"]``): each packed operand is ``x.flatten(0, 1)`` of a 4-D ``x``, then only
dtype casts; each ``cu_seqlens`` is the running sum, from 0, of ``b`` equal lengths ``l`` (the form above,
or ``torch.arange(0, (b + 1) * l, l)``), ``b`` and ``l`` being the unpacked operand's first two sizes; each
``max_seqlen`` is that ``l``; ``v`` as long as ``k`` (a guard: flash-attn requires it, and a call where
dynamo's symbols differ recompiles); every other argument that does not mean the same per sequence at its
default (no paged, padded or appended keys: ``block_table``, ``leftpad_k``, ``seqused_k``, ``page_table``...).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import guard_or_false

from fbcompile.passes.find_attention import AttentionSite
from fbcompile.passes.flash_ops import PER_SEQUENCE, FlashCall, flash_call
from fbcompile.passes.graph_utils import (NoExample, arg, erase_unused, example, fill_examples, op_name,
                                         qualified_op_name, recorded, same_size)

REASON = "fbcompile_varlen"  # node.meta key: why a varlen call was not unpacked
UNPACKED = "fbcompile_unpacked_varlen"  # node.meta key of the batched call that replaced a varlen one


class NotUnpacked(Exception):
    """Why a varlen call stays packed."""


def unpack_flash_varlen(gm: fx.GraphModule) -> None:
    """Rewrite every proven varlen call of ``gm`` (see the module docstring); note why the others stay."""
    for node in list(gm.graph.nodes):
        call = flash_call(node)
        if call is not None and call.packed:
            try:
                _rewrite(gm.graph, call)
            except NotUnpacked as e:
                node.meta[REASON] = f"flash-attn's varlen forward: {e}"


def packed_site(call: FlashCall) -> AttentionSite | None:
    """A varlen call left packed, as a site the report shows skipped (None if its output is unused)."""
    node = call.node
    out = next((user for user in node.users if user.target is operator.getitem and user.args[1] == 0), None)
    if out is None:
        return None
    return AttentionSite(node=out, form="flash varlen", q=call.arguments["q"], k=call.arguments["k"],
                         v=call.arguments["v"], tokens_first=True,
                         reason=node.meta.get(REASON, "flash-attn's varlen forward, not unpacked"))


def _batched_call(graph: fx.Graph, call: FlashCall, q: fx.Node, k: fx.Node, v: fx.Node) -> fx.Node:
    """The batched forward of ``call``'s version on unpacked operands, with ``call``'s per-sequence options."""
    if call.version == 2:
        namespace = qualified_op_name(call.node.target).split("::")[0]
        forward = getattr(getattr(torch.ops, namespace), "_flash_attn_forward", None)
        if forward is None:
            raise NotUnpacked(f"torch.ops.{namespace} has no batched forward")
        options = {name: value for name, value in call.arguments.items() if name in PER_SEQUENCE[2]}
    else:  # the same op, without the packing arguments
        forward = call.node.target
        options = {name: value for name, value in call.arguments.items()
                   if name in PER_SEQUENCE[3] and call.given(name)}
    return graph.call_function(forward, (q, k, v), options)


def _rewrite(graph: fx.Graph, call: FlashCall) -> None:
    node, arguments = call.node, call.arguments
    given = call.not_per_sequence()
    if given is not None:
        raise NotUnpacked(f"{given[0]} is given")
    q, k, v = (_unpacked(arguments[name], name) for name in ("q", "k", "v"))
    batch = _shape(q.source)[0]
    for operand in (k, v):
        if not same_size(_shape(operand.source)[0], batch):
            raise NotUnpacked(f"{operand.name}'s batch is not q's")
    # flash-attn requires it (v has k's packed rows); dynamo's guard makes a call where they differ recompile
    if not guard_or_false(_shape(v.source)[1] == _shape(k.source)[1]):
        raise NotUnpacked("k and v are not as long")
    for operand in (q, k):
        batch, length = _shape(operand.source)[:2]
        lengths = _equal_lengths(arguments[f"cu_seqlens_{operand.name}"], batch)
        if lengths is None or not same_size(lengths, length):
            raise NotUnpacked(f"cu_seqlens_{operand.name} are not {batch} sequences of {length}")
        if not same_size(_int(arguments[f"max_seqlen_{operand.name}"]), length):
            raise NotUnpacked(f"max_seqlen_{operand.name} is not the sequences' length")
    users = list(node.users)
    if not all(user.target is operator.getitem and isinstance(user.args[1], int) for user in users):
        raise NotUnpacked("its outputs are used other than one by one")
    with graph.inserting_before(node):
        batched = _batched_call(graph, call, *(operand.emit(graph) for operand in (q, k, v)))
    batched.meta[UNPACKED] = True
    outputs = []
    for user in users:
        with graph.inserting_before(user):
            output = graph.call_function(operator.getitem, (batched, user.args[1]))
            if user.args[1] == 0:  # [b, lq, H, D] -> [b * lq, H, D]
                output = graph.call_method("flatten", (output, 0, 1))
            elif user.args[1] == 1:  # [b, H, lq] -> [H, b * lq]
                output = graph.call_method("flatten", (graph.call_method("transpose", (output, 0, 1)), 1))
        outputs.append(output)
    try:
        fill_examples(*outputs)
    except NoExample as e:
        for output in outputs:
            erase_unused(graph, output)
        erase_unused(graph, batched)
        raise NotUnpacked(f"the batched forward has no fake implementation ({e})") from None
    for user, output in zip(users, outputs):
        user.replace_all_uses_with(output)
        graph.erase_node(user)
    inputs = node.all_input_nodes
    graph.erase_node(node)
    for dead in inputs:
        erase_unused(graph, dead)


def _shape(node) -> tuple:
    value = example(node)
    if value is None:
        raise NotUnpacked(f"no shape recorded for {getattr(node, 'name', node)}")
    return tuple(value.shape)


def _int(value):
    return recorded(value) if isinstance(value, fx.Node) else value


@dataclass
class _Unpacked:
    """A packed operand ``source.flatten(0, 1)`` then ``casts`` (dtype casts, ``contiguous``)."""

    name: str
    source: fx.Node
    casts: list[fx.Node]

    def emit(self, graph: fx.Graph) -> fx.Node:
        """``source`` with the casts applied (they commute with the flatten)."""
        node = self.source
        for cast in self.casts:
            node = graph.call_method(cast.target, (node, *cast.args[1:]), dict(cast.kwargs))
        if node is not self.source:
            fill_examples(node)
        return node


def _is_cast(node: fx.Node) -> bool:
    """``x.to(dtype)``, ``x.type(dtype)``, ``x.to(dtype=dtype)``, ``x.contiguous()``: elementwise, no move."""
    if node.op != "call_method" or not node.args:
        return False
    rest, kwargs = node.args[1:], node.kwargs
    if node.target == "contiguous":
        return not rest and not kwargs
    if node.target in ("to", "type"):
        values = list(rest) + list(kwargs.values())
        return len(values) == 1 and isinstance(values[0], torch.dtype) and set(kwargs) <= {"dtype"}
    return False


def _unpacked(node, name: str) -> _Unpacked:
    casts = []
    while isinstance(node, fx.Node) and _is_cast(node):
        casts.append(node)
        node = node.args[0]
    flattened = isinstance(node, fx.Node) and op_name(node) == "flatten" and \
        (arg(node, 1, "start_dim", 0), arg(node, 2, "end_dim", -1)) == (0, 1)
    source = node.args[0] if flattened else None
    if not isinstance(source, fx.Node) or example(source) is None or example(source).dim() != 4:
        raise NotUnpacked(f"{name} is not a 4-D tensor flattened at its first two dims")
    return _Unpacked(name, source, list(reversed(casts)))


def _strip_moves(node):
    """Skip ``.to(device=..., dtype=..., non_blocking=...)`` calls (no value changes for integer lengths)."""
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to" and \
            all(isinstance(a, (torch.device, torch.dtype, str)) for a in node.args[1:]) and \
            set(node.kwargs) <= {"device", "dtype", "non_blocking"}:
        node = node.args[0]
    return node


def _equal_lengths(cu, batch):
    """``l`` if ``cu`` is the running sum from 0 of ``batch`` lengths ``l``, else None."""
    cu = _strip_moves(cu)
    if not isinstance(cu, fx.Node):
        return None
    if op_name(cu) == "arange":
        bounds = list(cu.args) + [cu.kwargs[k] for k in ("start", "end", "step") if k in cu.kwargs]
        if len(bounds) != 3 or _int(bounds[0]) != 0:
            return None
        end, step = _int(bounds[1]), _int(bounds[2])
        return step if same_size(end, (batch + 1) * step) else None
    if op_name(cu) != "cumsum" or arg(cu, 1, "dim") not in (0, -1):
        return None
    joined = cu.args[0]
    if not isinstance(joined, fx.Node) or op_name(joined) != "cat" or arg(joined, 1, "dim", 0) not in (0, -1):
        return None
    parts = arg(joined, 0, "tensors")
    if len(parts) != 2 or not _is_zero(parts[0]):
        return None
    lengths = _strip_moves(parts[1])
    if not isinstance(lengths, fx.Node):
        return None
    if op_name(lengths) == "tensor" and isinstance(lengths.args[0], (list, tuple)):  # [l] * b
        values = lengths.args[0]
        first = values[0] if values else None
        same = all(v is first or (isinstance(v, int) and v == first) for v in values)
        return _int(first) if values and same and same_size(len(values), batch) else None
    if op_name(lengths) == "full":  # torch.full((b,), l)
        size = arg(lengths, 0, "size")
        if isinstance(size, (list, tuple)) and len(size) == 1 and same_size(_int(size[0]), batch):
            return _int(arg(lengths, 1, "fill_value"))
    return None


def _is_zero(node) -> bool:
    """``x.new_zeros(1)``, ``x.new_zeros([1])``, ``torch.zeros(1)``: one zero."""
    node = _strip_moves(node)
    if not isinstance(node, fx.Node) or op_name(node) not in ("new_zeros", "zeros"):
        return False
    size = node.args[1:] if node.op == "call_method" else node.args
    if len(size) == 1 and isinstance(size[0], (list, tuple)):
        size = size[0]
    return tuple(size) == (1,)
