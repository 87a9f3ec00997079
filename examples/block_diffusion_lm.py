"""A tiny block-diffusion language model in plain PyTorch (Qwen2-like backbone).

Why it exists: fbcompile needs a model whose attention looks like the real thing
(HF ``DynamicCache`` style ``torch.cat([past_k, k], -2)`` before GQA expansion and
SDPA) but that builds in milliseconds on a CPU with random weights. Nothing here
imports fbcompile.

Decoding scheme (as in block diffusion LMs such as BD3-LM / SDAR / TraDo): the
prompt is prefilled into a KV cache, then each block of ``block_size`` tokens
starts as all ``[MASK]`` and is denoised in a few steps. Every step re-runs the
block against the *same* cached past, which is exactly the redundancy that
fbcompile removes. When a block is done, a commit pass produces the block's K/V
and the cache is extended outside the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

KV = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class BlockDiffusionConfig:
    vocab_size: int = 256
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    block_size: int = 8
    denoising_steps: int = 4
    mask_token_id: int = 255
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    # "repeat_kv": expand K/V to all heads (HF eager/sdpa style);
    # "enable_gqa": hand grouped K/V to SDPA(enable_gqa=True). Eager always repeats.
    gqa_style: str = "repeat_kv"
    # "sdpa": F.scaled_dot_product_attention; "eager": explicit softmax(q k^T) v.
    attn_impl: str = "sdpa"
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.gqa_style not in ("repeat_kv", "enable_gqa"):
            raise ValueError(f"gqa_style must be 'repeat_kv' or 'enable_gqa', got {self.gqa_style!r}")
        if self.attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'eager', got {self.attn_impl!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")


# --------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as Qwen2 does) so bf16 runs stay stable."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Computes RoPE cos/sin from explicit position ids, so a block placed after a cache
    of any length gets the right rotation."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        # position_ids [B, M] -> cos/sin [B, 1, M, head_dim] (broadcast over heads)
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * n_rep, L, D], the HF way (expand + reshape)."""
    if n_rep == 1:
        return x
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, l, d).reshape(b, h * n_rep, l, d)


def eager_attention(q, k, v, attention_mask, scale):
    """The explicit attention form many HF models use in ``eager`` mode."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class Attention(nn.Module):
    """GQA self-attention over ``cat(past, new)`` keys.

    Split into ``project`` / ``attend`` / ``output`` so other example models
    (LLaDA dual cache, SDAR) can change only how keys are assembled.
    """

    def __init__(self, config: BlockDiffusionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.n_rep = config.num_heads // config.num_kv_heads
        self.scale = config.head_dim ** -0.5
        h = config.hidden_size
        self.q_proj = nn.Linear(h, config.num_heads * config.head_dim, bias=True)
        self.k_proj = nn.Linear(h, config.num_kv_heads * config.head_dim, bias=True)
        self.v_proj = nn.Linear(h, config.num_kv_heads * config.head_dim, bias=True)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, h, bias=False)

    def project(self, hidden, cos, sin):
        """q, k, v as [B, H, M, D]; RoPE applied here unless ``cos`` is None (models that rotate later)."""
        b, m, _ = hidden.shape
        q = self.q_proj(hidden).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cos is None:
            return q, k, v
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q, k, v, attention_mask):
        cfg = self.config
        if cfg.attn_impl == "eager":
            k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
            return eager_attention(q, k, v, attention_mask, self.scale)
        if cfg.gqa_style == "repeat_kv":
            k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scale)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, scale=self.scale, enable_gqa=self.n_rep > 1
        )

    def output(self, attn):
        b, _, m, _ = attn.shape
        return self.o_proj(attn.transpose(1, 2).reshape(b, m, self.num_heads * self.head_dim))

    def forward(self, hidden, cos, sin, past_kv: Optional[KV] = None, attention_mask=None):
        q, k, v = self.project(hidden, cos, sin)
        new_kv = (k, v)
        if past_kv is not None:
            # HF DynamicCache style: the cached past and the new block are concatenated
            # on the sequence axis *before* GQA expansion.
            k = torch.cat([past_kv[0], k], dim=-2)
            v = torch.cat([past_kv[1], v], dim=-2)
        return self.output(self.attend(q, k, v, attention_mask)), new_kv


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: BlockDiffusionConfig, attention_cls=Attention):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention_cls(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden, cos, sin, past_kv=None, attention_mask=None, **attn_kwargs):
        attn, new_kv = self.self_attn(
            self.input_layernorm(hidden), cos, sin, past_kv, attention_mask, **attn_kwargs
        )
        hidden = hidden + attn
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, new_kv


# --------------------------------------------------------------------------- decoding helpers


def default_position_ids(past_len, batch: int, length: int, device) -> torch.Tensor:
    return torch.arange(past_len, past_len + length, device=device).unsqueeze(0).expand(batch, length)


def extend_cache(cache: Sequence[KV], block_kv: Sequence[KV]) -> List[KV]:
    """Append a committed block's K/V to the cache, outside the model (new tensors)."""
    return [
        (torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2))
        for (pk, pv), (k, v) in zip(cache, block_kv)
    ]


def greedy_confidence(logits: torch.Tensor, mask_token_id: int):
    """Greedy token and its softmax probability per position; never predicts [MASK]."""
    logits = logits.float().clone()
    logits[..., mask_token_id] = float("-inf")
    conf, tok = torch.softmax(logits, dim=-1).max(dim=-1)
    return conf, tok


def unmask_topk(x, masked, conf, tok, k: int):
    """Reveal the ``k`` most confident still-masked positions in every row.

    ``masked`` is tracked as its own bool tensor so a predicted token that happens to
    equal the mask id cannot confuse the bookkeeping.
    """
    if k <= 0:
        return x, masked
    scores = conf.masked_fill(~masked, float("-inf"))
    idx = scores.topk(k, dim=-1).indices
    x = x.scatter(1, idx, tok.gather(1, idx))
    masked = masked.scatter(1, idx, False)
    return x, masked


# --------------------------------------------------------------------------- model


class BlockDiffusionLM(nn.Module):
    """Block-diffusion LM: bidirectional inside the block, full attention to the past."""

    def __init__(self, config: BlockDiffusionConfig, attention_cls=Attention):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, attention_cls) for _ in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)

    def embed(self, input_ids, position_ids, past_len):
        """Token embeddings plus RoPE tables; ``position_ids`` defaults to after the past."""
        b, m = input_ids.shape
        if position_ids is None:
            position_ids = default_position_ids(past_len, b, m, input_ids.device)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(b, m)
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, hidden.dtype)
        return hidden, cos, sin

    def forward(
        self,
        input_ids: torch.Tensor,
        past_key_values: Optional[Sequence[KV]] = None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        use_cache: bool = False,
    ):
        """Returns ``(logits [B, M, V], new_kv)``; ``new_kv`` is the list of this call's own
        per-layer ``(k, v)`` [B, Hkv, M, D] (not concatenated with the past) or None.

        ``attention_mask``: optional bool [B, 1, M, L + M], True = may attend.
        """
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[-2]
        hidden, cos, sin = self.embed(input_ids, position_ids, past_len)
        new_kv = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            hidden, kv = layer(hidden, cos, sin, past, attention_mask)
            new_kv.append(kv)
        logits = self.lm_head(self.norm(hidden))
        return logits, (new_kv if use_cache else None)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, num_blocks: int, steps: Optional[int] = None,
                 on_block: Optional[Callable[[int, list], None]] = None):
        """Greedy block-wise diffusion decoding; returns [B, P + num_blocks * block_size].
        ``on_block(blocks_done, cache)`` runs after the prefill (0) and after each block's commit."""
        cfg = self.config
        steps = steps or cfg.denoising_steps
        bs = cfg.block_size
        b, p = prompt_ids.shape
        dev = prompt_ids.device
        per_step = math.ceil(bs / steps)

        _, cache = self(prompt_ids, use_cache=True)
        if on_block is not None:
            on_block(0, cache)
        pieces = [prompt_ids]
        for blk in range(num_blocks):
            start = p + blk * bs
            pos = default_position_ids(start, b, bs, dev)
            x = torch.full((b, bs), cfg.mask_token_id, dtype=prompt_ids.dtype, device=dev)
            masked = torch.ones(b, bs, dtype=torch.bool, device=dev)
            remaining = bs
            for s in range(steps):
                if remaining == 0:
                    break
                logits = self(x, past_key_values=cache, position_ids=pos)[0]
                conf, tok = greedy_confidence(logits, cfg.mask_token_id)
                k = remaining if s == steps - 1 else min(per_step, remaining)
                x, masked = unmask_topk(x, masked, conf, tok, k)
                remaining -= k
            _, block_kv = self(x, past_key_values=cache, position_ids=pos, use_cache=True)
            cache = extend_cache(cache, block_kv)
            pieces.append(x)
            if on_block is not None:
                on_block(blk + 1, cache)
        return torch.cat(pieces, dim=1)


# Multipliers on the variance-preserving std 1/sqrt(fan_in), chosen so that a random
# model is *not* degenerate: sharp-ish attention (q/k), sublayers that outweigh the
# [MASK] embedding (o/down), and confident logits (lm_head). With plain default init
# every position decodes to the same token, which makes equality tests vacuous.
DEFAULT_INIT_SCALES = {"q_proj": 3.0, "k_proj": 3.0, "o_proj": 2.0, "down_proj": 2.0, "lm_head": 4.0}


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int, scales=None, embed_std: float = 0.5,
                        bias_std: float = 0.02) -> nn.Module:
    """Seeded random init from a private generator (the global RNG is untouched).

    Matrices get N(0, scale / sqrt(fan_in)) where ``scale`` is looked up by parameter
    name substring in ``scales``; embeddings N(0, embed_std); biases N(0, bias_std);
    norm weights stay 1.
    """
    scales = DEFAULT_INIT_SCALES if scales is None else scales
    g = torch.Generator().manual_seed(seed)
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, nn.Embedding):
                p.copy_(torch.randn(p.shape, generator=g) * embed_std)
            elif p.dim() >= 2:
                mult = next((v for k, v in scales.items() if k in mod_name), 1.0)
                p.copy_(torch.randn(p.shape, generator=g) * (mult / math.sqrt(p[0].numel())))
            elif p_name == "bias":
                p.copy_(torch.randn(p.shape, generator=g) * bias_std)
    return model


def make_tiny_model(seed: int = 0, **config_overrides) -> BlockDiffusionLM:
    """Random-weight tiny model in eval mode, deterministic for a given seed."""
    config = BlockDiffusionConfig(**config_overrides)
    model = init_random_weights(BlockDiffusionLM(config), seed)
    return model.to(config.dtype).eval()


if __name__ == "__main__":
    model = make_tiny_model()
    prompt = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, num_blocks=3)
    print(out.shape, out[0, 12:].tolist())
