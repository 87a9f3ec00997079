"""Autoregressive video diffusion transformer, Self-Forcing / SANA-Video style (tiny, plain PyTorch).

Why: video AR diffusion is the other big user of "re-run a block against a fixed
past" - a chunk of frames is denoised in a few steps while attending to the K/V of
earlier clean chunks. Its layout differs from the LMs on purpose: tokens are
``[B, S, heads, D]`` and the cache is joined on ``dim=1`` *before* the transpose to
``[B, heads, S, D]`` for SDPA, and there is a second cache style:

* ``cache="cat"``: previous clean chunks' K/V are a list passed in as
  ``past_key_values``; attention uses ``torch.cat([past_k, k], dim=1)``.
* ``cache="static"``: a preallocated ``[B, max_S, heads, D]`` buffer per layer. At
  *every* call (every denoising step too) the model writes the chunk's own K/V into
  its slot in place, ``cache_k[:, start:end] = k``, then attends over
  ``cache_k[:, :end]`` (as Self-Forcing does). The noisy K/V written during denoising
  is overwritten by the clean pass, so both styles compute the same thing.

After a chunk is denoised, a pass at t=0 on the clean chunk produces the K/V that
later chunks see. Sampling is deterministic flow-matching Euler
(x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:  # importable both as ``examples.video_ar_diffusion`` and from inside ``examples/``
    from .block_diffusion_lm import RMSNorm, init_random_weights
except ImportError:
    from block_diffusion_lm import RMSNorm, init_random_weights

KV = Tuple[torch.Tensor, torch.Tensor]
CACHE_MODES = ("cat", "static")


@dataclass
class VideoARConfig:
    in_channels: int = 4
    height: int = 8          # latent height
    width: int = 8           # latent width
    patch_size: int = 2      # spatial patch; temporal patch is 1
    chunk_frames: int = 3    # latent frames per chunk (the "block")
    max_chunks: int = 8      # size of the static cache
    hidden_size: int = 64
    num_heads: int = 4
    head_dim: int = 16
    num_layers: int = 2
    mlp_ratio: int = 4
    freq_dim: int = 64       # sinusoidal timestep features
    denoising_steps: int = 4
    dtype: torch.dtype = torch.float32

    @property
    def tokens_per_frame(self) -> int:
        return (self.height // self.patch_size) * (self.width // self.patch_size)

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_frames * self.tokens_per_frame


def sinusoid(values: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] -> [N, dim] sin/cos features (timesteps or frame indices)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class VideoAttention(nn.Module):
    """Self-attention of a chunk over (cached past chunks + itself); no mask."""

    def __init__(self, cfg: VideoARConfig):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.head_dim
        inner = cfg.num_heads * cfg.head_dim
        self.q = nn.Linear(cfg.hidden_size, inner)
        self.k = nn.Linear(cfg.hidden_size, inner)
        self.v = nn.Linear(cfg.hidden_size, inner)
        self.o = nn.Linear(inner, cfg.hidden_size)
        self.norm_q = RMSNorm(cfg.head_dim)
        self.norm_k = RMSNorm(cfg.head_dim)

    def forward(self, x, past_kv: Optional[KV] = None, static_kv: Optional[KV] = None,
                cache_start: Optional[int] = None):
        b, s, _ = x.shape
        q = self.norm_q(self.q(x).view(b, s, self.h, self.d))
        k = self.norm_k(self.k(x).view(b, s, self.h, self.d))
        v = self.v(x).view(b, s, self.h, self.d)
        new_kv = (k, v)
        if static_kv is not None:
            cache_k, cache_v = static_kv
            end = cache_start + s
            cache_k[:, cache_start:end] = k  # in-place write of this chunk's slot
            cache_v[:, cache_start:end] = v
            k, v = cache_k[:, :end], cache_v[:, :end]
        elif past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=1)
            v = torch.cat([past_kv[1], v], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).reshape(b, s, self.h * self.d)), new_kv


class DiTBlock(nn.Module):
    """Transformer block with adaLN (shift, scale, gate) modulation from the timestep."""

    def __init__(self, cfg: VideoARConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = VideoAttention(cfg)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, cfg.mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * dim, dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, temb, past_kv=None, static_kv=None, cache_start=None):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(temb))[:, None].chunk(6, dim=-1)
        attn, new_kv = self.attn(self.norm1(x) * (1 + sc1) + sh1, past_kv, static_kv, cache_start)
        x = x + g1 * attn
        x = x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)
        return x, new_kv


class VideoARDiffusion(nn.Module):
    """Chunk-autoregressive latent video denoiser (predicts flow-matching velocity)."""

    def __init__(self, cfg: VideoARConfig):
        super().__init__()
        self.config = cfg
        p, c, dim = cfg.patch_size, cfg.in_channels, cfg.hidden_size
        self.patch_embed = nn.Linear(c * p * p, dim)
        self.spatial_pos = nn.Parameter(torch.zeros(cfg.tokens_per_frame, dim))
        self.time_mlp = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(dim, 2 * dim)
        self.final_proj = nn.Linear(dim, c * p * p)

    # latents [B, C, T, H, W] <-> tokens [B, T * h * w, C * p * p] (frame-major)
    def patchify(self, x):
        b, c, t, hh, ww = x.shape
        p = self.config.patch_size
        x = x.reshape(b, c, t, hh // p, p, ww // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(b, t * (hh // p) * (ww // p), c * p * p)

    def unpatchify(self, tokens, t):
        cfg = self.config
        p, c = cfg.patch_size, cfg.in_channels
        b = tokens.shape[0]
        h, w = cfg.height // p, cfg.width // p
        x = tokens.reshape(b, t, h, w, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, c, t, h * p, w * p)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        past_key_values: Optional[Sequence[KV]] = None,
        use_cache: bool = False,
        static_cache: Optional[Sequence[KV]] = None,
        cache_start: Optional[int] = None,
    ):
        """``latents`` [B, C, T, H, W] (one chunk), ``timestep`` [B] in [0, 1].

        Cat mode: ``past_key_values`` = per-layer (k, v) [B, S_past, heads, D] or None.
        Static mode: ``static_cache`` = per-layer preallocated (k, v) [B, max_S, heads, D]
        and ``cache_start`` (int) = this chunk's first token slot; written in place.
        Returns ``(velocity [B, C, T, H, W], new_kv)``; ``new_kv`` = the chunk's own
        per-layer (k, v) [B, S, heads, D] if ``use_cache`` else None.
        """
        cfg = self.config
        t = latents.shape[2]
        if static_cache is not None:
            start = cache_start
        else:
            start = 0 if past_key_values is None else past_key_values[0][0].shape[1]
        first_frame = start // cfg.tokens_per_frame
        frames = torch.arange(first_frame, first_frame + t, device=latents.device)

        x = self.patch_embed(self.patchify(latents))
        pos = sinusoid(frames, cfg.hidden_size).to(x.dtype)[:, None] + self.spatial_pos[None]
        x = x + pos.reshape(1, -1, cfg.hidden_size)
        temb = self.time_mlp(sinusoid(timestep * 1000.0, cfg.freq_dim).to(x.dtype))

        new_kv = []
        for i, block in enumerate(self.blocks):
            past = None if past_key_values is None else past_key_values[i]
            static = None if static_cache is None else static_cache[i]
            x, kv = block(x, temb, past, static, cache_start)
            new_kv.append(kv)
        shift, scale = self.final_ada(F.silu(temb))[:, None].chunk(2, dim=-1)
        x = self.final_proj(self.final_norm(x) * (1 + scale) + shift)
        return self.unpatchify(x, t), (new_kv if use_cache else None)

    def make_static_cache(self, batch_size: int, num_chunks: Optional[int] = None) -> List[KV]:
        """Zeroed per-layer (k, v) buffers [B, num_chunks * chunk_tokens, heads, D]."""
        cfg = self.config
        n = (num_chunks or cfg.max_chunks) * cfg.chunk_tokens
        dev = self.patch_embed.weight.device
        shape = (batch_size, n, cfg.num_heads, cfg.head_dim)
        return [(torch.zeros(shape, dtype=cfg.dtype, device=dev), torch.zeros(shape, dtype=cfg.dtype, device=dev))
                for _ in range(cfg.num_layers)]

    @torch.no_grad()
    def generate(self, num_chunks: int, steps: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, batch_size: int = 1,
                 cache: str = "cat"):
        """Returns latents [B, C, num_chunks * chunk_frames, H, W]; deterministic given
        the generator's seed (initial noise is the only randomness)."""
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        cfg = self.config
        steps = steps or cfg.denoising_steps
        dev = self.patch_embed.weight.device
        ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
        shape = (batch_size, cfg.in_channels, cfg.chunk_frames, cfg.height, cfg.width)

        past = None
        static = self.make_static_cache(batch_size, num_chunks) if cache == "static" else None
        chunks = []
        for n in range(num_chunks):
            x = torch.randn(shape, generator=generator).to(device=dev, dtype=cfg.dtype)
            kw = ({"static_cache": static, "cache_start": n * cfg.chunk_tokens} if cache == "static"
                  else {"past_key_values": past})
            for t_now, t_next in zip(ts[:-1], ts[1:]):
                tt = torch.full((batch_size,), t_now, device=dev, dtype=cfg.dtype)
                v = self(x, tt, **kw)[0]
                x = x + (t_next - t_now) * v
            # Clean pass at t=0: its K/V is what later chunks attend to.
            zero = torch.zeros(batch_size, device=dev, dtype=cfg.dtype)
            _, chunk_kv = self(x, zero, use_cache=True, **kw)
            if cache == "cat":
                past = chunk_kv if past is None else [
                    (torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1))
                    for (pk, pv), (k, v) in zip(past, chunk_kv)]
            chunks.append(x)
        return torch.cat(chunks, dim=2)


def make_tiny_model(seed: int = 0, **config_overrides) -> VideoARDiffusion:
    """Random-weight tiny video model in eval mode, deterministic for a given seed."""
    cfg = VideoARConfig(**config_overrides)
    model = init_random_weights(VideoARDiffusion(cfg), seed, scales={".attn.q": 2.0, ".attn.k": 2.0})
    return model.to(cfg.dtype).eval()


if __name__ == "__main__":
    model = make_tiny_model()
    a = model.generate(3, generator=torch.Generator().manual_seed(0), cache="cat")
    b = model.generate(3, generator=torch.Generator().manual_seed(0), cache="static")
    print(a.shape, (a - b).abs().max().item(), a.std().item())
