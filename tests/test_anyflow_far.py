"""diffusers' ``AnyFlowFARTransformer3DModel`` (tiny config) through its own KV-cache protocol.

The pipeline's loop, reproduced: per chunk, denoising steps with ``kv_cache`` (``is_cache_step=False``:
``flex_attention`` through ``dispatch_attention_fn`` over ``cat(compressed_cache[:n1], full_cache[:n2], key)``
with RoPE after the cat and zero padding to a multiple of 128), then a cache step that writes the chunk's
keys/values (a BlockMask from ``build_attention_mask``). Its RoPE table, a cat of the compressed- and
full-frame tables, is built in the graph from constants alone, so the roped keys split at the cache
(see fbcompile.passes.positionwise).
"""
from __future__ import annotations

import copy

import pytest
import torch

import fbcompile
from attention_zoo import rel_error

diffusers = pytest.importorskip("diffusers")
HEIGHT = WIDTH = 8
CHANNELS = 4


def _tiny(num_layers=1):
    torch.manual_seed(0)
    return diffusers.AnyFlowFARTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=CHANNELS, out_channels=CHANNELS, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=64, full_chunk_limit=2).eval()


def _generate(model, chunks=(1, 1, 1), steps=2, seed=0):
    """AnyFlowFARPipeline's chunk loop (no CFG): the noise predictions of every denoising step."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    full, compressed = (HEIGHT // 2) * (WIDTH // 2), (HEIGHT // 4) * (WIDTH // 4)
    heads, dim = cfg.num_attention_heads, cfg.attention_head_dim
    cache = [{"full_cache": torch.zeros(2, 1, heads, cfg.full_chunk_limit * max(chunks) * full, dim),
              "compressed_cache": torch.zeros(2, 1, heads, (len(chunks) - cfg.full_chunk_limit + 1) * max(chunks)
                                              * compressed, dim)} for _ in range(cfg.num_layers)]
    flag = {"num_cached_chunks": 0, "is_cache_step": False}
    text = torch.randn(1, 5, 16, generator=gen)
    done = torch.zeros(1, sum(chunks), CHANNELS, HEIGHT, WIDTH)
    predictions = []
    for index, frames in enumerate(chunks):
        partition = list(chunks[: index + 1])
        latents = torch.randn(1, frames, CHANNELS, HEIGHT, WIDTH, generator=gen)
        for step in range(steps):
            t = torch.full((1, frames), 900.0 - 400 * step)
            prediction, _ = model(hidden_states=latents, timestep=t, r_timestep=t - 400, encoder_hidden_states=text,
                                  return_dict=False, chunk_partition=partition, kv_cache=cache,
                                  kv_cache_flag=copy.deepcopy(flag))
            predictions.append(prediction)
            latents = latents - 0.4 * prediction
        done[:, sum(chunks[:index]): sum(partition)] = latents
        if index < len(chunks) - 1:
            zero = torch.zeros(1, sum(partition))
            mask = model.build_attention_mask(chunk_partition=partition, height=HEIGHT, width=WIDTH, device="cpu",
                                              mode="cache")
            model(hidden_states=done[:, : sum(partition)], chunk_partition=partition, timestep=zero, r_timestep=zero,
                  encoder_hidden_states=text, attention_mask=mask, return_dict=False, kv_cache=cache,
                  kv_cache_flag={**flag, "is_cache_step": True})
            flag["num_cached_chunks"] += 1
    return predictions


@pytest.fixture(scope="module")
def exact_run():
    """The eager predictions, and fbcompile's in exact mode with the optimized model."""
    with torch.no_grad():
        expected = _generate(_tiny())
        model = fbcompile.optimize(_tiny(), fbcompile.Config(refresh="always", compiler="eager"))
        return expected, _generate(model), model


def test_anyflow_far_exact_through_its_cache_loop(exact_run):
    expected, got, model = exact_run
    assert max(rel_error(a, b) for a, b in zip(got, expected)) < 1e-5
    assert any(s["form"] == "flex" for s in fbcompile.explain(model).sites)  # dispatch_attention_fn's flex backend


def test_anyflow_far_self_attention_over_the_cache_is_rewritten(exact_run):
    """Its RoPE table is a cat of the compressed-frame and full-frame tables, built from constants alone
    (a graph constant, see fbcompile.passes.positionwise): the roped keys split into the cache slices
    and the block, like the values."""
    flex = [s for s in fbcompile.explain(exact_run[2]).sites if s["form"] == "flex"]
    over_cache = [s for s in flex if s["decision"] == "rewritten"]
    # the others: the first chunk's denoising graph and the cache steps, which attend over no cache
    assert all("no cached part" in s["decision"] for s in flex if s not in over_cache), flex
    assert len(over_cache) == 2, flex  # the second and third chunks' denoising graphs
    # the third chunk attends over the compressed cache, the full cache and the block (+ zero padding)
    assert max(s["kv"].count("ext:") for s in over_cache) == 2


def test_anyflow_far_block_mode_reuses_within_each_chunk():
    """The loop denoises each chunk in ``steps`` calls over an unchanged cache, then writes the chunk
    in a cache step (a graph with no cached part). So every chunk after the first refreshes at its
    first step and reuses at the others: per split graph (calls, refreshes, reuses) = (steps, 1,
    steps - 1). Compiles: two graphs per chunk (denoising and cache step) but the first chunk's
    denoising graph and the last cache step: the loop's ``chunk_partition`` list grows each chunk
    and dynamo guards on its length, so compiles grow with the chunks (``Config(scope="blocks")``
    bounds them, see below)."""
    chunks, steps = (1,) * 4, 3
    with torch.no_grad():
        model = fbcompile.optimize(_tiny(), fbcompile.Config(refresh="block", compiler="eager"))
        _generate(model, chunks=chunks, steps=steps)
    stats = fbcompile.stats(model)
    cached_chunks = len(chunks) - 1
    assert [(s.calls, s.refreshes, s.reuses) for s in stats.sites] == [(steps, 1, steps - 1)] * cached_chunks, stats
    # every chunk's denoising graph is a new graph whose cached part slices the cache at other static
    # lengths (another fingerprint), so each chunk's first step is "new kv"
    assert stats.refresh_reasons == {"new kv": cached_chunks}, stats
    assert stats.compiles == 2 * len(chunks) - 1, stats


BLOCK_SCOPE_COMPILES = 5


def test_anyflow_far_block_scope_is_exact_and_rewrites_the_cached_attention():
    """``Config(scope="blocks")`` compiles the model's ``_repeated_blocks`` (``AnyFlowTransformerBlock``);
    each block gets the RoPE table the eager forward recomputes at every call, a graph input compared by
    value (see fbcompile.passes.find_attention)."""
    chunks = (1,) * 4
    with torch.no_grad():
        expected = _generate(_tiny(num_layers=2), chunks=chunks)
        model = fbcompile.optimize(_tiny(num_layers=2), fbcompile.Config(refresh="always", compiler="eager",
                                                                        scope="blocks"))
        got = _generate(model, chunks=chunks)
    assert max(rel_error(a, b) for a, b in zip(got, expected)) < 1e-5
    flex = [s for s in fbcompile.explain(model).sites if s["form"] == "flex"]
    assert all(s["decision"] == "rewritten" or "no cached part" in s["decision"] for s in flex), flex
    # the second chunk's graph (no compressed cache yet) and the later chunks' one (symbolic lengths)
    assert [s["kv"].count("ext:") for s in flex if s["decision"] == "rewritten"] == [1, 2], flex
    assert fbcompile.stats(model).compiles == BLOCK_SCOPE_COMPILES


def test_anyflow_far_block_scope_compiles_stay_bounded_and_reuse_within_each_chunk():
    """The model's forward takes ``chunk_partition``, a list that grows by one int per chunk: dynamo
    guards on its length, so ``scope="model"`` compiles two graphs per chunk. The blocks see tensors
    and ints only: graphs for the first chunk (denoising, cache step), the second chunk's denoising
    (an empty compressed cache), then one graph for the denoising steps and one for the cache steps of
    every later chunk (automatic dynamic shapes): 5 compiles, as for 4 chunks. Longer runs add a few
    graphs once, none per chunk: the cache step's BlockMask, 128 rows until then, grows (its sizes turn
    dynamic), and a length that is a multiple of 128 takes the model's no-padding branch - 7 compiles
    over 50 chunks of 1 frame, 6 over 20 chunks of 4 frames (compiles measured with a script).
    Every chunk after the first refreshes at its first step and reuses at the others."""
    chunks, steps = (1,) * 7, 3
    with torch.no_grad():
        model = fbcompile.optimize(_tiny(), fbcompile.Config(refresh="block", compiler="eager", scope="blocks"))
        _generate(model, chunks=chunks, steps=steps)
    stats = fbcompile.stats(model)
    assert stats.compiles == BLOCK_SCOPE_COMPILES, stats
    later = len(chunks) - 2  # chunks served by the symbolic-length graph
    assert [(s.calls, s.refreshes, s.reuses) for s in stats.sites] == [
        (steps, 1, steps - 1), (steps * later, later, (steps - 1) * later)], stats
    # the symbolic graph's first chunk is new to it; at the others the cache step wrote the cache
    assert stats.refresh_reasons == {"new kv": 2, "kv written in place": later - 1}, stats


def test_anyflow_far_block_scope_compiles_every_graph_with_inductor():
    """With Inductor: the later chunks' graph slices the full cache by an int input that turns symbolic; the
    mask of its flex call without a BlockMask made Inductor fail ("Invalid ranges [0:-1]") and that graph
    ran without Inductor. Every graph compiles now, and exact mode matches the model."""
    import warnings

    chunks = (1,) * 4
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = _generate(_tiny(), chunks=chunks)
        model = fbcompile.optimize(_tiny(), fbcompile.Config(refresh="always", scope="blocks"))
        got = _generate(model, chunks=chunks)
    assert max(rel_error(a, b) for a, b in zip(got, expected)) < 1e-5
    assert not [str(w.message) for w in caught if "could not compile" in str(w.message)]
    stats = fbcompile.stats(model)
    assert stats.uncompiled == 0 and stats.compiles == BLOCK_SCOPE_COMPILES, stats
