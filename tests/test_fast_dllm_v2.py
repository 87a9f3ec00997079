"""Fast-dLLM v2's block cache (``examples/fast_dllm_v2_lm.py``): each sub-block step writes its keys/values
into the block cache in place and attends over ``cat(committed, block cache)``. The written block cache
is part of the block (read afresh at every call), the committed cache the cached part. Checked: exact
mode equals the model, block mode refreshes once per block and reuses at the other sub-block steps, and
the block cache is never served stale."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fbcompile
from attention_zoo import rel_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import fast_dllm_v2_lm  # noqa: E402

GEN = dict(num_blocks=3, sub_block=4, per_step=1)  # blocks of 8: 2 sub-blocks of a full pass and 3 steps


def _prompt(seed=0):
    return torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_exact_generate_equals_the_model():
    expected = fast_dllm_v2_lm.make_tiny_model().generate(_prompt(), **GEN)
    model = fbcompile.optimize(fast_dllm_v2_lm.make_tiny_model(), fbcompile.Config(refresh="always", compiler="eager"))
    assert torch.equal(model.generate(_prompt(), commit=lambda: fbcompile.commit(model), **GEN), expected)
    graphs = [g for g in fbcompile.explain(model).graphs if g.sites]
    assert all(g.rewritten == len(g.sites) for g in graphs[1:]), [g.sites for g in graphs]  # [0]: the prefill


@torch.no_grad()
def test_block_mode_reuses_at_the_sub_block_steps():
    model = fbcompile.optimize(fast_dllm_v2_lm.make_tiny_model(), fbcompile.Config(compiler="eager"))
    model.generate(_prompt(), commit=lambda: fbcompile.commit(model), **GEN)
    stats, blocks = fbcompile.stats(model), GEN["num_blocks"]
    # per block: 2 full passes and the commit return the block's keys/values (save passes, exact); of the
    # 6 sub-block steps over the same committed cache, the first refreshes and the others reuse
    assert stats.refresh_reasons == {"save pass": 3 * blocks, "new kv": blocks}, stats
    assert stats.reuses == 5 * blocks, stats
    assert "never reuses (save pass)" in str(fbcompile.explain(model))  # the full-block passes' graph


class SubBlockStep(torch.nn.Module):
    """One sub-block step of v2's attention: the block cache written at ``offset``, then joined."""

    def forward(self, q, k, v, past_k, past_v, block_k, block_v, offset: int):
        block_k[:, :, offset:offset + k.shape[2]] = k
        block_v[:, :, offset:offset + v.shape[2]] = v
        return F.scaled_dot_product_attention(q, torch.cat([past_k, block_k], dim=-2),
                                              torch.cat([past_v, block_v], dim=-2))


@torch.no_grad()
def test_the_written_block_cache_is_never_served_stale():
    """The same queries at every step over the same committed cache: block mode reuses the committed part,
    so every step equals the model only if the block cache, rewritten at each step, is read afresh."""
    gen = torch.Generator().manual_seed(0)
    past_k, past_v, block_k, block_v = (torch.randn(1, 2, n, 8, generator=gen) for n in (40, 40, 16, 16))
    q = torch.randn(1, 2, 4, 8, generator=gen)
    model = fbcompile.optimize(SubBlockStep().eval(), fbcompile.Config(compiler="eager"))
    mine, theirs = (block_k, block_v), (block_k.clone(), block_v.clone())
    for step in range(8):
        k, v = torch.randn(1, 2, 4, 8, generator=gen), torch.randn(1, 2, 4, 8, generator=gen)
        offset = 4 * (step % 4)
        got = model(q, k, v, past_k, past_v, *mine, offset)
        expected = SubBlockStep()(q, k, v, past_k, past_v, *theirs, offset)
        assert rel_error(got, expected) < 1e-5, step
    stats = fbcompile.stats(model)
    assert stats.reuses >= 6, stats
