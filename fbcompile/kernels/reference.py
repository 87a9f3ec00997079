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

Sparse external attention (MAGE-style selection with FlashBlock residual reuse) works on KV *tiles*:
tile ``t`` of ``tile`` keys covers keys ``[t * tile, (t + 1) * tile)`` (the last tile may be partial).
:func:`attention_lse_tiles` scores the tiles, :func:`select_tiles` picks some per KV head,
:func:`sparse_attention_lse` attends to the picked ones only and :func:`subtract_lse` gives the
attention over the others (the residual that reuse steps take from the cache).
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


def _softmax(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and LSE of masked scores; a row with no finite score gets ``p = 0``, ``lse = -inf``."""
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
    return p, lse


def attention_lse(q, k, v, mask, scale, key_count=None):
    """Attention of ``q`` over ``(k, v)`` returning ``(out, lse)``; see the module docstring.

    ``key_count`` (an integer tensor of one element): only the first that many keys count, the rest
    being padding (masked on the device, no host sync)."""
    s = _scores(q, k, mask, scale)
    if key_count is not None:  # padding may hold anything, NaN included: its scores and values are dropped
        padding = torch.arange(k.shape[2], device=s.device) >= key_count.reshape(()).to(s.device)
        s = s.masked_fill(padding, float("-inf"))
        v = v.masked_fill(padding[:, None], 0)
    p, lse = _softmax(s)
    return _weighted_values(p, v).to(q.dtype), lse


def attention_lse_tiles(q, k, v, mask, scale, tile: int):
    """:func:`attention_lse` plus ``tile_mass`` fp32 ``[B, Hkv, ceil(N / tile)]``: the attention
    probability of each KV tile summed over the query heads of its KV head and the query rows."""
    p, lse = _softmax(_scores(q, k, mask, scale))
    B, Hkv, N = k.shape[0], k.shape[1], k.shape[2]
    key_mass = p.reshape(B, Hkv, (p.shape[1] // Hkv) * p.shape[2], N).sum(2)  # no -1: N may be 0
    num_tiles = -(-N // tile)
    tile_mass = torch.nn.functional.pad(key_mass, (0, num_tiles * tile - N)).reshape(B, Hkv, num_tiles, tile).sum(-1)
    return _weighted_values(p, v).to(q.dtype), lse, tile_mass


def select_tiles(tile_mass: torch.Tensor, max_tiles: int, mass: float) -> torch.Tensor:
    """Tile indices int32 ``[B, Hkv, max_tiles]`` per KV head, ascending, unused slots ``-1``.

    The tiles are taken in descending mass order: ``mass >= 1`` takes the top ``min(max_tiles, T)``;
    ``mass < 1`` the shortest such prefix whose mass reaches ``mass`` of the head's total (MAGE's
    adaptive budget; a head with no mass gets none), capped at ``max_tiles``. Static shapes, no host
    sync: the mass is padded with ``max_tiles`` negative entries so that ``topk`` always has enough.
    """
    B, Hkv = tile_mass.shape[:2]
    mass_f = tile_mass.float()
    padded = torch.cat([mass_f, mass_f.new_full((B, Hkv, max_tiles), -1.0)], dim=-1)
    top, order = torch.topk(padded, max_tiles, dim=-1)
    keep = top >= 0
    if mass < 1.0:
        before = torch.cumsum(top.clamp_min(0), dim=-1) - top.clamp_min(0)  # mass of the better tiles
        keep &= before < mass * mass_f.sum(-1, keepdim=True)
    order = torch.where(keep, order, torch.iinfo(torch.int32).max)
    order = torch.sort(order, dim=-1).values
    return torch.where(order == torch.iinfo(torch.int32).max, -1, order).to(torch.int32)


def tile_keys(idx: torch.Tensor, tile: int, num_keys) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions ``[B, Hkv, S * tile]`` of the selected tiles (clamped into range) and whether each
    is a real key (slot used and key inside the last, possibly partial, tile)."""
    pos = (idx.long().unsqueeze(-1) * tile + torch.arange(tile, device=idx.device)).flatten(-2)
    valid = (idx >= 0).repeat_interleave(tile, dim=-1) & (pos < num_keys)
    return torch.where(valid, pos, 0), valid


def tile_mask(q: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor, valid: torch.Tensor, num_keys):
    """The mask of ``q`` over the keys gathered at ``pos`` (:func:`tile_keys`): the ``valid`` ones, as
    ``mask`` (over all ``num_keys`` keys, or None) allows them; ``[B, Hq, M or 1, S * tile]``."""
    B, Hq, M, _ = q.shape
    group = Hq // pos.shape[1]
    allowed = valid.repeat_interleave(group, dim=1).unsqueeze(2)  # [B, Hq, 1, S * tile]
    if mask is None:
        return allowed
    pos_q = pos.repeat_interleave(group, dim=1).unsqueeze(2).expand(B, Hq, M, -1)
    picked = mask.expand(B, Hq, M, num_keys).gather(-1, pos_q)
    if picked.dtype == torch.bool:
        return allowed & picked
    return torch.where(allowed, picked.float(), float("-inf"))


def sparse_attention_lse(q, k, v, mask, scale, idx, tile: int):
    """:func:`attention_lse` of ``q`` over the keys of the tiles ``idx`` (int ``[B, Hkv, S]``, ``-1``
    = unused) of its KV head. The selected keys are gathered, so the cost follows the budget; a tile
    listed twice counts twice (:func:`select_tiles` lists each once)."""
    N = k.shape[2]
    if N == 0:  # nothing to gather from (a static cache's first chunk)
        return attention_lse(q, k, v, mask, scale)
    pos, valid = tile_keys(idx, tile, N)
    k_sel = k.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1]))
    v_sel = v.gather(2, pos.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]))
    return attention_lse(q, k_sel, v_sel, tile_mask(q, mask, pos, valid, N), scale)


def sparse_attention_merge_lse(q, k, v, mask, scale, idx, tile: int, k_blk, v_blk, mask_blk, out_res, lse_res):
    """A sparse reuse step: ``q`` over the tiles ``idx`` of ``(k, v)`` and over the block's own
    ``(k_blk, v_blk)``, merged with the residual ``(out_res, lse_res)`` (the external keys not selected)."""
    external = merge_lse(out_res, lse_res, *sparse_attention_lse(q, k, v, mask, scale, idx, tile))
    return attention_merge_lse(q, k_blk, v_blk, mask_blk, scale, *external)


def subtract_lse(out_a, lse_a, out_b, lse_b, min_mass: float = 1e-6):
    """fp32 ``(out, lse)`` of the attention over the keys of ``a`` minus those of ``b`` (a subset):
    ``e^L O = e^La Oa - e^Lb Ob``, ``L = log(e^La - e^Lb)``. A row whose remaining mass is at most
    ``min_mass`` of ``e^La`` (or negative from rounding) is empty: ``out = 0``, ``lse = -inf``."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    diff = lse_b - torch.where(torch.isfinite(lse_a), lse_a, 0.0)
    ratio, rest = torch.exp(diff), -torch.expm1(diff)  # e^(Lb - La) and 1 - e^(Lb - La)
    keep = torch.isfinite(lse_a) & (rest > min_mass)
    rest_safe = torch.where(keep, rest, 1.0)
    out = (out_a.float() - ratio.unsqueeze(-1) * out_b.float()) / rest_safe.unsqueeze(-1)
    out = torch.where(keep.unsqueeze(-1), out, 0.0)
    lse = torch.where(keep, lse_a + torch.log(rest_safe), float("-inf"))
    return out, lse


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
