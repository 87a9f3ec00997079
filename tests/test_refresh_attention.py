"""``fuse_refresh_attention``: an ``attention_lse`` whose result an ``attention_merge_lse`` merges becomes
one ``attention_refresh_lse`` with the same results, in exact graphs and in refresh graphs (which also
return the external part), and pairs it cannot join stay. On the CPU the op runs the two ops it
replaces, so results must be equal bit for bit; its Triton path is checked against the reference in
``test_triton_kernels.py::test_attention_refresh_lse`` (and on a GPU by the compiled models' tests)."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

import fbcompile
from attention_zoo import ZooSpec, build, make_inputs
from fbcompile.passes.refresh_attention import fuse_refresh_attention

OPS = torch.ops.fbcompile


def exact(q, k_ext, v_ext, k, v, mask):
    external = OPS.attention_lse.default(q, k_ext, v_ext, None, 0.3)
    merged = OPS.attention_merge_lse.default(q, k, v, mask, 0.3, external[0], external[1])
    return merged[0] * 2


def refresh(q, k_ext, v_ext, k, v, mask):
    """Also returns the external part (for the reuse steps) and the merged LSE; the block's keys are
    computed after the external call."""
    external = OPS.attention_lse.default(q, k_ext, v_ext, None, 0.3)
    k = k * 1.5
    merged = OPS.attention_merge_lse.default(q, k, v, mask, 0.3, external[0], external[1])
    return merged[0], merged[1], external[0], external[1]


def counted(q, k_ext, v_ext, k, v, mask):
    count = torch.full((1,), k_ext.shape[2] - 3, dtype=torch.int32)
    external = OPS.attention_lse.default(q, k_ext, v_ext, None, 0.3, count)
    return OPS.attention_merge_lse.default(q, k, v, mask, 0.3, external[0], external[1])


def other_scale(q, k_ext, v_ext, k, v, mask):
    external = OPS.attention_lse.default(q, k_ext, v_ext, None, 0.3)
    return OPS.attention_merge_lse.default(q, k, v, mask, 0.25, external[0], external[1])


def other_query(q, k_ext, v_ext, k, v, mask):
    external = OPS.attention_lse.default(q * 2, k_ext, v_ext, None, 0.3)
    return OPS.attention_merge_lse.default(q, k, v, mask, 0.3, external[0], external[1])


def keys_from_the_external_part(q, k_ext, v_ext, k, v, mask):
    """The block's keys read the external result: no place for one call that computes both."""
    external = OPS.attention_lse.default(q, k_ext, v_ext, None, 0.3)
    k = k + external[0].mean()
    return OPS.attention_merge_lse.default(q, k, v, mask, 0.3, external[0], external[1])


def written_between(q, k_ext, v_ext, k, v, mask):
    """Fast-dLLM v2: the block cache is written in place after the external part (here the cached keys
    themselves: the pass cannot tell which tensors share memory), so the external part cannot move to
    the merge."""
    external = OPS.attention_lse.default(q, k_ext, v_ext, None, 0.3)
    k_ext.narrow(2, 0, 2).copy_(k.narrow(2, 0, 2))
    return OPS.attention_merge_lse.default(q, k, v, mask, 0.3, external[0], external[1])


def merged_externals(q, k_ext, v_ext, k, v, mask):
    """A dual cache: the merge takes a merge of two external parts."""
    head = OPS.attention_lse.default(q, k_ext, v_ext, None, 0.3)
    tail = OPS.attention_lse.default(q, k_ext * 2, v_ext, None, 0.3)
    both = OPS.merge_lse.default(head[0], head[1], tail[0], tail[1])
    return OPS.attention_merge_lse.default(q, k, v, mask, 0.3, both[0], both[1])


def targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]


def inputs(case, seed: int):
    B, Hq, Hkv, M, N, D, dtype, masked = case
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    mask = torch.rand(B, 1, M, M, generator=gen) > 0.3 if masked else None
    if masked:
        mask[..., 0] = True  # every row keeps a key
    return randn(B, Hq, M, D), randn(B, Hkv, N, D), randn(B, Hkv, N, D), randn(B, Hkv, M, D), randn(B, Hkv, M, D), mask


CASES = [  # (batch, query heads, KV heads, block, cached keys, head dim, dtype, masked)
    (1, 4, 4, 8, 20, 16, torch.float32, False),
    (2, 6, 2, 5, 33, 32, torch.float32, True),
    (1, 8, 1, 16, 7, 64, torch.bfloat16, False),
    (3, 4, 2, 1, 50, 8, torch.bfloat16, True),
]


@pytest.mark.parametrize("graph", [exact, refresh, counted])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}h{c[1]}/{c[2]}m{c[3]}n{c[4]}d{c[5]}-{c[6]}-m{c[7]:d}")
def test_a_split_attention_becomes_one_op_with_the_same_results(graph, case):
    gm = fx.symbolic_trace(graph)
    args = inputs(case, seed=sum(case[:6]))
    expected = gm(*args)
    merge = next(n.name for n in gm.graph.nodes if n.target is OPS.attention_merge_lse.default)
    assert fuse_refresh_attention(gm) == [merge]
    assert OPS.attention_lse.default not in targets(gm) and OPS.attention_merge_lse.default not in targets(gm)
    assert targets(gm).count(OPS.attention_refresh_lse.default) == 1
    gm.graph.lint()
    got = gm(*args)
    for a, b in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("graph", [other_scale, other_query, keys_from_the_external_part, written_between,
                                   merged_externals])
def test_pairs_it_cannot_join_stay(graph):
    gm = fx.symbolic_trace(graph)
    before = targets(gm)
    assert fuse_refresh_attention(gm) == []
    assert targets(gm) == before and OPS.attention_refresh_lse.default not in before


@pytest.mark.parametrize("refresh_policy", ["always", "block"])
@torch.no_grad()
def test_compiled_graphs_computing_the_external_part_take_the_joint_op(refresh_policy):
    """In an optimized model the exact graph (``"always"``), or the refresh graph (``"block"``), has the
    joint op and the reuse graph the merge alone; the refreshes agree with the original model."""
    spec = ZooSpec(mask="window", gqa="expand")
    model = build(spec).eval()
    args = make_inputs(spec, seed=6)
    expected = model(*args)
    fbcompile.optimize(model, fbcompile.Config(compiler="eager", refresh=refresh_policy))
    got = model(*args)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    model(*args)
    graphs = {role: targets(gm) for g in fbcompile.explain(model).graphs
              for role, (gm, _, _) in g.attention_graphs.items()}
    computes = "exact" if refresh_policy == "always" else "refresh"
    assert OPS.attention_refresh_lse.default in graphs[computes], graphs
    assert OPS.attention_lse.default not in graphs[computes] and OPS.attention_merge_lse.default not in graphs[computes]
    if refresh_policy == "block":
        assert OPS.attention_merge_lse.default in graphs["reuse"], graphs
    report = str(fbcompile.explain(model))
    assert "attention parts: 2 on reference" in report  # both parts of the joint op
    assert f"{computes}: 1 split attentions with both parts and their merge in one op" in report, report
    assert "reuse: 1 split attentions" not in report


@torch.no_grad()
def test_config_joint_attention_false_keeps_the_two_ops():
    """``Config(joint_attention=False)``: the exact graph keeps ``attention_lse`` and the merge, and
    explain says nothing of a joint op."""
    spec = ZooSpec(mask="window", gqa="expand")
    model = build(spec).eval()
    args = make_inputs(spec, seed=7)
    expected = model(*args)
    fbcompile.optimize(model, fbcompile.Config(compiler="eager", refresh="always", joint_attention=False))
    torch.testing.assert_close(model(*args), expected, rtol=1e-5, atol=1e-6)
    report = fbcompile.explain(model)
    (ops,) = [targets(gm) for g in report.graphs for gm, _, _ in g.attention_graphs.values()]
    assert OPS.attention_lse.default in ops and OPS.attention_merge_lse.default in ops, ops
    assert OPS.attention_refresh_lse.default not in ops
    assert "in one op" not in str(report)
