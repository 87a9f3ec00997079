"""Dream (Fast-dLLM's second model) through its own prefix-cache loop (``examples/dream_lm.py``).

Its forms: the cache joined flat (``[B, S, Hkv*D]``) and split into heads after the cat, HF Qwen2's
rotary tables computed per call by a matmul of ``inv_freq`` and ``arange(past + q_len)``, RoPE after
the cat with the queries' rows ``cos[:, :, S - q_len:S]``, GQA after RoPE, and ``present = (k, v)``
returned at every call while the loop keeps a cut of the full pass's keys (``k[:, :s]``) as the cache.
Checked: exact mode equals the model (tokens, and logits over shapes in fp32 and bf16, with a padded
batch's mask), block mode refreshes once per block although every step returns the concatenation,
while a cache that is no such cut still runs returned concatenations exactly.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fbcompile
from attention_zoo import rel_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import dream_lm  # noqa: E402

EXACT = fbcompile.Config(refresh="always", compiler="eager")
BLOCK = fbcompile.Config(compiler="eager")


def _prompt(length=12, batch=2, seed=0):
    return torch.randint(0, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


def _padding(batch, length):
    """Left padding of 0, 3, 6... positions per row, as a ``[B, P]`` 0/1 prompt mask."""
    pad = torch.arange(batch)[:, None] * 3
    return (torch.arange(length)[None] >= pad).long()


def _cached_sites_rewritten(model) -> int:
    """Graphs over the cache rewrite all their sites, the full passes (no cat) none; how many rewrote."""
    rewritten = 0
    for graph in fbcompile.explain(model).graphs:
        decisions = [site["decision"] for site in graph.sites]
        if graph.rewritten:
            assert graph.rewritten == len(decisions) == model.config.num_layers, graph.sites
            rewritten += 1
        else:
            assert all(d.startswith("skipped: keys/values are not a concatenation") for d in decisions), graph.sites
    return rewritten


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded batch"])
@torch.no_grad()
def test_exact_generate_equals_the_model(padded):
    prompt = _prompt()
    mask = _padding(*prompt.shape) if padded else None
    gen = dict(gen_length=16, block_size=8, steps=8)
    expected = dream_lm.make_tiny_model().generate(prompt, prompt_mask=mask, **gen)
    model = fbcompile.optimize(dream_lm.make_tiny_model(), EXACT)
    assert torch.equal(model.generate(prompt, prompt_mask=mask, **gen), expected)
    assert _cached_sites_rewritten(model)
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (model.last_num_forwards - 2, 0), stats  # 2 full passes


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@torch.no_grad()
def test_exact_logits_over_shapes(dtype, tol):
    """One cached step per shape (prompt, batch, rest of the sequence, padding), fresh inputs, vs the model."""
    reference = dream_lm.make_tiny_model(num_layers=1, dtype=dtype)
    model = fbcompile.optimize(dream_lm.make_tiny_model(num_layers=1, dtype=dtype), EXACT)
    for seed, (cached, batch, rest, padded) in enumerate([(5, 1, 4, False), (12, 2, 16, True), (21, 3, 6, False),
                                                          (9, 3, 11, True)]):
        x = _prompt(cached + rest, batch, seed)
        mask = None
        if padded:
            keep = _padding(batch, cached + rest).bool()
            mask = (keep[:, None, None, :] & keep[:, None, :, None])
        _, presents = reference(x, mask)
        cache = [(k[:, :cached], v[:, :cached]) for k, v in presents]
        rows = None if mask is None else mask[:, :, cached:]
        expected = reference(x[:, cached:], rows, past_key_values=cache)[0]
        got = model(x[:, cached:], rows, past_key_values=cache)[0]
        assert rel_error(got, expected) < tol, (cached, batch, rest, padded)
    assert _cached_sites_rewritten(model)


@torch.no_grad()
def test_block_mode_reuses_though_every_step_returns_the_concatenation():
    """Each cached step returns ``present = cat(cache, block)``, which commits the block where the loop
    keeps it; Dream's loop cuts its cache from the block's full pass instead, so those steps reuse."""
    blocks, steps = 3, 4
    model = fbcompile.optimize(dream_lm.make_tiny_model(), BLOCK)
    model.generate(_prompt(), gen_length=8 * blocks, block_size=8, steps=steps * blocks)
    stats = fbcompile.stats(model)
    # per block: the full pass, a refresh over the new cache, then reuses
    assert (stats.refreshes, stats.reuses) == (blocks, blocks * (steps - 2)), stats
    assert stats.refresh_reasons == {"new kv": blocks}, stats
    assert "returns the block's keys/values: a call runs exactly (save pass) unless its cache is cut" in \
        str(fbcompile.explain(model))


@torch.no_grad()
def test_a_returned_concatenation_over_a_cache_that_is_no_cut_runs_exactly():
    """The same graph over caches the loop did not cut from returned keys/values (a copy, say, as a loop
    that keeps ``present`` as its cache holds): returning the concatenation commits, and runs exactly."""
    reference = dream_lm.make_tiny_model(num_layers=1)
    model = fbcompile.optimize(dream_lm.make_tiny_model(num_layers=1), BLOCK)
    x = _prompt(20)
    cut = [(k[:, :12], v[:, :12]) for k, v in model(x)[1]]
    copied = [(k.clone(), v.clone()) for k, v in cut]
    for cache in (cut, cut, copied, copied):
        got, presents = model(x[:, 12:], past_key_values=cache)
        expected, expected_presents = reference(x[:, 12:], past_key_values=cache)
        assert rel_error(got, expected) < 1e-5
        assert all(rel_error(a, b) < 1e-5 for pair, e in zip(presents, expected_presents) for a, b in zip(pair, e))
    stats = fbcompile.stats(model)
    assert stats.reuses == 1 and stats.refresh_reasons == {"new kv": 1, "save pass": 2}, stats


def test_cuts_of_returned_keys_values():
    """What counts as cut from keys/values a graph returned: a slice along one dim, anywhere in it; not the
    whole tensor, a slice along two dims, another layout of the same storage, or an unnoted tensor."""
    from fbcompile.backends import provenance

    returned = torch.randn(2, 4, 30, 8).transpose(1, 2)  # [B, S, H, D] as a view of [B, H, S, D]
    provenance.note_returned(returned)
    cuts = {"prefix": returned[:, :12], "suffix": returned[:, 20:], "middle": returned[:, 5:9],
            "heads": returned[:, :, :2]}
    not_cuts = {"whole": returned, "two dims": returned[:, :12, :2], "strided": returned[:, ::2],
                "contiguous copy": returned[:, :12].contiguous(), "transposed": returned[:, :12].transpose(1, 2),
                "unnoted": torch.randn(2, 30, 4, 8)[:, :12]}
    assert all(provenance.cut_of_returned(t) for t in cuts.values())
    assert not any(provenance.cut_of_returned(t) for t in not_cuts.values()), \
        [name for name, t in not_cuts.items() if provenance.cut_of_returned(t)]
