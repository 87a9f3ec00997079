"""Configurable attention-over-a-KV-cache modules, written the many ways models write them.

Used by the exactness tests and the differential fuzzer: each :class:`ZooSpec` field is one way real
block-diffusion code differs (GQA handling, layout, mask form, where the scale goes, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import fbcompile
import flash_attn_standin
from fbcompile.backends.compiler import make_backend
from fbcompile.backends.session import Session

flash_attn_standin.register()
flash_attn_standin.register_fa3()
flash_attn_standin.register_hub()


@dataclass(frozen=True)
class ZooSpec:
    form: str = "sdpa"           # sdpa | eager | flex (flex_attention, heads first) | flash (flash-attn's
                                 # op through the CPU stand-in, tokens first; GQA native: gqa="enable_gqa")
    gqa: str = "repeat_kv"       # repeat_kv | expand | repeat_interleave | enable_gqa | repeat
    layout: str = "bhsd"         # bhsd: cat on dim -2 | bshd: cat on dim 1, then transpose
    mask: str = "none"           # none | bool | additive | window | masked_fill | padding | block_causal
                                 # | padding_row (additive [B,1,1,N], may hide the whole cache)
                                 # | bool_row (bool [B,1,1,N]) | additive_2d (additive [M, N])
                                 # flex: a BlockMask (FLEX_MASKS), flash: none | causal (bottom right)
    scale: str = "after"         # after: (q k^T) * s | before: (q * s) k^T | div: (q k^T) / sqrt(D)
                                 # | explicit: a non-default scale (SDPA's scale= argument)
                                 # | after_mask: (q k^T + mask) * s (eager only)
    packed_qkv: bool = False
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    block: int = 8
    cache: int = 20
    batch: int = 2
    # additions for the differential fuzzer (defaults keep the forms above unchanged)
    suffix: int = 0              # dual cache: the last `suffix` cached tokens go after the block,
                                 # keys = cat([past[:cache-suffix], block, past[cache-suffix:]])
    window: int = 0              # mask "window": keys within `window` before each query (0: 2*block)
    buffer: str = "none"         # none | index_copy | setitem | slice: past_k/past_v are full-length
                                 # buffers (cache + block); the block is written into them at positions
                                 # cache-suffix.. (index_copy/setitem: in a random order, an index input)
                                 # and attention reads the whole buffer
    post: str = "none"           # position-wise ops after the cat: none | rope (tables sliced by size)
                                 # | rope_arange (tables from arange(key_len)) | key_norm (RMS over D)
                                 # | pad (zero padding of keys/values to a multiple of 8, masked)
                                 # | rope_complex (diffusers' form: view_as_complex(k) * polar table)
                                 # | rope_cat (AnyFlow-like: the table is a cat of the cache's and the
                                 #   block's sub-tables, cat([cos[:cache], cos[:block]]))
    # flex only
    score_mod: str = "none"      # none | bias (score + a captured [H, M, N] tensor) | alibi (score - slope[h] * dist)
    flex_block: int = 128        # create_block_mask's BLOCK_SIZE
    frame: int = 4               # mask "block_causal": keys in frames of `frame` positions
    # buffer "window" (Self-Forcing style static cache): cache[s:e] = block, e = s + block with s = `cache`,
    # then attention over cache[read_start:e] (read_start > s: a window shorter than the block);
    # `tail` unused rows after e; roll: the graph first shifts cache[0:s-1] = cache[1:s] (a write outside
    # the block: split, but refreshed at every call)
    read_start: int = 0
    tail: int = 0
    roll: bool = False
    graph_break: bool = False    # torch._dynamo.graph_break() right after the cat (the attention's graph reads
                                 # the concatenation as an input: split by its provenance)
    flash_version: int = 2       # flash: flash-attn 2's flash_attn_func or flash-attn 3's (its one op)
    flash_hub: bool = False      # flash: the op in a Hugging Face kernel hub build's namespace

    @property
    def key_len(self) -> int:
        """Keys the attention reads (before zero padding)."""
        return self.cache + self.block - (self.read_start if self.buffer == "window" else 0)

    @property
    def block_position(self) -> int:
        """Key index of the block's first key (negative: the window starts inside the block)."""
        return self.cache - (self.read_start if self.buffer == "window" else self.suffix)

    @property
    def padded_len(self) -> int:
        """Keys the attention sees (after zero padding)."""
        return self.key_len + (-self.key_len % 8 if self.post == "pad" else 0)


POST_CAT = ("none", "rope", "rope_arange", "key_norm", "pad", "rope_complex", "rope_cat")
FLEX_MASKS = ("none", "causal", "block_causal", "window", "document", "padding", "random")


class ZooAttention(nn.Module):
    """One attention layer over ``cat([past, block])`` written as ``spec`` says."""

    def __init__(self, spec: ZooSpec):
        super().__init__()
        self.spec = spec
        H, Hkv, D = spec.heads, spec.kv_heads, spec.head_dim
        width = H * D
        if spec.packed_qkv:
            self.qkv = nn.Linear(width, (H + 2 * Hkv) * D)
        else:
            self.q, self.k, self.v = nn.Linear(width, H * D), nn.Linear(width, Hkv * D), nn.Linear(width, Hkv * D)
        self.o = nn.Linear(H * D, width)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        positions = torch.arange(256, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_table", torch.cat([positions, positions], -1).cos(), persistent=False)
        self.register_buffer("sin_table", torch.cat([positions, positions], -1).sin(), persistent=False)
        self.key_norm = nn.Parameter(1 + 0.1 * torch.randn(D))
        if spec.score_mod == "bias":
            self.register_buffer("score_bias", torch.randn(H, spec.block, spec.padded_len), persistent=False)
        self.register_buffer("alibi_slopes", 2.0 ** -torch.arange(1, H + 1.0), persistent=False)

    def _rope_tables(self, n: int):
        """cos/sin [n, D] for positions [0, n)."""
        if self.spec.post == "rope":
            return self.cos_table[:n], self.sin_table[:n]
        freqs = torch.outer(torch.arange(n, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def _after_cat(self, q, k, v, mask, seq: int):
        """``spec.post``: RoPE over all key positions (queries: the last rows), a key norm, or padding."""
        post = self.spec.post
        if post in ("rope", "rope_arange", "rope_cat"):
            n, m = k.shape[seq], q.shape[-2]
            cos, sin = self._rope_tables(n) if post != "rope_cat" else (
                torch.cat([t[:n - m], t[:m]]) for t in (self.cos_table, self.sin_table))
            table = (lambda t: t[:, None]) if seq == 1 else (lambda t: t)
            k = (k.float() * table(cos) + _rotate_half(k.float()) * table(sin)).to(k.dtype)
            q = (q.float() * cos[n - m:] + _rotate_half(q.float()) * sin[n - m:]).to(q.dtype)
        elif post == "rope_complex":
            n, m = k.shape[seq], q.shape[-2]
            angles = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)
            freqs = torch.polar(torch.ones_like(angles), angles)
            k = _rotate_complex(k, freqs[:, None] if seq == 1 else freqs)
            q = _rotate_complex(q, freqs[n - m:])
        elif post == "key_norm":
            kf = k.float()
            k = (kf * torch.rsqrt(kf.pow(2).mean(-1, keepdim=True) + 1e-6) * self.key_norm).to(k.dtype)
        elif post == "pad":
            pad = -k.shape[seq] % 8
            if pad:
                shape = list(k.shape)
                shape[seq] = pad
                k = torch.cat([k, torch.zeros(shape, dtype=k.dtype, device=k.device)], dim=seq)
                v = torch.cat([v, torch.zeros(shape, dtype=v.dtype, device=v.device)], dim=seq)
                if isinstance(mask, torch.Tensor):  # a BlockMask is built for the padded length
                    mask = F.pad(mask, (0, pad), value=False if mask.dtype == torch.bool else float("-inf"))
        return q, k, v, mask

    def _project(self, x):
        s = self.spec
        B, M, _ = x.shape
        if s.packed_qkv:
            q, k, v = self.qkv(x).split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(B, M, s.heads, s.head_dim).transpose(1, 2)
        k = k.view(B, M, s.kv_heads, s.head_dim)
        v = v.view(B, M, s.kv_heads, s.head_dim)
        if s.layout == "bhsd":
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        return q, k, v

    def _replicate(self, t):
        s = self.spec
        R = s.heads // s.kv_heads
        B, Hkv, N, D = t.shape
        if s.gqa == "repeat_kv":
            return t[:, :, None, :, :].expand(B, Hkv, R, N, D).reshape(B, Hkv * R, N, D)
        if s.gqa == "expand":
            return t.unsqueeze(2).expand(-1, -1, R, -1, -1).flatten(1, 2)
        if s.gqa == "repeat_interleave":
            return t.repeat_interleave(R, dim=1)
        if s.gqa == "repeat":
            return t.repeat(1, R, 1, 1)
        return t  # enable_gqa

    def _write(self, buffer, block, positions, dim):
        """Write the block into a full-length buffer (HF StaticCache / Fast-dLLM dual cache style)."""
        s = self.spec
        if s.buffer == "index_copy":
            buffer.index_copy_(dim, positions, block)
        else:
            start = s.cache - s.suffix
            where = positions if s.buffer == "setitem" else slice(start, start + s.block)
            buffer[(slice(None),) * (dim % buffer.dim()) + (where,)] = block
        return buffer

    def _write_window(self, cache, block, dim):
        """Self-Forcing's static cache: (roll,) write the block at ``[s, e)``, read ``[read_start, e)``."""
        s = self.spec
        start, end = s.cache, s.cache + s.block
        rows = (slice(None),) * (dim % cache.dim())
        if s.roll:
            cache[rows + (slice(0, start - 1),)] = cache[rows + (slice(1, start),)].clone()
        cache[rows + (slice(start, end),)] = block
        return cache[rows + (slice(s.read_start, end),)]

    def _score_mod(self):
        s = self.spec
        if s.score_mod == "bias":
            return lambda score, b, h, q_idx, kv_idx: score + self.score_bias[h, q_idx, kv_idx]
        if s.score_mod == "alibi":
            P = s.block_position
            return lambda score, b, h, q_idx, kv_idx: score - self.alibi_slopes[h] * (q_idx + P - kv_idx).abs()
        return None

    def _attend(self, q, k, v, mask, layout: str):
        """The attention call of ``spec.form`` (SDPA / flex / flash; eager: None, done by the caller)."""
        s = self.spec
        scale = 0.75 * s.head_dim ** -0.5 if s.scale == "explicit" else None
        if s.form == "flash":  # tokens first; GQA native
            if layout == "bhsd":
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            flash_attn_func = (flash_attn_standin.flash_attn_3_func if s.flash_version == 3
                               else flash_attn_standin.flash_attn_func)
            hub = {"namespace": flash_attn_standin.HUB_NAMESPACES[s.flash_version]} if s.flash_hub else {}
            out = flash_attn_func(q.transpose(1, 2), k, v, softmax_scale=scale, causal=s.mask == "causal", **hub)
            return out.transpose(1, 2)
        if layout == "bshd":
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        k, v = self._replicate(k), self._replicate(v)
        if s.form == "flex":
            return flex_attention(q, k, v, score_mod=self._score_mod(), block_mask=mask, scale=scale,
                                  enable_gqa=s.gqa == "enable_gqa")
        if s.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=s.gqa == "enable_gqa",
                                                  **({"scale": scale} if scale is not None else {}))
        return self._eager(q, k, v, mask)

    def forward(self, x, past_k, past_v, mask=None, positions=None):
        s = self.spec
        q, k, v = self._project(x)
        cat_dim = -2 if s.layout == "bhsd" else 1
        if s.buffer == "window":
            k, v = self._write_window(past_k, k, cat_dim), self._write_window(past_v, v, cat_dim)
        elif s.buffer != "none":
            k, v = self._write(past_k, k, positions, cat_dim), self._write(past_v, v, positions, cat_dim)
        elif s.suffix:  # dual cache (Fast-dLLM style): the block's slots sit inside the cache
            P = past_k.shape[cat_dim] - s.suffix
            k = torch.cat([past_k.narrow(cat_dim, 0, P), k, past_k.narrow(cat_dim, P, s.suffix)], dim=cat_dim)
            v = torch.cat([past_v.narrow(cat_dim, 0, P), v, past_v.narrow(cat_dim, P, s.suffix)], dim=cat_dim)
        else:
            k, v = torch.cat([past_k, k], dim=cat_dim), torch.cat([past_v, v], dim=cat_dim)
        if s.graph_break:
            torch._dynamo.graph_break()
        q, k, v, mask = self._after_cat(q, k, v, mask, 2 if s.layout == "bhsd" else 1)
        out = self._attend(q, k, v, mask, s.layout)
        B, _, M, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(B, M, -1))

    def _eager(self, q, k, v, mask):
        """softmax(q k^T s + mask) @ v, the scale and mask placed as ``spec.scale`` says."""
        s = self.spec
        if s.scale == "before":
            w = (q * s.head_dim ** -0.5) @ k.transpose(-1, -2)
        elif s.scale == "div":
            w = torch.matmul(q, k.transpose(2, 3)) / (s.head_dim ** 0.5)
        elif s.scale == "explicit":
            w = q @ k.transpose(-1, -2) * (0.75 * s.head_dim ** -0.5)
        elif s.scale == "after_mask":
            w = q @ k.transpose(-1, -2)
        else:
            w = q @ k.transpose(-1, -2) * s.head_dim ** -0.5
        if mask is not None and mask.dtype == torch.bool:
            w = w.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            w = w + mask
        if s.scale == "after_mask":
            w = w * s.head_dim ** -0.5
        w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return w @ v


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_complex(x, freqs):
    """(even, odd) pairs of the head dim as complex numbers, rotated by ``freqs``."""
    rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * freqs
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def make_block_mask(spec: ZooSpec, gen: torch.Generator):
    """flex: a BlockMask of ``spec.mask`` kind over the keys the attention sees (None for "none"); the
    queries are the block, at key positions ``[P, P + M)``."""
    B, H, M, N, P = spec.batch, spec.heads, spec.block, spec.padded_len, spec.block_position
    kind, batch, heads = spec.mask, None, None
    if kind == "none":
        return None
    if kind == "causal":
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + P
    elif kind == "block_causal":  # frames of spec.frame positions, a query sees its own and earlier frames
        def mask_mod(b, h, q_idx, kv_idx):
            return (q_idx + P) // spec.frame >= kv_idx // spec.frame
    elif kind == "window":  # causal sliding window
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx + P) & (kv_idx > q_idx + P - (spec.window or 2 * M))
    elif kind == "document":  # packed documents per batch row
        batch, document = B, torch.randint(0, 3, (B, N), generator=gen).sort(-1).values

        def mask_mod(b, h, q_idx, kv_idx):
            return document[b, kv_idx] == document[b, q_idx + P]
    elif kind == "padding":  # left padding of the cache per batch row; the block stays visible
        batch, pad = B, torch.randint(0, max(1, N - M + 1), (B,), generator=gen)

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx >= pad[b]) | ((kv_idx >= P) & (kv_idx < P + M))
    elif kind == "random":  # per batch row and head, not block-structured; every query sees a key
        batch, heads, allowed = B, H, torch.rand(B, H, M, N, generator=gen) > 0.3
        allowed[..., max(P, 0)] = True

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed[b, h, q_idx, kv_idx]
    else:
        raise ValueError(kind)
    return create_block_mask(mask_mod, B=batch, H=heads, Q_LEN=M, KV_LEN=N, device="cpu", BLOCK_SIZE=spec.flex_block)


def make_mask(spec: ZooSpec, gen: torch.Generator, dtype=torch.float32):
    """A mask of ``spec.mask`` kind over ``[past ; block]`` keys (None for "none")."""
    if spec.form == "flex":
        return make_block_mask(spec, gen)
    B, H, M, N = spec.batch, spec.heads, spec.block, spec.key_len
    L = N - M  # keys that are not the block's
    P = spec.block_position  # the block's first key position (L unless a dual cache or a window)
    kind = spec.mask
    if kind == "none" or spec.form == "flash":
        return None
    if kind in ("bool", "masked_fill"):
        m = torch.rand(B, 1, M, N, generator=gen) > 0.3
        m[..., max(P, 0):P + M] = True  # every query sees its block
        return m
    if kind == "additive":
        return torch.randn(B, H, M, N, generator=gen, dtype=dtype)
    if kind == "window":  # sliding window of 2*M (or spec.window) keys ending at each query's position
        pos_q = torch.arange(P, P + M)[:, None]
        pos_k = torch.arange(N)[None, :]
        allowed = (pos_k <= pos_q + M) & (pos_k > pos_q - (spec.window or 2 * M))
        return allowed[None, None].expand(B, 1, M, N)
    if kind == "padding":  # left padding: different prompt lengths per batch row
        pad = torch.randint(0, max(1, L // 2), (B,), generator=gen)
        allowed = torch.arange(N)[None, :] >= pad[:, None]
        return torch.where(allowed, 0.0, float("-inf")).to(dtype)[:, None, None, :].expand(B, 1, M, N)
    if kind == "block_causal":  # block bidirectional, past fully visible: all True
        return torch.ones(1, 1, M, N, dtype=torch.bool)
    if kind in ("padding_row", "bool_row"):  # key padding row [B,1,1,N], not expanded; may hide all the cache
        pad = torch.randint(0, L + 1, (B,), generator=gen)
        pos_k = torch.arange(N)[None, :]
        allowed = (pos_k >= pad[:, None]) | ((pos_k >= P) & (pos_k < P + M))  # the block stays visible
        if kind == "bool_row":
            return allowed[:, None, None, :]
        return torch.where(allowed, 0.0, float("-inf")).to(dtype)[:, None, None, :]
    if kind == "additive_2d":  # one [M, N] bias broadcast over batch and heads
        return torch.randn(M, N, generator=gen, dtype=dtype)
    raise ValueError(kind)


def make_inputs(spec: ZooSpec, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    s = spec
    x = torch.randn(s.batch, s.block, s.heads * s.head_dim, generator=gen).to(dtype)
    length = s.cache + {"none": 0, "window": s.block + s.tail}.get(s.buffer, s.block)
    shape = (s.batch, s.kv_heads, length, s.head_dim) if s.layout == "bhsd" else \
        (s.batch, length, s.kv_heads, s.head_dim)
    past_k = torch.randn(shape, generator=gen).to(dtype)
    past_v = torch.randn(shape, generator=gen).to(dtype)
    mask = make_mask(s, gen, dtype)
    if spec.form == "eager" and mask is not None and mask.dtype != torch.bool and spec.mask != "padding":
        mask = mask.to(dtype)
    if s.buffer in ("none", "window"):
        return (x, past_k, past_v, mask)
    return (x, past_k, past_v, mask, s.cache - s.suffix + torch.randperm(s.block, generator=gen))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def compile_exact(fn, config=None):
    """``fn`` compiled by fbcompile in exact mode, with its own session (returned too)."""
    session = Session(config or fbcompile.Config(refresh="always", compiler="eager"))
    return torch.compile(fn, backend=make_backend(session), dynamic=False), session


def build(spec: ZooSpec, seed: int = 0, dtype=torch.float32) -> ZooAttention:
    torch.manual_seed(seed)
    return ZooAttention(spec).to(dtype).eval()
