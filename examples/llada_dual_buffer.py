"""LLaDA-style LM with Fast-dLLM's dual cache written as a full-length buffer (tiny, plain PyTorch).

``llada_lm`` models the dual cache as ``cat([prefix_k, block_k, suffix_k])``. Fast-dLLM's own code
keeps the whole sequence's K/V from the block's first (full) pass as one buffer per layer and, at the
block's later steps, writes the block's fresh K/V into it at the positions of a mask, then attends
over the whole buffer::

    idx = replace_position.nonzero(as_tuple=True)[1]
    past_k[:, :, idx] = k
    attention(q, past_k, past_v)

``replace_position`` is a ``[1, L]`` bool mask of the block (shared by the batch). The buffers are the
full pass's K/V, written in place at every later step of the block; the next block's full pass makes
new ones. Fast-dLLM's LLaDA (OLMo-style) caches the keys before RoPE and rotates the whole buffer after
the write, the queries with the tables' rows of the block (``make_tiny_model(rotate_after_write=True)``)::

    past_k[:, :, idx] = k                        # un-rotated
    q, k = rope(q, past_k)                       # every row of the buffer; q at the block's rows
    attention(q, k, past_v)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

try:  # importable both as ``examples.llada_dual_buffer`` and from inside ``examples/``
    from .block_diffusion_lm import KV, BlockDiffusionLM, greedy_confidence, init_random_weights, unmask_topk
    from .llada_lm import LLaDAAttention, LLaDAConfig, LLaDALM
    from .olmo_llada_lm import OLMoAttention, OLMoLLaDAConfig
except ImportError:
    from block_diffusion_lm import KV, BlockDiffusionLM, greedy_confidence, init_random_weights, unmask_topk
    from llada_lm import LLaDAAttention, LLaDAConfig, LLaDALM
    from olmo_llada_lm import OLMoAttention, OLMoLLaDAConfig


class BufferAttention(LLaDAAttention):
    """With ``replace_position``: write the block into the full-length cache at its positions."""

    def forward(self, hidden, cos, sin, past_kv: Optional[KV] = None, attention_mask=None,
                future_kv: Optional[KV] = None, replace_position: Optional[torch.Tensor] = None):
        if replace_position is None:
            return super().forward(hidden, cos, sin, past_kv, attention_mask, future_kv)
        q, k, v = self.project(hidden, *self.block_rotation(cos, sin))
        past_k, past_v = past_kv
        # written here, not in a helper function: dynamo would resume that function after nonzero's graph
        # break in a graph of its own, and the attention would read the written buffer as an input of the
        # next graph (BranchingBufferAttention's case)
        idx = replace_position.nonzero(as_tuple=True)[1]
        past_k[:, :, idx] = k
        past_v[:, :, idx] = v
        q, keys = self.rotated(q, past_k, idx)
        return self.output(self.attend(q, keys, past_v, attention_mask)), (past_k, past_v)

    def block_rotation(self, cos, sin):
        """The tables the block's projections are rotated with before the write."""
        return cos, sin

    def rotated(self, q, past_k, idx):
        """The queries and the keys attention reads after the write (the buffer as it is)."""
        return q, past_k


class RotatedBufferAttention(BufferAttention, OLMoAttention):
    """Fast-dLLM's own order (its OLMo-based LLaDA): the buffers hold un-rotated keys, the block is written
    un-rotated, then RoPE rotates the whole buffer; the queries take the tables' rows at the block's
    positions (Fast-dLLM: ``arange(block_end - q_len, block_end)``)."""

    def block_rotation(self, cos, sin):
        return None, None

    def rotated(self, q, past_k, idx):
        return self.rotary(q, past_k, q_positions=idx)


class BranchingBufferAttention(RotatedBufferAttention):
    """Fast-dLLM's own control flow around the write and the rotation: a write per batch row after its
    ``nonzero`` and a length check, the block's end from ``replace_position.any()`` and
    ``nonzero().max()``, the queries' rows ``arange(end - q_len, end)`` from tensors. Dynamo breaks the
    graph between the write and the attention, which then reads the written buffer as an input."""

    def forward(self, hidden, cos, sin, past_kv: Optional[KV] = None, attention_mask=None,
                future_kv: Optional[KV] = None, replace_position: Optional[torch.Tensor] = None):
        if replace_position is None:
            return super().forward(hidden, cos, sin, past_kv, attention_mask, future_kv)
        q, k, v = self.project(hidden, None, None)
        past_k, past_v = past_kv
        for row in range(replace_position.shape[0]):
            idx = replace_position[row].nonzero(as_tuple=True)[0]
            if len(idx) > 0:
                past_k[row, :, idx] = k[row, :, :len(idx)]
                past_v[row, :, idx] = v[row, :, :len(idx)]
        end = replace_position.nonzero(as_tuple=True)[1].max() + 1 if replace_position.any() else past_k.shape[-2]
        rows = torch.arange(end - q.shape[-2], end, device=q.device, dtype=torch.long)
        q, k = self.rotary(q, past_k, q_positions=rows)
        return self.output(self.attend(q, k, past_v, attention_mask)), (past_k, past_v)


class DualBufferLLaDA(LLaDALM):
    attention_cls = BufferAttention

    def __init__(self, config: LLaDAConfig):
        BlockDiffusionLM.__init__(self, config, attention_cls=self.attention_cls)
        self.last_num_forwards = 0

    def forward(self, input_ids: torch.Tensor, past_key_values: Optional[Sequence[KV]] = None,
                position_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                replace_position: Optional[torch.Tensor] = None, use_cache: bool = False):
        """As ``LLaDALM.forward``; with ``replace_position`` the past is the full-length buffers."""
        if replace_position is None:
            return super().forward(input_ids, past_key_values, position_ids=position_ids,
                                   attention_mask=attention_mask, use_cache=use_cache)
        hidden, cos, sin = self.embed(input_ids, position_ids, 0)
        for layer, past in zip(self.layers, past_key_values):
            hidden, _ = layer(hidden, cos, sin, past, attention_mask, replace_position=replace_position)
        return self.lm_head(self.norm(hidden)), None

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, gen_length: int, block_size: int, steps: int):
        """Fast-dLLM ``generate_with_dual_cache`` (greedy): per block a full pass, then block-only
        steps that write the block into the full pass's K/V buffers."""
        num_blocks = gen_length // block_size
        steps_per_block = steps // num_blocks
        if gen_length % block_size or steps % num_blocks or steps_per_block > block_size:
            raise ValueError("gen_length, block_size and steps must divide evenly")
        mask_id = self.config.mask_token_id
        b, p = prompt_ids.shape
        x = torch.cat([prompt_ids, prompt_ids.new_full((b, gen_length), mask_id)], dim=1)
        reveal = block_size // steps_per_block
        forwards = 0
        for blk in range(num_blocks):
            s, e = p + blk * block_size, p + (blk + 1) * block_size
            masked = torch.ones(b, block_size, dtype=torch.bool, device=x.device)
            replace_position = torch.zeros(1, x.shape[1], dtype=torch.bool, device=x.device)
            replace_position[:, s:e] = True
            for step in range(steps_per_block):
                if step == 0:
                    logits, buffers = self(x, use_cache=True)
                    logits = logits[:, s:e]
                else:
                    logits, _ = self(x[:, s:e], past_key_values=buffers, replace_position=replace_position,
                                     position_ids=torch.arange(s, e, device=x.device))
                forwards += 1
                k = reveal if step < steps_per_block - 1 else int(masked.sum(1).max())
                conf, tok = greedy_confidence(logits, mask_id)
                block, masked = unmask_topk(x[:, s:e], masked, conf, tok, k)
                x = torch.cat([x[:, :s], block, x[:, e:]], dim=1)
        self.last_num_forwards = forwards
        return x


class RotatedDualBufferLLaDA(DualBufferLLaDA):
    """The dual cache as Fast-dLLM runs it on LLaDA: RoPE after the write (:class:`RotatedBufferAttention`)."""

    attention_cls = RotatedBufferAttention


class BranchingDualBufferLLaDA(DualBufferLLaDA):
    """Fast-dLLM's dual cache with its own control flow (:class:`BranchingBufferAttention`)."""

    attention_cls = BranchingBufferAttention


def make_tiny_model(seed: int = 0, rotate_after_write: bool = False, branches: bool = False,
                    **config_overrides) -> DualBufferLLaDA:
    """Random-weight tiny model in eval mode, deterministic for a given seed; ``rotate_after_write``:
    Fast-dLLM's own order (RoPE after the write, OLMo-style tables: ``OLMoLLaDAConfig``); ``branches``:
    that order with Fast-dLLM's control flow too (graph breaks between the write and the attention)."""
    config = (OLMoLLaDAConfig if rotate_after_write or branches else LLaDAConfig)(**config_overrides)
    model_cls = BranchingDualBufferLLaDA if branches else RotatedDualBufferLLaDA if rotate_after_write \
        else DualBufferLLaDA
    return init_random_weights(model_cls(config), seed).to(config.dtype).eval()
