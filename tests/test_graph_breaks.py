"""Keys/values whose concatenation crosses a call or a graph boundary (issue 12, item 3).

* SDAR/TraDo-style remote code (``examples/sdar_remote_lm.py``): the layer concatenates the cache,
  then branches on ``torch.all(mask)``; the attention's graph reads the concatenation as an input and
  is split where the earlier graph joined it (its provenance);
* transformers' ``Qwen2ForCausalLM`` as a block-diffusion denoiser over a ``DynamicCache``: every step
  appends the block and ``crop``s it off again, so the cached prefix is a view of the previous step's
  concatenation - one content across the block's steps; also through transformers' own flash-attn 3
  integration, whose packed-sequence check breaks the graph after the cat, the next graph reading the
  keys transposed (tokens first);
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
    assert error < (1e-2 if expected.dtype == torch.bfloat16 else 1e-5), error


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


@pytest.fixture(params=["sdpa", "flash_attention_3"])
def attn(request, monkeypatch):
    """The attention implementation of transformers' Qwen2. ``"flash_attention_3"``: flash-attn 3's Python
    package as transformers imports it (``flash_attn_interface``), its functions the stand-in's, so that
    transformers' own flash integration runs (``_flash_attention_forward``: with a batch of one and position
    ids, its packed-sequence check reads the ids, a graph break between the cache's cat and the attention)."""
    if request.param == "flash_attention_3":
        import importlib.machinery
        import types

        from transformers import modeling_flash_attention_utils

        flash_attn_standin.register_fa3()
        module = types.ModuleType("flash_attn_interface")
        module.__spec__ = importlib.machinery.ModuleSpec("flash_attn_interface", None)
        module.flash_attn_func = flash_attn_standin.flash_attn_3_func
        module.flash_attn_varlen_func = flash_attn_standin.flash_attn_3_varlen_func
        module.flash_attn_with_kvcache = None
        monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
        monkeypatch.setattr(modeling_flash_attention_utils, "_loaded_implementation", None)
    return request.param


def _tiny_qwen2(layers=1, attn="sdpa"):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    # flash-attn 3 is chosen after the model is built (building it checks for a CUDA device), in bf16 as it
    # runs (fp32 inputs make transformers warn, a graph break in the loop over the layers)
    config._attn_implementation = "sdpa" if attn == "flash_attention_3" else attn
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    config._attn_implementation = attn
    return model.to(torch.bfloat16 if attn == "flash_attention_3" else torch.float32), config


class CropLoop:
    """Block diffusion over a DynamicCache: each step appends the block and crops it off again; the
    finished block is appended by one more forward (the commit). Step tokens are fixed by a seed, so
    two runs see the same inputs whatever their logits."""

    BLOCK = 4

    def __init__(self, model, config, commit=contextlib.nullcontext, prompt_len=8, seed=3):
        from transformers import DynamicCache

        self.model, self.commit, self.gen = model, commit, torch.Generator().manual_seed(seed)
        self.masked = "flash" not in config._attn_implementation  # flash-attn takes no 4-D mask
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
                mask = (torch.ones(1, 1, length, self.cache.get_seq_length() + length, dtype=torch.bool)
                        if self.masked else None)
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
    # a block's first step: the graph that joins the cache also returns it (a save pass), unless a graph break
    # lies between the join and the attention (transformers' flash integration), whose graph then sees new keys
    first = "new kv" if attn == "flash_attention_3" else "save pass"
    assert stats.refresh_reasons == {first: blocks, "commit": blocks}
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


def _attend_tokens_first(q, k, v):
    return _attend(q, k.transpose(1, 2), v.transpose(1, 2))


@pytest.mark.parametrize("tokens_first", [False, True], ids=["as joined", "transposed"])
def test_joined_input_without_valid_provenance_refreshes(tokens_first):
    """The graph after the break is split by the provenance its input had at compile time; a later
    input without it (a plain tensor, or a joined one written in place since) refreshes. The query
    stays the same, so a reuse over unchanged keys is exact and a stale one is not. ``tokens_first``:
    the next graph reads the joined tensors transposed, as transformers' flash integration passes them."""
    backend = fbcompile.backend(compiler="eager")
    join = torch.compile(_join, backend=backend)
    attend = torch.compile(_attend_tokens_first if tokens_first else _attend, backend=backend)
    session = backend.session
    past_k, past_v = _kv(1, 2, 8, 8, seed=0)
    q = torch.randn(1, 4, 4, 8, generator=torch.Generator().manual_seed(5))

    def check(k, v):
        if tokens_first:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        expected = (_attend_tokens_first if tokens_first else _attend)(q, k, v)
        assert_exact(attend(q, k, v), expected)

    with torch.no_grad():
        k, v = join(past_k, past_v, *_kv(1, 2, 4, 8, seed=1))
        check(k, v)
        assert session.graphs[-1].rewritten == 1  # split at 8, where join concatenated
        check(k, v)
        assert session.stats().reuses == 1
        check(*_join(past_k + 1.0, past_v, *_kv(1, 2, 4, 8, seed=1)))  # joined outside fbcompile
        k, v = join(past_k, past_v, *_kv(1, 2, 4, 8, seed=2))
        k[..., 0, :] += 1.0  # a write into the cached range after the join
        check(k, v)
    assert session.stats().reuses == 1
    assert session.refresh_reasons["new kv"] == 3


@pytest.mark.parametrize("shape,dim", [((1, 2, 6, 8), 2), ((2, 6, 1, 8), 1), ((1, 1, 6, 8), 2)],
                         ids=["heads first", "tokens first, one head", "one head and batch"])
def test_a_joined_tensor_seen_in_another_dim_order_keeps_its_provenance(shape, dim):
    """``C = cat(P, B)`` seen through any permutation of its dims (size-1 dims share strides) is split, and
    its prefix holds ``P``'s content, along the view's own joined dim; views that are not all of ``C``'s
    elements in another order (a slice of another dim), or ``C`` written since, have none."""
    from fbcompile.backends import provenance

    past = torch.randn(*shape)
    block = torch.randn(*shape[:dim], 2, *shape[dim + 1:])
    joined = torch.cat([past, block], dim)
    provenance.record(joined, past, dim)
    for order in ([0, 1, 2, 3], [0, 2, 1, 3], [2, 0, 3, 1]):
        view = joined.permute(order)
        at = order.index(dim)
        assert provenance.split_hint(view) == (at, 2), order
        assert provenance.content(view, (at, shape[dim])) == provenance.content(past)._replace(inherited=True)
        assert provenance.content(view, (at, shape[dim] + 1)).token is not provenance.content(past).token
    other = next(d for d in range(4) if d != dim and joined.shape[d] > 1)
    assert provenance.split_hint(joined.narrow(other, 0, 1).transpose(1, 2)) is None
    joined.add_(1.0)
    assert provenance.split_hint(joined.transpose(1, 2)) is None


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
