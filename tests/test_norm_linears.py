"""The residual and RMSNorm passes (``fbcompile.passes.residual_linears``, ``norm_linears``): a pre-norm
layer's ``h + o_proj(a)`` becomes the store of that GEMM, and ``RMSNorm(h)`` the load of the grouped or
gated GEMMs after it, so the add-and-normalise kernel between them is gone.

On the CPU the ops run the plain ops (the norm rounded once, :func:`fbcompile.ops.rms_norm`), so a
rewrite is checked against the original graph at bf16 precision with norm weights far from one; on a
GPU the Triton path the same way. Forms: Llama/Qwen2 (``w * n.to(dtype)``, either order), Gemma
(``(n * (1 + w.float())).type_as(h)``), ``F.rms_norm``, and the cases the passes must leave alone."""
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
from fbcompile.passes import norm_linears as nl
from fbcompile.passes import residual_linears as rl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_group_linears import ALWAYS, BF16, _count, _traced  # noqa: E402

GROUPED = (torch.ops.fbcompile.linear_group.default,)
GATED = (torch.ops.fbcompile.gated_linear.default,)


class RMSNorm(nn.Module):
    """The forms model code writes: ``llama`` (Qwen2, the examples), ``llama_swapped`` (the weight on the
    right), ``gemma`` (a ``1 + w`` scale in fp32, then the cast), ``functional`` (``F.rms_norm``); and
    ones the pass must not take: ``layer_norm`` (the mean subtracted), ``scaled_by_input`` (a scale
    computed from the input), ``mean_over_batch`` (another dim)."""

    def __init__(self, form, dim=64, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim, generator=torch.Generator().manual_seed(dim)) + 0.5)
        self.form, self.eps = form, eps

    def forward(self, h):
        if self.form == "functional":
            return F.rms_norm(h, (h.shape[-1],), self.weight, self.eps)
        hf = h.float()
        if self.form == "layer_norm":
            hf = hf - hf.mean(-1, keepdim=True)
        dim = 0 if self.form == "mean_over_batch" else -1
        n = hf * torch.rsqrt(hf.pow(2).mean(dim, keepdim=True) + self.eps)
        if self.form == "gemma":
            return (n * (1.0 + self.weight.float())).type_as(h)
        if self.form == "llama_swapped":
            return n.to(h.dtype) * self.weight
        if self.form == "scaled_by_input":
            return self.weight * h * n.to(h.dtype)
        return self.weight * n.to(h.dtype)


class Layer(nn.Module):
    """A pre-norm layer without attention: ``h += o(q(n1(h)) + k(...) + v(...))``, then a gated MLP."""

    def __init__(self, form="llama", h=64, inter=96):
        super().__init__()
        self.n1, self.n2 = RMSNorm(form, h), RMSNorm(form, h)
        self.q, self.k, self.v = nn.Linear(h, h), nn.Linear(h, 32), nn.Linear(h, 32)
        self.o = nn.Linear(h, h, bias=False)
        self.gate, self.up, self.down = (nn.Linear(h, inter, bias=False), nn.Linear(h, inter, bias=False),
                                         nn.Linear(inter, h, bias=False))

    def forward(self, h):
        x = self.n1(h)
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = h + self.o(q * torch.cat([k, v], -1).repeat(1, 1, 1))
        x = self.n2(h)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))


def _rewritten(model, x):
    """The passes in the backend's order, forced on; the graph, the two passes' lines, its outputs
    before and after, and its inputs (the model's parameters among them)."""
    gm, example_inputs = _traced(model, x)
    with torch.no_grad():
        before = gm(*example_inputs)
        gt.gated_linears(gm, ALWAYS)
        gl.group_linears(gm, ALWAYS)
        residuals = rl.residual_linears(gm, ALWAYS)
        norms = nl.norm_linears(gm)
        return gm, residuals, norms, before[0], gm(*example_inputs)[0], example_inputs


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _rsqrts(gm):
    return sum(n.op == "call_function" and n.target is torch.rsqrt for n in gm.graph.nodes)


@pytest.mark.parametrize("form", ["llama", "llama_swapped", "gemma", "functional"])
@pytest.mark.parametrize("shape", [(2, 8, 64), (1, 32, 64)])
def test_layer_norms_and_residuals_move_into_the_gemms(form, shape):
    model = Layer(form).to(BF16)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=BF16) * 3 + 1
    gm, residuals, norms, before, after, inputs = _rewritten(model, x)
    assert len(residuals) == 2 and len(norms) == 2, (residuals, norms)
    assert "l_h_ + linear" in residuals[0] and "o_parameters" in residuals[0], residuals
    assert _rsqrts(gm) == 0 and not any(n.op == "call_function" and n.target is F.rms_norm for n in gm.graph.nodes)
    assert _count(gm, GROUPED) == 3 and _count(gm, GATED) == 1  # q/k/v, o + residual, down + residual
    err = _rel(after, before)
    assert err < 1e-2, err
    # the norm weights matter: with them all one the output moves by much of the layer's update
    with torch.no_grad():
        for n in (model.n1, model.n2):
            n.weight.fill_(1.0)
        moved = (gm(*inputs)[0].float() - before.float()).norm() / (before.float() - x.float()).norm()
        assert moved > 0.1, moved


class Shared(nn.Module):
    """A norm whose output something besides fbcompile's linears reads: it stays."""

    def __init__(self):
        super().__init__()
        self.n, self.q, self.k = RMSNorm("llama"), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, h):
        x = self.n(h)
        return self.q(x) * self.k(x) + x


class Broadcast(nn.Module):
    """A residual of another shape (broadcast) or dtype, and a linear whose output is read twice."""

    def __init__(self, how):
        super().__init__()
        self.o, self.how = nn.Linear(64, 64, bias=False), how

    def forward(self, h):
        y = self.o(h)
        if self.how == "broadcast":
            return h[:1] + y
        if self.how == "fp32":
            return h.float() + y
        return h + y, y


@pytest.mark.parametrize("form", ["layer_norm", "scaled_by_input", "mean_over_batch"])
def test_other_norms_left_alone(form):
    gm, residuals, norms, before, after, _ = _rewritten(Layer(form).to(BF16), torch.randn(2, 8, 64, dtype=BF16))
    assert norms == [] and _rsqrts(gm) == 2
    assert len(residuals) == 2  # the residual sums still move: the norms are read by Inductor's kernel
    assert _rel(after, before) < 1e-2


def test_norm_read_elsewhere_left_alone():
    gm, _, norms, before, after, _ = _rewritten(Shared().to(BF16), torch.randn(2, 8, 64, dtype=BF16))
    assert norms == [] and _rsqrts(gm) == 1 and _count(gm, GROUPED) == 1
    assert torch.equal(after, before)


@pytest.mark.parametrize("how", ["broadcast", "fp32", "read_twice"])
def test_residuals_that_do_not_fit_left_alone(how):
    gm, residuals, _, before, after, _ = _rewritten(Broadcast(how).to(BF16), torch.randn(2, 8, 64, dtype=BF16))
    assert residuals == [] and _count(gm, GROUPED) == 0
    assert torch.equal(after, before)


def test_left_alone_where_it_does_not_pay():
    """The default rule (CPU tensors: no), fp32 (the kernel takes half precision) and grad mode."""
    x = torch.randn(2, 8, 64, dtype=BF16)
    gm = _traced(Layer().to(BF16), x)[0]
    assert rl.residual_linears(gm) == [] and nl.norm_linears(gm) == []
    gm = _traced(Layer(), x.float())[0]
    gt.gated_linears(gm, ALWAYS), gl.group_linears(gm, ALWAYS)
    assert rl.residual_linears(gm, ALWAYS) == [] and nl.norm_linears(gm) == []
    seen = []
    torch._dynamo.reset()
    torch.compile(Layer().to(BF16), backend=lambda gm, _: seen.append(gm) or gm.forward)(x)
    assert rl.residual_linears(seen[0], ALWAYS) == []


def test_optimize_reports_and_computes_the_same(monkeypatch):
    """transformers' Qwen2 as it is, its norm weights made far from one, through the backend with the
    rule forced on: per layer two residual adds and two norms move, the report says so, the logits are
    the model's at bf16 precision; with ``norm_linears=False`` nothing moves."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(gl, "pays", ALWAYS)
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    for on in (True, False):
        torch.manual_seed(0)
        model = transformers.Qwen2ForCausalLM(config).to(BF16).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layernorm" in name:
                    p.uniform_(0.5, 1.5)
            expected = model(ids).logits
            opt = fbcompile.optimize(model, fbcompile.Config(refresh="always", compiler="eager", norm_linears=on))
            got = opt(ids).logits
        report = fbcompile.explain(opt)
        moved = [g.norm_linears[role] for g in report.graphs for role in g.norm_linears]
        assert sum(len(r) for r, _ in moved) == (4 if on else 0) and sum(len(n) for _, n in moved) == (4 if on else 0)
        assert ("RMSNorms in the GEMMs after them" in str(report)) == on
        assert _rel(got, expected) < 1e-2


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_config_rejects_bad_norm_linears(value):
    with pytest.raises(ValueError, match="Config.norm_linears"):
        fbcompile.Config(norm_linears=value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("form", ["llama", "gemma"])
def test_gpu_triton_path(form):
    """The Triton path (norms in the loads, residuals in the stores) against the original graph."""
    model = Layer(form).to("cuda", BF16)
    gm, residuals, norms, before, after, _ = _rewritten(model, torch.randn(2, 16, 64, device="cuda", dtype=BF16) * 3)
    assert len(residuals) == 2 and len(norms) == 2
    assert _rel(after, before) < 1e-2
