"""flash-attn's forward ops as dynamo records them: which calls are batched or packed, and their arguments.

flash-attn 2 (2.6 on; the namespace is ``flashattn`` from 2.8) registers two ops::

    torch.ops.flash_attn._flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, ...)  # q [B, S, H, D]
    torch.ops.flash_attn._flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k,      # q [total, H, D]
                                                    max_seqlen_q, max_seqlen_k, dropout_p, ...)

flash-attn 3 (Hopper; ``flash_attn_interface``, which Wan prefers where it is installed) registers one op
for both, packed when ``cu_seqlens_q`` is given::

    torch.ops.flash_attn_3._flash_attn_forward(q, k, v, None, None, qv, None, cu_seqlens_q, cu_seqlens_k, ...,
                                               softmax_scale, causal=causal, window_size_left=-1, ...)

Each returns ``(out, softmax_lse, ...)``; ``softmax_lse`` is the natural-log LSE, ``[B, H, S]`` batched and
``[H, total]`` packed. Arguments are read by their schema names, so a version that adds arguments with
defaults (forks do) is matched as long as it leaves them at their defaults.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from fbcompile.passes.graph_utils import op_arguments, qualified_op_name

FLASH2_BATCHED = {"flash_attn::_flash_attn_forward", "flashattn::_flash_attn_forward"}
FLASH2_PACKED = {"flash_attn::_flash_attn_varlen_forward", "flashattn::_flash_attn_varlen_forward"}
FLASH3 = "flash_attn_3::_flash_attn_forward"
# what makes a call packed; a batched call leaves them None (flash-attn 3) or has none (flash-attn 2)
PACKING = frozenset({"cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"})
# options that mean the same per sequence packed or batched, as each version names them
PER_SEQUENCE = {
    2: frozenset({"dropout_p", "softmax_scale", "causal", "window_size_left", "window_size_right", "softcap",
                  "alibi_slopes", "return_softmax"}),
    3: frozenset({"softmax_scale", "causal", "window_size_left", "window_size_right", "attention_chunk", "softcap",
                  "rotary_interleaved", "num_splits", "pack_gqa", "sm_margin"}),
}
# flash-attn 2's batched options that a split computes exactly with these values (flash-attn 3: the defaults)
FLASH2_SPLIT = {"dropout_p": 0.0, "window_size_left": -1, "window_size_right": -1, "softcap": 0.0,
                "alibi_slopes": None, "return_softmax": False}
# flash-attn 3's options that do not change a batched call's result (launch tuning; rotary tables unused)
FLASH3_TUNING = frozenset({"num_splits", "pack_gqa", "sm_margin", "rotary_interleaved"})


@dataclass
class FlashCall:
    """One forward op call: ``version`` 2 or 3, ``packed`` (varlen), its ``arguments`` by schema name with
    the defaults filled in, and the ``defaults`` themselves."""

    node: fx.Node
    version: int
    packed: bool
    arguments: dict
    defaults: dict

    def unsplittable(self) -> tuple[str, object, object] | None:
        """``(name, value, expected)`` of the first option a split of this batched call does not compute
        (dropout, windows, softcapping, ALiBi, fp8 scales, paged or new keys...), None when there is none."""
        if self.version == 2:
            expected = FLASH2_SPLIT
        else:
            expected = {name: default for name, default in self.defaults.items()
                        if name not in FLASH3_TUNING | {"softmax_scale", "causal"}}
        for name, value in expected.items():
            if name in self.arguments and self.arguments[name] != value:
                return name, self.arguments[name], value
        return None

    def given(self, name: str) -> bool:
        """Is argument ``name`` set off its default (one without a default always is)?"""
        return self.arguments[name] != self.defaults.get(name, object())

    def not_per_sequence(self) -> tuple[str, object] | None:
        """``(name, value)`` of the first argument of this packed call set off its default that does not
        mean the same per sequence (paged, padded or new keys, ``seqused``...), None when there is none."""
        free = PACKING | PER_SEQUENCE[self.version] | {"q", "k", "v"}
        for name, value in self.arguments.items():
            if name not in free and self.given(name):
                return name, value
        return None


def flash_call(node: fx.Node) -> FlashCall | None:
    """The flash-attn forward call ``node`` makes, None for any other node (or one whose arguments do not
    bind to its op's schema)."""
    if node.op != "call_function":
        return None
    name = qualified_op_name(node.target)
    if name not in FLASH2_BATCHED | FLASH2_PACKED | {FLASH3}:
        return None
    bound = op_arguments(node)
    if bound is None:
        return None
    arguments, defaults = bound
    version = 3 if name == FLASH3 else 2
    packed = name in FLASH2_PACKED or (version == 3 and arguments.get("cu_seqlens_q") is not None)
    return FlashCall(node, version, packed, arguments, defaults)
