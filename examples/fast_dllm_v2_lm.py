"""Fast-dLLM v2-style block-diffusion LM with its block cache (tiny, plain PyTorch).

Why: Fast-dLLM v2 (block diffusion on a Qwen2.5 backbone) keeps two caches. The committed blocks'
keys/values (an HF ``DynamicCache``, updated only by a commit pass) are joined with the current
block's at every call; and within a block, a *block cache* holds the whole block's keys/values, which
each sub-block step overwrites in place at the sub-block's offset before attending over it::

    block_k[:, :, s:s + n] = k                  # the sub-block's fresh keys, in place
    k = torch.cat([past_k, block_k], dim=-2)    # committed blocks, then the whole block
    sdpa(q, k, v)                               # q: the sub-block's n queries

The block cache is a graph input the graph writes, so the split must take it as part of the block
(computed afresh at every call), not as cached keys. ``generate`` is v2's loop with the block cache:
per sub-block, a pass over the whole block makes the block cache (and reveals tokens), then
sub-block steps until the sub-block is revealed; a finished block is committed by one more pass. The
logits are shifted by one (``cat([logits[:, :1], logits[:, :-1]])``) as v2 does.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

try:  # importable both as ``examples.fast_dllm_v2_lm`` and from inside ``examples/``
    from .block_diffusion_lm import (KV, Attention, BlockDiffusionConfig, BlockDiffusionLM, extend_cache,
                                     greedy_confidence, init_random_weights, unmask_topk)
except ImportError:
    from block_diffusion_lm import (KV, Attention, BlockDiffusionConfig, BlockDiffusionLM, extend_cache,
                                    greedy_confidence, init_random_weights, unmask_topk)


class BlockCacheAttention(Attention):
    """With ``block_kv``: write the sub-block into the block cache at ``offset``, attend over all of it."""

    def forward(self, hidden, cos, sin, past_kv: Optional[KV] = None, attention_mask=None,
                block_kv: Optional[KV] = None, offset: int = 0):
        q, k, v = self.project(hidden, cos, sin)
        if block_kv is not None:
            block_k, block_v = block_kv
            block_k[:, :, offset:offset + k.shape[2]] = k
            block_v[:, :, offset:offset + v.shape[2]] = v
            k, v = block_k, block_v
        new_kv = (k, v)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=-2)
            v = torch.cat([past_kv[1], v], dim=-2)
        return self.output(self.attend(q, k, v, attention_mask)), new_kv


class FastDLLMv2LM(BlockDiffusionLM):
    def __init__(self, config: BlockDiffusionConfig):
        super().__init__(config, attention_cls=BlockCacheAttention)
        self.last_num_forwards = 0

    def forward(self, input_ids: torch.Tensor, past_key_values: Optional[Sequence[KV]] = None,
                block_key_values: Optional[Sequence[KV]] = None, offset: int = 0):
        """``(logits, kv)``: ``kv`` per layer this call's keys/values (the whole block's with a block cache),
        which a full-block pass returns as the block cache and a commit pass appends to the cache."""
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[-2]
        hidden, cos, sin = self.embed(input_ids, None, past_len + offset)
        kvs = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            block = None if block_key_values is None else block_key_values[i]
            hidden, kv = layer(hidden, cos, sin, past, block_kv=block, offset=offset)
            kvs.append(kv)
        return self.lm_head(self.norm(hidden)), kvs

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, num_blocks: int, sub_block: int, per_step: int = 1,
                 commit=None):
        """v2's loop with the block cache (greedy, ``per_step`` tokens per step); ``commit``: a context
        manager factory for the pass that commits a finished block (``fbcompile.commit``)."""
        cfg = self.config
        bs, mask_id = cfg.block_size, cfg.mask_token_id
        if bs % sub_block or sub_block % per_step:
            raise ValueError("block_size, sub_block and per_step must divide evenly")
        _, cache = self(prompt_ids)
        x_all, forwards = prompt_ids, 1
        for _ in range(num_blocks):
            x = torch.full((prompt_ids.shape[0], bs), mask_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
            masked = torch.ones_like(x, dtype=torch.bool)
            for start in range(0, bs, sub_block):
                end, block_kv = start + sub_block, None
                while masked[:, start:end].any():
                    if block_kv is None:  # the whole block: its keys/values become the block cache
                        logits, block_kv = self(x, past_key_values=cache)
                        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)[:, start:end]
                    else:
                        logits = self(x[:, start:end], past_key_values=cache, block_key_values=block_kv,
                                      offset=start)[0]
                        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
                    forwards += 1
                    conf, tok = greedy_confidence(logits, mask_id)
                    part, part_masked = unmask_topk(x[:, start:end], masked[:, start:end], conf, tok, per_step)
                    x = torch.cat([x[:, :start], part, x[:, end:]], dim=1)
                    masked = torch.cat([masked[:, :start], part_masked, masked[:, end:]], dim=1)
            with commit() if commit is not None else contextlib.nullcontext():
                _, block_kv = self(x, past_key_values=cache)
            cache = extend_cache(cache, block_kv)
            x_all, forwards = torch.cat([x_all, x], dim=1), forwards + 1
        self.last_num_forwards = forwards
        return x_all


def make_tiny_model(seed: int = 0, **config_overrides) -> FastDLLMv2LM:
    """Random-weight tiny model in eval mode, deterministic for a given seed."""
    config = BlockDiffusionConfig(**config_overrides)
    return init_random_weights(FastDLLMv2LM(config), seed).to(config.dtype).eval()


if __name__ == "__main__":
    model = make_tiny_model()
    prompt = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, num_blocks=3, sub_block=4, per_step=2)
    print(model.last_num_forwards, out[0, 12:].tolist())
