"""Per-head / per-layer reuse plans (``Config.reuse_plan``) and their calibration (``fbcompile.calibrate``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fbcompile
from attention_zoo import ZooSpec, build, make_inputs, rel_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.block_diffusion_lm import make_tiny_model  # noqa: E402

# one site, 4 query heads over 2 KV heads; steps since the refresh:
#   1: heads 2, 3 (KV head 1) recomputed; 2: all reuse; 3: head 0 recomputed -> its KV head 0 (heads 0, 1)
PLAN = fbcompile.ReusePlan([[[True, True, False, False], [True] * 4, [False, True, True, True]]])


def _heads_out(spec: ZooSpec, config: fbcompile.Config | None):
    """A zoo layer without its output projection (so each head's attention output is visible)."""
    model = build(spec)
    model.o = torch.nn.Identity()
    return fbcompile.optimize(model, config) if config is not None else model


def _by_head(out: torch.Tensor, spec: ZooSpec) -> torch.Tensor:
    return out.view(spec.batch, spec.block, spec.heads, spec.head_dim)


SPECS = [ZooSpec(mask="none"), ZooSpec(form="eager", gqa="expand", mask="bool"),
         ZooSpec(mask="additive", gqa="enable_gqa"),  # a per-head mask: narrowed with the heads
         ZooSpec(mask="bool", suffix=6),              # dual cache: two external parts, merged
         ZooSpec(form="eager", mask="padding", layout="bshd", gqa="repeat_interleave")]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.form}-{s.gqa}-{s.mask}-suffix{s.suffix}")
@torch.no_grad()
def test_plan_recomputes_its_heads_and_keeps_the_rest(spec):
    """Each head's output equals exact where the plan recomputes it, else reuse of the latest
    external part computed for its KV head (the refresh, or a step that recomputed it)."""
    _, past_k, past_v, mask = make_inputs(spec, seed=21)
    xs = [make_inputs(spec, seed=30 + i)[0] for i in range(5)]
    model = _heads_out(spec, fbcompile.Config(reuse_plan=PLAN, compiler="eager"))
    plain = _heads_out(spec, None)
    got = [_by_head(model(x, past_k, past_v, mask), spec) for x in xs]
    exact = [_by_head(plain(x, past_k, past_v, mask), spec) for x in xs]
    from_0 = [None] + [_by_head(o, spec) for o in _run_block(spec, xs[:4], past_k, past_v, mask)[1:]]
    from_1 = [None, None] + [_by_head(o, spec) for o in _run_block(spec, xs[1:4], past_k, past_v, mask)[1:]]
    expected = [
        exact[0],                                                            # refresh
        torch.cat([from_0[1][:, :, :2], exact[1][:, :, 2:]], 2),             # step 1: KV head 1 fresh
        torch.cat([from_0[2][:, :, :2], from_1[2][:, :, 2:]], 2),            # step 2: reuse (head 2, 3 from step 1)
        torch.cat([exact[3][:, :, :2], from_1[3][:, :, 2:]], 2),             # step 3: KV head 0 fresh
        exact[4],                                                            # past the plan: refresh
    ]
    for step, (g, e) in enumerate(zip(got, expected)):
        assert rel_error(g, e) < 1e-5, step
    assert rel_error(got[2], exact[2]) > 1e-4  # reuse is still an approximation
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (2, 3), stats
    assert stats.refresh_reasons == {"new kv": 1, "past the reuse plan": 1}, stats.refresh_reasons
    assert stats.external_fraction == pytest.approx((2 + 1 + 0 + 1 + 2) / 10)


def _run_block(spec, xs, past_k, past_v, mask):
    """Outputs of the plain ``"block"`` policy over ``xs`` (refresh at the first)."""
    model = _heads_out(spec, fbcompile.Config(compiler="eager"))
    return [model(x, past_k, past_v, mask) for x in xs]


@torch.no_grad()
def test_plan_graphs_recompute_with_inductor():
    spec = ZooSpec(mask="additive")
    _, past_k, past_v, mask = make_inputs(spec, seed=22)
    xs = [make_inputs(spec, seed=40 + i)[0] for i in range(4)]
    outs = {}
    for compiler in ("eager", "inductor"):
        torch._dynamo.reset()
        model = _heads_out(spec, fbcompile.Config(reuse_plan=PLAN, compiler=compiler))
        outs[compiler] = [model(x, past_k, past_v, mask) for x in xs]
        assert fbcompile.stats(model).reuses == 3
    for a, b in zip(outs["eager"], outs["inductor"]):
        assert rel_error(b, a) < 1e-5
    graphs = fbcompile.explain(model).graphs[0].plan_graphs
    assert sorted(graphs) == ["reuse, steps 1", "reuse, steps 2", "reuse, steps 3"]


@torch.no_grad()
def test_reuse_step_graph_reads_only_the_planned_kv_heads():
    spec = ZooSpec(mask="none")
    model = _heads_out(spec, fbcompile.Config(reuse_plan=PLAN, compiler="eager"))
    _, past_k, past_v, _ = make_inputs(spec, seed=23)
    for i in range(4):
        model(make_inputs(spec, seed=50 + i)[0], past_k, past_v)
    graphs = fbcompile.explain(model).graphs[0].plan_graphs
    external = torch.ops.fbcompile.attention_lse.default

    def external_heads(gm):  # (query heads, KV heads) read by every external attention call
        return [(n.args[0].args[1:], n.args[1].args[1:]) for n in gm.graph.nodes if n.target is external]
    assert external_heads(graphs["reuse, steps 1"]) == [((1, 2, 2), (1, 1, 1))]  # narrow(dim, start, length)
    assert external_heads(graphs["reuse, steps 2"]) == []
    assert external_heads(graphs["reuse, steps 3"]) == [((1, 0, 2), (1, 0, 1))]


@torch.no_grad()
def test_all_false_plan_is_exact_on_the_example_model():
    plain = make_tiny_model()
    calls = 4
    plan = fbcompile.ReusePlan([[[False] * plain.config.num_heads] * calls] * plain.config.num_layers)
    model = fbcompile.optimize(make_tiny_model(), fbcompile.Config(reuse_plan=plan, compiler="eager"))
    prompt = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(5))
    assert torch.equal(model.generate(prompt, num_blocks=3, steps=4), plain.generate(prompt, num_blocks=3, steps=4))
    stats = fbcompile.stats(model)
    assert stats.reuses == 3 * 3 and stats.external_fraction == 1.0, stats


def test_calibration_plans_step_by_step_against_the_last_recompute():
    def pair(cos, drift=0.0):
        return dict(calls=1, cos=[cos, 1.0], lse_drift=[drift, 0.0], layer_cos=cos, layer_lse_drift=drift)
    # one site, 2 query heads over 1 KV head; head 0 drifts away from the refresh but not from step 2
    calibration = fbcompile.Calibration(pairs={
        (0, 0, 1): pair(0.99), (0, 0, 2): pair(0.5), (0, 1, 2): pair(0.5), (0, 0, 3): pair(0.5),
        (0, 2, 3): pair(0.99), (0, 2, 4): pair(0.99, drift=0.2)}, kv_heads=[1])
    for granularity in ("head", "layer"):
        plan = calibration.plan(cos=0.9, lse_drift=0.1, granularity=granularity)
        # step 2 recomputes (far from the refresh), step 3 reuses (close to step 2), step 4's drift
        # from step 2 is too large
        assert plan.reuse == (((True, True), (False, False), (True, True), (False, False)),), granularity
    two_kv = fbcompile.Calibration(pairs={(0, 0, 1): pair(0.5)}, kv_heads=[2])
    assert two_kv.plan(cos=0.9).reuse == (((False, True),),)  # KV heads decide apart
    assert two_kv.plan(cos=0.9, granularity="layer").reuse == (((False, False),),)
    missing = fbcompile.Calibration(pairs={(0, 0, 1): pair(0.99), (0, 0, 3): pair(0.99)}, kv_heads=[1])
    assert missing.plan(cos=0.9).reuse == (((True, True), (False, False), (False, False)),)  # (0, 2) never seen


def test_plan_is_validated():
    with pytest.raises(ValueError, match="same number of steps"):
        fbcompile.ReusePlan([[[True]], [[True], [True]]])
    with pytest.raises(ValueError, match="same number of heads"):
        fbcompile.ReusePlan([[[True, True], [True]]])
    with pytest.raises(ValueError, match="no effect"):
        fbcompile.Config(refresh="always", reuse_plan=PLAN)
    with pytest.raises(ValueError, match="ReusePlan"):
        fbcompile.Config(reuse_plan=[[[True]]])
    assert fbcompile.Config(reuse_plan=PLAN) == fbcompile.Config(reuse_plan=fbcompile.ReusePlan(PLAN.reuse))
    assert PLAN.recompute(0, 1, kv_heads=2) == [(1, 2)] and PLAN.recompute(0, 3, kv_heads=2) == [(0, 1)]
    assert PLAN.recompute(0, 3, kv_heads=4) == [(0, 1)] and PLAN.recompute(0, 1, kv_heads=4) == [(2, 4)]


@torch.no_grad()
def test_plan_for_another_model_is_a_clear_error():
    spec = ZooSpec(mask="none", heads=8, kv_heads=2)
    model = fbcompile.optimize(build(spec), fbcompile.Config(reuse_plan=PLAN, compiler="eager"))
    x, past_k, past_v, _ = make_inputs(spec, seed=24)
    with pytest.raises(Exception, match="lists 4 heads for site 0, which has 8"):
        model(x, past_k, past_v)


@torch.no_grad()
def test_calibration_measures_heads_and_makes_plans():
    model = make_tiny_model()
    prompt = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(6))
    calibration = fbcompile.calibrate(model, lambda m: m.generate(prompt, num_blocks=3, steps=4))
    layers, heads = model.config.num_layers, model.config.num_heads
    assert len(calibration.cos) == layers and all(len(site) == 3 for site in calibration.cos)  # steps 1..3
    assert all(len(step) == heads for site in calibration.cos for step in site)
    assert calibration.calls == [[3] * 3] * layers
    flat = [c for site in calibration.cos for step in site for c in step]
    assert all(-1 <= c <= 1 for c in flat) and min(flat) < 0.999  # random weights: the external part moves
    assert all(d >= 0 for site in calibration.lse_drift for step in site for d in step)
    assert calibration.plan(cos=-1.0, lse_drift=1e9).reused_fraction == 1.0
    assert calibration.plan(cos=1.01).reused_fraction == 0.0
    middle = sorted(flat)[len(flat) // 2]
    per_head = calibration.plan(cos=middle, lse_drift=1e9)
    assert 0 < per_head.reused_fraction < 1
    group = heads // calibration.kv_heads[0]
    assert per_head.reuse[0][0][0] == all(c >= middle for c in calibration.cos[0][0][:group])
    per_layer = calibration.plan(cos=middle, lse_drift=1e9, granularity="layer")
    assert all(len(set(step)) == 1 for site in per_layer.reuse for step in site)
    assert "site 0" in str(calibration) and "step 3" in str(per_head)
    with pytest.raises(ValueError, match="granularity"):
        calibration.plan(granularity="token")


@torch.no_grad()
def test_fidelity_simulates_the_plan():
    """The probe run mixes fresh heads into the cached part as the plan's graphs do."""
    model = make_tiny_model(num_layers=1)
    prompt = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(7))
    generate = lambda m: m.generate(prompt, num_blocks=2, steps=4)  # noqa: E731
    H, L = model.config.num_heads, model.config.num_layers
    none = fbcompile.fidelity(model, generate, fbcompile.Config(
        compiler="eager", reuse_plan=fbcompile.ReusePlan([[[False] * H] * 3] * L)))
    assert none.token_agreement == 1.0 and none.external_fraction == 1.0
    assert max(r["reuse_rel_error"] for r in none.records) < 1e-5
    every = fbcompile.fidelity(model, generate, fbcompile.Config(
        compiler="eager", reuse_plan=fbcompile.ReusePlan([[[True] * H] * 3] * L)))
    block = fbcompile.fidelity(model, generate, fbcompile.Config(compiler="eager"))
    assert [r["reuse_rel_error"] for r in every.records] == [r["reuse_rel_error"] for r in block.records]
    assert every.external_fraction == block.external_fraction < 0.6
    assert "with a reuse plan" in str(every)


def tiny_generate(model):
    """``--generate`` of the command-line test: 2 blocks of 4 steps."""
    return model.generate(torch.arange(9)[None], num_blocks=2, steps=4)


def test_command_line_calibrates_and_evaluates_a_plan(tmp_path, capsys):
    from fbcompile.__main__ import main

    common = ["--model", "examples.block_diffusion_lm:make_tiny_model", "--generate", "test_reuse_plan:tiny_generate"]
    assert main(["calibrate", *common, "--cos", "0.5", "--lse-drift", "100", "--out", str(tmp_path / "cal")]) == 0
    plan = fbcompile.ReusePlan.load(str(tmp_path / "cal" / "plan.json"))
    assert (plan.sites, plan.steps) == (make_tiny_model().config.num_layers, 3)
    assert "min_head_cos" in (tmp_path / "cal" / "calibration.md").read_text()
    assert main(["fidelity", *common, "--plan", str(tmp_path / "cal" / "plan.json"), "--out", str(tmp_path / "f")]) == 0
    assert "with a reuse plan" in capsys.readouterr().out
    assert (tmp_path / "f" / "fidelity.md").exists()


@torch.no_grad()
def test_calibration_without_reuse_steps_is_a_clear_error():
    prompt = torch.arange(9)[None]
    with pytest.raises(ValueError, match="saw no reuse step"):
        fbcompile.calibrate(make_tiny_model(), lambda m: m.generate(prompt, num_blocks=2, steps=1))
    with pytest.raises(ValueError, match="without a reuse_plan"):
        fbcompile.calibrate(make_tiny_model(), tiny_generate, fbcompile.Config(reuse_plan=PLAN))
