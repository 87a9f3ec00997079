"""Sparse external attention guided by the refresh step (MAGE) with FlashBlock residual reuse:
``Config(sparse=fbcompile.Sparse(...))``. Budget 0 is "block" mode, a budget covering every tile is
exact, a middle budget is neither; without residual reuse the dropped tiles are gone (plain MAGE)."""
from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import fbcompile
from fbcompile.kernels import reference
from attention_zoo import ZooSpec, build, make_inputs, rel_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.block_diffusion_lm import make_tiny_model  # noqa: E402

EAGER = dict(compiler="eager")
CACHE = 40  # cached tokens of the zoo specs: 5 tiles of 8
ROPE_AFTER_CAT = ZooSpec(mask="none", post="rope", cache=CACHE)  # OLMo / Fast-dLLM LLaDA: RoPE over cat(past_k, k)
DUAL_CACHE = ZooSpec(mask="none", suffix=8, cache=CACHE)       # Fast-dLLM's dual cache: a prefix and a suffix
SPECS = [ZooSpec(mask="none", cache=CACHE),
         ZooSpec(mask="bool", gqa="repeat_interleave", cache=CACHE, batch=1),
         ZooSpec(mask="additive", form="eager", heads=4, kv_heads=4, cache=CACHE - 3),  # a partial last tile
         ZooSpec(mask="none", buffer="index_copy", cache=CACHE),  # a buffer written at the block's positions
         ROPE_AFTER_CAT, DUAL_CACHE,
         # both, with complex RoPE, a mask and a partial last tile in the prefix
         ZooSpec(mask="bool", post="rope_complex", suffix=8, cache=CACHE - 3)]


def _run(spec: ZooSpec, config: fbcompile.Config, steps: int = 3) -> tuple[list[torch.Tensor], torch.nn.Module]:
    """Outputs of ``steps`` calls over one cache (the first refreshes, the others reuse)."""
    model = fbcompile.optimize(build(spec), config)
    x, *rest = make_inputs(spec, seed=1)
    noise = torch.Generator().manual_seed(2)
    outs = []
    with torch.no_grad():
        for step in range(steps):
            outs.append(model(x + 0.5 * step * torch.randn(x.shape, generator=noise), *rest))
    return outs, model


def _steps(spec: ZooSpec, config: fbcompile.Config) -> list[torch.Tensor]:
    return _run(spec, config)[0]


def _sparse(**kwargs) -> fbcompile.Config:
    return fbcompile.Config(sparse=fbcompile.Sparse(**{"tile": 8, **kwargs}), **EAGER)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mask}-{s.buffer}-{s.form}-{s.post}-suffix{s.suffix}")
def test_extremes_are_block_and_exact_mode_and_the_middle_is_neither(spec):
    exact = _steps(spec, fbcompile.Config(refresh="always", **EAGER))
    block = _steps(spec, fbcompile.Config(**EAGER))
    none = _steps(spec, _sparse(budget=0))
    every = _steps(spec, _sparse(budget=CACHE))  # every tile: an empty residual
    middle = _steps(spec, _sparse(budget=16))
    for step in range(3):
        assert rel_error(none[step], block[step]) < 1e-5, step
        assert rel_error(every[step], exact[step]) < 1e-5, step
    assert rel_error(middle[0], exact[0]) < 1e-5  # the refresh step itself is exact
    for step in (1, 2):
        assert rel_error(block[step], exact[step]) > 1e-3  # the reuse steps are approximations
        assert rel_error(middle[step], exact[step]) > 1e-5
        assert rel_error(middle[step], block[step]) > 1e-5


@torch.no_grad()
def test_reuse_step_merges_residual_selected_tiles_and_block_by_hand():
    spec = ZooSpec(mask="none", gqa="repeat_kv", cache=CACHE)
    plain = build(spec)
    model = fbcompile.optimize(build(spec), _sparse(budget=16))
    x1, past_k, past_v, _ = make_inputs(spec, seed=1)
    x2 = torch.randn_like(x1)
    model(x1, past_k, past_v)
    second = model(x2, past_k, past_v)
    scale = spec.head_dim ** -0.5
    q1, _, _ = plain._project(x1)
    q2, k2, v2 = plain._project(x2)
    o_e, l_e, mass = reference.attention_lse_tiles(q1, past_k, past_v, None, scale, 8)  # the refresh step
    tiles = reference.select_tiles(mass, 2, 1.0)
    o_s, l_s = reference.sparse_attention_lse(q1, past_k, past_v, None, scale, tiles, 8)
    o_r, l_r = reference.subtract_lse(o_e, l_e, o_s, l_s)
    fresh = reference.sparse_attention_lse(q2, past_k, past_v, None, scale, tiles, 8)  # the reuse step
    merged, _ = reference.merge_lse(*reference.merge_lse(o_r, l_r, *fresh), *reference.attention_lse(q2, k2, v2, None, scale))
    B, _, M, _ = merged.shape
    assert rel_error(second, plain.o(merged.transpose(1, 2).reshape(B, M, -1))) < 1e-5


@torch.no_grad()
def test_without_residual_the_dropped_tiles_are_gone():
    spec = ZooSpec(mask="none", cache=CACHE)
    plain = build(spec)
    model = fbcompile.optimize(build(spec), _sparse(budget=0, residual=False))
    x1, past_k, past_v, _ = make_inputs(spec, seed=1)
    x2 = torch.randn_like(x1)
    model(x1, past_k, past_v)
    second = model(x2, past_k, past_v)
    only_block = plain(x2, past_k[:, :, :0], past_v[:, :, :0])  # budget 0: the block attends to itself
    assert rel_error(second, only_block) < 1e-5
    assert rel_error(second, plain(x2, past_k, past_v)) > 1e-3


@torch.no_grad()
def test_explain_and_stats_show_the_sparse_reuse():
    spec = ZooSpec(mask="none", cache=CACHE)
    outs, model = _run(spec, _sparse(budget=16), steps=4)
    report = fbcompile.explain(model)
    assert [row["sparse"] for row in report.rewritten] == ["sparse (budget 16, tiles of 8, residual on)"]
    graph = report.graphs[0]
    targets = {n.target for n in graph.reuse_graph.graph.nodes if n.op == "call_function"}
    assert torch.ops.fbcompile.sparse_attention_merge_lse.default in targets  # the whole reuse step, one op
    assert not targets & {torch.ops.fbcompile.attention_lse.default, torch.ops.fbcompile.attention_lse_tiles.default,
                          torch.ops.fbcompile.attention_merge_lse.default}
    assert "attention_lse_tiles" in graph.code_refresh and "select_tiles" in graph.code_refresh
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (1, 3)
    assert stats.sites[0].sparse_read == pytest.approx(2 / 5)  # 2 of the 5 tiles of 8
    assert stats.external_fraction == pytest.approx((1 + 3 * 2 / 5) / 4)
    assert "sparse_read" in str(stats)


@torch.no_grad()
def test_mass_target_selects_fewer_tiles_and_policies_compose():
    spec = ZooSpec(mask="none", cache=CACHE)
    _, model = _run(spec, fbcompile.Config(refresh=2, sparse=fbcompile.Sparse(budget=CACHE, mass=0.3, tile=8),
                                           **EAGER), steps=4)
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (2, 2)  # every 2nd call refreshes, as without sparse
    assert 0 < stats.sites[0].sparse_read < 1


def _reads(node: torch.fx.Node):
    """The users reading ``node``'s data, through ``narrow`` views (sizes are no reads)."""
    for user in node.users:
        if user.target == "narrow":
            yield from _reads(user)
        elif user.target != "size":
            yield user


@pytest.mark.parametrize("spec", [ROPE_AFTER_CAT, dataclasses.replace(ROPE_AFTER_CAT, suffix=8)],
                         ids=["prefix", "dual"])
@torch.no_grad()
def test_rope_after_the_cat_transforms_only_the_gathered_rows_of_the_cache(spec):
    """Also once the cache length is dynamic (a second, longer cache)."""
    model = fbcompile.optimize(build(spec), _sparse(budget=16))
    for cache in (CACHE, CACHE + 8):
        x, *rest = make_inputs(dataclasses.replace(spec, cache=cache), seed=1)
        model(x, *rest)
        model(x + 1, *rest)
    report = fbcompile.explain(model)
    assert {row["sparse"] for row in report.rewritten} == {"sparse (budget 16, tiles of 8, residual on)"}
    assert len(report.graphs) == 2
    for graph in report.graphs:  # the cache is read only to gather the selected rows, never whole
        for cache in (n for n in graph.reuse_graph.graph.nodes if n.name in ("l_past_k_", "l_past_v_")):
            for read in _reads(cache):
                assert read.target == "expand" and {u.target for u in read.users} <= {"gather", "size"}, read


@torch.no_grad()
def test_dual_cache_selects_over_both_ranges_under_one_budget():
    _, model = _run(DUAL_CACHE, _sparse(budget=16), steps=4)
    assert [row["sparse"] for row in fbcompile.explain(model).rewritten] == ["sparse (budget 16, tiles of 8, residual on)"]
    reuse = fbcompile.explain(model).graphs[0].reuse_graph.graph
    targets = [n.target for n in reuse.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fbcompile.sparse_attention_lse.default) == 1  # the prefix
    assert targets.count(torch.ops.fbcompile.sparse_attention_merge_lse.default) == 1  # the suffix, block, residual
    assert torch.ops.fbcompile.attention_lse_tiles.default not in targets
    assert fbcompile.stats(model).sites[0].sparse_read == pytest.approx(2 / 5)  # 2 of the 4 + 1 tiles of 8


def test_sites_sparse_cannot_serve_keep_block_reuse_and_say_why():
    """RoPE applied to keys laid out [B, n, H, D] (rows gathered per KV head would need another frame)."""
    spec = ZooSpec(mask="none", post="rope", layout="bshd", cache=CACHE)
    block = _steps(spec, fbcompile.Config(**EAGER))
    sparse, model = _run(spec, _sparse(budget=16))
    for a, b in zip(sparse, block):
        assert rel_error(a, b) < 1e-5
    [row] = fbcompile.explain(model).rewritten
    assert row["sparse"].startswith("block reuse: its external keys/values are computed in the graph"), row
    assert "not laid out as [B, Hkv, keys, D]" in row["sparse"], row


def test_config_validation():
    for bad in (dict(budget=-1), dict(budget=1.5), dict(tile=0), dict(mass=1.0), dict(mass=0), dict(residual=1)):
        with pytest.raises(ValueError, match="Sparse"):
            fbcompile.Sparse(**bad)
    with pytest.raises(ValueError, match="refresh='always'"):
        fbcompile.Config(refresh="always", sparse=fbcompile.Sparse())
    plan = fbcompile.ReusePlan([[[True]]])
    with pytest.raises(ValueError, match="reuse_plan"):
        fbcompile.Config(reuse_plan=plan, sparse=fbcompile.Sparse())
    with pytest.raises(ValueError, match="fbcompile.Sparse"):
        fbcompile.Config(sparse=512)
    with pytest.raises(ValueError, match="sparse"):
        fbcompile.fidelity(torch.nn.Linear(1, 1), lambda m: None, _sparse())
    assert fbcompile.Sparse(budget=100, tile=64).max_tiles == 2
    assert dataclasses.is_dataclass(fbcompile.Sparse) and hash(fbcompile.Sparse())


@torch.no_grad()
def test_example_model_generates_with_sparse_reuse_per_block():
    """Graphs sharing cache entries (a block's steps), save passes, a growing cache: as "block" at budget 0."""
    steps, blocks = 3, 2
    prompt = torch.randint(0, 200, (2, 35), generator=torch.Generator().manual_seed(3))

    def generate(config):
        torch.manual_seed(0)
        model = fbcompile.optimize(make_tiny_model(num_layers=1), config)
        return model.generate(prompt, num_blocks=blocks, steps=steps), model

    block, _ = generate(fbcompile.Config(**EAGER))
    none, model = generate(_sparse(budget=0, tile=16))
    assert torch.equal(none, block)
    stats = fbcompile.stats(model)
    assert stats.refreshes == 2 * blocks and stats.reuses == blocks * (steps - 1), stats


@torch.no_grad()
def test_video_static_cache_with_sparse_reuse_equals_block_at_budget_0_and_exact_with_every_tile():
    """A static cache's first chunk has no cached keys: the tile scores over an empty range must work
    (they crashed), and so must gathering tiles from it (it crashed with a budget); budget 0 equals
    "block" and a budget over every tile exact mode, through the video model's own loop."""
    from examples import video_ar_diffusion

    def generate(config):
        model = fbcompile.optimize(video_ar_diffusion.make_tiny_model(num_layers=1), config)
        return model.generate(2, steps=2, generator=torch.Generator().manual_seed(0), cache="static"), model

    block, _ = generate(fbcompile.Config(**EAGER))
    sparse, model = generate(_sparse(budget=0))
    assert torch.equal(sparse, block)
    assert fbcompile.stats(model).reuses > 0
    every, model = generate(_sparse(budget=4096))
    assert rel_error(every, generate(fbcompile.Config(refresh="always", **EAGER))[0]) < 1e-5
    assert fbcompile.stats(model).reuses > 0


@torch.no_grad()
def test_olmo_style_llada_dual_cache_reuses_sparsely_and_its_extremes_hold():
    """The example OLMo-style LLaDA (RoPE after the cat) with Fast-dLLM's dual cache, through its own
    loop: every cached site reuses sparsely; the logits of every call are "block" mode's at budget 0
    and exact mode's with every tile."""
    from examples import olmo_llada_lm

    prompt = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))

    def logits(config):
        model = fbcompile.optimize(olmo_llada_lm.make_tiny_model(num_layers=1), config)
        outs = []
        model.register_forward_hook(lambda module, args, out: outs.append(out[0]))
        model.generate(prompt, cache="dual", gen_length=16, block_size=8, steps=6)
        return outs, model

    exact, _ = logits(fbcompile.Config(refresh="always", **EAGER))
    block, _ = logits(fbcompile.Config(**EAGER))
    none, _ = logits(_sparse(budget=0, tile=4))
    every, model = logits(_sparse(budget=64, tile=4))
    assert {row["sparse"] for row in fbcompile.explain(model).rewritten} == {"sparse (budget 64, tiles of 4, residual on)"}
    assert fbcompile.stats(model).reuses > 0
    assert max(rel_error(b, e) for b, e in zip(block, exact)) > 1e-3
    for step in range(len(exact)):
        assert rel_error(none[step], block[step]) < 1e-5, step
        assert rel_error(every[step], exact[step]) < 1e-5, step


@torch.no_grad()
def test_diffusion_gemma_sites_are_sparse_and_the_extremes_hold():
    """transformers' DiffusionGemmaForBlockDiffusion (tiny, one block of 4 steps): every cached site
    reuses sparsely; the logits of every forward are "block" mode's at budget 0 and exact mode's with
    every tile (the zoo tests check the middle)."""
    from test_diffusion_gemma import CANVAS, make_model  # skips without DiffusionGemma

    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(1))
    built = make_model(num_hidden_layers=1)

    def logits(config):
        model = fbcompile.optimize(copy.deepcopy(built), config)
        compiled, outs = model.forward, []
        model.forward = lambda *args, **kwargs: outs.append(compiled(*args, **kwargs)) or outs[-1]
        torch.manual_seed(5)  # the initial canvas is random
        model.generate(ids, max_new_tokens=CANVAS, max_denoising_steps=4, do_sample=False)
        return [out.logits for out in outs], model

    exact, _ = logits(fbcompile.Config(refresh="always", **EAGER))
    block, _ = logits(fbcompile.Config(**EAGER))
    none, _ = logits(_sparse(budget=0))
    every, model = logits(_sparse(budget=64))  # the prompt and a canvas: under 64 cached keys
    rows = fbcompile.explain(model).rewritten
    assert rows and all(row["sparse"] == "sparse (budget 64, tiles of 8, residual on)" for row in rows), rows
    assert fbcompile.stats(model).reuses > 0
    assert max(rel_error(b, e) for b, e in zip(block, exact)) > 1e-3  # reuse is an approximation here
    for step in range(len(exact)):
        assert rel_error(none[step], block[step]) < 1e-5, step
        assert rel_error(every[step], exact[step]) < 1e-5, step
