"""Match flash-attn's forward op, tokens first, as an :class:`AttentionSite`.

flash-attn >= 2.6 registers its forward as a torch custom op, which dynamo records as one node; the user
wrote (HF remote code, video models)::

    k = torch.cat([past_k, k], dim=1)                                  # [B, N, Hkv, D]
    out = flash_attn_func(q, k, v, softmax_scale=s, causal=c)           # q, out: [B, M, H, D]

and the graph holds::

    r = torch.ops.flash_attn._flash_attn_forward(q, k, v, 0.0, s, causal=c, window_size_left=-1,
                                                 window_size_right=-1, softcap=0.0, alibi_slopes=None,
                                                 return_softmax=False)
    out, softmax_lse = r[0], r[1]                                      # lse: [B, H, M], natural log

flash-attn 3's op called without ``cu_seqlens`` is the same call under other argument names
(:mod:`.flash_ops`); its ``softmax_scale`` may be None (the default scale).

GQA groups query heads like ``repeat_kv``. ``causal`` is aligned to the bottom right (query ``i`` sees keys
``j <= i + N - M``); it is split exactly by giving every key range its part of that mask (none for a range
every query sees entirely). Dropout, sliding windows, softcapping, ALiBi, ``return_softmax`` (and flash-attn
3's options off their defaults: fp8 scales, paged or appended keys, rotary tables, chunked attention) are
left untouched, as is any use of the outputs other than ``out`` and ``softmax_lse``.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fbcompile.passes.find_attention import AttentionSite, KeyMask
from fbcompile.passes.flash_ops import FlashCall
from fbcompile.passes.flash_varlen import UNPACKED
from fbcompile.passes.graph_utils import shape


def bottom_right_causal_mask(q: torch.Tensor, k: torch.Tensor, start, length) -> torch.Tensor:
    """``[M, length]`` bool for tokens-first ``q``/``k``: query ``i`` sees key ``j`` of
    ``[start, start + length)`` iff ``j <= i + N - M``."""
    rows = torch.arange(q.shape[1], device=q.device).unsqueeze(-1)
    keys = torch.arange(length, device=q.device) + start
    return keys <= rows + (k.shape[1] - q.shape[1])


class _CausalKeys(KeyMask):
    def __init__(self, q: fx.Node, k: fx.Node):
        self.q, self.k = q, k

    def emit(self, graph: fx.Graph, start, length) -> fx.Node | None:
        q_len, k_len = shape(self.q)[1], shape(self.k)[1]
        end = start + length if isinstance(start, int) and isinstance(length, int) else None
        if end is not None and statically_known_true(end - 1 <= k_len - q_len):
            return None  # every query sees the whole range
        return graph.call_function(bottom_right_causal_mask, (self.q, self.k, start, length))


def match_flash(call: FlashCall) -> AttentionSite | None:
    """The site of a batched flash forward call (its ``out`` output replaced), None if ``out`` is unused."""
    node, arguments = call.node, call.arguments
    outputs = {user.args[1]: user for user in node.users if user.target is operator.getitem and user.users}
    if 0 not in outputs:
        return None
    q, k, v = arguments["q"], arguments["k"], arguments["v"]
    form = "flash varlen" if node.meta.get(UNPACKED) else "flash"  # as the model wrote it
    site = AttentionSite(node=outputs[0], form=form, q=q, k=k, v=v, tokens_first=True, lse=outputs.get(1),
                         scale=arguments.get("softmax_scale"))
    causal = arguments.get("causal", False)
    unsplittable = call.unsplittable()
    if unsplittable is not None:
        name, value, expected = unsplittable
        given = f"{name} is given" if isinstance(value, fx.Node) else f"{name}={value}"
        site.reason = f"{given} (only {expected!r} is split)"
    elif set(outputs) - {0, 1} or any(user.target is not operator.getitem for user in node.users):
        site.reason = "flash-attn's outputs other than out and softmax_lse are used"
    elif not (isinstance(site.scale, (int, float)) or (site.scale is None and call.version == 3)):
        site.reason = "softmax_scale is not a constant"
    elif causal not in (False, True):
        site.reason = "causal is not a constant"
    elif causal:
        site.key_mask = _CausalKeys(q, k)
    return site
