"""Sparse reuse (``Config(sparse=...)``) on every model family that block mode serves, through each
family's own loop (issue #15: "works on every family that block mode works on").

Per family, the outputs of every forward: at budget 0 they equal block mode's, with a budget over
every cached tile exact mode's, and the sites of the graphs that reuse say they reuse sparsely (or,
where sparse reuse cannot gather the external keys, keep block reuse, say why, and equal block mode
at any budget). ``tests/test_sparse_reuse.py`` covers the block-diffusion example, the AR video
model, the OLMo-style LLaDA and DiffusionGemma the same way.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

import fbcompile
from attention_zoo import rel_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import (dream_lm, fast_dllm_v2_lm, llada_dual_buffer, llada_lm, sdar_lm, sdar_remote_lm,  # noqa: E402
                      wan_causal_video)

EAGER = dict(compiler="eager")
EVERY = 4096  # KV entries: more than any family here caches
SPARSE = "sparse (budget 4096, tiles of {tile}, residual on)"


def _prompt():
    return torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def _sdar(intra_block):
    return lambda: sdar_lm.make_tiny_model(intra_block=intra_block, num_layers=1), \
        lambda m: m.generate(_prompt(), num_blocks=2)


def _llada(cache):
    return lambda: llada_lm.make_tiny_model(num_layers=1), \
        lambda m: m.generate(_prompt(), cache=cache, gen_length=16, block_size=8, steps=8)


def _dream():
    return lambda: dream_lm.make_tiny_model(num_layers=1), \
        lambda m: m.generate(_prompt(), gen_length=16, block_size=8, steps=8)


def _fast_dllm_v2():
    return lambda: fast_dllm_v2_lm.make_tiny_model(num_layers=1), \
        lambda m: m.generate(_prompt(), num_blocks=2, sub_block=4, per_step=1, commit=lambda: _commit(m))


def _dual_buffer(rotate_after_write=False):
    return lambda: llada_dual_buffer.make_tiny_model(num_layers=1, rotate_after_write=rotate_after_write), \
        lambda m: m.generate(_prompt(), gen_length=16, block_size=8, steps=8)


def _sdar_remote():
    import flash_attn_standin

    flash_attn_standin.register()

    def run(model):
        prompt = torch.randint(0, 60, (1, 8), generator=torch.Generator().manual_seed(1))
        model.generate(prompt, gen_blocks=2, steps=2, commit=lambda: _commit(model))
    return lambda: sdar_remote_lm.make_tiny_model(num_layers=1), run


def _wan(cache_mode):
    from test_wan_causal import LONGLIVE, ROLLING, STEPS, _inputs

    cfg = {"self_forcing": ROLLING, "longlive": LONGLIVE}[cache_mode]
    noise, context = _inputs(cfg, chunks=3)
    return lambda: wan_causal_video.init_weights(wan_causal_video.WanCausalVideo(cfg)), \
        lambda m: wan_causal_video.generate(m, noise, context, STEPS)


def _anyflow_far():
    from test_anyflow_far import _generate, _tiny  # skips without diffusers

    return _tiny, _generate


def _qwen2_crop():
    from test_graph_breaks import CropLoop, _tiny_qwen2  # skips without transformers

    def make():
        model, config = _tiny_qwen2()
        model.hf_config = config
        return model

    def run(model):
        loop = CropLoop(model, model.hf_config, commit=lambda: _commit(model))
        loop.block(3)
        loop.block(3)
    return make, run


# family: (make and run, KV tile, what its sites report with every tile selected)
FAMILIES = {
    "sdar-block-causal": (lambda: _sdar("block_causal"), 4, SPARSE),
    "sdar-bidirectional": (lambda: _sdar("bidirectional"), 4, SPARSE),
    "llada-prefix": (lambda: _llada("prefix"), 4, SPARSE),
    "llada-dual": (lambda: _llada("dual"), 4, SPARSE),
    "llada-dual-buffer": (_dual_buffer, 4, SPARSE),
    "dream-prefix": (_dream, 4, SPARSE),
    "fast-dllm-v2-block-cache": (_fast_dllm_v2, 4, SPARSE),
    "llada-dual-buffer-rotated-after": (lambda: _dual_buffer(rotate_after_write=True), 4, SPARSE),  # Fast-dLLM's order
    "sdar-remote-flash": (_sdar_remote, 4, SPARSE),
    "wan-self-forcing": (lambda: _wan("self_forcing"), 8, SPARSE),
    # LongLive attends over cat(sinks, window) of a written clone: the window starts at an offset that
    # moves, which the row gather cannot prove stable (fbcompile.passes.positionwise): block reuse
    "wan-longlive": (lambda: _wan("longlive"), 8, "block reuse: its external keys/values are computed in the graph"),
    "anyflow-far": (_anyflow_far, 8, SPARSE),
    "qwen2-dynamic-cache-crop": (_qwen2_crop, 4, SPARSE),
}


def _commit(model):
    """``fbcompile.commit`` for an optimized model; nothing for the original model of the reference run."""
    try:
        return fbcompile.commit(model)
    except ValueError:  # no fbcompile state: the original model
        return contextlib.nullcontext()


def _outputs(make, run, config):
    """Every forward's output (its first tensor), and the optimized model (``config`` None: the original
    model, whose outputs are exact mode's: tested per family elsewhere, and a compile less here)."""
    torch.manual_seed(0)
    model = make() if config is None else fbcompile.optimize(make(), config)
    outs = []

    def keep(module, args, out):
        out = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
        if out is not None:  # AnyFlow's cache steps return no prediction
            outs.append(out.detach().clone())
    hook = model.register_forward_hook(keep)
    with torch.no_grad():
        run(model)
    hook.remove()
    return outs, model


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_extremes_are_block_and_exact_mode(family, monkeypatch):
    if family == "sdar-remote-flash":
        import flash_attn_standin

        monkeypatch.setattr(sdar_remote_lm, "flash_attn_func", flash_attn_standin.flash_attn_func)
    family_run, tile, reported = FAMILIES[family]
    make, run = family_run()
    sparse = lambda budget: fbcompile.Config(sparse=fbcompile.Sparse(budget=budget, tile=tile), **EAGER)  # noqa: E731
    exact, _ = _outputs(make, run, None)
    block, _ = _outputs(make, run, fbcompile.Config(**EAGER))
    none, _ = _outputs(make, run, sparse(0))
    every, model = _outputs(make, run, sparse(EVERY))
    assert len(exact) == len(block) == len(none) == len(every) > 0
    assert fbcompile.stats(model).reuses > 0
    rows = [row for row in fbcompile.explain(model).rewritten if "sparse" in row]  # not: save passes' graphs
    assert rows and all(row["sparse"].startswith(reported.format(tile=tile)) for row in rows), rows
    full = exact if reported == SPARSE else block  # sites that keep block reuse reuse all at any budget
    if reported == SPARSE:  # so that a budget acting as budget 0 would fail
        assert max(rel_error(b, e) for b, e in zip(block, exact)) > 1e-5
    for step, (n, b, s, f) in enumerate(zip(none, block, every, full)):
        assert rel_error(n, b) < 1e-5, step
        assert rel_error(s, f) < 1e-5, step
