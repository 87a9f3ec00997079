"""A real model: transformers' DiffusionGemmaForBlockDiffusion (tiny random config), unmodified."""
from __future__ import annotations

import pytest
import torch

import fbcompile

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
    pytest.skip("this transformers has no DiffusionGemma", allow_module_level=True)

BLOCKS, STEPS, CANVAS = 3, 8, 16


def make_model(**text_overrides):
    torch.manual_seed(0)
    text = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=32, sliding_window=64,
                max_position_embeddings=4096, num_experts=4, top_k_experts=2, moe_intermediate_size=64)
    text.update(text_overrides)
    config = transformers.DiffusionGemmaConfig(text_config=text, canvas_length=CANVAS, boi_token_id=500,
                                               eoi_token_id=501, image_token_id=502)
    return transformers.DiffusionGemmaForBlockDiffusion(config).eval()


def generate(model, ids):
    torch.manual_seed(5)  # the initial canvas is random
    out = model.generate(ids, max_new_tokens=BLOCKS * CANVAS, max_denoising_steps=STEPS, do_sample=False)
    return getattr(out, "sequences", out)


@pytest.fixture(scope="module")
def prompt_and_reference():
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(1))
    return ids, generate(make_model(), ids)


def test_exact_mode_under_optimize_matches_and_rewrites_every_cached_attention(prompt_and_reference):
    ids, reference = prompt_and_reference
    model = fbcompile.optimize(make_model(), fbcompile.Config(refresh="always", compiler="eager"))
    assert torch.equal(generate(model, ids), reference)
    report = fbcompile.explain(model)
    layers = model.config.text_config.num_hidden_layers
    for graph in report.graphs:
        assert graph.rewritten == layers, graph.sites  # every decoder attention reads the cache
    assert not report.skipped
    assert fbcompile.stats(model).compiles <= 4


def test_exact_mode_through_the_named_backend(prompt_and_reference):
    ids, reference = prompt_and_reference
    model = make_model()
    model.forward = torch.compile(model.forward, backend="fbcompile",
                                  options={"refresh": "always", "compiler": "eager"})
    assert torch.equal(generate(model, ids), reference)
    # the backend's session is shared and outlives this test, and before the first call another test's
    # may be the last used (what stats() reads): count over a second generate
    before = fbcompile.stats().refreshes
    assert torch.equal(generate(model, ids), reference)
    assert fbcompile.stats().refreshes - before == BLOCKS * STEPS


def test_block_mode_refreshes_once_per_block(prompt_and_reference):
    ids, _ = prompt_and_reference
    model = fbcompile.optimize(make_model(), fbcompile.Config(refresh="block", compiler="eager"))
    out = generate(model, ids)
    stats = fbcompile.stats(model)
    assert out.shape == (1, 12 + BLOCKS * CANVAS)
    assert stats.refreshes == BLOCKS and stats.reuses == BLOCKS * (STEPS - 1), stats
    assert stats.refresh_reasons == {"new kv": BLOCKS}


def test_sparse_reuse_over_every_tile_is_exact_and_refreshes_once_per_block(prompt_and_reference):
    """Config(sparse=...) applies to every cached attention (sliding-window and global layers); a budget
    covering every tile leaves an empty residual, so block-mode reuse with sparse on decodes exactly."""
    ids, reference = prompt_and_reference
    model = fbcompile.optimize(make_model(), fbcompile.Config(compiler="eager",
                                                              sparse=fbcompile.Sparse(budget=4096, tile=16)))
    assert torch.equal(generate(model, ids), reference)
    stats = fbcompile.stats(model)
    assert stats.refreshes == BLOCKS and stats.reuses == BLOCKS * (STEPS - 1), stats
    assert all(row["sparse"].startswith("sparse (") for row in fbcompile.explain(model).rewritten)
    assert stats.sites[-1].sparse_read == 1.0


@pytest.mark.parametrize("refresh", ["always", "block"])
def test_a_padded_batch_runs_from_spare_capacity_under_cuda_graphs(monkeypatch, refresh):
    """A batch of prompts of different lengths: ``generate`` passes a 4-D mask over cache and canvas to each
    layer kind (sliding and global). The masks go into spare capacity with the cache, so the graphs over
    each new cache replay (they ran uncaptured before); the tokens are the original model's in exact mode
    and the model's without CUDA graphs in block mode. CPU stand-in for the capture."""
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_cuda_graphs import stand_in_record

    from fbcompile.backends import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "DEVICE_TYPE", "cpu")
    monkeypatch.setattr(cuda_graphs, "record", stand_in_record)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(1))
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, :3] = 0

    def padded_generate(model):
        torch.manual_seed(5)
        out = model.generate(ids, attention_mask=padding, max_new_tokens=BLOCKS * CANVAS,
                             max_denoising_steps=STEPS, do_sample=False)
        return getattr(out, "sequences", out)

    config = dict(refresh=refresh, compiler="eager")
    expected = padded_generate(make_model() if refresh == "always" else
                               fbcompile.optimize(make_model(), fbcompile.Config(**config)))
    model = fbcompile.optimize(make_model(), fbcompile.Config(cuda_graphs=True, **config))
    assert torch.equal(padded_generate(model), expected)
    counts = fbcompile.stats(model).cuda_graphs
    assert counts.get("switched to spare capacity") and not any(k.startswith("uncaptured (new") for k in counts), counts
    assert "2 mask(s) over cache and block copied into buffers" in str(fbcompile.explain(model))
