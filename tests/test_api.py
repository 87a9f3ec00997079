"""The user-facing API: Config validation, the named backend, optimize/explain/stats, logging, generate."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fbcompile
from fbcompile.report import Report
from attention_zoo import ZooSpec, build, make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from examples.block_diffusion_lm import make_tiny_model  # noqa: E402

EAGER = fbcompile.Config(refresh="always", compiler="eager")
SITE_KEYS = {"graph", "node", "form", "q", "kv", "heads", "mask", "decision"}




def fbcompile_ops_in(code: str) -> bool:
    return "torch.ops.fbcompile" in code


# --------------------------------------------------------------------------- Config


@pytest.mark.parametrize("refresh", ["sometimes", 0, -1, True, False, 2.5, None])
def test_config_rejects_bad_refresh(refresh):
    with pytest.raises(ValueError, match="Config.refresh"):
        fbcompile.Config(refresh=refresh)


@pytest.mark.parametrize("refresh", ["block", "always", 1, 3])
def test_config_accepts_good_refresh(refresh):
    assert fbcompile.Config(refresh=refresh).refresh == refresh


@pytest.mark.parametrize("compiler", ["aot_eager", "Inductor", "", None])
def test_config_rejects_bad_compiler(compiler):
    with pytest.raises(ValueError, match="Config.compiler"):
        fbcompile.Config(compiler=compiler)


@pytest.mark.parametrize("entries", [0, -3, 1.5])
def test_config_rejects_bad_max_cache_entries(entries):
    with pytest.raises(ValueError, match="max_cache_entries"):
        fbcompile.Config(max_cache_entries=entries)


@pytest.mark.parametrize("cuda_graphs", ["yes", 1, None])
def test_config_rejects_bad_cuda_graphs(cuda_graphs):
    with pytest.raises(ValueError, match="Config.cuda_graphs"):
        fbcompile.Config(cuda_graphs=cuda_graphs)


@pytest.mark.parametrize("value", [1, None, "yes"])
@pytest.mark.parametrize("flag", ["combo_kernels", "joint_attention"])
def test_config_rejects_bad_pass_flags(flag, value):
    with pytest.raises(ValueError, match=f"Config.{flag} must be a bool"):
        fbcompile.Config(**{flag: value})


def test_inductor_gets_combo_kernels_for_graphs_on_cuda_only():
    """``Config.combo_kernels`` reaches Inductor, beside the mode's options, for a graph on CUDA (a fake
    CUDA tensor stands for one here), and so do fbcompile's heuristics where Inductor's config takes them
    (:mod:`fbcompile.backends.inductor_choices`); a CPU graph, or the option off, patches nothing else."""
    from torch._inductor import config as inductor_config
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fbcompile.backends.compiler import inductor_options
    from fbcompile.backends.inductor_choices import block_step_choices
    from fbcompile.backends.session import Session

    with FakeTensorMode():
        on_cuda = [3, torch.empty(2, device="cuda")]
    choices = ({"inductor_choices_class": block_step_choices} if hasattr(inductor_config, "inductor_choices_class")
               else {})
    assert inductor_options(Session(fbcompile.Config()), on_cuda) == {"combo_kernels": True, **choices}
    assert inductor_options(Session(fbcompile.Config(combo_kernels=False)), on_cuda) == (choices or None)
    assert inductor_options(Session(fbcompile.Config()), [torch.ones(2)]) is None
    options = inductor_options(Session(fbcompile.Config(), mode="max-autotune-no-cudagraphs"), on_cuda)
    assert options["combo_kernels"] and options["max_autotune"] and "triton.cudagraphs" not in options


def test_config_from_options():
    assert fbcompile.Config.from_options(None) == fbcompile.Config()
    assert fbcompile.Config.from_options({"refresh": 2, "compiler": "eager"}) == fbcompile.Config(refresh=2,
                                                                                                compiler="eager")
    with pytest.raises(ValueError) as err:
        fbcompile.Config.from_options({"refresh": "always", "mode": "fast", "cache_size": 3})
    assert "mode" in str(err.value) and "cache_size" in str(err.value)
    assert "refresh" not in str(err.value).split("known")[0]  # only the unknown keys are blamed
    with pytest.raises(ValueError, match="Config.refresh"):
        fbcompile.Config.from_options({"refresh": "never"})


# --------------------------------------------------------------------------- the named backend


def test_backend_by_name_and_stats_explain_without_model():
    assert "fbcompile" in torch._dynamo.list_backends()
    spec = ZooSpec(mask="bool")
    model = build(spec)
    inputs = make_inputs(spec, seed=4)
    before = len(_shared_graphs(EAGER) or [])  # the shared session outlives tests
    compiled = torch.compile(model, backend="fbcompile", options={"refresh": "always", "compiler": "eager"})
    with torch.no_grad():
        got, expected = compiled(*inputs), model(*inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    stats = fbcompile.stats()
    assert stats.compiles == before + 1
    assert stats.sites[-1].calls == 1 and stats.sites[-1].refreshes == 1 and stats.reuses == 0
    report = fbcompile.explain()
    assert report.graphs[-1].rewritten == 1
    assert [s["decision"] for s in report.sites if s["graph"] == report.graphs[-1].index] == ["rewritten"]
    assert fbcompile_ops_in(report.graphs[-1].code_refresh)


def _shared_graphs(config):
    from fbcompile.backends.compiler import _shared_sessions
    session = _shared_sessions.get((config, None))  # keyed by (Config, torch.compile mode)
    return session.graphs if session is not None else None


def test_backend_by_name_rejects_unknown_option():
    spec = ZooSpec()
    model = build(spec)
    compiled = torch.compile(model, backend="fbcompile", options={"refresh": "always", "bogus": 1})
    with pytest.raises(Exception, match="bogus"):
        compiled(*make_inputs(spec))


# --------------------------------------------------------------------------- optimize


def test_optimize_rejects_bad_arguments():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fbcompile.optimize(lambda x: x)
    model = build(ZooSpec())
    with pytest.raises(TypeError, match="fbcompile.Config"):
        fbcompile.optimize(model, {"refresh": "always"})
    assert fbcompile.optimize(model, EAGER) is model
    with pytest.raises(RuntimeError, match="already optimized"):
        fbcompile.optimize(model, EAGER)
    with pytest.raises(ValueError, match="not optimized"):
        fbcompile.stats(build(ZooSpec()))


def test_optimize_then_explain_and_reset():
    spec = ZooSpec(mask="additive", gqa="repeat_interleave")
    model = build(spec)
    inputs = make_inputs(spec, seed=5)
    with torch.no_grad():
        expected = model(*inputs)
        fbcompile.optimize(model, EAGER)
        torch.testing.assert_close(model(*inputs), expected, rtol=1e-5, atol=1e-6)
        model(*inputs)
    stats = fbcompile.stats(model)
    assert stats.compiles == 1 and stats.refreshes == 2 and stats.reuses == 0
    assert [s["decision"] for s in fbcompile.explain(model).sites] == ["rewritten"]
    fbcompile.reset(model)
    stats = fbcompile.stats(model)
    assert stats.compiles == 1 and stats.refreshes == 0 and stats.refresh_reasons == {}


# --------------------------------------------------------------------------- explain(model, *inputs)


def test_explain_with_inputs_leaves_model_alone():
    spec = ZooSpec(mask="window", gqa="expand")
    model = build(spec)
    inputs = make_inputs(spec, seed=6)
    forward = model.forward
    report = fbcompile.explain(model, *inputs)

    assert isinstance(report, Report)
    assert len(report.sites) == 1
    site = report.sites[0]
    assert set(site) == SITE_KEYS
    assert site["decision"] == "rewritten" and site["form"] == "sdpa" and site["graph"] == 0
    assert "GQA 2" in site["heads"] and "ext:" in site["kv"] and "int:" in site["kv"]
    assert report.rewritten == report.sites and report.skipped == []
    text = str(report)
    assert "decision" in text and "rewritten" in text          # the table
    assert "+++ graph 0 refresh" in text                        # the diff
    assert any(line.startswith("+") and "fbcompile.attention_lse" in line for line in text.splitlines())
    assert any(line.startswith("-") and "scaled_dot_product_attention" in line for line in text.splitlines())
    assert "graph 0 exact: attention parts: 2 on reference" in text  # CPU tensors: no kernels

    # the model is as it was: not compiled, no fbcompile state
    assert model.forward == forward
    assert not hasattr(model.forward, "_torchdynamo_orig_callable")
    assert "_fbcompile" not in model.__dict__
    with pytest.raises(ValueError):
        fbcompile.stats(model)
    with torch.no_grad():
        model(*inputs)  # still runs eagerly


def test_explain_says_when_it_cannot_tell_the_kernels(monkeypatch):
    """The kernel counts come from running the graph on fake tensors; where that fails the line says
    so and the rest of the report stands."""
    from fbcompile.passes import attention_kernels

    class Failing:
        def __init__(self, *args):
            raise RuntimeError("no fake kernel")

    monkeypatch.setattr(attention_kernels, "FakeTensorProp", Failing)
    spec = ZooSpec(mask="window", gqa="expand")
    text = str(fbcompile.explain(build(spec), *make_inputs(spec, seed=6)))
    assert "graph 0 exact: attention parts: on kernels not known (RuntimeError: no fake kernel)" in text
    assert "+++ graph 0 refresh" in text


def test_telling_the_kernels_adds_no_guard_to_dynamos_shapes():
    """The kernels are told from a copy of the graph run on fake inputs; a symbolic int dynamo passes goes
    in as a symbol of the analysis's own. Passed as it is, a guard made there (``aten.size`` takes its
    sizes as ints) lands in dynamo's shape environment and specializes its graph: on the GPU, a recompile
    at every cache length of a graph with HF's rotary tables."""
    import torch.fx as fx
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from fbcompile.passes.attention_kernels import fake_inputs, kernels_of

    env = ShapeEnv()
    length = env.create_symintnode(env.create_symbol(28, ConstantSource("length")), hint=28)
    gm = fx.symbolic_trace(lambda x, n: (torch.ops.aten.size.default(x.new_zeros(n, 2)), x + 1))
    mode, inputs = fake_inputs([torch.ones(3), length])
    assert inputs[1].node.shape_env is not env and inputs[1].node.hint == 28
    kernels_of(gm, mode, inputs)
    assert not env.guards, env.guards


# --------------------------------------------------------------------------- no cached attention


class PlainLayer(torch.nn.Module):
    """A tiny transformer layer: SDPA over its own tokens, no KV cache, no cat."""

    def __init__(self, width=32, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.o = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 64), torch.nn.GELU(), torch.nn.Linear(64, width))

    def forward(self, x):
        B, M, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, M, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(B, M, W))
        return x + self.mlp(x)


def test_model_without_cached_attention_is_untouched():
    torch.manual_seed(0)
    model = PlainLayer().eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        expected = model(x)
        report = fbcompile.explain(model, x)
        fbcompile.optimize(model, EAGER)
        got = model(x)
    assert torch.equal(got, expected)
    assert len(report.sites) == 1
    decision = report.sites[0]["decision"]
    assert decision.startswith("skipped: ") and len(decision) > len("skipped: ") + 5
    assert report.rewritten == [] and "0 rewritten" in str(report)
    graphs = fbcompile.explain(model).graphs
    assert len(graphs) == 1 and graphs[0].rewritten == 0
    assert graphs[0].code_refresh is None and graphs[0].split_graph is None
    assert not fbcompile_ops_in(graphs[0].code_before)
    stats = fbcompile.stats(model)
    assert stats.compiles == 1 and stats.sites == [] and stats.refreshes == 0


# --------------------------------------------------------------------------- logging

_LOG_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import fbcompile
from fbcompile.report import Report
from attention_zoo import ZooSpec, build, make_inputs, compile_exact
torch.set_num_threads(1)
spec = ZooSpec()
compiled, session = compile_exact(build(spec))
with torch.no_grad():
    compiled(*make_inputs(spec))
assert session.graphs[0].rewritten == 1
"""


def _run_logged(env_value):
    env = {k: v for k, v in os.environ.items() if k not in ("FBCOMPILE_LOG", "TORCH_LOGS")}
    if env_value is not None:
        env["FBCOMPILE_LOG"] = env_value
    script = _LOG_SCRIPT.format(tests=os.path.join(ROOT, "tests"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_fbcompile_log_debug_logs_decisions():
    stderr = _run_logged("debug")
    assert "rewritten" in stderr
    assert "graph 0:" in stderr


def test_no_log_without_fbcompile_log():
    stderr = _run_logged(None)
    assert "rewritten" not in stderr and "graph 0:" not in stderr


# --------------------------------------------------------------------------- generate


def _prompt():
    return torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))


def test_generate_compiles_a_bounded_number_of_graphs_and_is_exact():
    prompt = _prompt()
    reference = make_tiny_model().generate(prompt, num_blocks=10)
    assert len(set(reference[0, 12:].tolist())) > 3  # not degenerate: the equality below can fail

    short = fbcompile.optimize(make_tiny_model(), EAGER)
    short_tokens = short.generate(prompt, num_blocks=5)
    short_compiles = fbcompile.stats(short).compiles
    assert torch.equal(short_tokens, reference[:, : 12 + 5 * 8])

    torch._dynamo.reset()  # a fresh model must not share dynamo's recompile budget with the first
    model = fbcompile.optimize(make_tiny_model(), EAGER)
    tokens = model.generate(prompt, num_blocks=10)
    stats = fbcompile.stats(model)
    assert torch.equal(tokens, reference)
    assert stats.compiles <= 6
    assert stats.compiles == short_compiles  # does not grow with the number of blocks
    assert stats.reuses == 0 and stats.refreshes > 0  # exact mode
    assert fbcompile.explain(model).rewritten  # the cached attention was in fact split
