"""Keys/values whose concatenation crosses a call or a graph boundary (issue 12, item 3).

* SDAR/TraDo-style remote code (``examples/sdar_remote_lm.py``): the layer concatenates the cache,
  then branches on ``torch.all(mask)``; the attention's graph reads the concatenation as an input and
  is split where the earlier graph joined it (its provenance);
* transformers' ``Qwen2ForCausalLM`` as a block-diffusion denoiser over a ``DynamicCache``: every step
  appends the block and ``crop``s it off again, so the cached prefix is a view of the previous step's
  concatenation - one content across the block's steps;
* what must not reuse: a cache written outside the block's range, a new request, a crop to another
  length, a joined input without (valid) provenance.
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import fbcompile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import flash_attn_standin  # noqa: E402
from examples import sdar_remote_lm  # noqa: E402

BLOCK = fbcompile.Config(compiler="eager")
EXACT = fbcompile.Config(refresh="always", compiler="eager")


def assert_exact(got: torch.Tensor, expected: torch.Tensor) -> None:
    error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    assert error < 1e-5, error


def _differs(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item() > 1e-4


# --------------------------------------------------------------------------- SDAR-style remote code


@pytest.fixture
def flash_standin(monkeypatch):
    """The decode branch calls flash-attn's op (a CPU stand-in with its schema), as on the GPU."""
    flash_attn_standin.register()
    monkeypatch.setattr(sdar_remote_lm, "flash_attn_func", flash_attn_standin.flash_attn_func)


def _generate_with_logits(model, commit=contextlib.nullcontext, blocks=1):
    logits = []
    hook = model.register_forward_hook(lambda module, args, out: logits.append(out))
    prompt = torch.randint(0, 60, (1, 8), generator=torch.Generator().manual_seed(1))
    tokens = model.generate(prompt, gen_blocks=blocks, steps=2, commit=commit)
    hook.remove()
    return tokens, logits


def test_sdar_exact_mode_equals_eager(flash_standin):
    want_tokens, want = _generate_with_logits(sdar_remote_lm.make_tiny_model(num_layers=1))
    model = fbcompile.optimize(sdar_remote_lm.make_tiny_model(num_layers=1), EXACT)
    tokens, got = _generate_with_logits(model)
    assert torch.equal(tokens, want_tokens)
    for g, w in zip(got, want, strict=True):
        assert_exact(g, w)
    decisions = {s["form"]: s["decision"] for s in fbcompile.explain(model).sites}
    assert decisions["flash"] == "rewritten"  # the decode attention, across the graph break


def test_sdar_block_mode_reuses_after_each_blocks_first_step(flash_standin):
    """Per block and layer: the first denoising step refreshes, the second reuses, the commit
    (``store_kv=True``, marked with fbcompile.commit) runs exactly."""
    model = fbcompile.optimize(sdar_remote_lm.make_tiny_model(num_layers=1), BLOCK)
    _generate_with_logits(model, commit=lambda: fbcompile.commit(model), blocks=2)
    stats = fbcompile.stats(model)
    layers, blocks = 1, 2
    assert stats.reuses == layers * blocks
    assert stats.refresh_reasons == {"new kv": layers * blocks, "commit": layers * blocks}


# --------------------------------------------------------------------------- Qwen2 + DynamicCache + crop


HUB_FLASH = "fbcompile_test_hub_fa3"  # a name without "flash": transformers treats those as its own


def hub_flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' flash-attention integration over a kernel hub build of flash-attn 3
    (``attn_implementation="kernels-community/flash-attn3"``), its path without a padding mask: the
    heads-first states as tokens-first, GQA left to the kernel, the module's ``is_causal`` (aligned
    bottom-right). The stand-in's op lives in the hub build's namespace."""
    out = flash_attn_standin.flash_attn_3_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scaling,
        causal=module.is_causal, namespace=flash_attn_standin.HUB_NAMESPACES[3])
    return out, None


def _tiny_qwen2(layers=1, attn="sdpa"):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if attn == HUB_FLASH:
        flash_attn_standin.register_hub()
        transformers.AttentionInterface.register(HUB_FLASH, hub_flash_attention)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval(), config


class CropLoop:
    """Block diffusion over a DynamicCache: each step appends the block and crops it off again; the
    finished block is appended by one more forward (the commit). Step tokens are fixed by a seed, so
    two runs see the same inputs whatever their logits."""

    BLOCK = 4

    def __init__(self, model, config, commit=contextlib.nullcontext, prompt_len=8, seed=3):
        from transformers import DynamicCache

        self.model, self.commit, self.gen = model, commit, torch.Generator().manual_seed(seed)
        self.cache, self.length, self.logits = DynamicCache(config=config), prompt_len, []
        with torch.no_grad():
            model(torch.randint(0, 64, (1, prompt_len), generator=self.gen), past_key_values=self.cache, use_cache=True)

    def block(self, steps=3, between=None):
        """Denoise one block; ``between(cache, step)`` runs after each step's crop."""
        n, length = self.length, self.BLOCK
        pos = torch.arange(n, n + length)[None]
        with torch.no_grad():
            for step in range(steps):
                x = torch.randint(0, 64, (1, length), generator=self.gen)
                mask = torch.ones(1, 1, length, self.cache.get_seq_length() + length, dtype=torch.bool)
                self.logits.append(self.model(x, past_key_values=self.cache, position_ids=pos, attention_mask=mask,
                                              use_cache=True).logits)
                self.cache.crop(-length)
                if between is not None:
                    between(self.cache, step)
            with self.commit():
                self.model(x, past_key_values=self.cache, position_ids=pos, attention_mask=mask, use_cache=True)
        self.length += length


def _optimized_qwen2(config: fbcompile.Config, attn="sdpa"):
    model, hf_config = _tiny_qwen2(attn=attn)
    fbcompile.optimize(model, config)
    return model, hf_config


@pytest.mark.parametrize("attn", ["sdpa", HUB_FLASH])
def test_qwen2_dynamic_cache_crop_exact_mode_equals_eager(attn):
    want = CropLoop(*_tiny_qwen2(attn=attn))
    got = CropLoop(*_optimized_qwen2(EXACT, attn))
    for loop in (want, got):
        loop.block(steps=2)
        loop.block(steps=2)
    for g, w in zip(got.logits, want.logits, strict=True):
        assert_exact(g, w)
    assert all(layer.keys.shape[-2] == 16 for layer in got.cache.layers)
    for g, w in zip(got.cache.layers, want.cache.layers):
        assert_exact(g.keys, w.keys)


@pytest.mark.parametrize("attn", ["sdpa", HUB_FLASH])
def test_qwen2_dynamic_cache_crop_reuses_and_commits_exactly(attn):
    """Each block: the first step runs exactly (its cache is the last commit, not a crop: a save
    pass), the other steps reuse, the commit forward (fbcompile.commit) runs exactly."""
    model, config = _optimized_qwen2(BLOCK, attn)
    loop = CropLoop(model, config, commit=lambda: fbcompile.commit(model))
    blocks, steps = 2, 3
    for _ in range(blocks):
        loop.block(steps)
    stats = fbcompile.stats(model)
    assert stats.reuses == blocks * (steps - 1)
    assert stats.refresh_reasons == {"save pass": blocks, "commit": blocks}
    rewritten = [s for s in fbcompile.explain(model).sites if s["decision"] == "rewritten"]
    assert rewritten and all("ext:" in s["kv"] for s in rewritten)


def test_qwen2_stale_caches_refresh():
    """Three blocks with the same inputs in block mode and eager; each case must refresh (so its step
    equals eager) and the protocol must then reuse again:

    * block 1: between its first and second step, a write into the prompt's keys (outside the block);
    * block 2 (graphs dynamic in the cache length by then, so no recompile hides a stale reuse): the
      first step's crop takes one more position - the cache is no longer the concatenation's prefix;
    * block 3: a new request over the prompt's cache cropped back (same cached content, a new block).
    """
    def perturb(cache, step, block):
        if step == 0 and block == 0:
            cache.layers[0].keys[..., 0, :] += 1.0
        if step == 0 and block == 1:
            cache.crop(-1)

    loops = []
    for model, config in (_optimized_qwen2(BLOCK), _tiny_qwen2()):
        optimized = hasattr(model, "_fbcompile")
        loop = CropLoop(model, config, commit=lambda: fbcompile.commit(model) if optimized else contextlib.nullcontext())
        for block in range(2):
            loop.block(between=lambda cache, step: perturb(cache, step, block))
        if optimized:
            fbcompile.new_request(model)
        loop.cache.crop(-CropLoop.BLOCK)
        loop.block()
        loops.append(loop)
    got, want = loops
    for step in (0, 1, 3, 4, 6):
        assert_exact(got.logits[step], want.logits[step])
    assert _differs(got.logits[7], want.logits[7])  # a reuse (the checks above can fail)
    assert fbcompile.stats(got.model).reuses == 4  # steps 3 of blocks 1 and 2, steps 2 and 3 of block 3


# --------------------------------------------------------------------------- joined inputs


def _join(past_k, past_v, k, v):
    return torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)


def _attend(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _kv(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def test_joined_input_without_valid_provenance_refreshes():
    """The graph after the break is split by the provenance its input had at compile time; a later
    input without it (a plain tensor, or a joined one written in place since) refreshes. The query
    stays the same, so a reuse over unchanged keys is exact and a stale one is not."""
    backend = fbcompile.backend(compiler="eager")
    join, attend = torch.compile(_join, backend=backend), torch.compile(_attend, backend=backend)
    session = backend.session
    past_k, past_v = _kv(1, 2, 8, 8, seed=0)
    q = torch.randn(1, 4, 4, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        k, v = join(past_k, past_v, *_kv(1, 2, 4, 8, seed=1))
        attend(q, k, v)
        assert session.graphs[-1].rewritten == 1  # split at 8, where join concatenated
        assert_exact(attend(q, k, v), _attend(q, k, v))
        assert session.stats().reuses == 1
        plain_k, plain_v = _join(past_k + 1.0, past_v, *_kv(1, 2, 4, 8, seed=1))  # joined outside fbcompile
        assert_exact(attend(q, plain_k, plain_v), _attend(q, plain_k, plain_v))
        k, v = join(past_k, past_v, *_kv(1, 2, 4, 8, seed=2))
        k[..., 0, :] += 1.0  # a write into the cached range after the join
        assert_exact(attend(q, k, v), _attend(q, k, v))
    assert session.stats().reuses == 1
    assert session.refresh_reasons["new kv"] == 3


def test_sdar_deep_model_stays_within_its_compile_budget(flash_standin):
    """The layer's frames after the graph break compile per layer: the budget grows with the depth
    (Config.recompile_limit + 8 per layer), so every layer still reuses with a small base limit that a
    fixed per-frame budget would exhaust (about 7 graphs per layer)."""
    layers, blocks = 4, 2
    model = fbcompile.optimize(sdar_remote_lm.make_tiny_model(num_layers=layers),
                               fbcompile.Config(compiler="eager", recompile_limit=8))
    _generate_with_logits(model, commit=lambda: fbcompile.commit(model), blocks=blocks)
    stats = fbcompile.stats(model)
    assert stats.reuses == layers * blocks, stats
    assert stats.refresh_reasons == {"new kv": layers * blocks, "commit": layers * blocks}
