"""A block written into a full-length buffer at data-dependent positions, then attention over the buffer.

Two families, each through its own loop: a stock ``transformers.Qwen2ForCausalLM`` driven as a
block-diffusion denoiser with ``StaticCache`` (``index_copy_`` at ``cumulative_length + arange``), and
a LLaDA-style model with Fast-dLLM's dual cache written as a buffer (``past_k[:, :, idx] = k``, ``idx``
from ``nonzero``; ``examples/llada_dual_buffer.py``). Then the guard's stale-reuse cases and the near
misses (see ``fbcompile/passes/buffer_write.py``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fbcompile
from attention_zoo import rel_error
from examples.block_diffusion_lm import unmask_topk
from examples.llada_dual_buffer import make_tiny_model as make_dual_buffer_llada

transformers = pytest.importorskip("transformers")

MASK_ID = 63


def _qwen2(attn: str, dtype=torch.float32, seed: int = 0):
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      attn_implementation=attn)
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(config).to(dtype).eval()


def _visible(batch: int, start: int, length: int, total: int, dtype) -> torch.Tensor:
    """4-D additive mask: queries ``[start, start + length)`` see every key before ``start + length``
    (bidirectional within the block; the buffer's unwritten tail hidden)."""
    allowed = torch.arange(total) < start + length
    return torch.where(allowed, 0.0, float("-inf")).to(dtype).expand(batch, 1, length, total)


@torch.no_grad()
def qwen2_static_cache_denoise(model, prompt, num_blocks: int, block: int, steps: int, seed: int = 0,
                               between_steps=None):
    """Block diffusion over HF ``StaticCache``: prefill, then per block ``steps`` denoising forwards of
    the block at its cache positions (each followed by ``cache.crop(-block)``), then a commit forward.
    Tokens are revealed from a fixed random draw (the loop does not depend on the model's outputs,
    so runs compare step by step). Returns every forward's logits."""
    batch, prompt_len = prompt.shape
    total = prompt_len + num_blocks * block
    dtype = model.dtype
    cache = transformers.StaticCache(config=model.config, max_cache_len=total)
    logits = [model(prompt, past_key_values=cache, use_cache=True,
                    attention_mask=_visible(batch, 0, prompt_len, total, dtype)).logits]
    gen = torch.Generator().manual_seed(seed)
    for b in range(num_blocks):
        start = prompt_len + b * block
        mask = _visible(batch, start, block, total, dtype)
        tokens = torch.full((batch, block), MASK_ID)
        masked = torch.ones(batch, block, dtype=torch.bool)
        for step in range(steps):
            logits.append(model(tokens, past_key_values=cache, attention_mask=mask, use_cache=True).logits)
            cache.crop(-block)  # denoising: the next step rewrites the same positions
            if between_steps is not None:
                between_steps(cache, b, step)
            conf = torch.rand(batch, block, generator=gen)
            tokens, masked = unmask_topk(tokens, masked, conf, torch.randint(0, MASK_ID, (batch, block), generator=gen),
                                         -(-block // steps))
        logits.append(model(tokens, past_key_values=cache, attention_mask=mask, use_cache=True).logits)  # commit
    return logits


def _optimized(model, refresh):
    return fbcompile.optimize(model, fbcompile.Config(refresh=refresh, compiler="eager"))


@pytest.mark.parametrize("attn,dtype,shape", [("sdpa", torch.float32, (1, 5, 4, 3)),
                                              ("eager", torch.float32, (2, 7, 6, 2)),
                                              ("sdpa", torch.bfloat16, (2, 6, 4, 2))])
def test_qwen2_static_cache_exact(attn, dtype, shape):
    """(batch, prompt, block, steps), 2 blocks."""
    batch, prompt_len, block, steps = shape
    prompt = torch.randint(0, MASK_ID, (batch, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    expected = qwen2_static_cache_denoise(_qwen2(attn, dtype), prompt, 2, block, steps)
    model = _optimized(_qwen2(attn, dtype), "always")
    got = qwen2_static_cache_denoise(model, prompt, 2, block, steps)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert max(rel_error(g, e) for g, e in zip(got, expected)) < tol
    _assert_cached_sites_rewritten(model, layers=2)


def _assert_cached_sites_rewritten(model, layers):
    """Every attention over the cache is rewritten; the prefill (the cache allocated in its graph,
    nothing cached yet) is the only one left, with that reason."""
    sites = fbcompile.explain(model).sites
    rewritten = [s for s in sites if s["decision"] == "rewritten"]
    assert len(rewritten) == layers and all("without cache_position" in s["kv"] for s in rewritten), sites
    assert all("reached 'zeros'" in s["decision"] for s in sites if s not in rewritten), sites


def test_qwen2_static_cache_reuses_within_each_block():
    blocks, block, steps = 4, 4, 3
    prompt = torch.randint(0, MASK_ID, (1, 5), generator=torch.Generator().manual_seed(0))
    model = _optimized(_qwen2("sdpa"), "block")
    qwen2_static_cache_denoise(model, prompt, blocks, block, steps)
    stats = fbcompile.stats(model)
    # one refresh per block (its first step), every other step and the commit reuse (the prefill has no cache)
    assert (stats.refreshes, stats.reuses) == (blocks, blocks * steps), stats
    assert stats.refresh_reasons == {"new kv": 1, "kv positions changed": blocks - 1}, stats
    assert stats.compiles == 2, stats  # prefill and block graphs, whatever the number of blocks


def test_qwen2_static_cache_stale_reuse_refreshes():
    """A write outside the block's positions, and a moved block, force a refresh; exact against eager."""
    prompt = torch.randint(0, MASK_ID, (1, 5), generator=torch.Generator().manual_seed(1))

    def meddle(cache, block, step):
        if (block, step) == (0, 0):  # outside write into the prefix
            cache.layers[1].keys[:, :, 2] += 1.0
        if (block, step) in ((1, 0), (1, 1)):  # the next step writes one position earlier, then back
            for layer in cache.layers:
                layer.cumulative_length.add_(-1 if step == 0 else 1)

    expected = qwen2_static_cache_denoise(_qwen2("sdpa"), prompt, 2, 4, 3, between_steps=meddle)
    model = _optimized(_qwen2("sdpa"), "block")
    got = qwen2_static_cache_denoise(model, prompt, 2, 4, 3, between_steps=meddle)
    failures = fbcompile.stats(model).refresh_reasons
    # block 0: new kv, written in place, reuse, reuse (commit); block 1: three moves, reuse (commit)
    assert failures == {"new kv": 1, "kv written in place": 1, "kv positions changed": 3}, failures
    assert fbcompile.stats(model).reuses == 3
    assert rel_error(got[2], expected[2]) < 1e-5  # the refresh after the outside write (same cache state)
    # a new request (a fresh cache): its first step refreshes too
    refreshes = fbcompile.stats(model).refreshes
    qwen2_static_cache_denoise(model, prompt, 2, 4, 3)
    assert fbcompile.stats(model).refreshes == refreshes + 2


@torch.no_grad()
@pytest.mark.parametrize("attn_impl,dtype,batch,prompt_len,block,rotate", [("sdpa", torch.float32, 1, 7, 8, False),
                                                                           ("eager", torch.float32, 2, 5, 4, False),
                                                                           ("eager", torch.bfloat16, 2, 6, 4, False),
                                                                           ("sdpa", torch.float32, 2, 7, 8, True),
                                                                           ("eager", torch.bfloat16, 1, 5, 4, True)])
def test_llada_dual_buffer_exact(attn_impl, dtype, batch, prompt_len, block, rotate):
    """``rotate``: Fast-dLLM's own order, RoPE applied to the whole buffer after the write (the keys reach
    attention through position-wise ops of the written buffer: the block's part rotates its rows with the
    tables' rows at the written positions)."""
    prompt = torch.randint(0, 200, (batch, prompt_len), generator=torch.Generator().manual_seed(block))
    kwargs = dict(attn_impl=attn_impl, dtype=dtype, rotate_after_write=rotate)
    expected = make_dual_buffer_llada(**kwargs).generate(prompt, gen_length=2 * block, block_size=block, steps=4)
    model = _optimized(make_dual_buffer_llada(**kwargs), "always")
    got = model.generate(prompt, gen_length=2 * block, block_size=block, steps=4)
    assert torch.equal(got, expected)
    sites = [s for s in fbcompile.explain(model).sites if "without" in s["kv"]]
    assert sites and all(s["decision"] == "rewritten" for s in sites)
    # every attention over cached K/V is rewritten; the full passes attend over their own keys only
    assert all("not a concatenation" in s["decision"] for s in fbcompile.explain(model).sites if s not in sites)


@torch.no_grad()
@pytest.mark.parametrize("rotate", [False, True], ids=["rotated before", "rotated after the write"])
def test_llada_dual_buffer_logits_exact(rotate):
    """The block steps' logits (the test above compares tokens). bf16: one layer, against eager bf16
    (eager bf16 itself is 1.3e-2 off the fp32 model with one layer, 2.5e-2 with two: large random logits)."""
    for dtype, tol, layers in ((torch.float32, 1e-5, 2), (torch.bfloat16, 1e-2, 1)):
        torch._dynamo.reset()
        plain = make_dual_buffer_llada(dtype=dtype, num_layers=layers, rotate_after_write=rotate)
        model = _optimized(make_dual_buffer_llada(dtype=dtype, num_layers=layers, rotate_after_write=rotate), "always")
        x = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(3))
        replace = torch.zeros(1, 20, dtype=torch.bool)
        replace[:, 9:15] = True
        _, buffers = plain(x, use_cache=True)
        copies = [tuple(t.clone() for t in kv) for kv in buffers]
        for step in range(2):
            block = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(step))
            expected = plain(block, buffers, position_ids=torch.arange(9, 15), replace_position=replace)[0]
            got = model(block, copies, position_ids=torch.arange(9, 15), replace_position=replace)[0]
            assert rel_error(got, expected) < tol


@torch.no_grad()
def test_fast_dllm_control_flow_keeps_the_dual_cache_exact_and_says_why():
    """Fast-dLLM's own control flow (a write per batch row, ``replace_position.any()``, tensor-bounded
    ``arange``) breaks the graph between the write and the attention, which then reads the written buffer
    as an input: no split is proved there (a written buffer must be written in the attention's graph),
    the tokens are the original model's, and ``explain`` says why."""
    prompt = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = make_dual_buffer_llada(branches=True).generate(prompt, gen_length=16, block_size=8, steps=4)
    model = _optimized(make_dual_buffer_llada(branches=True), "block")
    assert torch.equal(model.generate(prompt, gen_length=16, block_size=8, steps=4), expected)
    decisions = [s["decision"] for s in fbcompile.explain(model).sites]
    assert decisions and all(d.startswith("skipped: keys/values are not a concatenation") for d in decisions), decisions
    assert fbcompile.stats(model).reuses == 0


@torch.no_grad()
@pytest.mark.parametrize("rotate", [False, True], ids=["rotated before", "rotated after the write"])
def test_llada_dual_buffer_reuses_within_each_block(rotate):
    blocks, steps = 5, 4
    prompt = torch.randint(0, 200, (1, 7), generator=torch.Generator().manual_seed(0))
    model = _optimized(make_dual_buffer_llada(rotate_after_write=rotate), "block")
    model.generate(prompt, gen_length=blocks * 8, block_size=8, steps=blocks * steps)
    stats = fbcompile.stats(model)
    layers = model.config.num_layers
    # per block and layer: the full pass makes new buffers -> one refresh, then steps - 2 reuses
    assert (stats.refreshes, stats.reuses) == (blocks * layers, blocks * layers * (steps - 2)), stats
    assert stats.refresh_reasons == {"new kv": blocks * layers}, stats
    compiles = stats.compiles
    model.generate(prompt, gen_length=blocks * 8, block_size=8, steps=blocks * steps)
    assert fbcompile.stats(model).compiles == compiles <= 8, fbcompile.stats(model)


@torch.no_grad()
@pytest.mark.parametrize("rotate", [False, True], ids=["rotated before", "rotated after the write"])
def test_llada_dual_buffer_moved_block_and_outside_write_refresh(rotate):
    plain = make_dual_buffer_llada(rotate_after_write=rotate)
    model = _optimized(make_dual_buffer_llada(rotate_after_write=rotate), "block")
    x = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(5))
    _, copies = plain(x, use_cache=True)

    def step(start, seed):
        """Error of one block step against eager on the same buffers (a reuse leaves the written rows
        approximate, so eager starts from copies of fbcompile's buffers)."""
        replace = torch.zeros(1, 24, dtype=torch.bool)
        replace[:, start:start + 8] = True
        block = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(seed))
        kwargs = dict(position_ids=torch.arange(start, start + 8), replace_position=replace)
        expected = plain(block, [tuple(t.clone() for t in kv) for kv in copies], **kwargs)[0]
        return rel_error(model(block, copies, **kwargs)[0], expected)

    assert step(8, 0) < 1e-5
    step(8, 1)  # reuse (FlashBlock's approximation: a random new block, so no error bound here)
    assert fbcompile.stats(model).reuses == 2  # both layers
    assert step(9, 2) < 1e-5  # the block moved by one position: refresh
    copies[-1][0][:, :, 3] += 1.0  # an outside write into the last layer's keys: that layer refreshes
    assert step(9, 2) < 1e-5  # (the same block again, so the first layer's reuse is exact too)
    failures = fbcompile.stats(model).refresh_reasons
    assert failures == {"new kv": 2, "kv positions changed": 2, "kv written in place": 1}, failures


# ---------------------------------------------------------------------------------------------
# near misses: left untouched with a reason, still exact


class BufferWrite(torch.nn.Module):
    """``buf`` written at ``idx`` by ``how``, then attended over wholly; ``variant`` breaks the proof."""

    def __init__(self, how="setitem", variant="ok"):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(16, 48)
        self.how, self.variant = how, variant

    def forward(self, x, buf_k, buf_v, idx, mask=None):
        B, M, _ = x.shape
        q, k, v = (t.view(B, M, 2, 8).transpose(1, 2) for t in self.proj(x).chunk(3, -1))
        if self.variant == "read_before_write":
            early = buf_k.sum()
        start, end = (idx.min().item(), idx.max().item() + 1) if self.how == "slice" else (None, None)
        for buf, new in ((buf_k, k), (buf_v, v)):
            if self.how == "setitem":
                buf[:, :, idx] = new
            elif self.how == "index_copy_":
                buf.index_copy_(2, idx, new)
            elif self.how == "index_put_":  # a sequence-first buffer [N, B, H, D]
                buf.index_put_((idx,), new.permute(2, 0, 1, 3))
            else:  # slice assignment, bounds read off a tensor (a graph break: ints in the next graph)
                buf[..., start:end, :] = new
        if self.how == "index_put_":
            buf_k, buf_v = buf_k.permute(1, 2, 0, 3), buf_v.permute(1, 2, 0, 3)
        if self.variant == "two_writes":
            buf_k[:, :, 0] = 0.0
        out = F.scaled_dot_product_attention(q, buf_k, buf_v, attn_mask=mask)
        return out + early if self.variant == "read_before_write" else out


def _buffer_inputs(idx, batch=2, block=4, length=12, mask=None, seed=0, sequence_first=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, block, 16, generator=gen)
    shape = (length, batch, 2, 8) if sequence_first else (batch, 2, length, 8)
    bufs = [torch.randn(shape, generator=gen) for _ in range(2)]
    return x, *bufs, torch.tensor(idx), mask


def _run_both(module_args, inputs, refresh="always"):
    plain, model = BufferWrite(*module_args), _optimized(BufferWrite(*module_args), refresh)
    x, bk, bv, idx, mask = inputs
    with torch.no_grad():
        expected = plain(x, bk.clone(), bv.clone(), idx, mask)
        got = model(x, bk.clone(), bv.clone(), idx, mask)
    return rel_error(got, expected), fbcompile.explain(model).sites


@pytest.mark.parametrize("how", ["setitem", "index_copy_", "index_put_", "slice"])
@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_buffer_write_forms_exact(how, mask):
    gen = torch.Generator().manual_seed(1)
    masks = {"none": None, "bool": torch.rand(2, 1, 4, 12, generator=gen) > 0.3,
             "additive": torch.randn(2, 2, 4, 12, generator=gen)}
    err, sites = _run_both((how,), _buffer_inputs([5, 6, 7, 8], mask=masks[mask], sequence_first=how == "index_put_"))
    assert err < 1e-5 and [s["decision"] for s in sites] == ["rewritten"], sites


def test_duplicate_and_negative_indices_exact():
    """``buf[:, :, idx] = k`` with repeated (one write wins) and negative positions."""
    for idx in ([3, 3, 7, 3], [-1, 2, -1, 0]):
        torch._dynamo.reset()
        err, sites = _run_both(("setitem",), _buffer_inputs(idx, mask=torch.randn(2, 1, 4, 12)))
        assert err < 1e-5 and [s["decision"] for s in sites] == ["rewritten"], (idx, sites)


@pytest.mark.parametrize("variant,reason", [("two_writes", "written 2 times"),
                                            ("read_before_write", "read before the graph writes")])
def test_unproven_buffer_writes_are_skipped(variant, reason):
    err, sites = _run_both(("setitem", variant), _buffer_inputs([5, 6, 7, 8]), refresh="block")
    assert err < 1e-6 and len(sites) == 1 and reason in sites[0]["decision"], sites


@torch.no_grad()
def test_buffer_length_changes_exact():
    """A second buffer length makes dynamo's sizes symbolic (K and V lengths get separate symbols)."""
    plain, model = BufferWrite("index_copy_"), _optimized(BufferWrite("index_copy_"), "always")
    for length in (12, 17, 9):
        x, bk, bv, idx, _ = _buffer_inputs([5, 6, 7, 8], length=length, seed=length)
        assert rel_error(model(x, bk.clone(), bv.clone(), idx), plain(x, bk.clone(), bv.clone(), idx)) < 1e-5
    assert [s["decision"] for s in fbcompile.explain(model).sites] == ["rewritten"] * 2
