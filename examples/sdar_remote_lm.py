"""SDAR/TraDo-style block-diffusion LM, written the way its HF remote code is (tiny, random weights).

Why: the public remote code picks the attention kernel *after* building the keys, by a Python branch
on a tensor, which dynamo cannot trace: the layer splits into several graphs and the attention's graph
receives the concatenated keys as an input. The patterns reproduced here:

* per-head RMSNorm of queries and keys (before the transpose), RoPE on queries and keys, GQA;
* a DynamicCache-like cache and a ``store_kv`` flag: ``store_kv=True`` appends the keys to the cache
  inside the layer (``cache.update``: the cache's new keys are ``cat(old, k)``); ``store_kv=False``
  only reads the cache and concatenates (the denoising steps)::

      if store_kv:
          k, v = cache.update(k, v, layer)
      elif len(cache) > layer:
          past_k, past_v = cache[layer]
          k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)

* the kernel choice::

      if torch.all(mask):                       # graph break: data-dependent branch
          out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ...)  # decoding
      else:
          out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)      # prefill

  ``flash_attn_func`` is flash-attn's when it is installed, else :func:`flash_attn_func_sdpa`, an
  SDPA call with flash-attn's signature and ``[B, S, H, D]`` layout (assign the module attribute
  ``flash_attn_func`` to use another);
* :meth:`SDARStyleLM.generate`: SDAR's block-diffusion loop. The prompt's whole blocks are prefilled
  with ``store_kv=True`` under a block-causal mask; each new block starts fully masked and is
  denoised with ``store_kv=False`` against the cache (mask all ones: the flash path), revealing the
  most confident masked positions at each step; once no position is masked, one more pass with
  ``store_kv=True`` commits the block's keys/values into the cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def flash_attn_func_sdpa(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash-attn's ``flash_attn_func`` signature and layout (``[B, S, H, D]``), computed with SDPA."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         dropout_p=dropout_p, is_causal=causal, scale=softmax_scale, enable_gqa=True)
    return out.transpose(1, 2)


try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = flash_attn_func_sdpa


@dataclass
class SDARStyleConfig:
    vocab_size: int = 64
    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    block_length: int = 4
    mask_id: int = 63

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class KVCache:
    """DynamicCache's protocol: per layer ``(keys, values)`` grown by ``update`` (a concatenation)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer], self.values[layer]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.keys) <= layer:
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=-2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=-2)
        return self.keys[layer], self.values[layer]

    def get_seq_length(self) -> int:
        return self.keys[0].shape[-2] if self.keys else 0


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary(nn.Module):
    """cos/sin ``[B, S, D]`` for the given positions (computed in the graph, as HF does)."""

    def __init__(self, config: SDARStyleConfig):
        super().__init__()
        dim = config.head_dim
        self.register_buffer("inv_freq", 1.0 / config.rope_theta ** (torch.arange(0, dim, 2).float() / dim),
                             persistent=False)

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: SDARStyleConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, hidden, cos, sin, attention_mask, cache: KVCache | None, store_kv: bool):
        bsz, q_len = hidden.shape[:2]
        shape = (bsz, q_len, -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden).view(shape)).transpose(1, 2)
        v = self.v_proj(hidden).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None and store_kv:
            k, v = cache.update(k, v, self.layer_idx)
        elif cache is not None and len(cache) > self.layer_idx:
            past_k, past_v = cache[self.layer_idx]
            k = torch.cat([past_k, k], dim=-2)
            v = torch.cat([past_v, v], dim=-2)
        mask = attention_mask.bool()
        if torch.all(mask):  # decoding
            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False,
                                  softmax_scale=self.scaling)
            out = out.reshape(bsz, q_len, -1)
        else:  # prefilling
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, scale=self.scaling,
                                                 enable_gqa=True)
            out = out.transpose(1, 2).reshape(bsz, q_len, -1)
        return self.o_proj(out)


class DecoderLayer(nn.Module):
    def __init__(self, config: SDARStyleConfig, layer_idx: int):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden, cos, sin, attention_mask, cache, store_kv):
        hidden = hidden + self.attn(self.input_norm(hidden), cos, sin, attention_mask, cache, store_kv)
        x = self.post_norm(hidden)
        return hidden + self.down(F.silu(self.gate(x)) * self.up(x))


class SDARStyleLM(nn.Module):
    def __init__(self, config: SDARStyleConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = Rotary(config)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: KVCache | None = None,
                store_kv: bool = False):
        """``attention_mask``: ``[B, 1, S, past + S]`` (1 = attend). Returns the logits."""
        hidden = self.embed(input_ids)
        cos, sin = self.rotary(hidden, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, attention_mask, past_key_values, store_kv)
        return self.lm_head(self.norm(hidden))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, gen_blocks: int, steps: int, commit=contextlib.nullcontext):
        """SDAR's block-diffusion decoding (greedy, ``low_confidence_static`` remasking).

        ``prompt``: ``[1, P]`` with ``P`` a multiple of ``block_length``. ``commit``: a context manager
        factory the ``store_kv=True`` pass of each finished block runs in (``lambda:
        fbcompile.commit(model)`` to keep the committed keys exact under block reuse).
        """
        length, mask_id = self.config.block_length, self.config.mask_id
        if prompt.shape[1] % length:
            raise ValueError("the prompt length must be a multiple of block_length")
        total = prompt.shape[1] + gen_blocks * length
        blocks = total // length
        causal = torch.tril(torch.ones(blocks, blocks, device=prompt.device))
        block_mask = causal.repeat_interleave(length, 0).repeat_interleave(length, 1)[None, None]
        positions = torch.arange(total, device=prompt.device)[None]
        x = torch.full((1, total), mask_id, dtype=torch.long, device=prompt.device)
        x[:, :prompt.shape[1]] = prompt
        cache = KVCache()
        prefill = prompt.shape[1]
        self(x[:, :prefill], block_mask[..., :prefill, :prefill], positions[:, :prefill], cache, store_kv=True)
        per_step = [length // steps + (i < length % steps) for i in range(steps)]
        for start in range(prefill, total, length):
            end = start + length
            block, mask, pos = x[:, start:end].clone(), block_mask[..., start:end, :end], positions[:, start:end]
            for reveal in per_step:
                masked = block == mask_id
                if not masked.any():
                    break
                logits = self(block, mask, pos, cache, store_kv=False)
                confidence, tokens = torch.softmax(logits.float(), -1).max(-1)
                confidence = torch.where(masked, confidence, -torch.inf)
                chosen = confidence[0].topk(min(reveal, int(masked.sum()))).indices
                block[0, chosen] = tokens[0, chosen]
            with commit():
                self(block, mask, pos, cache, store_kv=True)
            x[:, start:end] = block
        return x


def make_tiny_model(seed: int = 0, **overrides) -> SDARStyleLM:
    torch.manual_seed(seed)
    model = SDARStyleLM(SDARStyleConfig(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model
