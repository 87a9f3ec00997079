"""OLMo-style LLaDA (the model Fast-dLLM runs) with RoPE applied *after* the cache concatenation.

Why: Fast-dLLM's LLaDA caches keys before RoPE and rotates the concatenated keys at every call::

    k = torch.cat([past_k, k], dim=-2)              # past_k: un-rotated keys of the prefix
    cos, sin = tables(key_len)                      # positions [0, key_len)
    q = rope(q, cos[:, :, key_len - q_len:key_len], ...)   # queries: the last q_len positions
    k = rope(k, cos, sin)                           # keys: every position, after the cat

so the keys reach attention through position-wise ops, not as a bare ``cat``. Options reproduce
the public variants: RoPE tables precomputed once and sliced by size (``rope_tables="cached"``,
LLaDA's buffer cache) or computed in the graph from ``arange(key_len)`` (``"arange"``); the
rotation in full precision (``float()`` then back); ``rotate_half`` by ``view(..., 2, D/2).unbind``;
an optional per-head RMSNorm of the keys after the cat (``key_norm=True``).

The decoding loop is :meth:`LLaDALM.generate` (Fast-dLLM's prefix cache: a full pass at each
block's first step, then ``x[:, s:]`` against the prefix's cached keys/values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

try:  # importable both as ``examples.olmo_llada_lm`` and from inside ``examples/``
    from .block_diffusion_lm import KV, RMSNorm
    from .llada_lm import LLaDAAttention, LLaDAConfig, LLaDALM, make_tiny_model as _make_llada
except ImportError:
    from block_diffusion_lm import KV, RMSNorm
    from llada_lm import LLaDAAttention, LLaDAConfig, LLaDALM, make_tiny_model as _make_llada

ROPE_TABLES = ("cached", "arange")


@dataclass
class OLMoLLaDAConfig(LLaDAConfig):
    rope_tables: str = "cached"
    key_norm: bool = False
    max_positions: int = 256

    def __post_init__(self):
        super().__post_init__()
        if self.rope_tables not in ROPE_TABLES:
            raise ValueError(f"rope_tables must be one of {ROPE_TABLES}, got {self.rope_tables!r}")


def rotate_half_unbind(x: torch.Tensor) -> torch.Tensor:
    """LLaDA's form: split the head dim as ``[2, D/2]`` and swap the halves."""
    b, h, n, d = x.shape
    x1, x2 = x.view(b, h, n, 2, d // 2).unbind(dim=-2)
    return torch.cat((-x2, x1), dim=-1)


class RotaryAfterCat(nn.Module):
    """RoPE over key positions ``[0, key_len)``; queries take the table's last ``q_len`` rows."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, tables: str):
        super().__init__()
        self.tables = tables
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if tables == "cached":
            cos, sin = self.compute(max_positions)
            self.register_buffer("cos_table", cos, persistent=False)
            self.register_buffer("sin_table", sin, persistent=False)

    def compute(self, length: int):
        positions = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.einsum("i,j->ij", positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos()[None, None], emb.sin()[None, None]

    def forward(self, q: torch.Tensor, k: torch.Tensor, q_positions: Optional[torch.Tensor] = None):
        """``q_positions``: the queries' rows of the tables (Fast-dLLM's dual cache: the block's, in the
        middle of the keys); by default the last ``q_len``."""
        q_len, key_len = q.shape[-2], k.shape[-2]
        if self.tables == "cached":
            cos, sin = self.cos_table[:, :, :key_len, :], self.sin_table[:, :, :key_len, :]
        else:
            cos, sin = self.compute(key_len)
        if q_positions is None:
            q_cos, q_sin = cos[:, :, key_len - q_len:key_len], sin[:, :, key_len - q_len:key_len]  # LLaDA's own slice
        else:
            q_cos, q_sin = cos.index_select(2, q_positions), sin.index_select(2, q_positions)
        qf, kf = q.float(), k.float()
        qf = qf * q_cos + rotate_half_unbind(qf) * q_sin
        kf = kf * cos + rotate_half_unbind(kf) * sin
        return qf.to(q.dtype), kf.to(k.dtype)


class OLMoAttention(LLaDAAttention):
    """Un-rotated projections; cat with the cache; (key norm); RoPE over the whole key range."""

    def __init__(self, config: OLMoLLaDAConfig):
        super().__init__(config)
        self.rotary = RotaryAfterCat(config.head_dim, config.rope_theta, config.max_positions,
                                     config.rope_tables)
        self.key_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.key_norm else None

    def forward(self, hidden, cos, sin, past_kv: Optional[KV] = None, attention_mask=None,
                future_kv: Optional[KV] = None):
        q, k, v = self.project(hidden, None, None)
        k, v = self.with_cache(k, v, past_kv, future_kv)
        new_kv = (k, v)  # LLaDA's ``present``: after the cat and before RoPE, as Fast-dLLM caches them
        if self.key_norm is not None:
            k = self.key_norm(k)
        q, k = self.rotary(q, k)
        return self.output(self.attend(q, k, v, attention_mask)), new_kv


class OLMoLLaDALM(LLaDALM):
    attention_cls = OLMoAttention


def make_tiny_model(seed: int = 0, **config_overrides) -> OLMoLLaDALM:
    """Random-weight tiny OLMo/LLaDA model in eval mode, deterministic for a given seed."""
    return _make_llada(seed, model_cls=OLMoLLaDALM, config_cls=OLMoLLaDAConfig, **config_overrides)


if __name__ == "__main__":
    model = make_tiny_model()
    prompt = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for mode in ("prefix", "none"):
        out = model.generate(prompt, gen_length=24, block_size=8, steps=12, cache=mode)
        print(mode, model.last_num_forwards, out[0, 12:].tolist())
