"""The runtime as a new user meets it: many models per process, request boundaries, HF caches,
inference mode, and errors that say what to do."""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

import fbcompile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from examples.block_diffusion_lm import make_tiny_model  # noqa: E402

BLOCK = fbcompile.Config(compiler="eager")
EXACT = fbcompile.Config(refresh="always", compiler="eager")
PROMPT = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
STEPS, BLOCKS = 2, 2


def assert_exact(got: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 exactness as the suite means it: relative error (L2) below 1e-5."""
    error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    assert error < 1e-5, error


def _prefix_cache(lm):
    with torch.no_grad():
        return lm(PROMPT, use_cache=True)[1]


def _dispatched_calls(model) -> int:
    """Calls of the model's split graphs: each compiled forward over the cache is one."""
    stats = fbcompile.stats(model)
    return stats.refreshes + stats.reuses


# --------------------------------------------------------------------------- many models per process


def _steps_and_commit(model, cache, batch=1, steps=STEPS) -> int:
    """A block's denoising steps and its commit pass over ``cache``; returns the number of forwards."""
    block = torch.randint(0, 200, (batch, 8), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(PROMPT.shape[1], PROMPT.shape[1] + 8)
    cache = [(k.expand(batch, -1, -1, -1).to(model.lm_head.weight.dtype), v.expand(batch, -1, -1, -1).to(
        model.lm_head.weight.dtype)) for k, v in cache]
    with torch.no_grad():
        for _ in range(steps):
            model(block, past_key_values=cache, position_ids=pos)
        model(block, past_key_values=cache, position_ids=pos, use_cache=True)
    return steps + 1


@pytest.mark.parametrize("config", [EXACT, BLOCK], ids=["exact", "block"])
def test_six_instances_of_one_class_all_compile(config):
    """Dynamo's recompile limit is per code object: every instance's forward must still compile."""
    cache = _prefix_cache(make_tiny_model(num_layers=1))
    models = [fbcompile.optimize(make_tiny_model(seed=i, num_layers=1), config) for i in range(6)]
    for model in models:
        forwards = _steps_and_commit(model, cache)
        assert _dispatched_calls(model) == forwards, fbcompile.stats(model)
        if config is BLOCK:
            assert fbcompile.stats(model).reuses == STEPS - 1


def test_batch_and_dtype_switches_stay_compiled():
    """Step and commit graphs for each dtype and batch size, past dynamo's global limit (lowered to 2
    here; its default 8 is as easily passed by a generate loop): the model's own budget holds."""
    cache = _prefix_cache(make_tiny_model(num_layers=1))
    model = fbcompile.optimize(make_tiny_model(num_layers=1), BLOCK)
    forwards = 0
    with torch._dynamo.config.patch(recompile_limit=2):
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            for batch in (1, 2):
                forwards += _steps_and_commit(model, cache, batch)
    assert _dispatched_calls(model) == forwards, fbcompile.stats(model)


def test_recompile_limit_warns_naming_fbcompile(monkeypatch):
    from fbcompile.backends import compiler

    monkeypatch.setattr(compiler, "RECOMPILES_PER_LAYER", 0)  # the budget is recompile_limit alone
    model = fbcompile.optimize(make_tiny_model(num_layers=1),
                               fbcompile.Config(compiler="eager", recompile_limit=1))
    with torch.no_grad(), pytest.warns(UserWarning, match="fbcompile.*recompile_limit"):
        model.generate(PROMPT, num_blocks=1, steps=STEPS)


# --------------------------------------------------------------------------- request boundaries


class PrefixServer(torch.nn.Module):
    """Serves requests that share one prompt's KV cache; each request denoises its own block."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, x, past_key_values, position_ids):
        return self.lm(x, past_key_values=past_key_values, position_ids=position_ids)[0]

    @torch.no_grad()
    def generate(self, block, cache, steps=STEPS):
        pos = torch.arange(PROMPT.shape[1], PROMPT.shape[1] + block.shape[1])
        logits = []
        for _ in range(steps):
            logits.append(self(block, cache, pos))
            block = logits[-1].argmax(-1)
        return logits


def _requests(server, cache, new_request=None):
    blocks = [torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    out = []
    for block in blocks:
        if new_request is not None:
            new_request(server)
        out.append(server.generate(block, cache))
    return out


def test_generate_starts_a_new_request():
    """Request 2's first step must not take request 1's external part (same prefix cache tensors)."""
    lm = make_tiny_model(num_layers=2)
    cache = _prefix_cache(lm)
    expected = _requests(PrefixServer(lm).eval(), cache)
    server = fbcompile.optimize(PrefixServer(lm).eval(), BLOCK)
    got = _requests(server, cache)
    assert_exact(got[1][0], expected[1][0])  # a refresh: exact
    assert fbcompile.stats(server).refresh_reasons == {"new kv": 2}


def test_new_request_in_a_hand_written_loop():
    lm = make_tiny_model(num_layers=2)
    cache = _prefix_cache(lm)
    expected = _requests(PrefixServer(lm).eval(), cache)
    server = fbcompile.optimize(PrefixServer(lm).eval(), BLOCK)
    steps = PrefixServer.generate.__wrapped__  # the loop without optimize's request boundary
    got = []
    for block in (torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(s)) for s in (1, 2)):
        fbcompile.new_request(server)
        with torch.no_grad():
            got.append(steps(server, block, cache))
    assert_exact(got[1][0], expected[1][0])


def test_new_kv_reads_one_site_before_the_refresh_runs(monkeypatch):
    """Over new keys/values (a new request or block) the dispatcher reads the first site's cache key
    before it runs the refresh and the other sites' after (on a GPU the launch waits for the host work
    before it); every site's part is kept all the same, and the next step reuses them all."""
    from fbcompile.backends import dispatcher

    lm = make_tiny_model(num_layers=3)
    model = fbcompile.optimize(make_tiny_model(num_layers=3), BLOCK)
    model.load_state_dict(lm.state_dict())
    cache = _prefix_cache(lm)
    read = {"in lookup": 0}
    contents, lookup = dispatcher.external_contents, dispatcher.SplitGraphDispatcher._lookup

    def counted_contents(guard, args):
        read["in lookup"] += read.get("inside", False)
        return contents(guard, args)

    def counted_lookup(self, args):
        read["inside"] = True
        try:
            return lookup(self, args)
        finally:
            read["inside"] = False

    monkeypatch.setattr(dispatcher, "external_contents", counted_contents)
    monkeypatch.setattr(dispatcher.SplitGraphDispatcher, "_lookup", counted_lookup)
    x = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(12, 20)[None]
    with torch.no_grad():
        model(x, past_key_values=cache, position_ids=pos)
        assert read["in lookup"] == 1
        model(x, past_key_values=cache, position_ids=pos)
    assert read["in lookup"] == 1 + 3  # the reuse looked up all three sites' entries
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses, len(stats.sites)) == (1, 1, 3), stats


# --------------------------------------------------------------------------- HF DynamicCache


def _tiny_qwen2(attn: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).eval(), config


def _dynamic_cache_block_loop(model, config, steps=3, prompt_len=8, block=4):
    """Denoise one block against a DynamicCache that the model updates in the graph; after each step
    but the last the cache gets its prefix tensors back (the last step commits the block)."""
    from transformers import DynamicCache

    prompt = torch.randint(0, 64, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, 64, (1, block), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(prompt_len, prompt_len + block)[None]
    mask = torch.ones(1, 1, block, prompt_len + block, dtype=torch.bool)  # bidirectional in the block
    with torch.no_grad():
        cache = DynamicCache(config=config)
        model(prompt, past_key_values=cache, use_cache=True)
        prefix = [(layer.keys, layer.values) for layer in cache.layers]
        for step in range(steps):
            logits = model(x, past_key_values=cache, position_ids=pos, attention_mask=mask, use_cache=True).logits
            if step < steps - 1:
                for layer, (k, v) in zip(cache.layers, prefix):
                    layer.keys, layer.values = k, v
            x = logits.argmax(-1)
    return logits, [layer.keys for layer in cache.layers]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_dynamic_cache_updated_in_the_graph_runs_exactly(attn):
    model, config = _tiny_qwen2(attn)
    expected_logits, expected_keys = _dynamic_cache_block_loop(model, config)
    model, config = _tiny_qwen2(attn)
    fbcompile.optimize(model, BLOCK)
    logits, keys = _dynamic_cache_block_loop(model, config)
    for got, want in zip(keys, expected_keys):
        assert_exact(got, want)
    assert_exact(logits, expected_logits)
    assert fbcompile.explain(model).rewritten  # the sites are split; the graph returns the cache: a save pass
    assert set(fbcompile.stats(model).refresh_reasons) == {"save pass"}


def test_fresh_dynamic_cache_layer_is_skipped_with_a_reason():
    """Prefill through a fresh DynamicCache: ``cat([empty 1-D tensor, k])`` has no cached part."""
    from transformers import DynamicCache

    model, config = _tiny_qwen2("eager")
    fbcompile.optimize(model, BLOCK)
    prompt = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(prompt, past_key_values=DynamicCache(config=config), use_cache=True)
    decisions = [s["decision"] for s in fbcompile.explain(model).sites]
    assert decisions and all(d == "skipped: every key depends on the current block (no cached part)"
                             for d in decisions), decisions


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fine_tuning_through_an_optimized_hf_model(attn):
    """Autograd on, an HF model over a DynamicCache prefix (as a LoRA-style fine-tune of a block diffusion
    model runs it): the graph runs unsplit, a backward works and its gradients are the plain model's."""
    from transformers import DynamicCache

    plain, config = _tiny_qwen2(attn)
    model, _ = _tiny_qwen2(attn)
    fbcompile.optimize(model, BLOCK)
    prompt = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(2))
    for m in (plain, model):
        cache = DynamicCache(config=config)
        with torch.no_grad():
            m(prompt, past_key_values=cache, use_cache=True)
        m(x, past_key_values=cache, position_ids=torch.arange(8, 12)[None], use_cache=True).logits.square().sum().backward()
    for (name, want), got in zip(plain.named_parameters(), model.parameters()):
        assert (want.grad is None) == (got.grad is None), name
        if want.grad is not None:
            assert_exact(got.grad, want.grad)
    assert any(s["decision"].endswith("the graph compiled as it is") for s in fbcompile.explain(model).sites)


# --------------------------------------------------------------------------- inference mode


def test_block_mode_under_inference_mode_is_exact():
    expected = make_tiny_model(num_layers=1).generate(PROMPT, num_blocks=1, steps=STEPS)
    model = fbcompile.optimize(make_tiny_model(num_layers=1), BLOCK)
    with torch.inference_mode(), pytest.warns(UserWarning, match="inference tensors"):
        got = model.generate(PROMPT, num_blocks=1, steps=STEPS)
    assert torch.equal(got, expected)
    assert fbcompile.stats(model).reuses == 0
    assert fbcompile.stats(model).refresh_reasons.get("kv is an inference tensor") == STEPS - 1


# --------------------------------------------------------------------------- errors and discovery


def test_backend_object_checks_options_when_built():
    with pytest.raises(ValueError, match="unknown fbcompile option"):
        fbcompile.backend(refrsh="always")
    assert fbcompile.backend(mode="reduce-overhead").session.cuda_graphs


def test_backend_object_refuses_torch_compile_options():
    compiled = torch.compile(make_tiny_model(num_layers=1), backend=fbcompile.backend(compiler="eager"),
                             options={"refresh": "always"})
    with torch.no_grad(), pytest.raises(Exception, match=r"pass \['options'\] to fbcompile.backend"):
        compiled(PROMPT)


@pytest.mark.parametrize("how", ["mode", "config"])
def test_cuda_graphs_on_the_cpu_run_without_them(how):
    """mode="reduce-overhead" / Config(cuda_graphs=True) without a GPU: a warning at the second call (the first
    could be a host graph ahead of device ones), the graphs run as compiled (as Inductor does); the GPU side
    is tests/test_cuda_graphs.py."""
    model = make_tiny_model(num_layers=1)
    with torch.no_grad():
        expected = model(PROMPT)[0]
    if how == "mode":
        compiled = torch.compile(model, backend=fbcompile.backend(mode="reduce-overhead", compiler="eager",
                                                                  refresh="always"))
    else:
        compiled = fbcompile.optimize(model, fbcompile.Config(cuda_graphs=True, compiler="eager", refresh="always"))
    with torch.no_grad():  # a first call on the host could be a host graph ahead of device ones: no warning yet
        assert_exact(compiled(PROMPT)[0], expected)
    with torch.no_grad(), pytest.warns(UserWarning, match="running without CUDA graphs"):
        got = compiled(PROMPT)[0]
    assert_exact(got, expected)
    assert fbcompile.stats(compiled).cuda_graphs == {"uncaptured (first call)": 1, "uncaptured (inputs on cpu)": 1}


def test_explain_before_any_call_says_to_run_the_model():
    model = fbcompile.optimize(make_tiny_model(num_layers=1), BLOCK)
    assert "run the model" in str(fbcompile.explain(model))


@pytest.mark.parametrize("how", ["named", "object"])
def test_explain_and_stats_of_a_torch_compiled_model(how):
    model = make_tiny_model(num_layers=1)
    backend = "fbcompile" if how == "named" else fbcompile.backend(compiler="eager", refresh="always")
    # named-backend compiles share one session per set of options: options no other test uses
    options = {"options": {"compiler": "eager", "refresh": "always", "max_cache_entries": 77}} if how == "named" else {}
    compiled = torch.compile(model, backend=backend, **options)
    with torch.no_grad():
        cache = compiled(PROMPT, use_cache=True)[1]
        compiled(PROMPT[:, :4], past_key_values=cache)
    assert [s["decision"] for s in fbcompile.explain(compiled).rewritten] == ["rewritten"]
    assert fbcompile.stats(compiled).refresh_reasons == {"exact mode": 1}


def test_fidelity_leaves_other_compiled_models_alone():
    """fidelity used to call torch._dynamo.reset(), dropping what the user compiled before."""
    model = fbcompile.optimize(make_tiny_model(num_layers=1), BLOCK)
    with torch.no_grad():
        model.generate(PROMPT, num_blocks=1, steps=STEPS)
    compiles = fbcompile.stats(model).compiles
    fbcompile.fidelity(make_tiny_model(num_layers=1), lambda m: m.generate(PROMPT, num_blocks=1, steps=STEPS))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no recompile-limit warning either
        model.generate(PROMPT, num_blocks=1, steps=STEPS)
    assert fbcompile.stats(model).compiles == compiles  # nothing was recompiled


def test_a_graph_inductor_cannot_compile_with_combo_kernels_compiles_without_them(monkeypatch):
    """Combo kernels are an experimental Inductor option (on by default for graphs on CUDA): a graph
    Inductor fails to compile with them is compiled again without them, with no warning."""
    from torch._inductor import compile_fx

    from fbcompile.backends import compiler

    real, patches = compile_fx.compile_fx, []

    def failing_with_combo(gm, example_inputs, config_patches=None):
        patches.append(dict(config_patches or {}))
        if (config_patches or {}).get("combo_kernels"):
            raise RuntimeError("simulated combo-kernel failure")
        return real(gm, example_inputs, config_patches=config_patches)

    monkeypatch.setattr(compile_fx, "compile_fx", failing_with_combo)
    monkeypatch.setattr(compiler, "inductor_options", lambda session, inputs: {"combo_kernels": True})
    eager = make_tiny_model()
    model = fbcompile.optimize(make_tiny_model(), fbcompile.Config(refresh="always"))
    cache = _prefix_cache(eager)
    block = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(PROMPT.shape[1], PROMPT.shape[1] + 8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", UserWarning)
        got = model(block, past_key_values=cache, position_ids=pos)[0]
        want = eager(block, past_key_values=cache, position_ids=pos)[0]
    assert_exact(got, want)
    assert patches[:2] == [{"combo_kernels": True}, {}], patches
    assert fbcompile.stats(model).uncompiled == 0


def test_a_graph_inductor_cannot_compile_runs_without_it(monkeypatch):
    """An Inductor failure on a (correct) rewritten graph is a warning and the graph runs as it is."""
    from torch._inductor import compile_fx

    def failing(*args, **kwargs):
        raise RuntimeError("simulated Inductor failure\nsecond line")

    monkeypatch.setattr(compile_fx, "compile_fx", failing)
    eager = make_tiny_model()
    model = fbcompile.optimize(make_tiny_model(), fbcompile.Config(refresh="always"))
    cache = _prefix_cache(eager)
    block = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(PROMPT.shape[1], PROMPT.shape[1] + 8)
    with pytest.warns(UserWarning, match="Inductor could not compile a graph .*simulated Inductor failure"), \
            torch.no_grad():
        got = model(block, past_key_values=cache, position_ids=pos)[0]
        want = eager(block, past_key_values=cache, position_ids=pos)[0]
    assert_exact(got, want)
    assert fbcompile.stats(model).refreshes >= 1  # the split graph ran, without Inductor
    assert fbcompile.stats(model).uncompiled >= 1 and "without Inductor" in str(fbcompile.stats(model))
    assert "runs without Inductor, which could not compile it (RuntimeError: simulated" in str(fbcompile.explain(model))
