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
attends separately (:func:`flex_key_mask`: the listed blocks, and ``mask_mod`` evaluated with
``create_mask`` over the range), so it is exact for any mask. The cost is a ``[M, n]`` bool mask per range,
and a reused external part needs none. Only the identity ``score_mod`` is split: any other one changes
the scores themselves, which the split kernels do not evaluate.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.nn.attention.flex_attention import create_mask

from fbcompile.passes.find_attention import AttentionSite, KeyMask
from fbcompile.passes.graph_utils import shape


def is_flex_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.higher_order.flex_attention


def _listed(num_blocks: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``[B, H, len(rows), len(cols)]``: is block ``(rows[i], cols[j])`` among a row's first ``num_blocks``
    ``indices``? Columns past the mask's width are not."""
    width = indices.shape[-1]
    valid = torch.arange(width, device=indices.device) < num_blocks.unsqueeze(-1)
    target = torch.where(valid, indices.long(), width)   # unused slots go to a spare column
    dense = torch.zeros(*indices.shape[:-1], width + 1, dtype=torch.bool, device=indices.device)
    dense = dense.scatter(-1, target, True)
    dense = torch.cat([dense[..., :width], torch.zeros_like(dense[..., :1])], dim=-1)
    return dense[..., rows, :][..., cols.clamp(max=width)]


def flex_key_mask(q: torch.Tensor, start, length, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                  full_kv_num_blocks: torch.Tensor | None, full_kv_indices: torch.Tensor | None,
                  q_block: int, kv_block: int, mask_mod, mask_mod_buffers: tuple, per_batch: bool,
                  per_head: bool) -> torch.Tensor:
    """The bool mask ``[B | 1, H | 1, M, length]`` with which flex attends keys ``[start, start + length)``."""
    device = q.device
    rows = torch.arange(q.shape[-2], device=device) // q_block
    cols = (torch.arange(length, device=device) + start) // kv_block

    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx + start, *mask_mod_buffers)

    evaluated = create_mask(shifted, q.shape[0] if per_batch else None, q.shape[1] if per_head else None,
                            q.shape[-2], length, device)
    mask = _listed(kv_num_blocks, kv_indices, rows, cols) & evaluated
    if full_kv_num_blocks is not None:
        mask = mask | _listed(full_kv_num_blocks, full_kv_indices, rows, cols)
    return mask


class _FlexKeys(KeyMask):
    def __init__(self, q: fx.Node, block_mask: tuple, mask_mod: fx.Node, buffers: tuple, per_batch: bool,
                 per_head: bool):
        self.q, self.block_mask, self.mask_mod, self.buffers = q, block_mask, mask_mod, buffers
        self.per_batch, self.per_head = per_batch, per_head

    def emit(self, graph: fx.Graph, start, length) -> fx.Node:
        bm = self.block_mask
        return graph.call_function(flex_key_mask, (self.q, start, length, *bm[2:6], bm[-3], bm[-2], self.mask_mod,
                                                   tuple(self.buffers), self.per_batch, self.per_head))


def _subgraph(gm: fx.GraphModule, node) -> fx.GraphModule | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        module = getattr(gm, node.target, None)
        return module if isinstance(module, fx.GraphModule) else None
    return None


def _placeholders(module: fx.GraphModule) -> list[fx.Node]:
    return [n for n in module.graph.nodes if n.op == "placeholder"]


def _is_identity_score_mod(module: fx.GraphModule) -> bool:
    output = next(n for n in module.graph.nodes if n.op == "output")
    result = output.args[0]
    result = result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result
    return result is _placeholders(module)[0]


def match_flex(gm: fx.GraphModule, node: fx.Node) -> AttentionSite | None:
    """The site of a flex_attention node (``node`` replaced: its output), None if the output is unused."""
    outputs = {user.args[1]: user for user in node.users if user.target is operator.getitem}
    if 0 not in outputs:
        return None
    q, k, v, score_mod, block_mask, scale, kernel_options = node.args[:7]
    mask_mod_buffers = node.args[8] if len(node.args) > 8 else ()
    log2 = (kernel_options or {}).get("BACKEND") != "FLASH"  # the HOP's lse is in base 2 unless FLASH
    site = AttentionSite(node=outputs[0], form="flex", q=q, k=k, v=v, scale=scale, lse=outputs.get(1),
                         lse_factor=1 / math.log(2) if log2 else 1.0)
    score_module, mask_module = _subgraph(gm, score_mod), _subgraph(gm, block_mask[-1])
    q_block, kv_block, num_blocks = block_mask[-3], block_mask[-2], block_mask[2]
    if set(outputs) - {0, 1} or len(outputs) != len(node.users):
        site.reason = "flex_attention's max_scores output is used"
    elif score_module is None or not _is_identity_score_mod(score_module):
        site.reason = "score_mod is not the identity (the split kernels do not evaluate it)"
    elif mask_module is None or not all(isinstance(b, int) for b in (q_block, kv_block)):
        site.reason = "BlockMask without a mask_mod subgraph and int block sizes"
    elif not isinstance(scale, (int, float)):
        site.reason = "scale is not a constant"
    elif shape(num_blocks) is None or not statically_known_true(shape(num_blocks)[-1] * q_block >= shape(q)[-2]):
        site.reason = "the BlockMask has fewer query blocks than the query has rows"
    else:
        b, h = _placeholders(mask_module)[:2]
        site.key_mask = _FlexKeys(q, block_mask, block_mask[-1], mask_mod_buffers, bool(b.users), bool(h.users))
    return site
