"""Wan-style causal video DiT with a preallocated rolling KV cache (Self-Forcing / CausVid / LongLive).

Why: the public autoregressive video models built on Wan 2.1 (Self-Forcing's ``CausalWanModel``, shared
by CausVid, LongLive and others) keep their self-attention cache in a way the other examples do not:

* one dict per layer, ``{"k", "v": [B, capacity, heads, D], "global_end_index", "local_end_index"}``,
  the two indices one-element tensors read with ``.item()`` at every call (graph breaks) and set with
  ``fill_`` after the attention;
* the chunk's keys get a per-frame 3-D RoPE (frame, height, width axes; the frame axis starts at the
  chunk's first frame) *before* they are written, tokens first (``[B, S, H, D]``);
* the chunk is written at ``[local_end - S, local_end)`` and the attention reads a window
  ``cache[:, max(0, local_end - window):local_end]``;
* when the write would run past the capacity, the cache is rolled left in place (a copy inside the
  cache, the first ``sink`` tokens kept) before the write, evicting the oldest frames.

``cache_mode="longlive"`` reproduces LongLive's variant of ``CausalWanSelfAttention``: the roll and the
write go to a ``clone()`` of the cache, the attention reads ``cat([clone[:, :sink], clone[:, a:end]])``
(the sink tokens, then the window after them; the window alone without sinks), and only then is the
real cache rolled and written the same way: right after the attention, in the same dynamo graph
(which lets fbcompile prove the external rows outlive the call), or with ``"longlive_deferred"`` as
LongLive itself does, after every layer ran (its ``_apply_cache_updates``; the layer hands the update
over in ``kv_cache["update"]``, standing in for its returned ``cache_update_info``).

Attention goes through flash-attn's varlen kernel where flash-attn is installed, as Wan's ``attention``
does (the batch packed into the tokens, equal lengths, half precision), else through SDPA.

The inference loop (:func:`generate`, after Self-Forcing's ``CausalInferencePipeline.inference``)
denoises one chunk of frames in a few steps, each step writing the noisy chunk into the cache slot
(the indices do not move within a chunk: ``current_end == global_end_index``), then reruns the clean
chunk at ``context_noise`` to write the keys/values later chunks see. Plain PyTorch, tiny, random weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # Wan attends with flash-attn's varlen kernel wherever it is installed: flash-attn 3 first (Hopper), then 2
    from flash_attn_interface import flash_attn_varlen_func
except ImportError:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None


@dataclass
class WanCausalConfig:
    in_channels: int = 4
    height: int = 8              # latent height and width
    width: int = 8
    patch_size: int = 2          # spatial patch; temporal patch 1
    frames_per_chunk: int = 2    # latent frames denoised together (Self-Forcing's num_frame_per_block)
    dim: int = 64
    num_heads: int = 4
    ffn_dim: int = 128
    num_layers: int = 2
    freq_dim: int = 32           # sinusoidal timestep features
    text_dim: int = 32
    text_len: int = 8
    cache_frames: int = 8        # cache capacity in frames (Self-Forcing: local_attn_size)
    window_frames: int | None = None  # frames the attention reads (None: the capacity)
    sink_frames: int = 0         # frames kept at the cache head when it rolls
    cache_mode: str = "self_forcing"  # or "longlive"/"longlive_deferred": attend over a written clone
    max_frames: int = 1024       # length of the RoPE frame table

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def frame_tokens(self) -> int:
        return (self.height // self.patch_size) * (self.width // self.patch_size)


def sinusoid(values: torch.Tensor, dim: int) -> torch.Tensor:
    """[N] -> [N, dim] cos/sin features of the timesteps."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def rope_angles(positions: int, dim: int) -> torch.Tensor:
    """[positions, dim // 2] rotation angles of one RoPE axis."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)


def video_rope(x: torch.Tensor, grid_sizes: torch.Tensor, angles: list[torch.Tensor], start_frame: int):
    """Rotate ``x`` ``[B, f*h*w, H, D]`` by per-token (frame, row, column) angles; the frame axis starts
    at ``start_frame``. ``angles``: the three axes' tables, their widths summing to ``D // 2``."""
    f, h, w = grid_sizes[0].tolist()
    frame, row, col = angles
    theta = torch.cat([frame[start_frame:start_frame + f].view(f, 1, 1, -1).expand(f, h, w, -1),
                       row[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                       col[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)
    pairs = x.double().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = theta.cos(), theta.sin()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Tokens-first attention (``[B, S, H, D]``) as Wan's ``attention``: flash-attn's varlen kernel where
    flash-attn is installed (the batch packed into the tokens, every sequence as long, in half precision),
    else SDPA."""
    if flash_attn_varlen_func is None:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous()
    b, q_len, k_len, dtype = q.shape[0], q.shape[1], k.shape[1], q.dtype

    def packed(x):
        x = x.flatten(0, 1)
        return x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.bfloat16)

    def running_lengths(length: int) -> torch.Tensor:
        lengths = torch.tensor([length] * b, dtype=torch.int32).to(device=q.device, non_blocking=True)
        return torch.cat([lengths.new_zeros([1]), lengths]).cumsum(0, dtype=torch.int32)

    out = flash_attn_varlen_func(packed(q), packed(k), packed(v), running_lengths(q_len), running_lengths(k_len),
                                 q_len, k_len)
    return out.unflatten(0, (b, q_len)).type(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).type_as(x) * self.weight


class CausalSelfAttention(nn.Module):
    """A chunk's self-attention over the rolling cache (the Self-Forcing pattern, see the module docstring)."""

    def __init__(self, cfg: WanCausalConfig):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.head_dim
        self.sink_frames = cfg.sink_frames
        self.longlive, self.deferred = cfg.cache_mode.startswith("longlive"), cfg.cache_mode == "longlive_deferred"
        self.window = (cfg.window_frames or cfg.cache_frames) * cfg.frame_tokens
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(cfg.dim), RMSNorm(cfg.dim)

    def forward(self, x, grid_sizes, angles, kv_cache: dict, current_start: int):
        b, s = x.shape[:2]
        q = self.norm_q(self.q(x)).view(b, s, self.h, self.d)
        k = self.norm_k(self.k(x)).view(b, s, self.h, self.d)
        v = self.v(x).view(b, s, self.h, self.d)
        frame_seqlen = math.prod(grid_sizes[0][1:]).item()
        start_frame = current_start // frame_seqlen
        roped_q = video_rope(q, grid_sizes, angles, start_frame)
        roped_k = video_rope(k, grid_sizes, angles, start_frame)

        current_end = current_start + s
        sink = self.sink_frames * frame_seqlen
        capacity = kv_cache["k"].shape[1]
        global_end, local_end = kv_cache["global_end_index"].item(), kv_cache["local_end_index"].item()
        advance = current_end - global_end  # 0 at the later steps of a chunk: same slot again
        evicted = local_end + s - capacity if advance > 0 and local_end + s > capacity else 0
        roll = (sink, evicted, local_end - evicted - sink)  # roll left in place, keeping the sink
        local_end = local_end + advance - evicted
        if self.longlive:
            k_cache, v_cache = self._write(kv_cache["k"].clone(), kv_cache["v"].clone(), roped_k, v,
                                           roll, local_end)
            if sink > 0:  # the sink tokens, then the window after them
                window_start = max(sink, local_end - (self.window - sink))
                keys = torch.cat([k_cache[:, :sink], k_cache[:, window_start:local_end]], dim=1)
                values = torch.cat([v_cache[:, :sink], v_cache[:, window_start:local_end]], dim=1)
            else:
                window_start = max(0, local_end - self.window)
                keys, values = k_cache[:, window_start:local_end], v_cache[:, window_start:local_end]
            out = attention(roped_q, keys, values)
            update = (kv_cache["k"], kv_cache["v"], roped_k, v, roll, local_end)
            if self.deferred:
                kv_cache["update"] = update
            else:
                self._write(*update)
        else:
            k_cache, v_cache = self._write(kv_cache["k"], kv_cache["v"], roped_k, v, roll, local_end)
            window_start = max(0, local_end - self.window)
            out = attention(roped_q, k_cache[:, window_start:local_end], v_cache[:, window_start:local_end])
        kv_cache["global_end_index"].fill_(current_end)
        kv_cache["local_end_index"].fill_(local_end)
        return self.o(out.flatten(2))

    @staticmethod
    def _write(k_cache, v_cache, k, v, roll: tuple, local_end: int):
        """Roll (``(sink, evicted, kept)``: evict ``evicted`` tokens after the sink, if any), then write
        the chunk ending at ``local_end``."""
        sink, evicted, kept = roll
        for cache, new in ((k_cache, k), (v_cache, v)):
            if evicted:
                cache[:, sink:sink + kept] = cache[:, sink + evicted:sink + evicted + kept].clone()
            cache[:, local_end - new.shape[1]:local_end] = new
        return k_cache, v_cache


class CrossAttention(nn.Module):
    """Attention to the text context, its keys/values computed once per request (Wan's crossattn cache)."""

    def __init__(self, cfg: WanCausalConfig):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))

    def forward(self, x, context, cache: dict):
        b = x.shape[0]
        q = self.q(x).view(b, -1, self.h, self.d)
        if not cache["is_init"]:
            cache["is_init"] = True
            cache["k"] = self.k(context).view(b, -1, self.h, self.d)
            cache["v"] = self.v(context).view(b, -1, self.h, self.d)
        return self.o(attention(q, cache["k"], cache["v"]).flatten(2))


class CausalBlock(nn.Module):
    """Self-attention, cross-attention and MLP with per-frame adaLN modulation (Wan's six vectors)."""

    def __init__(self, cfg: WanCausalConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = CausalSelfAttention(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e, grid_sizes, angles, context, kv_cache, crossattn_cache, current_start):
        frames = e.shape[1]
        e = (self.modulation.unsqueeze(1) + e).chunk(6, dim=2)  # each [B, F, 1, dim]

        def modulate(y, shift, scale):
            return (y.unflatten(1, (frames, -1)) * (1 + scale) + shift).flatten(1, 2)

        y = self.self_attn(modulate(self.norm1(x), e[0], e[1]), grid_sizes, angles, kv_cache, current_start)
        x = x + (y.unflatten(1, (frames, -1)) * e[2]).flatten(1, 2)
        x = x + self.cross_attn(x, context, crossattn_cache)
        y = self.ffn(modulate(self.norm2(x), e[3], e[4]))
        return x + (y.unflatten(1, (frames, -1)) * e[5]).flatten(1, 2)


class WanCausalVideo(nn.Module):
    """Predicts the flow-matching velocity of a chunk ``[B, F, C, H, W]`` at per-frame timesteps ``[B, F]``."""

    def __init__(self, cfg: WanCausalConfig):
        super().__init__()
        self.config = cfg
        p, c = cfg.patch_size, cfg.in_channels
        self.patch_embedding = nn.Linear(c * p * p, cfg.dim)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(CausalBlock(cfg) for _ in range(cfg.num_layers))
        self.head_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(cfg.dim, c * p * p)
        self.head_modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)
        half = cfg.head_dim // 2  # the frame axis gets what the two spatial axes leave
        spatial = 2 * (half // 3)
        # plain attributes, not buffers (as Wan's complex ``freqs``: kept in float64 through .to())
        self.angles = [rope_angles(cfg.max_frames, 2 * (half - spatial)), rope_angles(cfg.max_frames, spatial),
                       rope_angles(cfg.max_frames, spatial)]

    def init_caches(self, batch: int, dtype=torch.float32, device=None) -> tuple[list[dict], list[dict]]:
        """Per layer: the self-attention cache (zeros, indices 0) and an empty cross-attention cache."""
        cfg = self.config
        shape = (batch, cfg.cache_frames * cfg.frame_tokens, cfg.num_heads, cfg.head_dim)
        kv = [{"k": torch.zeros(shape, dtype=dtype, device=device), "v": torch.zeros(shape, dtype=dtype, device=device),
               "global_end_index": torch.zeros(1, dtype=torch.long, device=device),
               "local_end_index": torch.zeros(1, dtype=torch.long, device=device)} for _ in self.blocks]
        cross = [{"is_init": torch.zeros(1, dtype=torch.bool, device=device)} for _ in self.blocks]
        return kv, cross

    def forward(self, x, t, context, kv_cache: list[dict], crossattn_cache: list[dict], current_start: int):
        cfg = self.config
        b, frames, c, hh, ww = x.shape
        p = cfg.patch_size
        tokens = x.reshape(b, frames, c, hh // p, p, ww // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        tokens = self.patch_embedding(tokens.reshape(b, frames * (hh // p) * (ww // p), c * p * p))
        grid_sizes = torch.tensor([[frames, hh // p, ww // p]] * b, dtype=torch.long)
        e = self.time_embedding(sinusoid(t.flatten(), cfg.freq_dim).type_as(tokens))
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim)).unflatten(0, t.shape)  # [B, F, 6, dim]
        context = self.text_embedding(context)
        if self.angles[0].device != tokens.device:  # moved on first use, as Wan moves its ``freqs``
            self.angles = [a.to(tokens.device) for a in self.angles]
        for block, kv, cross in zip(self.blocks, kv_cache, crossattn_cache):
            tokens = block(tokens, e0, grid_sizes, self.angles, context, kv, cross, current_start)
        for kv in kv_cache:  # LongLive's deferred cache writes (see the module docstring)
            if "update" in kv:
                CausalSelfAttention._write(*kv.pop("update"))
        shift, scale = (self.head_modulation.unsqueeze(1) + e.unflatten(0, t.shape).unsqueeze(2)).chunk(2, dim=2)
        out = self.head((self.head_norm(tokens).unflatten(1, (frames, -1)) * (1 + scale) + shift).flatten(1, 2))
        out = out.reshape(b, frames, hh // p, ww // p, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, frames, c, hh, ww)


def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights (small, so that attention is not saturated)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (0.1 if param.dim() > 1 else 0.02))
    return model.eval()


@torch.no_grad()
def generate(model: WanCausalVideo, noise: torch.Tensor, context: torch.Tensor, timesteps=(1000, 750, 500, 250),
             context_noise: int = 0, caches=None, seed: int = 0) -> torch.Tensor:
    """Chunk by chunk, the Self-Forcing way: ``noise`` ``[B, F, C, H, W]`` -> denoised latents.

    Each chunk: ``len(timesteps)`` denoising calls at the chunk's cache position (the model predicts
    the velocity ``noise - x0``; the next step re-noises the predicted ``x0`` with fresh noise), then
    one call on the clean chunk at ``context_noise`` that writes the cache later chunks read.
    ``caches``: ``(kv_cache, crossattn_cache)`` of an earlier request, whose indices are reset (as
    Self-Forcing reuses its buffers across prompts); None: new zero caches.
    """
    cfg = model.config
    b, frames = noise.shape[:2]
    n = cfg.frames_per_chunk
    if frames % n:
        raise ValueError(f"{frames} frames are not whole chunks of {n}")
    if caches is None:
        caches = model.init_caches(b, noise.dtype, noise.device)
    kv_cache, crossattn_cache = caches
    for layer, cross in zip(kv_cache, crossattn_cache):
        layer["global_end_index"] = torch.zeros(1, dtype=torch.long, device=noise.device)
        layer["local_end_index"] = torch.zeros(1, dtype=torch.long, device=noise.device)
        cross["is_init"] = torch.zeros(1, dtype=torch.bool, device=noise.device)
    gen = torch.Generator(device=noise.device).manual_seed(seed)
    output = torch.zeros_like(noise)
    for start_frame in range(0, frames, n):
        current_start = start_frame * cfg.frame_tokens
        noisy = noise[:, start_frame:start_frame + n]
        for index, step in enumerate(timesteps):
            t = torch.full((b, n), step, dtype=torch.long, device=noise.device)
            sigma = step / 1000
            x0 = noisy - sigma * model(noisy, t, context, kv_cache, crossattn_cache, current_start)
            if index + 1 < len(timesteps):
                next_sigma = timesteps[index + 1] / 1000
                fresh = torch.randn(noisy.shape, generator=gen, device=noise.device, dtype=noise.dtype)
                noisy = (1 - next_sigma) * x0 + next_sigma * fresh
        output[:, start_frame:start_frame + n] = x0
        t = torch.full((b, n), context_noise, dtype=torch.long, device=noise.device)
        model(x0, t, context, kv_cache, crossattn_cache, current_start)
    return output
