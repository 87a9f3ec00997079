"""A CPU stand-in for flash-attn's forward op, with flash-attn 2's schema and namespace.

flash-attn (GPU only) registers ``torch.ops.flash_attn._flash_attn_forward`` (bshd layout: q ``[B, S, H, D]``,
k/v ``[B, N, Hkv, D]``; returns ``out, softmax_lse [B, H, S], S_dmask, rng_state``) and wraps it in an
autograd.Function behind ``flash_attn_func``. Tests register this stand-in when the real op is absent, so the
matcher sees the same node on the CPU; it computes attention with fbcompile's reference.
"""
from __future__ import annotations

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


def register() -> None:
    """Register ``flash_attn::_flash_attn_forward`` unless flash-attn (or an earlier call) did."""
    if hasattr(torch.ops.flash_attn, "_flash_attn_forward"):
        return
    op = torch.library.custom_op("flash_attn::_flash_attn_forward", _forward, mutates_args=(),
                                 schema="(Tensor q, Tensor k, Tensor v, float dropout_p, float softmax_scale, "
                                        "bool causal, int window_size_left, int window_size_right, float softcap, "
                                        "Tensor? alibi_slopes, bool return_softmax) -> (Tensor, Tensor, Tensor, Tensor)")
    op.register_fake(_fake)


class FlashAttnFunc(torch.autograd.Function):
    """``flash_attn_func``'s wrapper: default scale, the op call, the output (and lse on request)."""

    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, return_lse):
        out, lse, _, _ = torch.ops.flash_attn._flash_attn_forward(
            q, k, v, 0.0, softmax_scale, causal=causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
            alibi_slopes=None, return_softmax=False)
        return (out, lse) if return_lse else out

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("inference-only stand-in")


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_lse=False):
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    return FlashAttnFunc.apply(q, k, v, softmax_scale, causal, return_lse)
