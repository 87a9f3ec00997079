"""Plain PyTorch reference implementations of the split-attention primitives.

These define the semantics every faster kernel must reproduce:

* ``q``: ``[B, Hq, M, D]``; ``k``: ``[B, Hkv, N, D]``; ``v``: ``[B, Hkv, N, Dv]`` with ``Hq % Hkv == 0``.
  Query head ``h`` reads KV head ``h // (Hq // Hkv)`` (the grouping of ``repeat_kv`` and of SDPA's
  ``enable_gqa``).
* ``mask``: ``None``, or a tensor broadcastable to ``[B, Hq, M, N]``; ``bool`` means True = attend,
  a floating mask is added to the scaled scores.
* Returns ``out`` ``[B, Hq, M, Dv]`` in ``q.dtype`` and ``lse`` ``[B, Hq, M]`` in fp32 (natural log).
  A row that attends to nothing gets ``out = 0`` and ``lse = -inf`` (what SDPA returns for it).

All arithmetic is done in fp32. GQA is handled by folding the query groups into the row dimension,
so the KV is never replicated.
"""
from __future__ import annotations

import torch


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """fp32 scores ``[B, Hq, M, N]`` with the mask applied (masked-out entries are ``-inf``)."""
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    group = Hq // Hkv
    qg = q.float().reshape(B, Hkv, group * M, D)
    s = torch.matmul(qg, k.float().transpose(-1, -2)).mul_(scale).reshape(B, Hq, M, N)
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.float()
    return s


def _weighted_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    B, Hq, M, N = p.shape
    Hkv = v.shape[1]
    out = torch.matmul(p.reshape(B, Hkv, (Hq // Hkv) * M, N), v.float())
    return out.reshape(B, Hq, M, v.shape[-1])


def attention_lse(q, k, v, mask, scale):
    """Attention of ``q`` over ``(k, v)`` returning ``(out, lse)``; see the module docstring."""
    s = _scores(q, k, mask, scale)
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, 0.0).unsqueeze(-1))
    out = _weighted_values(p, v)
    out = torch.where(finite.unsqueeze(-1), out, 0.0)
    return out.to(q.dtype), lse


def merge_lse(out_a, lse_a, out_b, lse_b):
    """Exact combination of two attention results over disjoint key sets.

    ``m = max(L_a, L_b); O = (e^(L_a-m) O_a + e^(L_b-m) O_b) / (e^(L_a-m) + e^(L_b-m))``.
    A side with ``lse = -inf`` gets weight 0; if both are ``-inf`` the row is 0 with ``lse = -inf``.
    """
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isfinite(m), m, 0.0)
    w_a = torch.exp(lse_a - m_safe)
    w_b = torch.exp(lse_b - m_safe)
    denom = w_a + w_b
    denom_safe = torch.where(denom > 0, denom, 1.0)
    out = (w_a.unsqueeze(-1) * out_a.float() + w_b.unsqueeze(-1) * out_b.float()) / denom_safe.unsqueeze(-1)
    lse = m_safe + torch.log(denom)
    lse = torch.where(denom > 0, lse, float("-inf"))
    return out.to(out_a.dtype), lse


def attention_merge_lse(q, k, v, mask, scale, out_ext, lse_ext):
    """Internal attention of ``q`` over ``(k, v)`` merged with a given external ``(out_ext, lse_ext)``."""
    out_int, lse_int = attention_lse(q, k, v, mask, scale)
    out, lse = merge_lse(out_ext, lse_ext, out_int, lse_int)
    return out.to(q.dtype), lse
