"""Fast CPU tests of the plain-PyTorch example models in ``examples/`` (no fbcompile).

They pin down the behaviour fbcompile's own tests rely on: cached decoding equals a
no-cache reference, cache modes agree where they must, and the random tiny models are
not degenerate (so equality checks elsewhere can actually fail).
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples import block_diffusion_lm as bd  # noqa: E402
from examples import llada_lm, sdar_lm, video_ar_diffusion  # noqa: E402

P = 12  # prompt length used throughout


def prompt(batch=2, seed=0, length=P):
    return torch.randint(0, 200, (batch, length), generator=torch.Generator().manual_seed(seed))


def record_past_lengths(model, key="past_key_values", dim=-2):
    """Forward pre-hook logging (past length, id of layer-0 past K) for every model call; the tensors are
    kept alive while the hook is, so that a freed one's id is not handed to a later one."""
    log, held = [], []

    def hook(_mod, args, kwargs):
        past = kwargs.get(key, args[1] if len(args) > 1 else None)
        log.append((None, None) if past is None else (past[0][0].shape[dim], id(past[0][0])))
        held.append(None if past is None else past[0][0])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return log, handle


# --------------------------------------------------------------------------- block diffusion LM

VARIANTS = [
    {},
    {"gqa_style": "enable_gqa"},
    {"attn_impl": "eager"},
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_bd_forward_shapes(overrides):
    model = bd.make_tiny_model(**overrides)
    cfg = model.config
    ids = prompt()
    logits, kv = model(ids, use_cache=True)
    assert logits.shape == (2, P, cfg.vocab_size)
    assert len(kv) == cfg.num_layers
    for k, v in kv:
        assert k.shape == v.shape == (2, cfg.num_kv_heads, P, cfg.head_dim)
    block = torch.full((2, cfg.block_size), cfg.mask_token_id)
    logits2, kv2 = model(block, past_key_values=kv, use_cache=True)
    assert logits2.shape == (2, cfg.block_size, cfg.vocab_size)
    assert kv2[0][0].shape[-2] == cfg.block_size  # own K/V only, not concatenated
    assert model(block, past_key_values=kv)[1] is None


def test_bd_variants_agree():
    ids = prompt(length=P + 8)
    ref = bd.make_tiny_model()(ids)[0]
    for overrides in VARIANTS[1:]:
        torch.testing.assert_close(bd.make_tiny_model(**overrides)(ids)[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_bd_cached_block_equals_masked_full_pass(overrides):
    """cat(past, block) attention == one full pass where the prompt cannot see the block."""
    model = bd.make_tiny_model(**overrides)
    ids = prompt(length=P + 8)
    _, cache = model(ids[:, :P], use_cache=True)
    cached = model(ids[:, P:], past_key_values=cache)[0]
    mask = torch.ones(P + 8, P + 8, dtype=torch.bool)
    mask[:P, P:] = False
    full = model(ids, attention_mask=mask[None, None])[0]
    torch.testing.assert_close(cached, full[:, P:], atol=1e-4, rtol=1e-4)
    # the past matters: without it the block's logits change
    assert not torch.allclose(model(ids[:, P:], position_ids=torch.arange(P, P + 8))[0], cached, atol=1e-3)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_bd_attention_mask_equals_dropping_keys(overrides):
    """Masking past key j == removing it from the cache (positions kept explicit)."""
    model = bd.make_tiny_model(**overrides)
    ids = prompt(length=P + 8)
    _, cache = model(ids[:, :P], use_cache=True)
    pos = torch.arange(P, P + 8)
    mask = torch.ones(2, 1, 8, P + 8, dtype=torch.bool)
    mask[0, :, :, 3] = False  # row 0 hides past key 3 (e.g. a pad token)
    masked = model(ids[:, P:], past_key_values=cache, position_ids=pos, attention_mask=mask)[0]
    keep = [i for i in range(P) if i != 3]
    dropped_cache = [(k[:, :, keep], v[:, :, keep]) for k, v in cache]
    dropped = model(ids[:, P:], past_key_values=dropped_cache, position_ids=pos)[0]
    plain = model(ids[:, P:], past_key_values=cache, position_ids=pos)[0]
    torch.testing.assert_close(masked[0], dropped[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(masked[1], plain[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked[0], plain[0], atol=1e-3)


def reference_generate(model, prompt_ids, num_blocks, steps):
    """No-cache decoding: every step re-runs the whole sequence with a block-causal mask."""
    cfg = model.config
    bs = cfg.block_size
    b, p = prompt_ids.shape
    seq = prompt_ids
    per_step = -(-bs // steps)
    for _ in range(num_blocks):
        x = torch.full((b, bs), cfg.mask_token_id)
        masked = torch.ones(b, bs, dtype=torch.bool)
        n = seq.shape[1] + bs
        owner = torch.cat([torch.zeros(p, dtype=torch.long), 1 + torch.arange(n - p) // bs])
        mask = (owner[None, :] <= owner[:, None])[None, None]
        remaining = bs
        for s in range(steps):
            if remaining == 0:
                break
            logits = model(torch.cat([seq, x], 1), attention_mask=mask)[0][:, -bs:]
            conf, tok = bd.greedy_confidence(logits, cfg.mask_token_id)
            k = remaining if s == steps - 1 else min(per_step, remaining)
            x, masked = bd.unmask_topk(x, masked, conf, tok, k)
            remaining -= k
        seq = torch.cat([seq, x], 1)
    return seq


@pytest.mark.parametrize("steps", [None, 3, 8])
def test_bd_generate_matches_no_cache_reference(steps):
    model = bd.make_tiny_model()
    cfg = model.config
    out = model.generate(prompt(), num_blocks=3, steps=steps)
    assert out.shape == (2, P + 3 * cfg.block_size)
    assert torch.equal(out[:, :P], prompt())
    assert not (out[:, P:] == cfg.mask_token_id).any()
    ref = reference_generate(model, prompt(), 3, steps or cfg.denoising_steps)
    assert torch.equal(out, ref)


def test_bd_generate_deterministic_and_not_degenerate():
    model = bd.make_tiny_model()
    a = model.generate(prompt(), num_blocks=3)
    assert torch.equal(a, bd.make_tiny_model().generate(prompt(), num_blocks=3))
    gen = a[:, P:]
    assert gen.unique().numel() >= 8  # not one token repeated
    assert not torch.equal(gen[0], gen[1])  # depends on the prompt
    other_weights = bd.make_tiny_model(seed=1).generate(prompt(), num_blocks=3)
    assert not torch.equal(a, other_weights)


def test_bd_cache_grows_one_block_per_block():
    model = bd.make_tiny_model()
    cfg = model.config
    log, handle = record_past_lengths(model)
    try:
        model.generate(prompt(), num_blocks=3)
    finally:
        handle.remove()
    calls_per_block = cfg.denoising_steps + 1  # denoising steps + commit pass
    assert log[0] == (None, None)  # prefill
    assert len(log) == 1 + 3 * calls_per_block
    ids = []
    for blk in range(3):
        chunk = log[1 + blk * calls_per_block: 1 + (blk + 1) * calls_per_block]
        assert {n for n, _ in chunk} == {P + blk * cfg.block_size}
        assert len({i for _, i in chunk}) == 1  # same cache object within a block
        ids.append(chunk[0][1])
    assert len(set(ids)) == 3  # a new cache tensor each block


# --------------------------------------------------------------------------- SDAR


def test_sdar_shapes_and_sub_block_mask():
    model = sdar_lm.make_tiny_model()
    cfg = model.config
    _, cache = model(prompt(), use_cache=True)
    x = prompt(seed=1, length=cfg.block_size)
    logits, kv = model(x, past_key_values=cache, use_cache=True)
    assert logits.shape == (2, cfg.block_size, cfg.vocab_size)
    assert kv[0][0].shape == (2, cfg.num_kv_heads, cfg.block_size, cfg.head_dim)
    x2 = x.clone()
    x2[:, cfg.sub_block_size:] = cfg.mask_token_id
    logits2 = model(x2, past_key_values=cache)[0]
    sbs = cfg.sub_block_size
    torch.testing.assert_close(logits[:, :sbs], logits2[:, :sbs], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[:, sbs:], logits2[:, sbs:], atol=1e-3)
    # bidirectional variant: a later sub-block does influence the first one
    bidi = sdar_lm.make_tiny_model(intra_block="bidirectional")
    assert not torch.allclose(bidi(x, cache)[0][:, :sbs], bidi(x2, cache)[0][:, :sbs], atol=1e-3)


def test_sdar_threshold_controls_parallelism():
    model = sdar_lm.make_tiny_model()
    cfg = model.config
    nb = 3
    steps = {}
    outs = {}
    for th in (0.0, cfg.threshold, 1.0):
        outs[th] = model.generate(prompt(), num_blocks=nb, threshold=th)
        steps[th] = model.last_num_steps
        assert outs[th].shape == (2, P + nb * cfg.block_size)
        assert not (outs[th][:, P:] == cfg.mask_token_id).any()
    assert steps[0.0] == nb * cfg.block_size // cfg.sub_block_size  # all of a sub-block at once
    assert steps[1.0] == nb * cfg.block_size  # one token per step
    assert steps[0.0] < steps[cfg.threshold] < steps[1.0]
    assert torch.equal(outs[cfg.threshold], model.generate(prompt(), num_blocks=nb))
    assert outs[cfg.threshold][:, P:].unique().numel() >= 8


def test_sdar_cache_grows_one_block_per_block():
    model = sdar_lm.make_tiny_model()
    log, handle = record_past_lengths(model)
    try:
        model.generate(prompt(), num_blocks=3)
    finally:
        handle.remove()
    lengths = [n for n, _ in log[1:]]
    bs = model.config.block_size
    assert log[0] == (None, None)
    assert sorted(set(lengths)) == [P, P + bs, P + 2 * bs]
    assert lengths == sorted(lengths)


# --------------------------------------------------------------------------- LLaDA


def llada_state(model, blk=1, bs=8, gen=24):
    """A mid-generation sequence: block ``blk`` is the current one, earlier ones filled."""
    x = torch.cat([prompt(), torch.full((2, gen), model.config.mask_token_id)], 1)
    x[:, P:P + blk * bs] = prompt(seed=3, length=blk * bs)
    x[:, P + blk * bs + 2] = 17  # a token already revealed inside the current block
    return x, P + blk * bs, P + (blk + 1) * bs


@pytest.mark.parametrize("overrides", [{}, {"attn_impl": "eager"}, {"num_kv_heads": 2, "gqa_style": "enable_gqa"}])
def test_llada_first_step_full_prefix_dual_agree(overrides):
    """With K/V from the same state, full pass, prefix-cache and dual-cache queries agree."""
    model = llada_lm.make_tiny_model(**overrides)
    x, s, e = llada_state(model)
    full, kv = model(x, use_cache=True)
    prefix = [(k[:, :, :s], v[:, :, :s]) for k, v in kv]
    suffix = [(k[:, :, e:], v[:, :, e:]) for k, v in kv]
    by_prefix = model(x[:, s:], past_key_values=prefix)[0][:, :e - s]
    by_dual = model(x[:, s:e], past_key_values=prefix, future_key_values=suffix)[0]
    torch.testing.assert_close(by_prefix, full[:, s:e], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(by_dual, full[:, s:e], atol=1e-4, rtol=1e-4)
    # the suffix is really attended: dropping it changes the block's logits
    assert not torch.allclose(model(x[:, s:e], past_key_values=prefix)[0], by_dual, atol=1e-3)


def test_llada_is_bidirectional():
    model = llada_lm.make_tiny_model()
    x, _, _ = llada_state(model)
    y = x.clone()
    y[:, -1] = 5
    assert not torch.allclose(model(x)[0][:, 0], model(y)[0][:, 0], atol=1e-4)


def test_llada_generate_modes():
    model = llada_lm.make_tiny_model()
    bs, gen = 8, 24
    one_step = {c: model.generate(prompt(), gen, bs, steps=gen // bs, cache=c) for c in llada_lm.CACHE_MODES}
    # one step per block: every step is the refreshing full pass, so the modes coincide
    assert torch.equal(one_step["prefix"], one_step["none"])
    assert torch.equal(one_step["dual"], one_step["none"])
    for c in llada_lm.CACHE_MODES:
        out = model.generate(prompt(), gen, bs, steps=12, cache=c)
        assert model.last_num_forwards == 12
        assert out.shape == (2, P + gen)
        assert torch.equal(out[:, :P], prompt())
        assert not (out[:, P:] == model.config.mask_token_id).any()
        assert torch.equal(out, model.generate(prompt(), gen, bs, steps=12, cache=c))
        assert out[:, P:].unique().numel() >= 6


def test_llada_prefix_cache_grows_one_block_per_block():
    model = llada_lm.make_tiny_model()
    for mode in ("prefix", "dual"):
        log, handle = record_past_lengths(model)
        try:
            model.generate(prompt(), 24, 8, steps=12, cache=mode)
        finally:
            handle.remove()
        # per block: 1 full pass (no past) + 3 cached steps
        assert [n for n, _ in log] == [None, P, P, P, None, P + 8, P + 8, P + 8, None, P + 16, P + 16, P + 16]


# --------------------------------------------------------------------------- video


def test_video_forward_shapes():
    model = video_ar_diffusion.make_tiny_model()
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, cfg.chunk_frames, cfg.height, cfg.width, generator=torch.Generator().manual_seed(0))
    out, kv = model(x, torch.full((2,), 0.5), use_cache=True)
    assert out.shape == x.shape
    assert len(kv) == cfg.num_layers
    assert kv[0][0].shape == (2, cfg.chunk_tokens, cfg.num_heads, cfg.head_dim)
    # patchify / unpatchify are inverse
    assert torch.equal(model.unpatchify(model.patchify(x), cfg.chunk_frames), x)
    # the past matters, and so does the timestep
    out2, _ = model(x, torch.full((2,), 0.5), past_key_values=kv)
    assert not torch.allclose(out, out2, atol=1e-3)
    assert not torch.allclose(out, model(x, torch.full((2,), 0.1))[0], atol=1e-3)


def test_video_static_cache_equals_cat_cache():
    model = video_ar_diffusion.make_tiny_model()
    gen = lambda seed, cache: model.generate(3, steps=3, generator=torch.Generator().manual_seed(seed),  # noqa: E731
                                             batch_size=2, cache=cache)
    cat = gen(0, "cat")
    static = gen(0, "static")
    cfg = model.config
    assert cat.shape == (2, cfg.in_channels, 3 * cfg.chunk_frames, cfg.height, cfg.width)
    torch.testing.assert_close(static, cat, atol=1e-5, rtol=1e-5)
    assert torch.equal(cat, gen(0, "cat"))
    assert not torch.allclose(cat, gen(1, "cat"), atol=1e-2)
    assert torch.isfinite(cat).all()


def test_video_static_cache_written_in_place():
    model = video_ar_diffusion.make_tiny_model()
    cfg = model.config
    n = cfg.chunk_tokens
    cache = model.make_static_cache(1, num_chunks=2)
    x = torch.randn(1, cfg.in_channels, cfg.chunk_frames, cfg.height, cfg.width, generator=torch.Generator().manual_seed(0))
    version = cache[0][0]._version
    _, kv = model(x, torch.zeros(1), use_cache=True, static_cache=cache, cache_start=n)
    assert cache[0][0]._version > version
    for (ck, cv), (k, v) in zip(cache, kv):
        assert torch.equal(ck[:, n:2 * n], k) and torch.equal(cv[:, n:2 * n], v)
        assert not ck[:, :n].any()  # other slots untouched


def test_video_cache_grows_one_chunk_per_chunk():
    model = video_ar_diffusion.make_tiny_model()
    log, handle = record_past_lengths(model, dim=1)
    try:
        model.generate(3, steps=2, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    n = model.config.chunk_tokens
    assert [length for length, _ in log] == [None] * 3 + [n] * 3 + [2 * n] * 3
