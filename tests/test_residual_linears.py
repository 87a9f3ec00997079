"""The residual pass (``fbcompile.passes.residual_linears``): a pre-norm layer's ``h + o_proj(a)`` and
``h + down(m)`` become the store of that GEMM, ``fbcompile::linear_group(a, [w], [b], h)``.

On the CPU the op runs the plain linear and add, so a rewrite is checked bit for bit; on a GPU its
Triton path against the separate ops. Forms: either operand order, with a bias, after the grouping and
gating passes, and the cases the pass must leave alone."""
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
from fbcompile.passes import residual_linears as rl
from fbcompile.passes.graph_utils import LINEARS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_group_linears import ALWAYS, BF16, _count, _traced, optimized_qwen2  # noqa: E402

GROUPED = (torch.ops.fbcompile.linear_group.default,)


def rms_norm(h, w, eps=1e-6):
    hf = h.float()
    return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


class Layer(nn.Module):
    """A pre-norm layer without attention: ``h = h + o(q(n1(h)) * k(...))``, then ``h + down(gated MLP)``;
    ``order``: where the residual stands in the sum, ``bias``: of o and down."""

    def __init__(self, order="residual_first", bias=False, h=64, inter=96):
        super().__init__()
        self.n1, self.n2 = nn.Parameter(torch.rand(h) + 0.5), nn.Parameter(torch.rand(h) + 0.5)
        self.q, self.k = nn.Linear(h, h), nn.Linear(h, h)
        self.o = nn.Linear(h, h, bias=bias)
        self.gate, self.up = nn.Linear(h, inter, bias=False), nn.Linear(h, inter, bias=False)
        self.down = nn.Linear(inter, h, bias=bias)
        self.order = order

    def add(self, residual, out):
        return residual + out if self.order == "residual_first" else out + residual

    def forward(self, h):
        x = rms_norm(h, self.n1)
        h = self.add(h, self.o(self.q(x) * self.k(x)))
        x = rms_norm(h, self.n2)
        return self.add(h, self.down(F.silu(self.gate(x)) * self.up(x)))


def _rewritten(model, x):
    """The passes in the backend's order, forced on: the graph, the residual pass's lines, and the
    outputs before and after."""
    gm, example_inputs = _traced(model, x)
    with torch.no_grad():
        before = gm(*example_inputs)
        gt.gated_linears(gm, ALWAYS)
        gl.group_linears(gm, ALWAYS)
        lines = rl.residual_linears(gm, ALWAYS)
        return gm, lines, before[0], gm(*example_inputs)[0]


@pytest.mark.parametrize("order", ["residual_first", "residual_second"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 8, 64), (1, 32, 64)])
def test_residual_sums_move_into_the_gemms(order, bias, shape):
    model = Layer(order, bias).to(BF16)
    gm, lines, before, after = _rewritten(model, torch.randn(*shape, dtype=BF16))
    assert len(lines) == 2 and "o_parameters_weight" in lines[0] and "down_parameters_weight" in lines[1], lines
    assert _count(gm, GROUPED) == 3 and _count(gm, LINEARS) == 0  # q/k grouped; o and down with their residual
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in rl._ADDS]
    assert all(not any(isinstance(a, torch.fx.Node) and a.target in GROUPED for a in n.args) for n in adds)
    assert torch.equal(after, before)


class Unfit(nn.Module):
    """Sums the pass must leave: a residual of another shape (broadcast) or dtype, a linear read twice,
    a scaled add (``torch.add(h, y, alpha=2)``), a linear whose input is written in place before the sum
    (the GEMM at the sum would read the written value)."""

    def __init__(self, how):
        super().__init__()
        self.o, self.how = nn.Linear(64, 64, bias=False), how

    def forward(self, h):
        if self.how == "input_written_before_the_sum":
            x = h * 2
            y = self.o(x)
            x.mul_(3)
            return h + y
        y = self.o(h)
        if self.how == "broadcast":
            return h[:1] + y
        if self.how == "fp32":
            return h.float() + y
        if self.how == "alpha":
            return torch.add(h, y, alpha=2)
        return h + y, y


@pytest.mark.parametrize("how", ["broadcast", "fp32", "read_twice", "alpha", "input_written_before_the_sum"])
def test_sums_that_do_not_fit_left_alone(how):
    gm, lines, before, after = _rewritten(Unfit(how).to(BF16), torch.randn(2, 8, 64, dtype=BF16))
    assert lines == [] and _count(gm, GROUPED) == 0
    assert torch.equal(after, before)


def test_left_alone_where_it_does_not_pay():
    """The default rule (CPU tensors: no), fp32 (the kernel takes half precision) and grad mode."""
    x = torch.randn(2, 8, 64, dtype=BF16)
    assert rl.residual_linears(_traced(Layer().to(BF16), x)[0]) == []
    assert rl.residual_linears(_traced(Layer(), x.float())[0], ALWAYS) == []
    seen = []
    torch._dynamo.reset()
    torch.compile(Layer().to(BF16), backend=lambda gm, _: seen.append(gm) or gm.forward)(x)
    assert rl.residual_linears(seen[0], ALWAYS) == []


def test_optimize_reports_and_computes_the_same(monkeypatch):
    """transformers' Qwen2 as it is, through the backend with the rule forced on: per layer the o_proj
    and down_proj sums move, the report says so, the logits are the model's; with
    ``residual_linears=False`` nothing moves."""
    monkeypatch.setattr(gl, "pays", ALWAYS)
    for on in (True, False):
        expected, got, report = optimized_qwen2(residual_linears=on)
        moved = [line for g in report.graphs for lines in g.residual_linears.values() for line in lines]
        assert len(moved) == (4 if on else 0), moved
        assert sorted(line.split("linear(")[1].split("_parameters")[0].rsplit("_", 1)[-1] for line in moved) == \
            (["proj"] * 4 if on else [])
        assert ("residual adds in the GEMM before them" in str(report)) == on
        assert torch.equal(got, expected)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_config_rejects_bad_residual_linears(value):
    with pytest.raises(ValueError, match="Config.residual_linears"):
        fbcompile.Config(residual_linears=value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("bias", [False, True])
def test_gpu_triton_path(bias):
    """The Triton path (the residual added as o_proj and down store) against the original graph."""
    model = Layer(bias=bias).to("cuda", BF16)
    gm, lines, before, after = _rewritten(model, torch.randn(2, 16, 64, device="cuda", dtype=BF16))
    assert len(lines) == 2
    torch.testing.assert_close(after, before, rtol=1e-2, atol=1e-2)
