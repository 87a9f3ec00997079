"""The partial-sums pass (``fbcompile.passes.linear_partials``): a grouped or residual GEMM becomes
``fbcompile::linear_partials`` (fp32 partial sums over slices of the reduction) plus the sum, bias, cast
and residual add as graph ops, for Inductor to fold into the kernel that reads the result.

On the CPU the op computes each slice's product in fp32, so a rewrite is checked against the original
graph within rounding (fp32: 1e-5; bf16: the cast of a sum taken in another order); on a GPU its
Triton path. Forms: q/k/v with biases, o_proj and down with their residual, after the grouping,
gating and residual passes; and what the pass must leave alone."""
from __future__ import annotations

import os
import sys

import pytest
import torch

import fbcompile
from fbcompile.passes import gated_linears as gt
from fbcompile.passes import group_linears as gl
from fbcompile.passes import linear_partials as lp
from fbcompile.passes import residual_linears as rl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_group_linears import ALWAYS, BF16, _count, _traced, optimized_qwen2  # noqa: E402
from test_residual_linears import Layer  # noqa: E402

GROUPED = (torch.ops.fbcompile.linear_group.default,)
PARTIALS = (torch.ops.fbcompile.linear_partials.default,)
GATED = (torch.ops.fbcompile.gated_linear.default,)


def _rewritten(model, x, splits=4):
    """The passes in the backend's order, forced on with ``splits`` partial sums: the graph, the pass's
    lines, and the outputs before and after."""
    gm, example_inputs = _traced(model, x)
    with torch.no_grad():
        before = gm(*example_inputs)
        gt.gated_linears(gm, ALWAYS)
        gl.group_linears(gm, ALWAYS)
        rl.residual_linears(gm, ALWAYS)
        lines = lp.linear_partials(gm, ALWAYS, lambda x, w: splits)
        return gm, lines, before[0], gm(*example_inputs)[0], example_inputs


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape, splits", [((2, 8, 64), 4), ((1, 32, 64), 2), ((1, 5, 64), 3)])
def test_grouped_and_residual_gemms_become_partial_sums(bias, shape, splits):
    """bf16 (the kernels take half precision only: fp32 graphs keep their linears): within the rounding
    of a bf16 forward, here <= 1.5x the original's own distance to the fp32 forward (+1e-3)."""
    torch.manual_seed(sum(shape) + splits)
    model = Layer("residual_second", bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        truth = model(x)
    gm, lines, before, after, inputs = _rewritten(model.to(BF16), x.to(BF16), splits)
    # q/k grouped (with their biases), o and down with their residual; the gated gate/up launch stays whole
    assert len(lines) == 3 and all(f"over {splits} partial sums" in line for line in lines), lines
    assert _count(gm, PARTIALS) == 3 and _count(gm, GROUPED) == 0 and _count(gm, GATED) == 1
    assert after.dtype == before.dtype == BF16 and after.shape == before.shape
    assert _rel(after, truth) <= 1.5 * _rel(before, truth) + 1e-3, (_rel(after, truth), _rel(before, truth))
    # the sums matter: the first partial sum alone in place of each sum is far off
    for node in gm.graph.find_nodes(op="call_function", target=torch.sum):
        with gm.graph.inserting_before(node):
            first = gm.graph.call_function(torch.select, (node.args[0], 0, 0))
        node.replace_all_uses_with(first)
    gm.recompile()
    with torch.no_grad():
        assert _rel(gm(*inputs)[0], truth) > 0.05


def test_new_nodes_carry_example_values():
    """Later passes (the CUDA-graph ones) read each node's example value."""
    gm, lines, _, _, _ = _rewritten(Layer(bias=True).to(BF16), torch.randn(2, 8, 64, dtype=BF16))
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in PARTIALS:
            assert node.meta["example_value"].shape == (4, 2, 8, node.meta["example_value"].shape[-1])
            assert node.meta["example_value"].dtype == torch.float32
        if node.op == "call_function" and node.target is torch.sum:
            parts = node.args[0].meta["example_value"]
            assert node.meta["example_value"].shape == parts.shape[1:]


def test_split_launch_sums_each_piece_and_keeps_its_biases_in_the_first_partial():
    """q and k grouped with their biases: no split of a whole sum is left, each piece sums its own
    columns of the partials (Inductor inlines such a sum into each of the piece's readers), and the op
    takes the biases (none is added in the graph)."""
    gm, lines, before, after, _ = _rewritten(Layer(bias=True).to(BF16), torch.randn(2, 8, 64, dtype=BF16))
    assert not gm.graph.find_nodes(op="call_function", target=torch.split)
    assert not gm.graph.find_nodes(op="call_function", target=torch.cat)
    grouped = [n for n in gm.graph.find_nodes(op="call_function", target=PARTIALS[0]) if len(n.args[1]) == 2]
    assert len(grouped) == 1 and all(b is not None for b in grouped[0].args[3])
    narrows = sorted((u.args[2], u.args[3]) for u in grouped[0].users)
    assert all(u.target is torch.narrow for u in grouped[0].users) and narrows == [(0, 64), (64, 64)], narrows
    for u in grouped[0].users:
        assert [s.target for s in u.users] == [torch.sum]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("splits", [1, 3, 5])
def test_op_partials_sum_to_the_linears(bias, splits):
    """The op's own path off CUDA: the slices' fp32 products, the biases in the first only, sum to
    ``cat(linear(x, w, b))``; past ``K`` a slice holds zeros."""
    torch.manual_seed(splits)
    x = torch.randn(3, 5, 8)
    ws = [torch.randn(6, 8), torch.randn(4, 8)]
    bs = [torch.randn(6), torch.randn(4)] if bias else [None, None]
    parts = torch.ops.fbcompile.linear_partials(x, ws, splits, bs)
    ref = torch.cat([torch.nn.functional.linear(x, w, b) for w, b in zip(ws, bs)], -1)
    assert parts.shape == (splits, 3, 5, 10) and parts.dtype == torch.float32
    assert _rel(parts.sum(0), ref) < 1e-6
    if splits == 5:
        assert not parts[4].any()  # ceil(8 / 5) = 2 columns a slice: the fifth is past K


def test_left_alone_where_it_does_not_split_or_pay():
    """One partial sum (nothing to split), the default rule (CPU tensors: no), grad mode."""
    x = torch.randn(2, 8, 64, dtype=BF16)
    gm, lines, before, after, _ = _rewritten(Layer().to(BF16), x, splits=1)
    assert lines == [] and _count(gm, PARTIALS) == 0 and torch.equal(after, before)
    gm = _traced(Layer().to(BF16), x)[0]
    gl.group_linears(gm, ALWAYS)
    assert lp.linear_partials(gm) == []  # CPU: group_linears.pays says no, and the op would not split
    seen = []
    torch._dynamo.reset()
    torch.compile(Layer().to(BF16), backend=lambda gm, _: seen.append(gm) or gm.forward)(x)
    gl.group_linears(seen[0], ALWAYS)
    assert lp.linear_partials(seen[0], ALWAYS, lambda x, w: 4) == []


def test_optimize_reports_and_computes_the_same(monkeypatch):
    """transformers' Qwen2 as it is, through the backend with the rules forced on (4 partial sums): per
    layer q/k/v, o_proj and down split, the report says so, the logits are the model's within bf16
    rounding; with ``linear_partials=False`` nothing splits."""
    monkeypatch.setattr(gl, "pays", ALWAYS)
    monkeypatch.setattr(lp, "linear_partials_splits", lambda x, w: 4)
    for on in (True, False):
        expected, got, report = optimized_qwen2(linear_partials=on)
        split = [line for g in report.graphs for lines in g.linear_partials.values() for line in lines]
        assert len(split) == (6 if on else 0), split
        assert ("their partial sums added by the kernels that read them" in str(report)) == on
        assert _rel(got, expected) < 1e-2
        if not on:
            assert torch.equal(got, expected)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_config_rejects_bad_linear_partials(value):
    with pytest.raises(ValueError, match="Config.linear_partials"):
        fbcompile.Config(linear_partials=value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("bias", [False, True])
def test_gpu_triton_path(bias):
    """The Triton path (fp32 partials summed by the graph) against the original graph, at the default
    numbers of partial sums for a 1.5B layer's shapes."""
    model = Layer(bias=bias, h=1536, inter=8960).to("cuda", BF16)
    x = torch.randn(1, 32, 1536, device="cuda", dtype=BF16)
    gm, example_inputs = _traced(model, x)
    with torch.no_grad():
        before = gm(*example_inputs)[0]
        gt.gated_linears(gm)
        gl.group_linears(gm)
        rl.residual_linears(gm)
        lines = lp.linear_partials(gm)
        after = gm(*example_inputs)[0]
    if torch.cuda.get_device_capability()[0] != 9:
        assert lines == []
        return
    # q+k (3072 rows: 48 programs per slice) 2, o 4, down 5: as many as keep one program per SM
    assert len(lines) == 3 and [int(line.split("over ")[1].split()[0]) for line in lines] == [2, 4, 5], lines
    assert _rel(after, before) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("splits, kernels", [(2, 1), (5, 1), (7, 1), (8, 2)])
def test_gpu_inductor_folds_fewer_than_8_partial_sums_into_the_consumer(splits, kernels):
    """What :func:`fbcompile.kernels.triton_linear.partials_splits` relies on: Inductor sums up to 7
    partials inside the kernel that reads them (here the residual add and RMSNorm after o_proj/down);
    8 become a reduction kernel of their own."""
    from torch._inductor.utils import run_and_get_code

    def add_norm(p, r, w):
        h = r + p.sum(0).to(r.dtype)
        hf = h.float()
        return h, (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * w

    p = torch.randn(splits, 32, 1536, device="cuda")
    r = torch.randn(32, 1536, device="cuda", dtype=BF16)
    w = torch.randn(1536, device="cuda", dtype=BF16)
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(add_norm, dynamic=False), p, r, w)
    assert sum(c.count("@triton.jit") for c in code) == kernels
    for got, ref in zip(out, add_norm(p, r, w)):
        assert _rel(got, ref) < 1e-2


def test_diffusion_gemma_projections_split(monkeypatch):
    """transformers' DiffusionGemma as it is (q/k norms after the projections, sliding-window and global
    layers, MoE), bf16, the rules forced on with 4 partial sums: its grouped and residual launches split,
    and generation agrees with the same model without the pass (measured: every token; bf16 sums taken
    in another order may flip a near-tie. With each sum replaced by its first partial: 0.90)."""
    from test_diffusion_gemma import generate, make_model
    monkeypatch.setattr(gl, "pays", ALWAYS)
    monkeypatch.setattr(lp, "linear_partials_splits", lambda x, w: 4)
    try:
        make_model()
    except ValueError as e:  # the GPU machine's transformers (another version) builds no DiffusionGemma
        pytest.skip(f"this transformers cannot build DiffusionGemma: {str(e)[:80]}")
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(1))
    runs = {}
    for on in (True, False):
        torch._dynamo.reset()
        model = fbcompile.optimize(make_model(num_hidden_layers=2).to(BF16),
                                   fbcompile.Config(refresh="always", compiler="eager", linear_partials=on))
        runs[on] = generate(model, ids), fbcompile.explain(model)
    split = [line for g in runs[True][1].graphs for lines in g.linear_partials.values() for line in lines]
    assert len(split) >= 4, split
    new = runs[True][0][:, ids.shape[1]:]
    agreement = (new == runs[False][0][:, ids.shape[1]:]).float().mean().item()
    assert agreement >= 0.98, agreement
