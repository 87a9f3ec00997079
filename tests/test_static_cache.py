"""A preallocated cache that the graph writes in place at every step (Self-Forcing style)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fbcompile
from attention_zoo import rel_error

H, D, M, CAP = 2, 8, 4, 32


class StaticCacheAttention(torch.nn.Module):
    """Writes the block's K/V into ``cache[:, start:start+M]`` and attends over ``cache[:, :start+M]``."""

    def __init__(self, variant="ok"):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(H * D, 3 * H * D)
        self.variant = variant
        self.eval()

    def forward(self, x, cache_k, cache_v, start: int):
        B = x.shape[0]
        q, k, v = self.proj(x).view(B, M, 3, H, D).unbind(2)
        end = start + M
        cache_k[:, start:end] = k
        cache_v[:, start:end] = v
        if self.variant == "writes_outside_block":
            cache_k[:, :1] = 0.0
        read_end = end + 1 if self.variant == "reads_past_write" else end
        read_start = end - CAP - 2 if self.variant == "reads_from_the_end" else 0  # a negative int: wraps
        k, v = cache_k[:, read_start:read_end], cache_v[:, read_start:read_end]
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, M, H * D, generator=gen), torch.randn(1, CAP, H, D, generator=gen),
            torch.randn(1, CAP, H, D, generator=gen))


def _exact(module, x, cache_k, cache_v, start):
    return module(x, cache_k.clone(), cache_v.clone(), start)


@torch.no_grad()
@pytest.mark.parametrize("start", [0, 8, 13])
def test_exact_mode_matches(start):
    plain = StaticCacheAttention()
    model = fbcompile.optimize(StaticCacheAttention(), fbcompile.Config(refresh="always", compiler="eager"))
    x, ck, cv = _inputs(start)
    expected = _exact(plain, x, ck, cv, start)
    assert rel_error(model(x, ck, cv, start), expected) < 1e-5
    assert [s["decision"] for s in fbcompile.explain(model).sites] == ["rewritten"]


@torch.no_grad()
def test_reuse_survives_the_graphs_own_writes_but_not_foreign_ones():
    plain = StaticCacheAttention()
    model = fbcompile.optimize(StaticCacheAttention(), fbcompile.Config(refresh="block", compiler="eager"))
    x, ck, cv = _inputs(1)
    start = 8
    model(x, ck, cv, start)
    model(torch.randn_like(x), ck, cv, start)  # the graph rewrote cache[:, 8:12] itself
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (1, 1), stats
    ck[:, :start] += 1.0  # a write from outside into the external range
    x3 = torch.randn_like(x)
    assert rel_error(model(x3, ck, cv, start), _exact(plain, x3, ck, cv, start)) < 1e-5
    assert fbcompile.stats(model).refresh_reasons.get("kv written in place") == 1
    for block in (1, 2):  # the next blocks: dynamo recompiles once with a symbolic start, whose graph
        x4 = torch.randn_like(x)  # finds the entry (ranges are compared by value, not fingerprinted)
        assert rel_error(model(x4, ck, cv, start + block * M), _exact(plain, x4, ck, cv, start + block * M)) < 1e-5
    assert fbcompile.stats(model).refresh_reasons.get("kv range changed") == 2


@torch.no_grad()
@pytest.mark.parametrize("variant,reason", [("reads_past_write", "not read up to the end"),
                                            ("reads_from_the_end", "not as long as its bounds say")])
def test_unproven_static_write_is_skipped(variant, reason):
    plain = StaticCacheAttention(variant)
    model = fbcompile.optimize(StaticCacheAttention(variant), fbcompile.Config(refresh="block", compiler="eager"))
    x, ck, cv = _inputs(2)
    expected = _exact(plain, x, ck, cv, 8)
    assert rel_error(model(x, ck, cv, 8), expected) < 1e-6
    sites = fbcompile.explain(model).sites
    assert len(sites) == 1 and sites[0]["decision"].startswith("skipped") and reason in sites[0]["decision"]


@torch.no_grad()
def test_a_graph_writing_the_cache_outside_the_block_never_reuses():
    """The graph's own write of ``cache[:, :1]`` changes the external rows at every call: split, exact,
    and refreshed at every call."""
    plain = StaticCacheAttention("writes_outside_block")
    model = fbcompile.optimize(StaticCacheAttention("writes_outside_block"),
                               fbcompile.Config(refresh="block", compiler="eager"))
    x, ck, cv = _inputs(2)
    for _ in range(2):
        x = torch.randn_like(x)
        expected = _exact(plain, x, ck, cv, 8)
        assert rel_error(model(x, ck, cv, 8), expected) < 1e-5
    assert [s["decision"] for s in fbcompile.explain(model).sites] == ["rewritten"]
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (2, 0), stats
    assert stats.refresh_reasons.get("cache written outside the block") == 2


SINK, WINDOW = 2, 12


class ClonedCacheAttention(StaticCacheAttention):
    """LongLive's form: writes the block into a clone of the cache, attends over ``cat(sinks, window)``
    of the clone, then writes the real cache as it wrote the clone (unless ``variant`` says otherwise)."""

    def forward(self, x, cache_k, cache_v, start: int):
        B = x.shape[0]
        q, k, v = self.proj(x).view(B, M, 3, H, D).unbind(2)
        end = start + M
        temp_k, temp_v = cache_k.clone(), cache_v.clone()
        temp_k[:, start:end] = k[:, :M]  # sliced anew for the cache below, as LongLive's cache_update_info
        temp_v[:, start:end] = v
        a = max(SINK, end - WINDOW)
        keys = torch.cat([temp_k[:, :SINK], temp_k[:, a:end]], dim=1)
        values = torch.cat([temp_v[:, :SINK], temp_v[:, a:end]], dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
        if self.variant != "real_cache_unwritten":
            cache_k[:, start:end] = k * 2 if self.variant == "real_cache_written_otherwise" else k[:, :M]
            cache_v[:, start:end] = v
        return out


def _optimized_cloned(variant="ok", refresh="block"):
    return ClonedCacheAttention(variant), fbcompile.optimize(
        ClonedCacheAttention(variant), fbcompile.Config(refresh=refresh, compiler="eager"))


@torch.no_grad()
def test_cloned_cache_exact_mode_matches():
    """Blocks inside the sinks (0), across them (1), after them (8, 13: the window starts later)."""
    plain, model = _optimized_cloned(refresh="always")
    for start in (0, 1, 8, 13):
        x, ck, cv = _inputs(start)
        expected = _exact(plain, x, ck, cv, start)
        assert rel_error(model(x, ck, cv, start), expected) < 1e-5, start
    decisions = [s["decision"] for s in fbcompile.explain(model).sites]
    assert decisions and set(decisions) == {"rewritten"}, decisions


@torch.no_grad()
def test_cloned_cache_reuses_until_written_from_outside():
    plain, model = _optimized_cloned()
    x, ck, cv = _inputs(1)
    start = 8
    model(x, ck, cv, start)
    x2 = torch.randn_like(x)
    model(x2, ck, cv, start)  # the graph wrote cache[:, 8:12] itself, as it wrote the clone
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (1, 1), stats
    ck[:, :SINK] += 1.0  # a write from outside into the sinks
    x3 = torch.randn_like(x)
    assert rel_error(model(x3, ck, cv, start), _exact(plain, x3, ck, cv, start)) < 1e-5
    assert fbcompile.stats(model).refresh_reasons.get("kv written in place") == 1


@torch.no_grad()
def test_cloned_cache_not_written_by_the_graph_reuses_until_written():
    """A graph that does not write the cache at all (LongLive's deferred write: another graph writes it,
    logging its rows): the clone's external rows are the cache's, which keep the cached part until any
    write that no graph logged inside the block's rows."""
    plain, model = _optimized_cloned("real_cache_unwritten")
    x, ck, cv = _inputs(3)
    model(x, ck, cv, 8)
    model(torch.randn_like(x), ck, cv, 8)
    assert (fbcompile.stats(model).refreshes, fbcompile.stats(model).reuses) == (1, 1)
    ck[:, 8:12] += 1.0  # the block's rows, but written eagerly: no log tells where
    x = torch.randn_like(x)
    assert rel_error(model(x, ck, cv, 8), _exact(plain, x, ck, cv, 8)) < 1e-5
    assert fbcompile.stats(model).refresh_reasons.get("kv written in place") == 1
    assert [s["decision"] for s in fbcompile.explain(model).sites] == ["rewritten"]


@torch.no_grad()
def test_cloned_cache_not_written_back_alike_is_skipped():
    """The clone's content outlives the call only if the cache, where the graph writes it, is written as
    the clone was."""
    plain, model = _optimized_cloned("real_cache_written_otherwise")
    x, ck, cv = _inputs(3)
    for _ in range(2):
        x = torch.randn_like(x)
        assert rel_error(model(x, ck, cv, 8), _exact(plain, x, ck, cv, 8)) < 1e-6
    sites = fbcompile.explain(model).sites
    assert len(sites) == 1 and sites[0]["decision"].startswith("skipped")
    assert "does not write the cache as it wrote the clone" in sites[0]["decision"], sites[0]["decision"]


class RolledCloneAttention(StaticCacheAttention):
    """LongLive's deferred form at a chunk that rolls the cache: the clone drops ``evicted`` rows after the
    sinks, shifting the rest left, and takes the block at ``[start, start + M)``; another graph writes the
    real cache (:func:`_deferred_write`)."""

    def forward(self, x, cache_k, cache_v, start: int, evicted: int):
        B = x.shape[0]
        q, k, v = self.proj(x).view(B, M, 3, H, D).unbind(2)
        end = start + M
        temp_k, temp_v = cache_k.clone(), cache_v.clone()
        for temp, new in ((temp_k, k), (temp_v, v)):
            if evicted:
                temp[:, SINK:start] = temp[:, SINK + evicted:start + evicted].clone()
            temp[:, start:end] = new
        a = max(SINK, end - WINDOW)
        keys = torch.cat([temp_k[:, :SINK], temp_k[:, a:end]], dim=1)
        values = torch.cat([temp_v[:, :SINK], temp_v[:, a:end]], dim=1)
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))


def _deferred_write(cache, new, start: int, evicted: int):
    """The real cache's write, in a graph of its own (logged): rolled by ``evicted`` rows, then the block."""
    if evicted:
        cache[:, SINK:start] = cache[:, SINK + evicted:start + evicted].clone()
    cache[:, start:start + new.shape[1]] = new


def _foreign_write(cache, rows, start: int):
    """A third graph's write of the real cache (logged)."""
    cache[:, start:start + rows.shape[1]] = rows


@torch.no_grad()
def test_a_deferred_roll_reuses_exactly_where_the_rows_outside_the_block_agree():
    """A chunk's first call rolls the clone it reads (or not); another graph then rolls the real cache (or
    not) and writes the block; a third graph may write a row of the block or an external one; the chunk's
    next call reads an unrolled clone of the real cache. Over every combination, that call reuses exactly
    when the real cache holds, outside the block, what the refresh's clone held (the same roll, no external
    write), and equals the model either way (the same block input: a valid reuse is exact too). A real
    cache left unrolled after a rolled clone was reused before (0.79 relative error)."""
    plain = RolledCloneAttention()
    model = fbcompile.optimize(RolledCloneAttention(), fbcompile.Config(refresh="block", compiler="eager"))
    write, foreign = (torch.compile(fn, backend=fbcompile.backend(compiler="eager"), dynamic=True)
                      for fn in (_deferred_write, _foreign_write))
    start = 24  # the window: sinks [0, 2) and [16, 24) external, the block [24, 28)
    for seed, case in enumerate(itertools.product((0, 2, 4), (0, 2, 4), (None, "block", "external"))):
        clone_roll, real_roll, extra = case
        x, ck, cv = _inputs(seed)
        expected = plain(x, ck.clone(), cv.clone(), start, clone_roll)
        assert rel_error(model(x, ck, cv, start, clone_roll), expected) < 1e-5
        for cache in (ck, cv):
            write(cache, torch.randn(1, M, H, D), start, real_roll)
        if extra is not None:
            foreign(ck, torch.randn(1, 2, H, D), start + 1 if extra == "block" else 17)
        reuses = fbcompile.stats(model).reuses
        assert rel_error(model(x, ck, cv, start, 0), plain(x, ck.clone(), cv.clone(), start, 0)) < 1e-5, case
        reused = fbcompile.stats(model).reuses > reuses
        assert reused == (clone_roll == real_roll and extra != "external"), case
