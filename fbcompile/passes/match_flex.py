"""Match ``flex_attention`` with a ``BlockMask`` as an :class:`AttentionSite`.

The user wrote (diffusers' ``dispatch_attention_fn(..., backend="flex")`` calls the same)::

    block_mask = create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN)       # outside the graph
    k = torch.cat([cache_k, k], dim=2)
    out = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=g)   # or return_lse=True

and dynamo records the higher-order op with the mask as block tensors (graph inputs) and ``mask_mod`` as a
subgraph::

    r = torch.ops.higher_order.flex_attention(q, k, v, score_mod_0, (Q_LEN, KV_LEN, kv_num_blocks, kv_indices,
            full_kv_num_blocks, full_kv_indices, ..., Q_BLOCK_SIZE, KV_BLOCK_SIZE, mask_fn_0), scale,
            kernel_options, score_mod_buffers, mask_mod_buffers)
    out, lse = r[0], r[1]                                   # lse in base 2 (the wrapper scales it by ln 2)

Flex attends key ``j`` from query ``i`` iff their block pair is listed as full, or listed as partial and
``mask_mod(b, h, i, j)`` holds. The split computes exactly that, in the graph, for each key range it
attends separately (:func:`flex_key_mask`: the listed blocks, and ``mask_mod`` evaluated over the range
as flex evaluates it), so it is exact for any mask. The cost is a ``[M, n]`` bool mask per range,
and a reused external part needs none. A ``score_mod`` is split when it is the identity or adds a bias
that does not depend on the score (relative-position biases, ALiBi, diffusers' float ``attn_mask``)::

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]        # or score - slope[h] * (q_idx - kv_idx).abs()

The bias is then evaluated per key range too and passed as an additive mask (``-inf`` where flex masks);
any other ``score_mod`` changes the scores in a way the split kernels do not evaluate, and is left alone.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

from fbcompile.ops import listed_key_blocks
from fbcompile.passes.find_attention import AttentionSite, KeyMask
from fbcompile.passes.graph_utils import shape, traced_value


def is_flex_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.higher_order.flex_attention


def _evaluate(fn, q: torch.Tensor, start, length, per_batch: bool, per_head: bool) -> torch.Tensor:
    """``fn(b, h, q_idx, kv_idx)`` over ``[B | 1, H | 1, M, length]`` for keys ``[start, start + length)``,
    vmapped as flex (and ``create_mask``) evaluate mods: tensor indexing inside becomes ``aten.index``."""
    device = q.device
    indices = [torch.arange(q.shape[0] if per_batch else 1, device=device),
               torch.arange(q.shape[1] if per_head else 1, device=device),
               torch.arange(q.shape[-2], device=device), torch.arange(length, device=device) + start]
    for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)):
        fn = torch.vmap(fn, in_dims=dims)
    with TransformGetItemToIndex():
        return fn(*indices)


def flex_key_mask(q: torch.Tensor, start, length, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                  full_kv_num_blocks: torch.Tensor | None, full_kv_indices: torch.Tensor | None,
                  q_block: int, kv_block: int, mask_mod, mask_mod_buffers: tuple, score_mod, score_mod_buffers: tuple,
                  per_batch: bool, per_head: bool) -> torch.Tensor:
    """The mask ``[B | 1, H | 1, M, length]`` with which flex attends keys ``[start, start + length)``:
    bool, or with an additive ``score_mod`` its bias where flex attends and ``-inf`` elsewhere.

    The blocks a BlockMask lists are looked up by key in :func:`fbcompile.ops.listed_key_blocks`, an op
    Inductor leaves as it is: over a symbolic key count it got that lookup wrong on the CPU, or could not
    compile it (that op's docstring)."""
    torch._check(kv_num_blocks.shape[-1] * q_block >= q.shape[-2],
                 lambda: "fbcompile: the BlockMask has fewer query blocks than the query has rows")
    if isinstance(length, int) and length == 0:  # vmap over no key fails where a score_mod indexes a tensor
        return q.new_zeros(q.shape[0] if per_batch else 1, q.shape[1] if per_head else 1, q.shape[-2], 0,
                           dtype=torch.bool if score_mod is None else torch.float32)

    def listed(num_blocks, indices):
        return listed_key_blocks(num_blocks, indices, q.shape[-2], q_block, start, length, kv_block)

    evaluated = _evaluate(lambda b, h, q_idx, kv_idx: mask_mod(b, h, q_idx, kv_idx, *mask_mod_buffers),
                          q, start, length, per_batch, per_head)
    mask = listed(kv_num_blocks, kv_indices) & evaluated
    if full_kv_num_blocks is not None:
        mask = mask | listed(full_kv_num_blocks, full_kv_indices)
    if score_mod is None:
        return mask
    zero = torch.zeros((), dtype=torch.float32, device=q.device)
    bias = _evaluate(lambda b, h, q_idx, kv_idx: score_mod(zero, b, h, q_idx, kv_idx, *score_mod_buffers),
                     q, start, length, per_batch, per_head)
    return torch.where(mask, bias.float(), float("-inf"))


class _FlexKeys(KeyMask):
    def __init__(self, node: fx.Node, score_mod: fx.Node | None, per_batch: bool, per_head: bool):
        self.node, self.score_mod = node, score_mod
        self.per_batch, self.per_head = per_batch, per_head

    def emit(self, graph: fx.Graph, start, length) -> fx.Node:
        q, block_mask = self.node.args[0], self.node.args[4]
        score_buffers, mask_buffers = (tuple(self.node.args[i]) if len(self.node.args) > i else () for i in (7, 8))
        return graph.call_function(flex_key_mask, (
            q, start, length, *block_mask[2:6], block_mask[-3], block_mask[-2], block_mask[-1], mask_buffers,
            self.score_mod, score_buffers if self.score_mod is not None else (), self.per_batch, self.per_head))


def _lists_every_query_row(listed_rows, rows) -> bool:
    """Does the BlockMask list a block for every query row? Proven on the sizes, or - symbolic sizes
    sympy cannot compare (a length padded to a multiple of 128 with ``ceil``, as diffusers' AnyFlow pads)
    - true at the traced sizes and checked again at every call by :func:`flex_key_mask`."""
    if statically_known_true(listed_rows >= rows):
        return True
    return not isinstance(rows, int) and traced_value(listed_rows) >= traced_value(rows)


def _subgraph(gm: fx.GraphModule, node) -> fx.GraphModule | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        module = getattr(gm, node.target, None)
        return module if isinstance(module, fx.GraphModule) else None
    return None


def _placeholders(module: fx.GraphModule) -> list[fx.Node]:
    return [n for n in module.graph.nodes if n.op == "placeholder"]


def _score_mod_kind(module: fx.GraphModule) -> str | None:
    """"identity", "bias" (``score + f(b, h, q_idx, kv_idx)`` or ``score - f(...)``, ``f`` not reading the
    score: evaluated at ``score = 0`` it is the bias) or None."""
    output = next(n for n in module.graph.nodes if n.op == "output")
    result = output.args[0]
    result = result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result
    score = _placeholders(module)[0]
    if result is score:
        return "identity"
    if not (isinstance(result, fx.Node) and result.op == "call_function" and len(result.args) == 2
            and not result.kwargs and score in result.args):
        return None
    if result.target in (operator.add, torch.add):
        bias = result.args[1] if result.args[0] is score else result.args[0]
    elif result.target in (operator.sub, torch.sub) and result.args[0] is score:
        bias = result.args[1]
    else:
        return None
    return None if _reads(bias, score) else "bias"


def _reads(node, target: fx.Node) -> bool:
    """Does ``node`` (a value in a subgraph) depend on ``target``?"""
    stack, seen = [node] if isinstance(node, fx.Node) else [], set()
    while stack:
        current = stack.pop()
        if current is target:
            return True
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return False


def match_flex(gm: fx.GraphModule, node: fx.Node) -> AttentionSite | None:
    """The site of a flex_attention node (``node`` replaced: its output), None if the output is unused."""
    outputs = {user.args[1]: user for user in node.users if user.target is operator.getitem}
    if 0 not in outputs:
        return None
    q, k, v, score_mod, block_mask, scale, kernel_options = node.args[:7]
    log2 = (kernel_options or {}).get("BACKEND") != "FLASH"  # the HOP's lse is in base 2 unless FLASH
    site = AttentionSite(node=outputs[0], form="flex", q=q, k=k, v=v, scale=scale, lse=outputs.get(1),
                         lse_factor=1 / math.log(2) if log2 else 1.0)
    score_module, mask_module = _subgraph(gm, score_mod), _subgraph(gm, block_mask[-1])
    score_kind = _score_mod_kind(score_module) if score_module is not None else None
    q_block, kv_block, num_blocks = block_mask[-3], block_mask[-2], block_mask[2]
    if set(outputs) - {0, 1} or len(outputs) != len(node.users):
        site.reason = "flex_attention's max_scores output is used"
    elif score_kind is None:
        site.reason = "score_mod is neither the identity nor score + a bias (the split kernels do not evaluate it)"
    elif mask_module is None or not all(isinstance(b, int) for b in (q_block, kv_block)):
        site.reason = "BlockMask without a mask_mod subgraph and int block sizes"
    elif not isinstance(scale, (int, float)):
        site.reason = "scale is not a constant"
    elif shape(num_blocks) is None or not _lists_every_query_row(shape(num_blocks)[-1] * q_block, shape(q)[-2]):
        site.reason = "the BlockMask has fewer query blocks than the query has rows"
    else:
        index_users = [_placeholders(mask_module)[:2]]
        if score_kind == "bias":
            index_users.append(_placeholders(score_module)[1:3])
        per_batch, per_head = (any(bool(p[i].users) for p in index_users) for i in range(2))
        site.key_mask = _FlexKeys(node, score_mod if score_kind == "bias" else None, per_batch, per_head)
    return site
