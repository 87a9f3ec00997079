"""flex_attention with a BlockMask and flash-attn's forward op: split exactly, reused, near misses skipped.

flash-attn runs on the GPU only; :mod:`flash_attn_standin` registers an op of the same schema on the CPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import fbcompile
import flash_attn_standin
from attention_zoo import compile_exact, rel_error

flash_attn_standin.register()
flash_attn_standin.register_fa3()
flash_attn_standin.register_hub()  # the same ops in kernel hub builds' namespaces
HUB = {f"hub {version}": namespace for version, namespace in flash_attn_standin.HUB_NAMESPACES.items()}
EAGER = fbcompile.Config(refresh="always", compiler="eager")
BLOCK = fbcompile.Config(refresh="block", compiler="eager")
FRAME = 8  # tokens per video frame


class _Attention(nn.Module):
    """Projects a block of tokens, appends its keys/values to the cache, attends."""

    def __init__(self, dim=32, heads=4, kv_heads=2, head_dim=16):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv_heads * head_dim)
        self.v = nn.Linear(dim, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)

    def _project(self, x):
        B, M, _ = x.shape
        return (self.q(x).view(B, M, self.heads, self.head_dim), self.k(x).view(B, M, self.kv_heads, self.head_dim),
                self.v(x).view(B, M, self.kv_heads, self.head_dim))


class FlexVideoAttention(_Attention):
    """Video style, heads first: ``flex_attention`` over ``cat(cache, block)`` with a block-causal BlockMask."""

    def __init__(self, score_mod=None, return_lse=False, **kw):
        super().__init__(**kw)
        self.score_mod, self.return_lse = score_mod, return_lse

    def forward(self, x, cache_k, cache_v, block_mask):
        q, k, v = (t.transpose(1, 2) for t in self._project(x))
        k, v = torch.cat([cache_k, k], dim=2), torch.cat([cache_v, v], dim=2)
        out = flex_attention(q, k, v, score_mod=self.score_mod, block_mask=block_mask, enable_gqa=True,
                             return_lse=self.return_lse)
        out, lse = out if self.return_lse else (out, None)
        out = self.o(out.transpose(1, 2).flatten(2))
        return out if lse is None else (out, lse)


class FlashAttention(_Attention):
    """HF remote-code style, tokens first: ``flash_attn_func`` over ``cat(past, block)`` along dim 1.
    ``kernel``: "2" flash-attn 2's wrapper, "3" flash-attn 3's, "3 op" flash-attn 3's op called directly
    with keywords only (no ``softmax_scale``: the op's default), "hub 2"/"hub 3" a kernel hub build's."""

    def __init__(self, causal=False, return_lse=False, kernel="2", **kw):
        super().__init__(**kw)
        self.causal, self.return_lse, self.kernel = causal, return_lse, kernel

    def forward(self, x, past_k, past_v):
        q, k, v = self._project(x)
        k, v = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
        if self.kernel in ("2", "hub 2"):
            out = flash_attn_standin.flash_attn_func(q, k, v, causal=self.causal, return_lse=self.return_lse,
                                                     namespace=HUB.get(self.kernel, "flash_attn"))
        elif self.kernel in ("3", "hub 3"):
            out = flash_attn_standin.flash_attn_3_func(q, k, v, causal=self.causal, return_attn_probs=self.return_lse,
                                                       namespace=HUB.get(self.kernel, "flash_attn_3"))
        else:
            out = torch.ops.flash_attn_3._flash_attn_forward(q=q, k=k, v=v, causal=self.causal)[:2]
            out = out if self.return_lse else out[0]
        out, lse = out if self.return_lse else (out, None)
        out = self.o(out.flatten(2))
        return out if lse is None else (out, lse)


def _frame_causal(cache_len):
    """Queries (the block, after ``cache_len`` keys) see every key of their own or an earlier frame."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx + cache_len) // FRAME >= kv_idx // FRAME
    return mask_mod


def _video_inputs(cache_frames, block_frames=2, batch=2, seed=0, mask_mod=None, block_size=FRAME):
    gen = torch.Generator().manual_seed(seed)
    C, M = cache_frames * FRAME, block_frames * FRAME
    x = torch.randn(batch, M, 32, generator=gen)
    cache_k, cache_v = (torch.randn(batch, 2, C, 16, generator=gen) for _ in range(2))
    mask = create_block_mask(mask_mod or _frame_causal(C), B=None, H=None, Q_LEN=M, KV_LEN=C + M, device="cpu",
                             BLOCK_SIZE=block_size)
    return x, cache_k, cache_v, mask


def _decisions(model):
    return [s["decision"] for s in fbcompile.explain(model).sites]


def _pair(cls, config=EAGER, **kw):
    torch.manual_seed(0)
    plain = cls(**kw).eval()
    optimized = cls(**kw).eval()
    optimized.load_state_dict(plain.state_dict())
    return plain, fbcompile.optimize(optimized, config)


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("cache_frames,block_size", [(3, FRAME), (5, 2 * FRAME), (4, 128)])
@torch.no_grad()
def test_flex_block_causal_video_exact(cache_frames, block_size):
    plain, model = _pair(FlexVideoAttention, return_lse=True)
    inputs = _video_inputs(cache_frames, seed=cache_frames, block_size=block_size)
    for got, expected in zip(_outputs(model(*inputs)), _outputs(plain(*inputs))):
        assert rel_error(got, expected) < 1e-5
    assert _decisions(model) == ["rewritten"]


@torch.no_grad()
def test_flex_mask_hiding_part_of_the_cache_is_exact():
    """A sliding window over frames hides early cache frames from some queries: still exact, by construction."""
    cache_len = 4 * FRAME

    def window(b, h, q_idx, kv_idx):
        frame, key_frame = (q_idx + cache_len) // FRAME, kv_idx // FRAME
        return (key_frame <= frame) & (key_frame > frame - 3)

    plain, model = _pair(FlexVideoAttention)
    inputs = _video_inputs(4, mask_mod=window)
    assert rel_error(model(*inputs), plain(*inputs)) < 1e-5
    assert _decisions(model) == ["rewritten"]


@torch.no_grad()
def test_flex_without_block_mask_is_exact():
    """No BlockMask: flex builds a full one in the graph (an inlined vmap, which the rewrite must keep intact)."""
    plain, model = _pair(FlexVideoAttention)
    x, cache_k, cache_v, _ = _video_inputs(3)
    assert rel_error(model(x, cache_k, cache_v, None), plain(x, cache_k, cache_v, None)) < 1e-5
    assert _decisions(model) == ["rewritten"]


@torch.no_grad()
def test_flex_block_mode_reuses_within_a_block():
    plain, model = _pair(FlexVideoAttention, config=BLOCK)
    x, cache_k, cache_v, mask = _video_inputs(3)
    for step in range(4):
        out = model(torch.randn_like(x), cache_k, cache_v, mask)
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (1, 3)
    x = torch.randn_like(x)
    assert rel_error(model(x, cache_k.clone(), cache_v, mask), plain(x, cache_k, cache_v, mask)) < 1e-5  # new cache


@torch.no_grad()
def test_flex_additive_score_mod_is_exact():
    """A per-head relative-position bias read from a captured tensor (ALiBi-like): split as an additive mask."""
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    cache_len = 3 * FRAME

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx + cache_len - kv_idx).abs()

    plain, model = _pair(FlexVideoAttention, score_mod=alibi, return_lse=True)
    inputs = _video_inputs(3, block_size=2 * FRAME)
    for got, expected in zip(_outputs(model(*inputs)), _outputs(plain(*inputs))):
        assert rel_error(got, expected) < 1e-5
    assert _decisions(model) == ["rewritten"]


@torch.no_grad()
def test_flex_unknown_score_mod_is_skipped():
    def softcap(score, b, h, q_idx, kv_idx):
        return 20 * torch.tanh(score / 20)

    plain, model = _pair(FlexVideoAttention, score_mod=softcap)
    inputs = _video_inputs(3)
    assert rel_error(model(*inputs), plain(*inputs)) < 1e-5
    assert _decisions(model) == ["skipped: score_mod is neither the identity nor score + a bias "
                                 "(the split kernels do not evaluate it)"]


@pytest.mark.parametrize("kernel", ["2", "3", "3 op", "hub 2", "hub 3"])
@pytest.mark.parametrize("causal,return_lse", [(False, False), (True, True)])
@pytest.mark.parametrize("past", [5, 24])
@torch.no_grad()
def test_flash_forward_exact(kernel, causal, return_lse, past):
    plain, model = _pair(FlashAttention, causal=causal, return_lse=return_lse, kernel=kernel)
    gen = torch.Generator().manual_seed(past)
    x = torch.randn(2, 8, 32, generator=gen)
    past_k, past_v = (torch.randn(2, past, 2, 16, generator=gen) for _ in range(2))
    for got, expected in zip(_outputs(model(x, past_k, past_v)), _outputs(plain(x, past_k, past_v))):
        assert rel_error(got, expected) < 1e-5
    assert _decisions(model) == ["rewritten"]


@pytest.mark.parametrize("kernel", ["2", "3", "hub 3"])
@torch.no_grad()
def test_flash_block_mode_reuses_within_a_block(kernel):
    plain, model = _pair(FlashAttention, config=BLOCK, kernel=kernel)
    past_k, past_v = torch.randn(2, 24, 2, 16), torch.randn(2, 24, 2, 16)
    x = torch.randn(2, 8, 32)
    for step in range(3):
        model(torch.randn_like(x), past_k, past_v)
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (1, 2)


def _flash(q, k, v, version, outputs=(0,), dropout_p=0.0, given=(), **options):
    """The op as flash-attn's wrappers call it, with some options changed (flash-attn 3: ``given`` tensors
    too); returns the chosen outputs."""
    if version == 2:
        kwargs = dict(causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                      return_softmax=False)
        result = torch.ops.flash_attn._flash_attn_forward(q, k, v, dropout_p, 0.25, **{**kwargs, **options})
    else:
        tensors = {"seqused_k": torch.full((q.shape[0],), k.shape[1] - 1, dtype=torch.int32),
                   "k_new": k[:, -q.shape[1]:] * 2, "v_new": v[:, -q.shape[1]:] * 2}  # flash_attn_with_kvcache
        options.update({name: tensors[name] for name in given})
        result = torch.ops.flash_attn_3._flash_attn_forward(q, k, v, softmax_scale=0.25, **options)
    return tuple(result[i] for i in outputs)


@pytest.mark.parametrize("version,options,reason", [
    (2, dict(window_size_left=4), "window_size_left=4 (only -1 is split)"),
    (2, dict(softcap=30.0), "softcap=30.0 (only 0.0 is split)"),
    (2, dict(dropout_p=0.1), "dropout_p=0.1 (only 0.0 is split)"),
    (2, dict(outputs=(0, 2)), "flash-attn's outputs other than out and softmax_lse are used"),
    (3, dict(window_size_right=0), "window_size_right=0 (only -1 is split)"),
    (3, dict(attention_chunk=4), "attention_chunk=4 (only 0 is split)"),
    (3, dict(given=("seqused_k",)), "seqused_k is given (only None is split)"),
    (3, dict(given=("k_new", "v_new")), "k_new is given (only None is split)"),  # appended in place
    (3, dict(outputs=(0, 3)), "flash-attn's outputs other than out and softmax_lse are used"),
])
@torch.no_grad()
def test_flash_near_misses_are_skipped(version, options, reason):
    x_k, past = torch.randn(1, 8, 2, 16), torch.randn(1, 24, 2, 16)

    def attend(q, k_block, past_k):
        k = torch.cat([past_k, k_block], dim=1)
        return _flash(q, k, k, version, **options)

    compiled, session = compile_exact(attend)
    try:
        compiled(torch.randn(1, 8, 4, 16), x_k, past)
    except NotImplementedError:  # the stand-in computes only the options that are split; the decision came first
        pass
    assert [s["decision"] for s in session.graphs[0].sites] == [f"skipped: {reason}"]


class ZeroPaddedAttention(_Attention):
    """Keys zero-padded to a length (diffusers' flex processor pads to a multiple of 128)."""

    def forward(self, x, padded_length: int):
        q, k, v = (t.transpose(1, 2) for t in self._project(x))
        pad = torch.zeros(k.shape[0], k.shape[1], padded_length - k.shape[2], k.shape[3], dtype=k.dtype)
        k, v = torch.cat([k, pad], dim=2), torch.cat([v, pad], dim=2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(out.transpose(1, 2).flatten(2))


@torch.no_grad()
def test_zero_padding_is_not_a_cache():
    """A part reading no input has no tensor to guard a reused result: padding to 16 and to 24 keys differ."""
    plain, model = _pair(ZeroPaddedAttention, config=BLOCK)
    x = torch.randn(2, 8, 32)
    for padded_length in (16, 24):
        assert rel_error(model(x, padded_length), plain(x, padded_length)) < 1e-5
    assert set(_decisions(model)) == {"skipped: every key depends on the current block (no cached part)"}
