"""SDAR / Fast-dLLM-v2 style block-diffusion LM (tiny, random weights, plain PyTorch).

Why a second LM: it puts an *attention mask inside the block* next to the cached
past, so a pass that splits attention into "past" and "block" parts must also split
the mask. Everything else (backbone, cat cache, commit pass) is reused from
``block_diffusion_lm``.

Choices (documented because they are choices):

* A block of ``block_size`` tokens is decoded in sub-blocks of ``sub_block_size``,
  left to right. With ``intra_block="block_causal"`` (default) a query in sub-block
  ``i`` sees sub-blocks ``<= i`` of its own block and the whole cached past; the mask
  is built inside ``forward`` from shapes only (no graph break). With
  ``"bidirectional"`` there is no mask and the model is the base model plus the
  sub-block / threshold decoding schedule.
* Every denoising step feeds the *whole* block (all sub-blocks) against the same
  cached past; only positions of the current sub-block are unmasked.
* Fast-dLLM parallel decoding: in one step every masked position of the current
  sub-block whose confidence exceeds ``threshold`` is revealed; if none does, the single
  most confident one is, so each step makes progress.
* Committed blocks are appended to the cache outside the model by concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

try:  # importable both as ``examples.sdar_lm`` and from inside ``examples/``
    from .block_diffusion_lm import (BlockDiffusionConfig, BlockDiffusionLM, default_position_ids,
                                     extend_cache, greedy_confidence, init_random_weights)
except ImportError:
    from block_diffusion_lm import (BlockDiffusionConfig, BlockDiffusionLM, default_position_ids,
                                    extend_cache, greedy_confidence, init_random_weights)


@dataclass
class SDARConfig(BlockDiffusionConfig):
    sub_block_size: int = 4
    # Fast-dLLM uses 0.9 with trained models; random tiny weights are less confident,
    # and 0.5 still reveals several tokens in some steps.
    threshold: float = 0.5
    intra_block: str = "block_causal"  # or "bidirectional"

    def __post_init__(self):
        super().__post_init__()
        if self.block_size % self.sub_block_size:
            raise ValueError("block_size must be a multiple of sub_block_size")
        if self.intra_block not in ("block_causal", "bidirectional"):
            raise ValueError(f"intra_block must be 'block_causal' or 'bidirectional', got {self.intra_block!r}")


def sub_block_causal_mask(past_len, length: int, sub_block_size: int, device) -> torch.Tensor:
    """Bool [1, 1, M, L + M]: the past is fully visible; among the new tokens, key j is
    visible to query i iff j's sub-block is not after i's."""
    idx = torch.arange(length, device=device) // sub_block_size
    inner = idx[None, :] <= idx[:, None]
    past = torch.ones(length, past_len, dtype=torch.bool, device=device)
    return torch.cat([past, inner], dim=-1)[None, None]


class SDARLM(BlockDiffusionLM):
    """Block-diffusion LM with sub-block-causal attention inside the block."""

    def __init__(self, config: SDARConfig):
        super().__init__(config)
        self.last_num_steps = 0  # denoising forwards used by the last generate()

    def forward(self, input_ids, past_key_values=None, position_ids=None, attention_mask=None,
                use_cache=False):
        """Same contract as ``BlockDiffusionLM.forward``; a user ``attention_mask`` (bool
        [B, 1, M, L + M]) is AND-ed with the sub-block mask."""
        if self.config.intra_block == "block_causal":
            past_len = 0 if past_key_values is None else past_key_values[0][0].shape[-2]
            mask = sub_block_causal_mask(past_len, input_ids.shape[1], self.config.sub_block_size,
                                         input_ids.device)
            attention_mask = mask if attention_mask is None else mask & attention_mask
        return super().forward(input_ids, past_key_values, position_ids, attention_mask, use_cache)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, num_blocks: int, threshold: Optional[float] = None):
        """Returns [B, P + num_blocks * block_size]; ``threshold`` overrides the config's."""
        cfg = self.config
        threshold = cfg.threshold if threshold is None else threshold
        bs, sbs = cfg.block_size, cfg.sub_block_size
        b, p = prompt_ids.shape
        dev = prompt_ids.device
        num_steps = 0

        _, cache = self(prompt_ids, use_cache=True)
        pieces = [prompt_ids]
        for blk in range(num_blocks):
            pos = default_position_ids(p + blk * bs, b, bs, dev)
            x = torch.full((b, bs), cfg.mask_token_id, dtype=prompt_ids.dtype, device=dev)
            masked = torch.ones(b, bs, dtype=torch.bool, device=dev)
            for sub in range(bs // sbs):
                in_sub = torch.zeros(b, bs, dtype=torch.bool, device=dev)
                in_sub[:, sub * sbs:(sub + 1) * sbs] = True
                while True:
                    cand = masked & in_sub
                    if not bool(cand.any()):
                        break
                    logits = self(x, past_key_values=cache, position_ids=pos)[0]
                    num_steps += 1
                    conf, tok = greedy_confidence(logits, cfg.mask_token_id)
                    conf = conf.masked_fill(~cand, -1.0)
                    best = torch.zeros_like(cand).scatter(1, conf.argmax(-1, keepdim=True), True)
                    reveal = cand & ((conf > threshold) | best)
                    x = torch.where(reveal, tok, x)
                    masked = masked & ~reveal
            _, block_kv = self(x, past_key_values=cache, position_ids=pos, use_cache=True)
            cache = extend_cache(cache, block_kv)
            pieces.append(x)
        self.last_num_steps = num_steps
        return torch.cat(pieces, dim=1)


def make_tiny_model(seed: int = 0, **config_overrides) -> SDARLM:
    """Random-weight tiny SDAR model in eval mode, deterministic for a given seed."""
    config = SDARConfig(**config_overrides)
    model = init_random_weights(SDARLM(config), seed)
    return model.to(config.dtype).eval()


if __name__ == "__main__":
    model = make_tiny_model()
    prompt = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model.generate(prompt, num_blocks=3)
    print(out.shape, model.last_num_steps, out[0, 12:].tolist())
