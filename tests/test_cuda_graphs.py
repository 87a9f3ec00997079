"""CUDA graphs (``Config(cuda_graphs=True)``, ``mode="reduce-overhead"``) on the GPU: exact mode stays exact,
replays follow the guards, captures stay bounded while a cache grows. Skipped without CUDA (the CPU
fallback is tested in test_runtime.py)."""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import fbcompile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.block_diffusion_lm import make_tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

SHAPE = dict(hidden_size=256, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=512,
             block_size=16, dtype=torch.bfloat16)
CONTEXT = 300


def lm():
    return make_tiny_model(**SHAPE).cuda()


def random_cache(model, seed: int, context: int = CONTEXT):
    cfg = model.config
    gen = torch.Generator("cuda").manual_seed(seed)
    shape = (1, cfg.num_kv_heads, context, cfg.head_dim)
    return [tuple(torch.randn(shape, generator=gen, device="cuda", dtype=cfg.dtype) for _ in "kv")
            for _ in range(cfg.num_layers)]


def block_tokens(model, step: int):
    gen = torch.Generator("cuda").manual_seed(100 + step)
    return torch.randint(0, 200, (1, model.config.block_size), generator=gen, device="cuda")


def positions(model, context: int = CONTEXT):
    return torch.arange(context, context + model.config.block_size, device="cuda")[None]


def rel_error(got, expected) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("how", ["optimize", "reduce-overhead"])
@torch.no_grad()
def test_exact_mode_replays_and_matches_eager(how):
    """Inductor graphs, exact mode: every step within bf16 tolerance of eager, outputs kept across
    later replays untouched (checked after all calls), one capture then replays."""
    reference = lm()
    model = copy.deepcopy(reference)
    if how == "optimize":
        model = fbcompile.optimize(model, fbcompile.Config(refresh="always", cuda_graphs=True))
    else:
        model = torch.compile(model, backend=fbcompile.backend(mode="reduce-overhead", refresh="always"))
    cache, pos = random_cache(reference, 0), positions(reference)
    got, expected = [], []
    for step in range(5):
        x = block_tokens(reference, step)
        got.append(model(x, past_key_values=cache, position_ids=pos)[0])
        expected.append(reference(x, past_key_values=cache, position_ids=pos)[0])
    errors = [rel_error(g, e) for g, e in zip(got, expected)]
    assert max(errors) < 1e-2, errors
    counts = fbcompile.stats(model).cuda_graphs
    assert counts.get("captures") == 1 and counts.get("replays") == 3, counts


@torch.no_grad()
def test_named_backend_reduce_overhead_reuses_under_replay():
    """``torch.compile(backend="fbcompile", mode="reduce-overhead")``: block mode, Inductor; the refresh
    (first step) is exact, the other steps reuse, and replay."""
    reference = lm()
    model = torch.compile(copy.deepcopy(reference), backend="fbcompile", mode="reduce-overhead")
    cache, pos = random_cache(reference, 3), positions(reference)
    for step in range(5):
        x = block_tokens(reference, step)
        got = model(x, past_key_values=cache, position_ids=pos)[0]
        if step == 0:
            assert rel_error(got, reference(x, past_key_values=cache, position_ids=pos)[0]) < 1e-2
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (1, 4), stats
    assert stats.cuda_graphs.get("replays", 0) >= 2, stats.cuda_graphs


@torch.no_grad()
def test_replays_follow_the_guards():
    """Two caches through the same graphs (as classifier-free guidance does) and an in-place write:
    every call agrees with the same model without CUDA graphs, and each refresh with eager."""
    reference = lm()
    graphed = fbcompile.optimize(copy.deepcopy(reference), fbcompile.Config(cuda_graphs=True, compiler="eager"))
    plain = fbcompile.optimize(copy.deepcopy(reference), fbcompile.Config(compiler="eager"))
    caches, pos = [random_cache(reference, 1), random_cache(reference, 2)], positions(reference)
    for step in range(6):
        x = block_tokens(reference, step)
        if step == 4:
            caches[0][1][0].mul_(-1.0)  # the first layer's keys written in place: must refresh
        for cache in caches:
            got = graphed(x, past_key_values=cache, position_ids=pos)[0]
            assert rel_error(got, plain(x, past_key_values=cache, position_ids=pos)[0]) < 1e-3
            if step in (0, 4):  # refreshes: exact
                assert rel_error(got, reference(x, past_key_values=cache, position_ids=pos)[0]) < 1e-2
    stats = fbcompile.stats(graphed)
    assert stats.reuses == fbcompile.stats(plain).reuses == 9, stats
    assert stats.refresh_reasons == {"new kv": 2, "kv written in place": 1}, stats
    assert stats.cuda_graphs.get("replays", 0) >= 6, stats


@torch.no_grad()
def test_growing_cache_captures_stay_bounded():
    """``generate`` grows its cache by a ``torch.cat`` per block: the reuse graphs are captured once for
    all blocks, refreshes over the new tensors run uncaptured; the tokens are those of the model
    without CUDA graphs."""
    reference = lm()
    graphed = fbcompile.optimize(copy.deepcopy(reference), fbcompile.Config(cuda_graphs=True, compiler="eager"))
    plain = fbcompile.optimize(copy.deepcopy(reference), fbcompile.Config(compiler="eager"))
    prompt = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0)).cuda()
    graphed.generate(prompt, num_blocks=4, steps=4)
    fbcompile.reset(graphed)  # counts from here
    got = graphed.generate(prompt, num_blocks=12, steps=4)
    expected = plain.generate(prompt, num_blocks=12, steps=4)
    assert (got == expected).float().mean().item() > 0.98
    stats = fbcompile.stats(graphed)
    assert stats.reuses == fbcompile.stats(plain).reuses > 0
    assert stats.cuda_graphs.get("captures", 0) <= 3, stats.cuda_graphs  # over 12 more blocks
    assert stats.cuda_graphs.get("replays", 0) >= 12 * 2, stats.cuda_graphs
