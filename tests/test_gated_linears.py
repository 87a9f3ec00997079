"""The gated-linear pass (``fbcompile.passes.gated_linears``): a gated MLP's ``act(gate(h)) * up(h)``
becomes one ``fbcompile::gated_linear`` that applies the gate where its GEMM stores.

On the CPU the op runs the model's own linears, activation and product, so a rewrite is checked bit for
bit; on a GPU its Triton path against the separate ops. Forms: SiLU (Llama, Qwen2), tanh-GELU (Gemma),
either operand order, with biases, with the linear grouping pass after it, and the cases the pass must
leave alone."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fbcompile
from fbcompile.passes import gated_linears as gt
from fbcompile.passes import group_linears as gl
from fbcompile.passes.graph_utils import LINEARS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_group_linears import ALWAYS, BF16, _count, _traced, optimized_qwen2  # noqa: E402

GATED = (torch.ops.fbcompile.gated_linear.default,)
GROUPED = (torch.ops.fbcompile.linear_group.default,)


class MLP(nn.Module):
    """``down(act(gate(x)) * up(x))``, in the forms model code writes it; ``fused``: gate and up stored
    as one weight whose output is chunked (Phi-3's ``gate_up_proj``)."""

    def __init__(self, act="silu", order="act_first", bias=False, h=64, inter=96, fused=False):
        super().__init__()
        if fused:
            self.gate_up = nn.Linear(h, 2 * inter, bias=bias)
        else:
            self.gate, self.up = nn.Linear(h, inter, bias=bias), nn.Linear(h, inter, bias=bias)
        self.down = nn.Linear(inter, h, bias=bias)
        self.act = {"silu": nn.SiLU(), "silu_builtin": torch._C._nn.silu, "gelu_tanh": nn.GELU(approximate="tanh"),
                    "gelu": nn.GELU(), "relu": nn.ReLU()}[act]
        self.order, self.fused = order, fused

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            gate = self.act(gate)
        else:
            gate, up = self.act(self.gate(x)), self.up(x)
        return self.down(gate * up if self.order == "act_first" else up * gate)


def _rewritten(model, x, where=ALWAYS, group=False):
    """The passes as the backend runs them: gated first, then (``group``) the grouping."""
    gm, example_inputs = _traced(model, x)
    with torch.no_grad():
        before = gm(*example_inputs)
        lines = gt.gated_linears(gm, where)
        if group:
            gl.group_linears(gm, where)
        return gm, lines, before, gm(*example_inputs)


@pytest.mark.parametrize("act", ["silu", "silu_builtin", "gelu_tanh"])
@pytest.mark.parametrize("order", ["act_first", "up_first"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("fused", [False, True], ids=["two_weights", "one_weight_chunked"])
def test_gated_projection_rewritten_exactly(act, order, bias, group, fused):
    model = MLP(act, order, bias, fused=fused).to(BF16)
    gm, lines, before, after = _rewritten(model, torch.randn(2, 8, 64, dtype=BF16), group=group)
    assert len(lines) == 1 and f"{act.replace('_builtin', '')}(" in lines[0], lines
    assert _count(gm, GATED) == 1 and _count(gm, GROUPED) == 0  # gate/up taken: nothing left to group
    assert not any(n.op == "call_function" and n.target in (F.silu, torch._C._nn.silu, F.gelu)
                   for n in gm.graph.nodes), gm.code
    assert _count(gm, LINEARS) == 1  # the down projection
    assert torch.equal(before[0], after[0])


class Shared(nn.Module):
    """A part of the gated product also used elsewhere: the product itself (its users take the fused
    result), or the activation or a projection (which must stay computed, so nothing is fused); or
    ``inputs``: gate and up over different inputs."""

    def __init__(self, reuse):
        super().__init__()
        self.mlp, self.reuse = MLP(), reuse

    def forward(self, x):
        m = self.mlp
        projected = {"gate": m.gate(x), "up": m.up(x if self.reuse != "inputs" else 2 * x)}
        activated = F.silu(projected["gate"])
        product = activated * projected["up"]
        extra = {"product": product, "activation": activated}.get(self.reuse, projected.get(self.reuse))
        return m.down(product) + (extra.sum() if extra is not None else 0)


def test_product_used_elsewhere_takes_the_fused_result():
    gm, lines, before, after = _rewritten(Shared("product").to(BF16), torch.randn(4, 64, dtype=BF16))
    assert len(lines) == 1 and _count(gm, GATED) == 1
    assert torch.equal(before[0], after[0])


class OtherChunks(nn.Module):
    """One weight's output chunked in ways that are not a gate/up pair: over the rows (not the features),
    in three, or the gate taken from the second half."""

    def __init__(self, how):
        super().__init__()
        self.mlp, self.how = MLP(fused=True), how

    def forward(self, x):
        m = self.mlp
        y = m.gate_up(x)
        if self.how == "rows":
            gate, up = y.chunk(2, dim=0)
        elif self.how == "three":
            gate, up, _ = y[..., :-2].chunk(3, dim=-1)
        else:
            up, gate = y.chunk(2, dim=-1)
        return F.silu(gate) * up


class WrittenBetween(nn.Module):
    """The projections' input written in place between them: the up projection reads the written value."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP()

    def forward(self, x):
        h = x * 2
        gate = F.silu(self.mlp.gate(h))
        h.mul_(3)
        return self.mlp.down(gate * self.mlp.up(h))


@pytest.mark.parametrize("model", [MLP("relu"), MLP("gelu"), Shared("activation"), Shared("gate"), Shared("up"),
                                   Shared("inputs"), OtherChunks("rows"), OtherChunks("three"),
                                   OtherChunks("swapped"), WrittenBetween()],
                         ids=["relu", "gelu_erf", "activation_shared", "gate_shared", "up_shared", "two_inputs",
                              "chunked_rows", "chunked_in_three", "halves_swapped", "input_written_between"])
def test_left_alone_where_it_does_not_apply(model):
    gm, lines, before, after = _rewritten(model.to(BF16), torch.randn(4, 64, dtype=BF16))
    assert lines == [] and _count(gm, GATED) == 0
    assert torch.equal(before[0], after[0])


def test_left_alone_where_it_does_not_pay():
    x = torch.randn(4, 64, dtype=BF16)
    assert gt.gated_linears(_traced(MLP().to(BF16), x)[0]) == []  # the default rule: CPU tensors
    assert gt.gated_linears(_traced(MLP(), x.float())[0], ALWAYS) == []  # fp32: the kernel takes half only


def test_grad_mode_keeps_the_ops():
    """Traced with autograd on, the projection keeps its backward (the gated op has none)."""
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(MLP().to(BF16), backend=backend)(torch.randn(4, 64, dtype=BF16))
    assert gt.gated_linears(seen[0], ALWAYS) == []


def test_optimize_reports_gated_linears_and_computes_the_same(monkeypatch):
    """transformers' Qwen2 as it is, through the backend with the rule forced on: every layer's gate_proj
    and up_proj apply the gate in their GEMM, the report says so, the logits are the model's; with
    ``gated_linears=False`` nothing is gated."""
    monkeypatch.setattr(gl, "pays", ALWAYS)
    for on in (True, False):
        expected, got, report = optimized_qwen2(gated_linears=on)
        gated = [line for g in report.graphs for lines in g.gated_linears.values() for line in lines]
        assert len(gated) == (2 if on else 0), gated
        assert ("gated MLPs" in str(report)) == on
        assert all("gate_proj" in line and "up_proj" in line and "silu(" in line for line in gated), gated
        assert torch.equal(got, expected)


def test_diffusion_gemma_mlps_gated(monkeypatch):
    """transformers' DiffusionGemma as it is (tanh-GELU, the self-conditioning MLP, MoE layers), bf16, the
    rule forced on: each dense MLP's gate is applied in its gate/up GEMM, and generation is token for
    token the same as without the pass (the CPU op runs the model's ops)."""
    from test_diffusion_gemma import generate, make_model
    monkeypatch.setattr(gl, "pays", ALWAYS)
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(1))
    runs = {}
    try:
        make_model()
    except ValueError as e:  # the GPU machine's transformers (another version) builds no DiffusionGemma
        pytest.skip(f"this transformers cannot build DiffusionGemma: {str(e)[:80]}")
    layers = 2
    for on in (True, False):
        torch._dynamo.reset()
        model = fbcompile.optimize(make_model(num_hidden_layers=layers).to(BF16),
                                   fbcompile.Config(refresh="always", compiler="eager", gated_linears=on))
        runs[on] = generate(model, ids), fbcompile.explain(model)
    gated = [line for g in runs[True][1].graphs for lines in g.gated_linears.values() for line in lines]
    assert len(gated) >= layers + 1 and all("gelu_tanh(" in line for line in gated), gated
    assert any("self_conditioning" in line for line in gated), gated
    assert torch.equal(runs[True][0], runs[False][0])


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_config_rejects_bad_gated_linears(value):
    with pytest.raises(ValueError, match="Config.gated_linears"):
        fbcompile.Config(gated_linears=value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("fused", [False, True], ids=["two_weights", "one_weight_chunked"])
def test_gpu_triton_path(act, fused):
    """The Triton path (the gated gate/up launch, then the down projection) against the separate ops."""
    model = MLP(act, bias=fused, fused=fused).to("cuda", BF16)
    gm, lines, before, after = _rewritten(model, torch.randn(2, 16, 64, device="cuda", dtype=BF16), group=True)
    assert len(lines) == 1
    torch.testing.assert_close(after, before, rtol=1e-2, atol=1e-2)
