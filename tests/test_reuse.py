"""Refresh/reuse of the block-external attention (FlashBlock) and the guards against stale results."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import fbcompile
from fbcompile.backends.compiler import AUTOGRAD
from fbcompile.kernels import reference
from attention_zoo import ZooSpec, build, make_inputs, rel_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.block_diffusion_lm import make_tiny_model  # noqa: E402

EAGER_BLOCK = fbcompile.Config(refresh="block", compiler="eager")


def _layer(spec=ZooSpec(mask="none"), config=EAGER_BLOCK, dtype=torch.float32):
    """A zoo attention layer and an optimized copy with the same weights."""
    plain = build(spec, dtype=dtype)
    optimized = fbcompile.optimize(build(spec, dtype=dtype), config)
    return plain, optimized


@torch.no_grad()
def test_reuse_step_is_flashblock_merge_computed_by_hand():
    spec = ZooSpec(mask="none", gqa="repeat_kv")
    plain, model = _layer(spec)
    x1, past_k, past_v, _ = make_inputs(spec, seed=1)
    x2 = torch.randn_like(x1)
    first = model(x1, past_k, past_v)
    second = model(x2, past_k, past_v)
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (1, 1)
    assert rel_error(first, plain(x1, past_k, past_v)) < 1e-5  # refresh step = exact

    def qkv(x):
        return plain._project(x)
    scale = spec.head_dim ** -0.5
    q1, _, _ = qkv(x1)
    q2, k2, v2 = qkv(x2)
    o_e, l_e = reference.attention_lse(q1, past_k, past_v, None, scale)   # from the block's first step
    o_i, l_i = reference.attention_lse(q2, k2, v2, None, scale)           # fresh
    merged, _ = reference.merge_lse(o_e, l_e, o_i, l_i)
    B, _, M, _ = merged.shape
    by_hand = plain.o(merged.transpose(1, 2).reshape(B, M, -1))
    assert rel_error(second, by_hand) < 1e-5
    assert rel_error(second, plain(x2, past_k, past_v)) > 1e-4  # it is an approximation


@torch.no_grad()
def test_reuse_graph_has_no_read_of_external_kv():
    model = fbcompile.optimize(make_tiny_model(), EAGER_BLOCK)
    model.generate(torch.randint(0, 200, (1, 9)), num_blocks=3)
    graphs = [g for g in fbcompile.stats(model) and fbcompile.explain(model).graphs if g.reuse_graph is not None]
    assert graphs
    for record in graphs:
        placeholders = {n.name: n for n in record.reuse_graph.graph.nodes if n.op == "placeholder"}
        past = [n for name, n in placeholders.items() if "past_key_values" in name]
        assert past, placeholders.keys()
        assert all(not n.users for n in past), [n.name for n in past if n.users]
        targets = {n.target for n in record.reuse_graph.graph.nodes if n.op == "call_function"}
        assert torch.ops.fbcompile.attention_lse.default not in targets
        assert torch.ops.fbcompile.attention_merge_lse.default in targets


@pytest.mark.parametrize("overrides", [{}, {"attn_impl": "eager"}, {"gqa_style": "enable_gqa"}])
@torch.no_grad()
def test_example_model_refreshes_once_per_block(overrides):
    steps, blocks = 4, 5
    model = fbcompile.optimize(make_tiny_model(**overrides), EAGER_BLOCK)
    exact = fbcompile.optimize(make_tiny_model(**overrides), fbcompile.Config(refresh="always", compiler="eager"))
    prompt = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, num_blocks=blocks, steps=steps)
    stats = fbcompile.stats(model)
    # per block: the first denoising step refreshes, the other steps reuse; the commit pass returns
    # the block's keys/values (a save pass) and is exact
    assert stats.refreshes == 2 * blocks and stats.reuses == blocks * (steps - 1), stats
    assert stats.refresh_reasons == {"new kv": blocks, "save pass": blocks}, stats.refresh_reasons
    assert out.shape == (2, 11 + blocks * 8)
    assert torch.equal(exact.generate(prompt, num_blocks=blocks, steps=steps),
                       make_tiny_model(**overrides).generate(prompt, num_blocks=blocks, steps=steps))


@torch.no_grad()
def test_refresh_steps_equal_exact_mode():
    """Calls that refresh compute exactly what the exact model computes on the same inputs."""
    model = fbcompile.optimize(make_tiny_model(), EAGER_BLOCK)
    plain = make_tiny_model()
    prompt = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(0))
    _, cache = plain(prompt, use_cache=True)
    x = torch.full((1, 8), plain.config.mask_token_id)
    pos = torch.arange(10, 18)[None]
    got = model(x, past_key_values=cache, position_ids=pos)[0]
    assert rel_error(got, plain(x, past_key_values=cache, position_ids=pos)[0]) < 1e-5
    x2 = x.clone()
    x2[0, :3] = torch.tensor([5, 6, 7])
    model(x2, past_key_values=cache, position_ids=pos)  # reuse
    cache = [(k.clone(), v.clone()) for k, v in cache]   # new tensors: a new block
    got = model(x2, past_key_values=cache, position_ids=pos)[0]
    assert rel_error(got, plain(x2, past_key_values=cache, position_ids=pos)[0]) < 1e-5
    assert fbcompile.stats(model).refresh_reasons == {"new kv": 2}


# --- stale-cache guards: each case must give the exact result, and fails if reuse were used ---

@torch.no_grad()
def _assert_exact_after(model, plain, x, past_k, past_v, reason):
    got = model(x, past_k, past_v)
    assert rel_error(got, plain(x, past_k, past_v)) < 1e-5
    assert fbcompile.stats(model).refresh_reasons.get(reason, 0) >= 1, fbcompile.stats(model).refresh_reasons


@torch.no_grad()
def test_in_place_write_into_cache_forces_refresh():
    plain, model = _layer()
    x, past_k, past_v, _ = make_inputs(ZooSpec(mask="none"), seed=4)
    model(x, past_k, past_v)
    past_k.mul_(-1.0)  # same tensor object and shape, new content
    _assert_exact_after(model, plain, x, past_k, past_v, "kv written in place")


@torch.no_grad()
def test_preallocated_cache_slice_assignment_forces_refresh():
    plain, model = _layer()
    x, past_k, past_v, _ = make_inputs(ZooSpec(mask="none"), seed=5)
    model(x, past_k, past_v)
    past_v[:, :, :4] = torch.randn_like(past_v[:, :, :4])  # a write through a view
    _assert_exact_after(model, plain, x, past_k, past_v, "kv written in place")


@torch.no_grad()
def test_second_generate_with_new_prompt_of_same_length():
    gen = torch.Generator().manual_seed(7)
    p1, p2 = torch.randint(0, 200, (1, 12), generator=gen), torch.randint(0, 200, (1, 12), generator=gen)
    fresh = fbcompile.optimize(make_tiny_model(), EAGER_BLOCK).generate(p2, num_blocks=2)
    torch._dynamo.reset()  # two models' graphs would pass dynamo's per-function recompile limit
    model = fbcompile.optimize(make_tiny_model(), EAGER_BLOCK)
    first = model.generate(p1, num_blocks=2)
    second = model.generate(p2, num_blocks=2)
    assert torch.equal(second, fresh)
    assert not torch.equal(first[:, 12:], second[:, 12:])


@torch.no_grad()
def test_batch_size_change_forces_refresh():
    spec = ZooSpec(mask="none", batch=2)
    plain, model = _layer(spec)
    x, past_k, past_v, _ = make_inputs(spec, seed=6)
    model(x, past_k, past_v)
    got = model(x[:1], past_k[:1], past_v[:1])
    assert rel_error(got, plain(x[:1], past_k[:1], past_v[:1])) < 1e-5


@torch.no_grad()
def test_dtype_change_forces_refresh():
    spec = ZooSpec(mask="none")
    plain, model = _layer(spec)
    x, past_k, past_v, _ = make_inputs(spec, seed=8)
    model(x, past_k, past_v)
    model.double(), plain.double()
    got = model(x.double(), past_k.double(), past_v.double())
    assert got.dtype == torch.float64
    assert rel_error(got, plain(x.double(), past_k.double(), past_v.double())) < 1e-5


@torch.no_grad()
def test_block_input_change_with_same_cache_and_new_length():
    spec = ZooSpec(mask="none")
    plain, model = _layer(spec)
    x, past_k, past_v, _ = make_inputs(spec, seed=9)
    model(x, past_k, past_v)
    got = model(x[:, :5], past_k, past_v)  # a shorter block over the same cache
    assert rel_error(got, plain(x[:, :5], past_k, past_v)) < 1e-5


def test_train_mode_and_grad_never_reuse():
    spec = ZooSpec(mask="none")
    plain, model = _layer(spec)
    x, past_k, past_v, _ = make_inputs(spec, seed=10)
    with torch.no_grad():
        model(x, past_k, past_v)
    x2 = torch.randn_like(x)
    model.train()
    with torch.no_grad():
        got = model(x2, past_k, past_v)
    assert rel_error(got, plain(x2, past_k, past_v)) < 1e-5
    model.eval()
    got = model(x2, past_k, past_v)  # grad enabled
    assert rel_error(got, plain(x2, past_k, past_v)) < 1e-5
    assert fbcompile.stats(model).reuses == 0


def test_autograd_calls_run_unsplit_and_differentiate():
    """A call with autograd on (fine-tuning through an optimized model, or a forgotten torch.no_grad())
    runs the graph as it is, so a backward works and gives the plain model's gradients; the report says
    why the sites were skipped; calls under no_grad still split and reuse."""
    spec = ZooSpec(mask="none")
    plain, model = _layer(spec)
    x, past_k, past_v, _ = make_inputs(spec, seed=13)
    for m in (plain, model):
        m(x, past_k, past_v).square().sum().backward()
    grads = [(name, p.grad, q.grad) for (name, p), q in zip(plain.named_parameters(), model.parameters())]
    assert any(g is not None for _, g, _ in grads)
    for name, expected, got in grads:
        assert (got is None) == (expected is None) and (got is None or rel_error(got, expected) < 1e-5), name
    report = fbcompile.explain(model)
    assert report.sites and all(s["decision"] == f"skipped: {AUTOGRAD}" for s in report.sites)
    with torch.no_grad():
        got = model(x, past_k, past_v)  # a refresh of the split graph: exact
        assert rel_error(got, plain(x, past_k, past_v)) < 1e-5
        model(x + 0.01, past_k, past_v)
    assert fbcompile.stats(model).reuses == 1 and fbcompile.explain(model).rewritten


@torch.no_grad()
def test_reset_drops_cached_results():
    spec = ZooSpec(mask="none")
    plain, model = _layer(spec)
    x, past_k, past_v, _ = make_inputs(spec, seed=11)
    model(x, past_k, past_v)
    fbcompile.reset(model)
    assert fbcompile.stats(model).refreshes == 0
    x2 = torch.randn_like(x)
    got = model(x2, past_k, past_v)
    assert rel_error(got, plain(x2, past_k, past_v)) < 1e-5
    assert fbcompile.stats(model).refresh_reasons == {"new kv": 1}


@torch.no_grad()
def test_every_n_policy():
    spec = ZooSpec(mask="none")
    _, model = _layer(spec, fbcompile.Config(refresh=3, compiler="eager"))
    x, past_k, past_v, _ = make_inputs(spec, seed=12)
    for _ in range(7):
        model(x, past_k, past_v)
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (3, 4)  # calls 1, 4, 7 refresh
    assert stats.refresh_reasons == {"new kv": 1, "policy": 2}


@torch.no_grad()
def test_tokens_policy_refreshes_after_tau_changed_positions():
    model = fbcompile.optimize(make_tiny_model(), fbcompile.Config(refresh="tokens", tokens=2, compiler="eager"))
    prompt = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(0))
    _, cache = model(prompt, use_cache=True)
    x = torch.full((1, 8), model.config.mask_token_id)
    model(x, past_key_values=cache)            # refresh (new kv)
    x[0, 0] = 5
    model(x, past_key_values=cache)            # 1 position changed since the refresh: reuse
    x[0, 1] = 6
    model(x, past_key_values=cache)            # 2 changed: refresh (policy)
    model(x, past_key_values=cache)            # 0 changed since that refresh: reuse
    stats = fbcompile.stats(model)
    assert stats.refresh_reasons.get("policy") == 1 and stats.reuses == 2, stats


@torch.no_grad()
def test_recycled_tensor_ids_are_not_mistaken_for_the_same_cache():
    """A new cache of the same shape may get a freed tensor's id(); identity is checked by weakref."""
    spec = ZooSpec(mask="none")
    plain, model = _layer(spec)
    x, past_k, past_v, _ = make_inputs(spec, seed=13)
    for step in range(3):
        model(x, past_k, past_v)
        model(x, past_k, past_v)  # reuse (fast path armed)
        ids = id(past_k), id(past_v)
        del past_k, past_v
        past_k, past_v = torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)  # may land on the same ids
        got = model(x, past_k, past_v)
        assert rel_error(got, plain(x, past_k, past_v)) < 1e-5, (step, ids == (id(past_k), id(past_v)))


@torch.no_grad()
def test_inductor_compiles_refresh_and_reuse_graphs():
    spec = ZooSpec(mask="bool")
    x, past_k, past_v, mask = make_inputs(spec, seed=14)
    x2 = torch.randn_like(x)
    results = []
    for compiler in ("eager", "inductor"):
        torch._dynamo.reset()
        model = fbcompile.optimize(build(spec), fbcompile.Config(refresh="block", compiler=compiler))
        results.append((model(x, past_k, past_v, mask), model(x2, past_k, past_v, mask)))
        stats = fbcompile.stats(model)
        assert (stats.refreshes, stats.reuses) == (1, 1), stats
    for eager_out, inductor_out in zip(*results):
        assert rel_error(inductor_out, eager_out) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_adaptive_policy_refreshes_when_the_query_drifts(compiler):
    spec = ZooSpec(mask="none")
    plain, model = _layer(spec, fbcompile.Config(refresh="adaptive", drift=0.05, compiler=compiler))
    x, past_k, past_v, _ = make_inputs(spec, seed=15)
    model(x, past_k, past_v)                      # refresh (new kv)
    model(x * 1.01, past_k, past_v)               # reuse; query drift ~1%
    model(x * 1.01, past_k, past_v)               # drift below 5%: reuse
    x3 = torch.randn_like(x)
    model(x3, past_k, past_v)                     # reuse, but its query moved a lot...
    got = model(x3, past_k, past_v)               # ...so this call refreshes: exact
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (2, 3), stats
    assert stats.refresh_reasons == {"new kv": 1, "drift": 1}
    assert rel_error(got, plain(x3, past_k, past_v)) < 1e-5


def test_graphs_that_slice_the_cache_differently_do_not_share_entries():
    """Two graphs over the same cache tensor, one attending to ``cache[:, :, :8]`` and one to
    ``cache[:, :, :12]`` (a Python int, so a graph per value): the second must not take the first's
    external part, which has the same shape (it is the block's) but covers other keys."""
    import copy

    class Window(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))
            self.keep = 8

        def forward(self, x, past_k, past_v):
            q, k, v = (proj(x)[:, None] for proj in (self.q, self.k, self.v))
            k = torch.cat([past_k[:, :, :self.keep], k], dim=2)
            v = torch.cat([past_v[:, :, :self.keep], v], dim=2)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    torch.manual_seed(0)
    model = Window().eval()
    reference = copy.deepcopy(model)
    x, past_k, past_v = torch.randn(1, 4, 8), torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)
    optimized = fbcompile.optimize(model, fbcompile.Config(compiler="eager"))
    with torch.no_grad():
        for keep in (8, 12):
            model.keep = reference.keep = keep
            got, expected = optimized(x, past_k, past_v), reference(x, past_k, past_v)
            assert ((got - expected).norm() / expected.norm()).item() < 1e-5, keep
    assert fbcompile.stats(optimized).refresh_reasons == {"new kv": 2}


class _SharedTable(torch.nn.Module):
    """Two attention layers whose cached keys are scaled by one table ``t`` before the cat (as the SANA-WM
    refiner rotates every layer's sink keys by one RoPE table); with ``direct``, the second layer's query
    reads ``t`` as well, not only through the first layer's attention."""

    def __init__(self, direct: bool):
        super().__init__()
        torch.manual_seed(0)
        self.direct = direct
        self.wq = torch.nn.ModuleList(torch.nn.Linear(8, 8, bias=False) for _ in range(2))

    def forward(self, x, t, caches):
        F = torch.nn.functional
        for layer, (past_k, past_v) in enumerate(caches):
            q = self.wq[layer](x + t.mean() if self.direct and layer == 1 else x)
            k, v = torch.cat([past_k * t, q * 0.5], -2), torch.cat([past_v, q * 0.25], -2)
            x = x + F.scaled_dot_product_attention(q, k, v)
        return x


@pytest.mark.parametrize("direct", [False, True])
@torch.no_grad()
def test_an_input_an_earlier_site_caches_is_cached_for_later_sites_and_guarded(direct):
    """The second layer's query reads ``t`` through the first layer's attention: ``t`` stays a cached input of
    its cached part (both layers split). Reuse holds while ``t`` is the same tensor; a new ``t`` refreshes,
    also where the query reads it directly (a per-call table: every call then refreshes, never stale)."""
    plain = _SharedTable(direct).eval()
    model = fbcompile.optimize(_SharedTable(direct).eval(), EAGER_BLOCK)
    caches = [(torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)) for _ in range(2)]
    t = torch.rand(1, 1, 6, 1) + 0.5
    x = torch.randn(1, 2, 4, 8)
    model(x, t, caches)
    model(torch.randn_like(x), t, caches)
    stats = fbcompile.stats(model)
    assert [s["decision"] for s in fbcompile.explain(model).sites] == ["rewritten"] * 2
    assert (stats.refreshes, stats.reuses) == (1, 1), stats
    for _ in range(2):
        t = torch.rand(1, 1, 6, 1) + 0.5
        x = torch.randn(1, 2, 4, 8)
        assert rel_error(model(x, t, caches), plain(x, t, caches)) < 1e-5
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (3, 1) and stats.refresh_reasons == {"new kv": 3}, stats
