"""The pass that runs linears over one input in one launch (``fbcompile.passes.group_linears``).

On the CPU the grouped op runs the plain linears, so a rewritten graph must equal the original
exactly; the tests force the pass on (``where``) to check which linears it groups and which it must
leave alone. On a GPU the Triton path is checked against eager through ``fbcompile.optimize``.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fbcompile
from fbcompile.passes import group_linears as gl
from fbcompile.passes.graph_utils import LINEARS

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.block_diffusion_lm import BlockDiffusionConfig, BlockDiffusionLM, init_random_weights  # noqa: E402

BF16 = torch.bfloat16
ALWAYS = lambda x, weights=None: True  # noqa: E731


class Layer(nn.Module):
    """q/k/v with bias over one input, o; gate/up without bias over another, down."""

    def __init__(self, h=64, q=64, kv=32, inter=96, v_bias=True):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(h, q), nn.Linear(h, kv), nn.Linear(h, kv, bias=v_bias)
        self.o = nn.Linear(q, h, bias=False)
        self.gate, self.up = nn.Linear(h, inter, bias=False), nn.Linear(h, inter, bias=False)
        self.down = nn.Linear(inter, h, bias=False)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = x + self.o(q * k.sum(-1, keepdim=True) + v.mean(-1, keepdim=True))
        return h + self.down(F.silu(self.gate(h)) * self.up(h))


def _traced(model, *inputs):
    """The dynamo graph of ``model`` and its example inputs."""
    seen = []

    def backend(gm, example_inputs):
        seen.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    return seen[0]


def _grouped(model, x, where=ALWAYS):
    gm, example_inputs = _traced(model, x)
    with torch.no_grad():
        before = gm(*example_inputs)
        groups = gl.group_linears(gm, where)
        return gm, groups, before, gm(*example_inputs)


def _count(gm, target):
    return sum(n.op == "call_function" and n.target in target for n in gm.graph.nodes)


@pytest.mark.parametrize("shape", [(2, 8, 64), (16, 64), (1, 32, 64)])
def test_qkv_and_gate_up_grouped_exactly(shape):
    model = Layer().to(BF16)
    gm, groups, before, after = _grouped(model, torch.randn(*shape, dtype=BF16))
    assert len(groups) == 2 and groups[0].startswith("3 linears") and groups[1].startswith("2 linears"), groups
    assert _count(gm, (torch.ops.fbcompile.linear_group.default,)) == 2
    assert _count(gm, LINEARS) == 2  # o and down: each alone over its input
    assert torch.equal(before[0] if isinstance(before, tuple) else before, after[0] if isinstance(after, tuple) else after)
    assert "linear_group" in gm.code


def test_bias_and_no_bias_grouped_apart():
    model = Layer(v_bias=False).to(BF16)
    gm, groups, before, after = _grouped(model, torch.randn(8, 64, dtype=BF16))
    assert sorted(g.split(" ")[0] for g in groups) == ["2", "2"], groups  # q+k (biased), gate+up; v alone
    assert _count(gm, LINEARS) == 3
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_left_alone_where_it_does_not_pay_or_apply():
    x = torch.randn(8, 64, dtype=BF16)
    assert gl.group_linears(_traced(Layer().to(BF16), x)[0]) == []  # default rule: CPU tensors
    assert gl.group_linears(_traced(Layer().to(BF16), x)[0], lambda x, weights: False) == []
    assert gl.group_linears(_traced(Layer(), x.float())[0], ALWAYS) == []  # fp32: the kernel takes half only
    # an inner weight of 40 rows cannot end on a 16-row tile: only gate/up group
    gm, groups, before, after = _grouped(Layer(q=40).to(BF16), x)
    assert len(groups) == 1 and "gate" in groups[0], groups
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_the_rule_sees_each_group_with_its_weights():
    """The rule is asked per group, with the group's weights: one that takes stacks of three only
    groups q/k/v and leaves gate/up as they are."""
    asked = []

    def three_only(x, weights):
        asked.append([tuple(w.shape) for w in weights])
        return len(weights) == 3

    gm, groups, before, after = _grouped(Layer().to(BF16), torch.randn(8, 64, dtype=BF16), three_only)
    assert sorted(asked) == [[(64, 64), (32, 64), (32, 64)], [(96, 64), (96, 64)]], asked
    assert len(groups) == 1 and groups[0].startswith("3 linears"), groups
    assert _count(gm, LINEARS) == 4  # o, gate, up, down
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("rows, outputs, k, expected", [
    (256, [1536, 256, 256], 1536, True),    # Qwen2-1.5B q/k/v at batch 8: 8.7 against 17.5 us (H100)
    (512, [1536, 256, 256], 1536, True),    # 10.5 against 18.9
    (128, [8960, 8960], 1536, True),        # its gated gate/up at batch 4: 25.6 against 32.0
    (256, [8960, 8960], 1536, False),       # at batch 8: 50.7 against 37.4
    (64, [1536], 8960, False),              # one weight (down): 15.9 against 15.3
    (4096, [1536], 1536, False),
])
def test_stacked_launches_pay_beyond_32_rows_while_their_gemm_is_small(rows, outputs, k, expected):
    """The measured rule beyond :data:`MAX_ROWS` (``benchmarks/results/linear_rows_h100.md``)."""
    assert gl.stacked_pays(rows, outputs, k) is expected


class LateWeight(nn.Module):
    """The second linear's weight is computed after the first linear: grouping must not move it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(32, 64)), nn.Parameter(torch.randn(32, 64))

    def forward(self, x):
        first = F.linear(x, self.a)
        return first, F.linear(x, self.b * first.mean())


def test_operand_computed_after_first_linear_not_grouped():
    gm, groups, before, after = _grouped(LateWeight().to(BF16), torch.randn(4, 64, dtype=BF16))
    assert groups == []
    assert all(torch.equal(a, b) for a, b in zip(before, after))


class WrittenBetween(nn.Module):
    """The input of two linears is written in place between them: the second reads the written value."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False)

    def forward(self, x):
        h = x * 2
        first = self.a(h)
        h.mul_(3)
        return first, self.b(h)


def test_a_write_between_the_linears_keeps_them_apart():
    """One launch before the first linear would read the input before the write."""
    gm, groups, before, after = _grouped(WrittenBetween().to(BF16), torch.randn(8, 64, dtype=BF16))
    assert groups == []
    assert all(torch.equal(a, b) for a, b in zip(before, after))


class Chained(nn.Module):
    """Two linears over the input, two more over the first one's output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(64, 64, bias=False) for _ in range(4))

    def forward(self, x):
        first = self.a(x)
        return self.b(x), self.c(first), self.d(first)


def test_a_group_over_another_groups_output():
    """The second group reads the first's output as the first's rewrite left it (once: the node it
    replaced, a graph that failed to lint)."""
    gm, groups, before, after = _grouped(Chained().to(BF16), torch.randn(8, 64, dtype=BF16))
    assert len(groups) == 2 and _count(gm, LINEARS) == 0, groups
    torch.testing.assert_close(after, before, rtol=2e-2, atol=2e-2)  # c, d read a column slice: other bf16 kernels


def test_dynamic_rows_not_grouped():
    model = Layer().to(BF16)
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=True)(torch.randn(8, 64, dtype=BF16))
    assert gl.group_linears(seen[0], ALWAYS) == []


def test_grad_mode_not_grouped_and_backward_works(monkeypatch):
    """Traced with autograd on, the linears keep their backward (the grouped op has none)."""
    monkeypatch.setattr(gl, "pays", ALWAYS)
    model, reference = Layer().to(BF16), Layer().to(BF16)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 64, dtype=BF16)
    opt = fbcompile.optimize(model, fbcompile.Config(compiler="eager"))
    opt(x).float().sum().backward()
    reference(x).float().sum().backward()
    assert "groups of linears" not in str(fbcompile.explain(opt))
    torch.testing.assert_close(model.q.weight.grad, reference.q.weight.grad)


def test_optimize_reports_groups_and_computes_the_same(monkeypatch):
    """Through the backend, forced on: the report lists the groups, and the model computes what it
    computes without them (on the CPU the grouped op runs the same linears; the projections, now
    column slices of one output, may take other bf16 kernels downstream: bf16 tolerance). Variance-
    preserving weights: the example's sharper default init amplifies bf16 rounding through the layers
    (1.2e-2 between the two on torch 2.11)."""
    monkeypatch.setattr(gl, "pays", ALWAYS)
    prompt = torch.randint(0, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    runs = {}
    for group in (True, False):
        tiny = init_random_weights(BlockDiffusionLM(BlockDiffusionConfig(dtype=BF16)), 0, scales={})
        model = fbcompile.optimize(tiny.to(BF16).eval(),
                                   fbcompile.Config(refresh="always", compiler="eager", group_linears=group))
        logits = []
        model.register_forward_hook(lambda module, args, out: logits.append(out[0].clone()))
        model.generate(prompt, num_blocks=2)
        runs[group] = (logits, str(fbcompile.explain(model)))
    (logits, report), (logits_off, report_off) = runs[True], runs[False]
    assert "groups of linears in one launch each" in report, report[-2000:]
    assert "groups of linears" not in report_off
    assert len(logits) == len(logits_off) > 0
    errors = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(logits, logits_off)]
    assert max(errors) < 1e-2, errors


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_config_rejects_bad_group_linears(value):
    with pytest.raises(ValueError, match="Config.group_linears"):
        fbcompile.Config(group_linears=value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_rule_and_triton_path():
    """The measured rule (Hopper, <= 32 rows) and the Triton path against the separate linears."""
    x = torch.randn(32, 64, device="cuda", dtype=BF16)
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert gl.pays(x) == hopper and not gl.pays(torch.randn(33, 64, device="cuda", dtype=BF16))
    x256 = torch.randn(8, 32, 1536, device="cuda", dtype=BF16)
    qkv = [torch.empty(n, 1536, device="cuda", dtype=BF16) for n in (1536, 256, 256)]
    assert gl.pays(x256, qkv) == hopper and not gl.pays(x256, qkv[:1]) and not gl.pays(x256)
    model = Layer().to("cuda", BF16)
    gm, groups, before, after = _grouped(model, torch.randn(2, 16, 64, device="cuda", dtype=BF16))
    assert len(groups) == 2
    torch.testing.assert_close(after, before, rtol=1e-2, atol=1e-2)


def optimized_qwen2(**fields):
    """transformers' Qwen2 as it is (2 small layers, bf16, seeded): its logits, those of the model
    optimized with ``Config(refresh="always", compiler="eager", **fields)``, and the report."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).to(BF16).eval()
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        opt = fbcompile.optimize(model, fbcompile.Config(refresh="always", compiler="eager", **fields))
        got = opt(ids).logits
    return expected, got, fbcompile.explain(opt)


def test_hf_qwen2_projections_grouped(monkeypatch):
    """transformers' Qwen2 as it is: per layer q/k/v (with bias) and gate/up in one launch each (the gate left
    to Inductor: with it, gate/up are the gated pass's, test_gated_linears)."""
    monkeypatch.setattr(gl, "pays", ALWAYS)
    expected, got, report = optimized_qwen2(gated_linears=False)
    groups = [line for g in report.graphs for lines in g.linear_groups.values() for line in lines]
    assert sorted(line.split(" ")[0] for line in groups) == ["2", "2", "3", "3"], groups
    assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < 1e-2
