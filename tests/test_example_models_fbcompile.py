"""The three example model families under ``fbcompile.optimize`` (issue 6).

For SDAR (block-causal and bidirectional inside the block), LLaDA (Fast-dLLM prefix and dual
cache) and the AR video model (cat and static cache):

* exact mode (``refresh="always"``): ``generate`` gives the eager result (token ids / latents), and
  every forward that reads a cache goes through graphs whose attention sites are all ``rewritten``;
  the no-cache forwards (prefill, LLaDA's full pass, the video model's first chunk with a cat cache)
  have no cached attention and are left alone;
* block mode (``refresh="block"``): one refresh per block and reuse on that block's other forwards,
  counted from the structure of each family's ``generate`` (one-layer models: the counts are per
  call, and tracing is what makes these tests slow).

Cached external results are shared across graphs over the same KV tensors (keyed by their
identity). A block's commit / clean pass returns the block's own keys/values: it is a save pass and
runs exactly (``Config.exact_save_pass``), as in the official FlashBlock code.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fbcompile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import llada_lm, sdar_lm, video_ar_diffusion  # noqa: E402

EXACT = fbcompile.Config(refresh="always", compiler="eager")
BLOCK = fbcompile.Config(refresh="block", compiler="eager")
NOT_A_CAT = "skipped: keys/values are not a concatenation"

P = 12                                   # prompt length
SDAR_BLOCKS = 2
LLADA = dict(gen_length=16, block_size=8, steps=8)   # 2 blocks of 4 steps
LLADA_BLOCKS = LLADA["gen_length"] // LLADA["block_size"]
VIDEO_CHUNKS, VIDEO_STEPS = 3, 3
# block mode counts calls per graph, not per layer: one layer is enough and halves dynamo's tracing
ONE_LAYER = {"num_layers": 1}




def prompt():
    return torch.randint(0, 200, (2, P), generator=torch.Generator().manual_seed(0))


def rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_cached_sites_rewritten(model, num_layers):
    """Every graph either rewrites all its attention sites or has no cached attention at all."""
    report = fbcompile.explain(model)
    rewritten_graphs = 0
    for graph in report.graphs:
        decisions = [site["decision"] for site in graph.sites]
        assert len(decisions) == num_layers, graph.sites
        if graph.rewritten:
            assert graph.rewritten == num_layers, graph.sites
            rewritten_graphs += 1
        else:  # a forward without a cache: attention over the block's own keys only
            assert all(d.startswith(NOT_A_CAT) for d in decisions), graph.sites
    assert rewritten_graphs, str(report)


# --------------------------------------------------------------------------- SDAR

@pytest.mark.parametrize("intra_block", ["block_causal", "bidirectional"])
@torch.no_grad()
def test_sdar_exact(intra_block):
    reference = sdar_lm.make_tiny_model(intra_block=intra_block).generate(prompt(), num_blocks=SDAR_BLOCKS)
    model = fbcompile.optimize(sdar_lm.make_tiny_model(intra_block=intra_block), EXACT)
    out = model.generate(prompt(), num_blocks=SDAR_BLOCKS)
    assert torch.equal(out, reference)
    assert_cached_sites_rewritten(model, model.config.num_layers)
    # every denoising step and every commit pass reads the cache; the prefill does not
    cached_forwards = model.last_num_steps + SDAR_BLOCKS
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (cached_forwards, 0), stats
    assert stats.refresh_reasons == {"exact mode": cached_forwards}


@pytest.mark.parametrize("intra_block", ["block_causal", "bidirectional"])
@torch.no_grad()
def test_sdar_block_mode_refreshes_once_per_block(intra_block):
    model = fbcompile.optimize(sdar_lm.make_tiny_model(intra_block=intra_block, **ONE_LAYER), BLOCK)
    out = model.generate(prompt(), num_blocks=SDAR_BLOCKS)
    assert out.shape == (2, P + SDAR_BLOCKS * model.config.block_size)
    steps = model.last_num_steps
    assert steps > SDAR_BLOCKS * model.config.block_size // model.config.sub_block_size  # >1 step per sub-block somewhere
    stats = fbcompile.stats(model)
    # per block: its first denoising step refreshes (a new cache tensor), its other steps reuse,
    # its commit pass is exact (save pass)
    assert stats.refreshes == 2 * SDAR_BLOCKS, stats
    assert stats.reuses == steps - SDAR_BLOCKS, stats
    assert stats.refresh_reasons == {"new kv": SDAR_BLOCKS, "save pass": SDAR_BLOCKS}


# --------------------------------------------------------------------------- LLaDA

@pytest.mark.parametrize("cache", ["prefix", "dual"])
@torch.no_grad()
def test_llada_exact(cache):
    reference = llada_lm.make_tiny_model().generate(prompt(), cache=cache, **LLADA)
    model = fbcompile.optimize(llada_lm.make_tiny_model(), EXACT)
    out = model.generate(prompt(), cache=cache, **LLADA)
    assert torch.equal(out, reference)
    assert_cached_sites_rewritten(model, model.config.num_layers)
    # each block's first step is a full pass without a cache; all its other steps read the cache
    forwards = model.last_num_forwards
    assert forwards == LLADA["steps"]
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (forwards - LLADA_BLOCKS, 0), stats
    assert stats.refresh_reasons == {"exact mode": forwards - LLADA_BLOCKS}


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@torch.no_grad()
def test_llada_block_mode_refreshes_once_per_block(cache):
    model = fbcompile.optimize(llada_lm.make_tiny_model(**ONE_LAYER), BLOCK)
    out = model.generate(prompt(), cache=cache, **LLADA)
    assert out.shape == (2, P + LLADA["gen_length"])
    assert not (out[:, P:] == model.config.mask_token_id).any()
    forwards = model.last_num_forwards
    stats = fbcompile.stats(model)
    # per block: step 0 is the full pass (no cached attention, counted nowhere); step 1 refreshes
    # over the block's new prefix (and suffix) slices; steps 2.. reuse
    assert stats.refreshes == LLADA_BLOCKS, stats
    assert stats.reuses == forwards - 2 * LLADA_BLOCKS, stats
    assert stats.refresh_reasons == {"new kv": LLADA_BLOCKS}


# --------------------------------------------------------------------------- AR video

def video_generate(model, cache):
    return model.generate(VIDEO_CHUNKS, steps=VIDEO_STEPS, generator=torch.Generator().manual_seed(0), cache=cache)


@pytest.mark.parametrize("cache", ["cat", "static"])
@torch.no_grad()
def test_video_exact(cache):
    reference = video_generate(video_ar_diffusion.make_tiny_model(), cache)
    model = fbcompile.optimize(video_ar_diffusion.make_tiny_model(), EXACT)
    out = video_generate(model, cache)
    assert rel_error(out, reference) < 1e-5
    layers = model.config.num_layers
    assert_cached_sites_rewritten(model, layers)
    # cat: the first chunk has no past; static: every call attends over the buffer (the first
    # chunk's cached range is empty), so every call goes through rewritten sites
    calls_per_chunk = VIDEO_STEPS + 1  # denoising steps + the clean t=0 pass
    cached_calls = (VIDEO_CHUNKS - 1 if cache == "cat" else VIDEO_CHUNKS) * calls_per_chunk
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (cached_calls, 0), stats
    if cache == "static":
        assert not fbcompile.explain(model).skipped


@pytest.mark.parametrize("cache", ["cat", "static"])
@torch.no_grad()
def test_video_block_mode_refreshes_once_per_chunk(cache):
    model = fbcompile.optimize(video_ar_diffusion.make_tiny_model(**ONE_LAYER), BLOCK)
    out = video_generate(model, cache)
    cfg = model.config
    assert out.shape == (1, cfg.in_channels, VIDEO_CHUNKS * cfg.chunk_frames, cfg.height, cfg.width)
    assert torch.isfinite(out).all()
    stats = fbcompile.stats(model)
    if cache == "cat":
        # chunk 0 has no past; every later chunk: the first denoising step refreshes (a new
        # concatenated past), the other steps reuse, the clean pass is a save pass (exact)
        assert stats.refreshes == 2 * (VIDEO_CHUNKS - 1), stats
        assert stats.reuses == (VIDEO_CHUNKS - 1) * (VIDEO_STEPS - 1), stats
        assert stats.refresh_reasons == {"new kv": VIDEO_CHUNKS - 1, "save pass": VIDEO_CHUNKS - 1}
    else:
        # one buffer for the whole video: chunk 0 refreshes over an empty range ("new kv"); the slot
        # writes the denoising graphs make themselves do not invalidate the cached part; the clean
        # pass is a save pass (exact); the next chunk's cached range [0, start) has moved on ("kv range
        # changed", told before the clean pass's write: the graph dynamo recompiled for chunk 1 with a
        # symbolic start finds chunk 0's entry, ranges are compared by value)
        assert stats.refreshes == 2 * VIDEO_CHUNKS, stats
        assert stats.reuses == VIDEO_CHUNKS * (VIDEO_STEPS - 1), stats
        assert stats.refresh_reasons == {"new kv": 1, "kv range changed": VIDEO_CHUNKS - 1,
                                        "save pass": VIDEO_CHUNKS}
