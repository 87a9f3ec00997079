"""Dream-style masked-diffusion LM (Qwen2 backbone) with Fast-dLLM's prefix cache (tiny, plain PyTorch).

Why: Fast-dLLM's Dream keeps its cache in the projections' own layout and applies RoPE after the
concatenation, with forms LLaDA does not have::

    k = torch.cat([past_k, k_proj(h)], dim=-2)            # [B, S, Hkv*D]: flat, un-rotated
    present = (k, v)                                       # the cache is the un-rotated keys
    k = k.view(B, -1, Hkv, D).transpose(1, 2)              # heads after the cat
    cos, sin = tables(arange(past_len + q_len))            # once per call, in the model, [1, S, D]
    cos = cos.unsqueeze(1)
    q = q * cos[:, :, S - q_len:S] + rotate_half(q) * sin[:, :, S - q_len:S]
    k = k * cos + rotate_half(k) * sin                     # every key position
    k = repeat_kv(k)                                       # GQA after RoPE
    sdpa(q, k, v, attn_mask=mask or None)

with ``past_len = past[0][0].shape[1]``. Its prefix-cache loop (``generate``): per block, a full pass
over the whole sequence, whose keys/values sliced to the prefix (``k[:, :s, :]``) are the cache; the
block's later steps run ``x[:, s:]`` (the block and every masked position after it) against it. The
logits are shifted by one (``cat([logits[:, :1], logits[:, :-1]])``: Dream predicts the next token).
A padded batch passes a ``[B, 1, N, N]`` bool mask, cut to the query's rows.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:  # importable both as ``examples.dream_lm`` and from inside ``examples/``
    from .block_diffusion_lm import (KV, MLP, BlockDiffusionConfig, RMSNorm, greedy_confidence, init_random_weights,
                                     repeat_kv, rotate_half, unmask_topk)
except ImportError:
    from block_diffusion_lm import (KV, MLP, BlockDiffusionConfig, RMSNorm, greedy_confidence, init_random_weights,
                                    repeat_kv, rotate_half, unmask_topk)


class DreamAttention(nn.Module):
    """Qwen2 projections (q/k/v biases); the cache joined flat; heads, RoPE and GQA after the join."""

    def __init__(self, config: BlockDiffusionConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden, cos, sin, past_kv: Optional[KV] = None, attention_mask=None):
        b, q_len, _ = hidden.shape
        q, k, v = self.q_proj(hidden), self.k_proj(hidden), self.v_proj(hidden)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=-2)
            v = torch.cat([past_kv[1], v], dim=-2)
        present = (k, v)
        q = q.view(b, q_len, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        key_len = k.shape[-2]
        q = q * cos[:, :, key_len - q_len:key_len] + rotate_half(q) * sin[:, :, key_len - q_len:key_len]
        k = k * cos + rotate_half(k) * sin
        groups = self.heads // self.kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1)), present


class DreamLayer(nn.Module):
    def __init__(self, config: BlockDiffusionConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DreamAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden, cos, sin, past_kv=None, attention_mask=None):
        attn, present = self.self_attn(self.input_layernorm(hidden), cos, sin, past_kv, attention_mask)
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), present


class DreamLM(nn.Module):
    def __init__(self, config: BlockDiffusionConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DreamLayer(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32)
                                                / config.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.last_num_forwards = 0

    def rotary_tables(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """HF Qwen2's rotary embedding: ``[1, S, D]`` tables for ``position_ids`` ``[1, S]``."""
        freqs = (self.inv_freq[None, :, None].float() @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[Sequence[KV]] = None):
        """``(logits, present)``: ``present`` per layer the un-rotated ``[B, S, Hkv*D]`` keys/values."""
        hidden = self.embed_tokens(input_ids)
        past_len = past_key_values[0][0].shape[1] if past_key_values is not None else 0
        position_ids = torch.arange(past_len + hidden.shape[1], device=hidden.device).unsqueeze(0)
        cos, sin = self.rotary_tables(position_ids, hidden.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            hidden, present = layer(hidden, cos, sin, None if past_key_values is None else past_key_values[i],
                                    attention_mask)
            presents.append(present)
        return self.lm_head(self.norm(hidden)), presents

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, gen_length: int, block_size: int, steps: int,
                 prompt_mask: Optional[torch.Tensor] = None):
        """Fast-dLLM's Dream prefix-cache loop, greedy, ``block_size // steps_per_block`` tokens per step;
        ``prompt_mask`` ``[B, P]`` (0 at left padding) makes the ``[B, 1, N, N]`` bool attention mask."""
        num_blocks = gen_length // block_size
        steps_per_block = steps // num_blocks
        if gen_length % block_size or steps % num_blocks or block_size % steps_per_block:
            raise ValueError("gen_length, block_size and steps must divide evenly")
        mask_id = self.config.mask_token_id
        b, p = prompt_ids.shape
        x = F.pad(prompt_ids, (0, gen_length), value=mask_id)
        mask = None
        if prompt_mask is not None:
            keep = F.pad(prompt_mask.bool(), (0, gen_length), value=True)
            mask = keep[:, None, None, :] & keep[:, None, :, None]
        forwards = 0
        for blk in range(num_blocks):
            s, e = p + blk * block_size, p + (blk + 1) * block_size
            masked = torch.ones(b, block_size, dtype=torch.bool, device=x.device)
            for step in range(steps_per_block):
                if step == 0:
                    logits, presents = self(x, mask)
                    cache = [(k[:, :s, :], v[:, :s, :]) for k, v in presents]
                    logits = logits[:, s - 1:]
                else:
                    logits, _ = self(x[:, s:], None if mask is None else mask[:, :, s:, :], past_key_values=cache)
                    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # shifted; position s keeps its own
                forwards += 1
                conf, tok = greedy_confidence(logits[:, :block_size], mask_id)
                block, masked = unmask_topk(x[:, s:e], masked, conf, tok, block_size // steps_per_block)
                x = torch.cat([x[:, :s], block, x[:, e:]], dim=1)
        self.last_num_forwards = forwards
        return x


def make_tiny_model(seed: int = 0, **config_overrides) -> DreamLM:
    """Random-weight tiny Dream-style model in eval mode, deterministic for a given seed."""
    config = BlockDiffusionConfig(**config_overrides)
    return init_random_weights(DreamLM(config), seed).to(config.dtype).eval()


if __name__ == "__main__":
    model = make_tiny_model()
    prompt = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, gen_length=24, block_size=8, steps=12)
    print(model.last_num_forwards, out[0, 12:].tolist())
