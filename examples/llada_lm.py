"""LLaDA-style masked-diffusion LM with Fast-dLLM prefix / dual KV caches (tiny, plain PyTorch).

Why: unlike block-diffusion LMs, LLaDA attends bidirectionally over the *whole*
sequence (prompt + all generated positions, no causal mask anywhere), so an exact
cache does not exist. Fast-dLLM's approximate caches make it look like a block model:

* ``cache="prefix"``: at a block's first step a full pass over the whole sequence
  yields K/V for every position; the prefix (prompt + committed blocks) K/V is kept
  for the block's remaining steps, whose query is the current block **plus** the
  still-masked suffix.
* ``cache="dual"``: the suffix (masked future positions) K/V from that same full pass
  is kept as well; the query is the block only and the keys are
  ``cat([prefix_k, block_k, suffix_k], -2)`` inside attention.
* ``cache="none"``: every step is a full pass (the exact baseline).

The full pass at each block's first step refreshes the caches (nothing is carried
across blocks). Every call passes ``use_cache=True``, as Fast-dLLM's loops do: the cached
steps return keys/values that the loop drops. Backbone pieces come from ``block_diffusion_lm``; the default
config is multi-head (``num_kv_heads == num_heads``) like LLaDA-8B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

try:  # importable both as ``examples.llada_lm`` and from inside ``examples/``
    from .block_diffusion_lm import (KV, Attention, BlockDiffusionConfig, BlockDiffusionLM,
                                     greedy_confidence, init_random_weights, unmask_topk)
except ImportError:
    from block_diffusion_lm import (KV, Attention, BlockDiffusionConfig, BlockDiffusionLM,
                                    greedy_confidence, init_random_weights, unmask_topk)

CACHE_MODES = ("prefix", "dual", "none")


@dataclass
class LLaDAConfig(BlockDiffusionConfig):
    num_kv_heads: int = 4


class LLaDAAttention(Attention):
    """Attention whose keys may have a cached *future* part after the new tokens."""

    def forward(self, hidden, cos, sin, past_kv: Optional[KV] = None, attention_mask=None,
                future_kv: Optional[KV] = None):
        q, k, v = self.project(hidden, cos, sin)
        new_kv = (k, v)
        k, v = self.with_cache(k, v, past_kv, future_kv)
        return self.output(self.attend(q, k, v, attention_mask)), new_kv

    @staticmethod
    def with_cache(k, v, past_kv: Optional[KV], future_kv: Optional[KV]):
        """``cat([past, new, future], -2)`` for keys and values (missing parts skipped)."""
        if past_kv is not None or future_kv is not None:
            ks, vs = [k], [v]
            if past_kv is not None:
                ks.insert(0, past_kv[0])
                vs.insert(0, past_kv[1])
            if future_kv is not None:
                ks.append(future_kv[0])
                vs.append(future_kv[1])
            k = torch.cat(ks, dim=-2)
            v = torch.cat(vs, dim=-2)
        return k, v


class LLaDALM(BlockDiffusionLM):
    """Fully bidirectional masked-diffusion LM."""

    attention_cls = LLaDAAttention

    def __init__(self, config: LLaDAConfig):
        super().__init__(config, attention_cls=self.attention_cls)
        self.last_num_forwards = 0  # forwards used by the last generate()

    def forward(
        self,
        input_ids: torch.Tensor,
        past_key_values: Optional[Sequence[KV]] = None,
        future_key_values: Optional[Sequence[KV]] = None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        use_cache: bool = False,
    ):
        """Returns ``(logits, new_kv)`` like ``BlockDiffusionLM.forward``.

        Keys per layer are ``cat([past, new, future], -2)`` (missing parts skipped);
        positions default to ``arange(L, L + M)``, i.e. the new tokens sit right after
        the past, so the future must start at ``L + M`` (it carries its own RoPE).
        ``attention_mask`` (bool [B, 1, M, L + M + F]) is optional.
        """
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[-2]
        hidden, cos, sin = self.embed(input_ids, position_ids, past_len)
        new_kv = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            future = None if future_key_values is None else future_key_values[i]
            hidden, kv = layer(hidden, cos, sin, past, attention_mask, future_kv=future)
            new_kv.append(kv)
        logits = self.lm_head(self.norm(hidden))
        return logits, (new_kv if use_cache else None)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, gen_length: int, block_size: int, steps: int,
                 cache: str = "prefix"):
        """LLaDA low-confidence remasking, block by block, greedy.

        ``steps`` is the total over ``gen_length`` and must be a multiple of the number
        of blocks; each block reveals ``block_size`` tokens spread evenly over its steps.
        Returns [B, P + gen_length].
        """
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        if gen_length % block_size:
            raise ValueError("gen_length must be a multiple of block_size")
        num_blocks = gen_length // block_size
        if steps % num_blocks:
            raise ValueError("steps must be a multiple of gen_length // block_size")
        steps_per_block = steps // num_blocks
        base, extra = divmod(block_size, steps_per_block)
        reveal_counts = [base + (1 if i < extra else 0) for i in range(steps_per_block)]

        mask_id = self.config.mask_token_id
        b, p = prompt_ids.shape
        x = torch.cat([prompt_ids, prompt_ids.new_full((b, gen_length), mask_id)], dim=1)
        forwards = 0
        for blk in range(num_blocks):
            s, e = p + blk * block_size, p + (blk + 1) * block_size
            masked = torch.ones(b, block_size, dtype=torch.bool, device=x.device)
            for step, k in enumerate(reveal_counts):
                if step == 0 or cache == "none":
                    logits, kv = self(x, use_cache=cache != "none")
                    logits = logits[:, s:e]
                    if cache != "none" and step == 0:
                        prefix = [(pk[:, :, :s], pv[:, :, :s]) for pk, pv in kv]
                        suffix = [(pk[:, :, e:], pv[:, :, e:]) for pk, pv in kv]
                elif cache == "prefix":
                    logits = self(x[:, s:], past_key_values=prefix, use_cache=True)[0][:, :block_size]
                else:  # dual
                    logits = self(x[:, s:e], past_key_values=prefix, future_key_values=suffix, use_cache=True)[0]
                forwards += 1
                conf, tok = greedy_confidence(logits, mask_id)
                block, masked = unmask_topk(x[:, s:e], masked, conf, tok, k)
                x = torch.cat([x[:, :s], block, x[:, e:]], dim=1)
        self.last_num_forwards = forwards
        return x


def make_tiny_model(seed: int = 0, model_cls=None, config_cls=None, **config_overrides) -> LLaDALM:
    """Random-weight tiny LLaDA model in eval mode, deterministic for a given seed."""
    config = (config_cls or LLaDAConfig)(**config_overrides)
    model = init_random_weights((model_cls or LLaDALM)(config), seed)
    return model.to(config.dtype).eval()


if __name__ == "__main__":
    model = make_tiny_model()
    prompt = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    for mode in CACHE_MODES:
        out = model.generate(prompt, gen_length=24, block_size=8, steps=12, cache=mode)
        print(mode, model.last_num_forwards, out[0, 12:].tolist())
