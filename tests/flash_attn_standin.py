"""CPU stand-ins for flash-attn's forward ops, with flash-attn 2's and 3's schemas and namespaces.

flash-attn (GPU only) registers ``torch.ops.flash_attn._flash_attn_forward`` (bshd layout: q ``[B, S, H, D]``,
k/v ``[B, N, Hkv, D]``; returns ``out, softmax_lse [B, H, S], S_dmask, rng_state``) and wraps it in an
autograd.Function behind ``flash_attn_func``; its varlen op likewise. flash-attn 3 registers one op for both,
``torch.ops.flash_attn_3._flash_attn_forward``. Hugging Face's kernel hub builds register the same ops under
a namespace of the build (``_flash_attn3_<build id>``): ``namespace`` registers and calls them there. Tests
register these stand-ins when the real ops are absent, so the matchers see the same nodes on the CPU; they
compute attention with fbcompile's reference.
"""
from __future__ import annotations

import inspect

import torch

from fbcompile.kernels import reference


def _bottom_right_causal(q_len: int, k_len: int, device) -> torch.Tensor:
    rows = torch.arange(q_len, device=device)[:, None]
    return torch.arange(k_len, device=device)[None, :] <= rows + (k_len - q_len)


def _forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
             alibi_slopes, return_softmax):
    if (dropout_p, window_size_left, window_size_right, softcap, alibi_slopes, return_softmax) != (
            0.0, -1, -1, 0.0, None, False):
        raise NotImplementedError("the stand-in does not compute these flash-attn options")
    mask = _bottom_right_causal(q.shape[1], k.shape[1], q.device) if causal else None
    out, lse = reference.attention_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, softmax_scale)
    return (out.transpose(1, 2).contiguous(), lse, q.new_empty(0), torch.zeros(2, dtype=torch.int64))


def _fake(q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
          alibi_slopes, return_softmax):
    B, S, H, _ = q.shape
    return (torch.empty_like(q), q.new_empty(B, H, S, dtype=torch.float32), q.new_empty(0),
            torch.empty(2, dtype=torch.int64))


def register(namespace: str = "flash_attn") -> None:
    """Register ``<namespace>::_flash_attn_forward`` unless flash-attn (or an earlier call) did."""
    if hasattr(getattr(torch.ops, namespace), "_flash_attn_forward"):
        return
    op = torch.library.custom_op(f"{namespace}::_flash_attn_forward", _forward, mutates_args=(),
                                 schema="(Tensor q, Tensor k, Tensor v, float dropout_p, float softmax_scale, "
                                        "bool causal, int window_size_left, int window_size_right, float softcap, "
                                        "Tensor? alibi_slopes, bool return_softmax) -> (Tensor, Tensor, Tensor, Tensor)")
    op.register_fake(_fake)


class FlashAttnFunc(torch.autograd.Function):
    """``flash_attn_func``'s wrapper: default scale, the op call, the output (and lse on request)."""

    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, return_lse, namespace):
        out, lse, _, _ = getattr(torch.ops, namespace)._flash_attn_forward(
            q, k, v, 0.0, softmax_scale, causal=causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
            alibi_slopes=None, return_softmax=False)
        return (out, lse) if return_lse else out

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("inference-only stand-in")


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_lse=False, namespace="flash_attn"):
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    return FlashAttnFunc.apply(q, k, v, softmax_scale, causal, return_lse, namespace)


def _varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
                    softmax_scale: float, causal: bool, window_size_left: int = -1, window_size_right: int = -1,
                    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None, return_softmax: bool = False,
                    block_table: torch.Tensor | None = None, leftpad_k: torch.Tensor | None = None,
                    seqused_k: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """flash-attn's varlen forward: sequence ``i`` is rows ``[cu_seqlens[i], cu_seqlens[i + 1])`` of the
    packed ``q`` ``[total_q, H, D]`` and ``k``/``v`` ``[total_k, Hkv, D]``; ``softmax_lse`` is ``[H, total_q]``."""
    if (dropout_p, window_size_left, window_size_right, softcap, alibi_slopes, return_softmax, block_table,
            leftpad_k, seqused_k) != (0.0, -1, -1, 0.0, None, False, None, None, None):
        raise NotImplementedError("the stand-in does not compute these flash-attn options")
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for qa, qb, ka, kb in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:]):
        out, lse, _, _ = _forward(q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], 0.0, softmax_scale, causal,
                                  -1, -1, 0.0, None, False)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1), q.new_empty(0), torch.zeros(2, dtype=torch.int64)


def _varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                 window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False,
                 block_table=None, leftpad_k=None, seqused_k=None):
    total, H, _ = q.shape
    return (torch.empty_like(q), q.new_empty(H, total, dtype=torch.float32), q.new_empty(0),
            torch.empty(2, dtype=torch.int64))


def register_varlen() -> None:
    """Register ``flash_attn::_flash_attn_varlen_forward`` (flash-attn 2.7's schema, inferred from the
    annotations as flash-attn's is) unless flash-attn (or an earlier call) did."""
    register()
    if hasattr(torch.ops.flash_attn, "_flash_attn_varlen_forward"):
        return
    op = torch.library.custom_op("flash_attn::_flash_attn_varlen_forward", _varlen_forward, mutates_args=())
    op.register_fake(_varlen_fake)


class FlashAttnVarlenFunc(torch.autograd.Function):
    """``flash_attn_varlen_func``'s wrapper: default scale, the op call (keywords as flash-attn passes them)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
        out, _, _, _ = torch.ops.flash_attn._flash_attn_varlen_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, softmax_scale, causal=causal,
            window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False,
            block_table=None)
        return out

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("inference-only stand-in")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False):
    if dropout_p:
        raise NotImplementedError("inference-only stand-in")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    return FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                     causal)


# Hugging Face kernel hub builds (kernels-community/flash-attn2, flash-attn3) as their namespaces read; ids made up
HUB_NAMESPACES = {2: "_flash_attn2_0a1b2c3_dirty", 3: "_flash_attn3_9f8e7d6_dirty"}


def register_hub() -> None:
    """Register flash-attn 2's and 3's forward in the kernel hub builds' namespaces (:data:`HUB_NAMESPACES`)."""
    register(HUB_NAMESPACES[2])
    register_fa3(HUB_NAMESPACES[3])


# flash-attn 3 (``flash_attn_interface``): one op, ``flash_attn_3::_flash_attn_forward``, batched or packed
# (``cu_seqlens_q`` given), with its many options as keywords; its wrappers pass them as below.
_FA3_TUNING = ("num_splits", "pack_gqa", "sm_margin", "rotary_interleaved")


def _fa3_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None, qv: torch.Tensor | None = None,
    out_: torch.Tensor | None = None, cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None, cu_seqlens_k_new: torch.Tensor | None = None,
    seqused_q: torch.Tensor | None = None, seqused_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
    page_table: torch.Tensor | None = None, kv_batch_idx: torch.Tensor | None = None,
    leftpad_k: torch.Tensor | None = None, rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None, seqlens_rotary: torch.Tensor | None = None,
    q_descale: torch.Tensor | None = None, k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None, softmax_scale: float | None = None, causal: bool = False,
    window_size_left: int = -1, window_size_right: int = -1, attention_chunk: int = 0, softcap: float = 0.0,
    rotary_interleaved: bool = True, scheduler_metadata: torch.Tensor | None = None, num_splits: int = 1,
    pack_gqa: bool | None = None, sm_margin: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """flash-attn 3's forward: ``out, softmax_lse`` as flash-attn 2's batched or varlen forward computes them
    (the stand-in computes the default options only), then two empty split accumulators."""
    options = dict(locals())
    for name in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale",
                 "causal", *_FA3_TUNING):
        options.pop(name)
    defaults = inspect.signature(_fa3_forward).parameters
    if any(isinstance(value, torch.Tensor) or value != defaults[name].default for name, value in options.items()):
        raise NotImplementedError("the stand-in does not compute these flash-attn options")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if cu_seqlens_q is None:
        out, lse, _, _ = _forward(q, k, v, 0.0, scale, causal, -1, -1, 0.0, None, False)
    else:
        out, lse, _, _ = _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0,
                                         scale, causal)
    return out, lse, q.new_empty(0), q.new_empty(0)


def _fa3_fake(*args, **kwargs):
    given = inspect.signature(_fa3_forward).bind(*args, **kwargs).arguments
    q, v, cu_seqlens_q = given["q"], given["v"], given.get("cu_seqlens_q")
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = (q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32) if cu_seqlens_q is not None
           else q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32))
    return out, lse, q.new_empty(0), q.new_empty(0)


def register_fa3(namespace: str = "flash_attn_3") -> None:
    """Register ``<namespace>::_flash_attn_forward`` (its schema inferred from the annotations, as
    flash-attn 3's is) unless flash-attn 3 (or an earlier call) did."""
    if hasattr(getattr(torch.ops, namespace), "_flash_attn_forward"):
        return
    op = torch.library.custom_op(f"{namespace}::_flash_attn_forward", _fa3_forward, mutates_args=())
    op.register_fake(_fa3_fake)


class FlashAttn3Func(torch.autograd.Function):
    """flash-attn 3's wrappers: the default scale, then the op with the unused tensors positional (None) and
    the options as keywords, as ``flash_attn_interface`` passes them."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                window_size, return_lse, namespace):
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** -0.5
        out, lse, *_ = getattr(torch.ops, namespace)._flash_attn_forward(
            q, k, v, None, None, None, None, cu_seqlens_q, cu_seqlens_k, None, None, None, max_seqlen_q,
            max_seqlen_k, None, None, None, None, None, None, None, None, None, softmax_scale, causal=causal,
            window_size_left=window_size[0], window_size_right=window_size[1], attention_chunk=0, softcap=0.0,
            num_splits=1, pack_gqa=None, sm_margin=0)
        return (out, lse) if return_lse else out

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("inference-only stand-in")


def flash_attn_3_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), return_attn_probs=False,
                      namespace="flash_attn_3"):
    """flash-attn 3's ``flash_attn_func``: tokens first, ``out`` (and ``softmax_lse`` on request)."""
    return FlashAttn3Func.apply(q, k, v, None, None, None, None, softmax_scale, causal, window_size,
                                return_attn_probs, namespace)


def flash_attn_3_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                             causal=False, window_size=(-1, -1), return_attn_probs=False):
    """flash-attn 3's ``flash_attn_varlen_func``: the batch packed into the tokens."""
    return FlashAttn3Func.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                causal, window_size, return_attn_probs, "flash_attn_3")
