"""diffusers' SANA-WM stage-2 refiner (``SanaWMLTX2Refiner``, tiny config) through its own pipeline.

The pipeline refines a video chunk-causally: it captures the attention sink's keys before RoPE once,
then per block of ``block_size`` latent frames runs 3 Euler steps whose self-attention reads
``cat([rope(sink_k, sink_pe), history_k, block_k])`` (tokens first, heads flattened), and a last
forward at sigma 0 that stores a copy of the block's keys/values (``key.detach().clone()``), which
the loop appends to the history and trims to ``kv_max_frames``. ``sink_pe``, the sink's RoPE table,
is rebuilt per block and shared by every layer, so every layer after the first has a query that
reads it through the earlier layers' attention (see fbcompile.passes.find_attention). The text
encoder (Gemma-3) is left out: ``_encode_prompt`` returns fixed embeddings.
"""
from __future__ import annotations

import pytest
import torch

import fbcompile
from attention_zoo import rel_error

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.sana_wm.refiner import SanaWMLTX2Refiner  # noqa: E402

CHANNELS, TEXT_DIM, STEPS = 8, 16, 3  # STEPS: the pipeline's distilled schedule


def _tiny(num_layers=2, dtype=torch.float32):
    torch.manual_seed(0)
    return diffusers.SanaWMLTX2RefinerTransformer3DModel(
        in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=num_layers, caption_channels=TEXT_DIM, audio_in_channels=8,
        audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16).to(dtype).eval()


def _refine(model, frames=10, kv_max_frames=7, seed=0, on_block=None):
    """The pipeline's refined latents of a random stage-1 latent (1 sink frame, blocks of 3 frames);
    ``on_block()`` runs as each block starts (the pipeline resets its scheduler there)."""
    pipe = SanaWMLTX2Refiner(transformer=model, connectors=None, tokenizer=None, text_encoder=None,
                             scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe.set_progress_bar_config(disable=True)
    if on_block is not None:
        set_timesteps = pipe.scheduler.set_timesteps
        pipe.scheduler.set_timesteps = lambda *args, **kwargs: (on_block(), set_timesteps(*args, **kwargs))
    gen = torch.Generator().manual_seed(seed)
    weight = next(model.parameters())
    text = torch.randn(1, 5, TEXT_DIM, generator=gen, dtype=weight.dtype).to(weight.device)
    mask = torch.ones(1, 5, device=weight.device)
    pipe._encode_prompt = lambda prompt, device, dtype: (text, mask)
    latent = torch.randn(1, CHANNELS, frames, 4, 4, generator=gen, dtype=weight.dtype).to(weight.device)
    return pipe(latent, "a prompt", fps=24.0, output_type="latent", kv_max_frames=kv_max_frames)


def _blocks(frames, sink=1, block_size=3):
    return -(-(frames - sink) // block_size)


def _window_sites(model):
    """The self-attention sites over a cached part (the others attend over the block or the text only)."""
    return [s for s in fbcompile.explain(model).sites if "ext:" in s["kv"] or "int:" in s["kv"]]


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_sana_wm_refiner_exact_through_its_pipeline_and_every_layer_split(scope):
    with torch.no_grad():
        expected = _refine(_tiny())
        model = fbcompile.optimize(_tiny(), fbcompile.Config(refresh="always", compiler="eager", scope=scope))
        got = _refine(model)
    assert rel_error(got, expected) < 1e-5
    sites = _window_sites(model)
    # both layers in every graph over the window: the sink (its RoPE applied in the graph) and the history
    # are cached parts; before, the second layer's sink was left unsplit at the model scope ("part 0 is
    # cached for values only: its keys depend on an input the query depends on": the shared table)
    assert sites and all(s["decision"] == "rewritten" for s in sites), [s["decision"] for s in sites]
    assert {s["kv"].count("ext:") for s in sites} == {1, 2}  # the first block has no history yet


def test_sana_wm_refiner_exact_in_bf16():
    with torch.no_grad():
        expected = _refine(_tiny(dtype=torch.bfloat16))
        model = fbcompile.optimize(_tiny(dtype=torch.bfloat16), fbcompile.Config(refresh="always", compiler="eager"))
        got = _refine(model)
    assert rel_error(got.float(), expected.float()) < 1e-2


def test_sana_wm_refiner_block_mode_reuses_within_each_block_and_captures_it_exactly():
    """Each block's first step refreshes (a new ``sink_pe`` and history), its other steps reuse, and the
    capture forward returns a copy of the block's keys/values: a commit, which runs exactly. Once the
    history reaches ``kv_max_frames`` its length stays, and so do the graphs."""
    frames = 31
    blocks = _blocks(frames)
    with torch.no_grad():
        expected = _refine(_tiny(), frames=frames)
        model = fbcompile.optimize(_tiny(), fbcompile.Config(refresh="block", compiler="eager"))
        compiles = []  # before each block, and once at the start
        got = _refine(model, frames=frames, on_block=lambda: compiles.append(fbcompile.stats(model).compiles))
    stats = fbcompile.stats(model)
    assert stats.refresh_reasons == {"new kv": blocks, "save pass": blocks}, stats
    assert stats.reuses == blocks * (STEPS - 1), stats
    assert 0 < rel_error(got, expected) < 0.05  # reuse approximates; the random model stays close
    # a graph for the sink's capture, then a denoising and a capture graph for each of the first 4 blocks
    # (no history, 3 frames, 6, 6 trimmed: a view) and none after
    assert compiles[:6] == [0, 1, 3, 5, 7, 9], compiles
    assert compiles[6:] + [stats.compiles] == [9] * (blocks - 4), compiles


def test_sana_wm_refiner_exact_with_inductor():
    with torch.no_grad():
        expected = _refine(_tiny(), frames=7)
        model = fbcompile.optimize(_tiny(), fbcompile.Config(refresh="always"))
        got = _refine(model, frames=7)
    assert rel_error(got, expected) < 1e-5
    assert fbcompile.stats(model).uncompiled == 0
    assert all(s["decision"] == "rewritten" for s in _window_sites(model))


def test_sana_wm_refiner_under_cuda_graphs_matches_the_uncaptured_runs_and_stops_capturing(monkeypatch):
    """With ``cuda_graphs=True`` (CPU stand-in for the capture, see test_cuda_graphs): exact mode equals the
    pipeline and block mode equals block mode without CUDA graphs, replays included. The sink's RoPE table
    is a new tensor at every block: its graphs copy it in after a few blocks (a capture per block before),
    so past the ninth block every call replays and none captures. Every block's table is kept alive, so
    that each comes at new memory (else the allocator may hand an earlier one's back, where the capture
    over it replays as it is)."""
    from fbcompile.backends import cuda_graphs
    from test_cuda_graphs import stand_in_record

    monkeypatch.setattr(cuda_graphs, "DEVICE_TYPE", "cpu")
    monkeypatch.setattr(cuda_graphs, "record", stand_in_record)
    frames = 31
    with torch.no_grad():
        expected = _refine(_tiny(), frames=frames)
        block = _refine(fbcompile.optimize(_tiny(), fbcompile.Config(refresh="block", compiler="eager")), frames=frames)
        runs = {}
        for refresh in ("always", "block"):
            model = fbcompile.optimize(_tiny(), fbcompile.Config(refresh=refresh, compiler="eager", cuda_graphs=True))
            build, tables = model.build_rotary_emb_for_absolute_positions, []
            monkeypatch.setattr(model, "build_rotary_emb_for_absolute_positions",
                                lambda *args, **kwargs: tables.append(build(*args, **kwargs)) or tables[-1])
            counts = []  # before each block, and once at the start
            got = _refine(model, frames=frames, on_block=lambda: counts.append(dict(fbcompile.stats(model).cuda_graphs)))
            runs[refresh] = got, counts + [fbcompile.stats(model).cuda_graphs]
    assert rel_error(runs["always"][0], expected) < 1e-5
    assert rel_error(runs["block"][0], block) < 1e-6
    for refresh, (_, counts) in runs.items():
        last = counts[-1]
        assert last.get("cached inputs copied in from then on (new at every block)") == 2, (refresh, last)
        assert counts[9].get("captures") == last.get("captures"), (refresh, counts[9], last)
        calls = 4  # per block: 3 steps and the capture forward
        assert last["replays"] - counts[9]["replays"] == calls * (len(counts) - 10), (refresh, counts[9], last)
