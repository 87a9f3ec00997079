"""OLMo/LLaDA (Fast-dLLM) with RoPE after the cache cat, through its own prefix-cache loop (issue 12).

The keys reach attention as ``rope(cat(prefix_k, block_k))`` (see ``examples/olmo_llada_lm.py``):
the split goes through the position-wise ops (:mod:`fbcompile.passes.positionwise`). Checked:
every cached site rewritten, exact mode equals eager, block mode refreshes once per block, compiles
stay bounded, the RoPE tables are guarded, and ops that mix key positions are left alone.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fbcompile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import olmo_llada_lm  # noqa: E402

EXACT = fbcompile.Config(refresh="always", compiler="eager")
BLOCK = fbcompile.Config(refresh="block", compiler="eager")
GEN = dict(gen_length=16, block_size=8, steps=8)  # 2 blocks of 4 steps
BLOCKS = GEN["gen_length"] // GEN["block_size"]
NOT_A_CAT = "skipped: keys/values are not a concatenation"


def prompt(length=12, batch=2, seed=0):
    return torch.randint(0, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


def rel_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_cached_sites_rewritten(model):
    """Graphs that read the prefix cache rewrite every site; the full passes have no cat."""
    rewritten = 0
    for graph in fbcompile.explain(model).graphs:
        decisions = [site["decision"] for site in graph.sites]
        assert len(decisions) == model.config.num_layers, graph.sites
        if graph.rewritten:
            assert graph.rewritten == len(decisions), graph.sites
            rewritten += 1
        else:
            assert all(d.startswith(NOT_A_CAT) for d in decisions), graph.sites
    assert rewritten


@pytest.mark.parametrize("cache,overrides", [("prefix", dict(rope_tables="cached")),
                                             ("prefix", dict(rope_tables="arange", key_norm=True)),
                                             ("dual", dict(rope_tables="cached"))],
                         ids=["prefix-cached_tables", "prefix-arange_tables+key_norm", "dual-cached_tables"])
@torch.no_grad()
def test_exact_generate_equals_eager(cache, overrides):
    """The dual cache here is ``cat([prefix, block, suffix])`` (Fast-dLLM's own writes into a
    full-length buffer are another form, not covered here)."""
    reference = olmo_llada_lm.make_tiny_model(**overrides).generate(prompt(), cache=cache, **GEN)
    model = fbcompile.optimize(olmo_llada_lm.make_tiny_model(**overrides), EXACT)
    out = model.generate(prompt(), cache=cache, **GEN)
    assert torch.equal(out, reference)
    assert_cached_sites_rewritten(model)
    cached = model.last_num_forwards - BLOCKS  # each block's first step is a full pass
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (cached, 0), stats


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@torch.no_grad()
def test_exact_logits_over_shapes(dtype, tol):
    """One prefix-cache step per shape (prompt length, batch, block), fresh inputs, vs eager."""
    config = dict(rope_tables="arange", key_norm=True, num_layers=1, dtype=dtype)
    reference = olmo_llada_lm.make_tiny_model(**config)
    model = fbcompile.optimize(olmo_llada_lm.make_tiny_model(**config), EXACT)
    for seed, (length, batch, block) in enumerate([(5, 1, 4), (12, 2, 8), (21, 3, 6)]):
        x = prompt(length + block, batch, seed)
        _, kv = reference(x, use_cache=True)
        prefix = [(k[:, :, :length], v[:, :, :length]) for k, v in kv]
        expected = reference(x[:, length:], past_key_values=prefix)[0]
        got = model(x[:, length:], past_key_values=prefix)[0]
        assert rel_error(got, expected) < tol, (length, batch, block)
    assert fbcompile.explain(model).rewritten


@torch.no_grad()
def test_block_mode_refreshes_once_per_block_and_compiles_stay_bounded():
    model = fbcompile.optimize(olmo_llada_lm.make_tiny_model(num_layers=1), BLOCK)
    blocks = 4
    model.generate(prompt(), cache="prefix", gen_length=8 * blocks, block_size=8, steps=4 * blocks)
    stats = fbcompile.stats(model)
    # per block: step 0 is the full pass (no cached attention); step 1 refreshes over the new
    # prefix; steps 2 and 3 reuse
    assert stats.refreshes == blocks and stats.reuses == 2 * blocks, stats
    assert stats.refresh_reasons == {"new kv": blocks}
    # the full pass and the prefix step each get a static then a dynamic graph, then no more
    assert len(fbcompile.explain(model).graphs) <= 4


@torch.no_grad()
def test_stale_reuse_is_refused():
    """Same graph, same shapes: a new request, a write into the prefix, a changed RoPE table refresh."""
    model = fbcompile.optimize(olmo_llada_lm.make_tiny_model(num_layers=1), BLOCK)
    eager = olmo_llada_lm.make_tiny_model(num_layers=1)
    x = prompt(20)
    block = x[:, 12:]

    def prefix_of(tokens):
        kv = model(tokens, use_cache=True)[1]
        return [(k[:, :, :12], v[:, :, :12]) for k, v in kv]

    prefix = prefix_of(x)
    for _ in range(2):
        model(block, past_key_values=prefix)
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (1, 1), stats
    prefix = prefix_of(prompt(20, seed=1))  # a new request: new cache tensors
    model(block, past_key_values=prefix)
    prefix[0][0].mul_(1.5)  # a write outside the block's range: into the cached prefix
    model(block, past_key_values=prefix)
    rotary = model.layers[0].self_attn.rotary
    rotary.cos_table.mul_(-1.0)  # the RoPE table changes in place
    eager.layers[0].self_attn.rotary.cos_table.mul_(-1.0)
    got = model(block, past_key_values=prefix)[0]
    stats = fbcompile.stats(model)
    assert stats.reuses == 1 and stats.refresh_reasons == {"new kv": 2, "kv written in place": 2}, stats
    # the last call ran the refresh: exact for the changed table
    expected = eager(block, past_key_values=prefix)[0]
    assert rel_error(got, expected) < 1e-5


class PerCallTables(torch.nn.Module):
    """RoPE tables passed per call and read by the query too: the keys must stay internal."""

    def forward(self, q, k_block, past_k, v_block, past_v, cos):
        k = torch.cat([past_k, k_block], dim=-2) * cos
        v = torch.cat([past_v, v_block], dim=-2)
        return F.scaled_dot_product_attention(q * cos[:, :, -q.shape[-2]:], k, v)


@torch.no_grad()
def test_tables_passed_per_call_keep_the_keys_internal():
    B, H, M, L, D = 2, 2, 4, 6, 8
    q, k_block, past_k = torch.randn(B, H, M, D), torch.randn(B, H, M, D), torch.randn(B, H, L, D)
    v_block, past_v, cos = torch.randn(B, H, M, D), torch.randn(B, H, L, D), torch.randn(1, 1, L + M, D)
    model = fbcompile.optimize(PerCallTables(), EXACT)
    out = model(q, k_block, past_k, v_block, past_v, cos)
    assert torch.allclose(out, PerCallTables()(q, k_block, past_k, v_block, past_v, cos))
    decisions = [s["decision"] for g in fbcompile.explain(model).graphs for s in g.sites]
    assert decisions == ["skipped: part 0 is cached for values only: its keys go through ops that read l_cos_, "
                         "a per-call input the query reads too"], decisions
