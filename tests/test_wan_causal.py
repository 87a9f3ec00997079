"""The Wan-style causal video DiT (Self-Forcing's rolling KV cache), through its own inference loop.

Every self-attention over the cache is rewritten although ``.item()`` breaks each layer into several
dynamo graphs (the write and the window read sit in the resumed graph, with symbolic bounds); exact
mode equals eager; block mode refreshes once per chunk and reuses at the chunk's other calls; and
no call reuses a stale external part: a write from outside, a roll of the cache, a moved window,
a new request. LongLive's variant (attention over a written clone of the cache, sinks and window
concatenated) is held to the same.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fbcompile
from attention_zoo import rel_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import wan_causal_video  # noqa: E402
from examples.wan_causal_video import WanCausalConfig, WanCausalVideo, generate, init_weights  # noqa: E402

STEPS = (1000, 750, 500, 250)
ROLLING = WanCausalConfig(cache_frames=6, window_frames=4, sink_frames=1)  # window < cache: the start moves
LONGLIVE = replace(ROLLING, cache_mode="longlive")  # attends over cat(sinks, window) of a written clone
DEFERRED = replace(ROLLING, cache_mode="longlive_deferred")  # ... and writes the real cache after all layers
CACHE_MODES = pytest.mark.parametrize("cfg", [ROLLING, LONGLIVE, DEFERRED],
                                      ids=["self_forcing", "longlive", "longlive_deferred"])


def _models(cfg: WanCausalConfig, refresh="block", dtype=torch.float32):
    plain = init_weights(WanCausalVideo(cfg)).to(dtype)
    optimized = fbcompile.optimize(init_weights(WanCausalVideo(cfg)).to(dtype),
                                   fbcompile.Config(refresh=refresh, compiler="eager"))
    return plain, optimized


def _inputs(cfg: WanCausalConfig, chunks: int, seed=0, dtype=torch.float32, batch=1):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, chunks * cfg.frames_per_chunk, cfg.in_channels, cfg.height, cfg.width, generator=gen)
    return noise.to(dtype), torch.randn(batch, cfg.text_len, cfg.text_dim, generator=gen).to(dtype)


def _clone(kv_cache, crossattn_cache):
    clone = lambda layer: {k: t.clone() if isinstance(t, torch.Tensor) else t for k, t in layer.items()}  # noqa: E731
    return [clone(layer) for layer in kv_cache], [clone(layer) for layer in crossattn_cache]


class Checked:
    """Stands in for the optimized model in :func:`generate`: before chosen calls ``before(chunk, step,
    kv_cache)`` runs, and calls where ``check(chunk, step)`` are compared with the plain model on a copy
    of the same caches (step ``len(STEPS)`` is the clean pass)."""

    def __init__(self, optimized, plain, check, before=None, tol=1e-5):
        self.optimized, self.plain = optimized, plain
        self.config, self.init_caches = optimized.config, optimized.init_caches
        self.check, self.before, self.calls, self.checked, self.tol = check, before, 0, 0, tol

    def __call__(self, x, t, context, kv_cache, crossattn_cache, current_start):
        chunk, step = divmod(self.calls, len(STEPS) + 1)
        self.calls += 1
        if self.before is not None:
            self.before(chunk, step, kv_cache)
        expected = None
        if self.check(chunk, step):
            expected = self.plain(x, t, context, *_clone(kv_cache, crossattn_cache), current_start)
        out = self.optimized(x, t, context, kv_cache, crossattn_cache, current_start)
        if expected is not None:
            self.checked += 1
            assert rel_error(out, expected) < self.tol, (chunk, step, rel_error(out, expected))
        return out


def _self_attention_rewritten(model) -> int:
    """Every graph attending over the cache has its site rewritten; returns how many there are."""
    report = fbcompile.explain(model)
    graphs = [g for g in report.graphs if "l_kv_cache_k_" in g.code_before]
    assert graphs and all([s["decision"] for s in g.sites] == ["rewritten"] for g in graphs), \
        [(s["graph"], s["decision"]) for s in report.sites]
    return len(graphs)


@torch.no_grad()
@pytest.mark.parametrize("cfg,dtype,tol", [
    (ROLLING, torch.float32, 1e-5),
    (LONGLIVE, torch.float32, 1e-5),
    (WanCausalConfig(cache_frames=4, sink_frames=0), torch.bfloat16, 1e-2),  # Self-Forcing's: window = cache
    (replace(WanCausalConfig(cache_frames=4, sink_frames=0), cache_mode="longlive"), torch.bfloat16, 1e-2),
    (DEFERRED, torch.float32, 1e-5),
])
def test_exact_mode_equals_eager_through_the_loop(cfg, dtype, tol):
    plain, optimized = _models(cfg, refresh="always", dtype=dtype)
    noise, context = _inputs(cfg, chunks=4, dtype=dtype)  # the cache rolls from the fourth (third) chunk
    expected = generate(plain, noise, context, STEPS)
    assert rel_error(generate(optimized, noise, context, STEPS), expected) < tol
    assert _self_attention_rewritten(optimized) >= 3  # a chunk's first call, later calls, rolls


@torch.no_grad()
@CACHE_MODES
def test_block_mode_refreshes_once_per_chunk_and_compiles_stay_bounded(cfg):
    plain, optimized = _models(cfg)
    noise, context = _inputs(cfg, chunks=6)
    checked = Checked(optimized, plain, check=lambda chunk, step: step == 0)
    out = generate(checked, noise, context, STEPS)
    assert checked.checked == 6  # every chunk's first call is exact (rolls included)
    assert rel_error(out, generate(plain, noise, context, STEPS)) < 1e-3
    stats = fbcompile.stats(optimized)
    layers = cfg.num_layers  # a chunk's first call refreshes; its 3 later steps and its clean pass reuse
    assert (stats.refreshes, stats.reuses) == (6 * layers, 6 * layers * len(STEPS)), stats
    _self_attention_rewritten(optimized)
    compiles = stats.compiles
    fbcompile.new_request(optimized)
    generate(optimized, *_inputs(cfg, chunks=12, seed=1), STEPS)
    assert fbcompile.stats(optimized).compiles == compiles  # twice the chunks, no new graph


@pytest.fixture
def flash_varlen(request, monkeypatch):
    """Wan's attention as where flash-attn (2, or 3 on Hopper) is installed: its varlen kernel (here the CPU
    stand-in), the batch packed into the tokens."""
    import flash_attn_standin

    if getattr(request, "param", 2) == 2:
        flash_attn_standin.register_varlen()
        kernel = flash_attn_standin.flash_attn_varlen_func
    else:
        flash_attn_standin.register_fa3()
        kernel = flash_attn_standin.flash_attn_3_varlen_func
    monkeypatch.setattr(wan_causal_video, "flash_attn_varlen_func", kernel)


@torch.no_grad()
@pytest.mark.parametrize("cfg,flash_varlen", [(ROLLING, 2), (LONGLIVE, 2), (DEFERRED, 2), (DEFERRED, 3)],
                         ids=["self_forcing", "longlive", "longlive_deferred", "longlive_deferred-flash-attn 3"],
                         indirect=["flash_varlen"])
def test_flash_varlen_attention_is_unpacked_split_and_reused(cfg, flash_varlen):
    """Through flash-attn's varlen kernel (in bf16, as Wan casts for it), batch 2: every self-attention is
    rewritten, each chunk's first call (a refresh) equals the model and block mode refreshes once per chunk,
    as with SDPA (:mod:`fbcompile.passes.flash_varlen` unpacks the call into flash-attn's batched forward,
    over the cache it concatenates)."""
    plain, block = _models(cfg)
    noise, context = _inputs(cfg, chunks=4, batch=2)  # the cache rolls from the fourth (third) chunk
    checked = Checked(block, plain, check=lambda chunk, step: step == 0, tol=1e-2)
    out = generate(checked, noise, context, STEPS)
    assert checked.checked == 4 and rel_error(out, generate(plain, noise, context, STEPS)) < 2e-2
    assert _self_attention_rewritten(block) >= 3
    stats = fbcompile.stats(block)
    assert (stats.refreshes, stats.reuses) == (4 * cfg.num_layers, 4 * cfg.num_layers * len(STEPS)), stats
    cross = [s for g in fbcompile.explain(block).graphs if "l_kv_cache_k_" not in g.code_before for s in g.sites]
    assert cross and all(s["form"] == "flash varlen" for s in cross), cross  # cross-attention: no cache


@torch.no_grad()
@CACHE_MODES
def test_a_roll_of_the_cache_refreshes(cfg):
    """Once the cache is full, every chunk rolls it and writes at the same range as the chunk before:
    only the roll itself (a write inside the graph, outside the block) tells the external part changed.
    LongLive's deferred write rolls the real cache after the chunk's first call, as that call rolled the
    clone it read: the chunk's later calls reuse."""
    plain, optimized = _models(cfg)
    checked = Checked(optimized, plain, check=lambda chunk, step: chunk >= 2 and step == 0)  # the 4th chunk rolls
    generate(checked, *_inputs(cfg, chunks=4), STEPS)
    assert checked.checked == 2
    stats = fbcompile.stats(optimized)
    assert stats.refresh_reasons.get("cache written outside the block") == cfg.num_layers
    assert stats.refresh_reasons.get("kv written in place", 0) == 0
    assert (stats.refreshes, stats.reuses) == (4 * cfg.num_layers, 4 * cfg.num_layers * len(STEPS)), stats


@torch.no_grad()
@pytest.mark.parametrize("cfg", [ROLLING, LONGLIVE], ids=["self_forcing", "longlive"])  # (deferred: below)
def test_a_write_outside_the_block_refreshes(cfg):
    def write(chunk, step, kv_cache):
        if (chunk, step) == (1, 2):
            for layer in kv_cache:
                layer["k"][:, :4] += 1.0

    plain, optimized = _models(cfg)
    checked = Checked(optimized, plain, check=lambda chunk, step: (chunk, step) == (1, 2), before=write)
    generate(checked, *_inputs(cfg, chunks=2), STEPS)
    assert checked.checked == 1
    assert fbcompile.stats(optimized).refresh_reasons.get("kv written in place") == cfg.num_layers


def _write_rows(cache, rows, start: int):
    """Another graph's write of ``cache[:, start:start + len]``: logged (as LongLive's deferred write is)."""
    cache[:, start:start + rows.shape[1]] = rows


@torch.no_grad()
@pytest.mark.parametrize("where", ["block", "external"])
def test_longlive_deferred_write_reuses_only_over_writes_in_the_block(where):
    """LongLive writes the real cache after every layer ran, in another graph than the attention's: the
    attention reads a clone, and the real cache's writes are logged by the graph that makes them. A
    chunk's later calls reuse while all logged writes stayed in the block's rows; a logged write of
    external rows (here by a third graph, mid-chunk) refreshes, and that call equals the model."""
    write = torch.compile(_write_rows, backend=fbcompile.backend(compiler="eager"), dynamic=True)
    block = DEFERRED.frames_per_chunk * DEFERRED.frame_tokens

    def before(chunk, step, kv_cache):
        if (chunk, step) == (1, 2):
            for layer in kv_cache:
                end = int(layer["local_end_index"])
                start = end - block if where == "block" else 2
                write(layer["k"], layer["k"][:, start:start + 4] + (where == "external"), start)

    plain, optimized = _models(DEFERRED)
    checked = Checked(optimized, plain, check=lambda chunk, step: (chunk, step) == (1, 2) and where == "external",
                      before=before)
    generate(checked, *_inputs(DEFERRED, chunks=2), STEPS)
    assert checked.checked == (where == "external")
    stats, layers = fbcompile.stats(optimized), DEFERRED.num_layers
    assert stats.refresh_reasons.get("kv written in place", 0) == (layers if where == "external" else 0)
    assert stats.refreshes == 2 * layers + stats.refresh_reasons.get("kv written in place", 0)
    sites = [s for g in fbcompile.explain(optimized).graphs if "l_kv_cache_k_" in g.code_before for s in g.sites]
    assert sites and all(s["decision"] == "rewritten" for s in sites), sites


@torch.no_grad()
def test_a_moved_window_refreshes():
    """A smaller window mid-chunk: dynamo recompiles, the new graph finds the chunk's entry, but its
    window starts later."""
    def shrink(chunk, step, kv_cache):
        if (chunk, step) == (2, 2):
            for model in (plain, optimized):
                for block in model.blocks:
                    block.self_attn.window = 3 * ROLLING.frame_tokens

    plain, optimized = _models(ROLLING)
    checked = Checked(optimized, plain, check=lambda chunk, step: (chunk, step) == (2, 2), before=shrink)
    generate(checked, *_inputs(ROLLING, chunks=3), STEPS)
    assert checked.checked == 1
    assert fbcompile.stats(optimized).refresh_reasons.get("kv range changed", 0) > 2 * ROLLING.num_layers


@torch.no_grad()
def test_a_new_request_refreshes():
    """A second request regenerates the last chunk with another prompt over the same cache (indices
    restored to that chunk's): every guard passes, only the request boundary tells."""
    plain, optimized = _models(ROLLING)
    noise, context = _inputs(ROLLING, chunks=2)
    caches = optimized.init_caches(1)
    generate(optimized, noise, context, STEPS, caches=caches)
    kv_cache, crossattn_cache = caches
    fbcompile.new_request(optimized)
    for cross in crossattn_cache:
        cross["is_init"] = torch.zeros(1, dtype=torch.bool)
    noise2, context2 = _inputs(ROLLING, chunks=1, seed=1)
    start = ROLLING.frames_per_chunk * ROLLING.frame_tokens
    t = torch.full((1, ROLLING.frames_per_chunk), STEPS[0], dtype=torch.long)
    expected = plain(noise2, t, context2, *_clone(kv_cache, crossattn_cache), start)
    assert rel_error(optimized(noise2, t, context2, kv_cache, crossattn_cache, start), expected) < 1e-5
    assert fbcompile.stats(optimized).refresh_reasons["new kv"] == 2 * ROLLING.num_layers
