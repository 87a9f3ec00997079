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

Hugging Face's kernel hub builds of both (``kernels-community/flash-attn2``, ``flash-attn3``, which
transformers loads for ``attn_implementation="kernels-community/flash-attn3"``) register the same ops under
a namespace of the build, ``_flash_attn3_<build id>``::

    torch.ops._flash_attn3_9a8dc93_dirty._flash_attn_forward(q, k, v, None, None, qv, None, ...)

so the version is told by the schema (flash-attn 3's one op takes ``k_new``), not by the namespace.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx

from fbcompile.passes.graph_utils import op_arguments, qualified_op_name

# flash-attn 2's (``flashattn`` from 2.8) and 3's namespaces; a hub build's is ``_flash_attn<N>_<build id>``
FLASH_NAMESPACE = re.compile(r"flash_?attn(_3)?|_flash_attn\d*_\w+")
BATCHED, PACKED = "_flash_attn_forward", "_flash_attn_varlen_forward"
# the arguments each kind of op must take (by name) to be read as that op
SCHEMA_NAMES = {
    (2, BATCHED): frozenset({"q", "k", "v", "dropout_p", "softmax_scale", "causal"}),
    (2, PACKED): frozenset({"q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                            "dropout_p", "softmax_scale", "causal"}),
    (3, BATCHED): frozenset({"q", "k", "v", "k_new", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                             "max_seqlen_k", "softmax_scale", "causal"}),
}
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
    namespace, _, op = (qualified_op_name(node.target) or "").partition("::")
    if op not in (BATCHED, PACKED) or not FLASH_NAMESPACE.fullmatch(namespace):
        return None
    bound = op_arguments(node)
    if bound is None:
        return None
    arguments, defaults = bound
    version = 3 if "k_new" in arguments and op == BATCHED else 2
    if not SCHEMA_NAMES[version, op] <= arguments.keys():
        return None
    packed = op == PACKED or (version == 3 and arguments["cu_seqlens_q"] is not None)
    return FlashCall(node, version, packed, arguments, defaults)
