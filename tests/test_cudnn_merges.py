"""``split_cudnn_merges``: an ``attention_merge_lse`` declared on cuDNN becomes ``attention_lse`` and
``merge_lse`` with the same results (on the CPU both run the reference; the rewrite is what is checked),
and calls it cannot rewrite stay. Its use by the compiler under CUDA graphs is checked in
``test_cuda_graphs.py::test_attention_on_cudnn_keeps_its_cache_unpadded``."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

import fbcompile  # noqa: F401  (registers torch.ops.fbcompile.*)
from fbcompile.passes.cudnn_merges import split_cudnn_merges

OPS = torch.ops.fbcompile


def split_attention(q, k_ext, v_ext, k, v, mask):
    external = OPS.attention_lse.default(q, k_ext, v_ext, None, 0.3)
    merged = OPS.attention_merge_lse.default(q, k, v, mask, 0.3, external[0], external[1])
    return merged[0] * 2, merged[1]


def returned_whole(q, k_ext, v_ext, k, v, mask):
    external = OPS.attention_lse.default(q, k_ext, v_ext, None, 0.3)
    return OPS.attention_merge_lse.default(q, k, v, mask, 0.3, external[0], external[1])


def targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]


def merge_name(gm: fx.GraphModule) -> str:
    return next(n.name for n in gm.graph.nodes if n.target is OPS.attention_merge_lse.default)


CASES = [  # (batch, query heads, KV heads, block, cached keys, head dim, dtype, masked)
    (1, 4, 4, 8, 20, 16, torch.float32, False),
    (2, 6, 2, 5, 33, 32, torch.float32, True),
    (1, 8, 1, 16, 7, 64, torch.bfloat16, False),
    (3, 4, 2, 1, 50, 8, torch.bfloat16, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}h{c[1]}/{c[2]}m{c[3]}n{c[4]}d{c[5]}-{c[6]}-m{c[7]:d}")
def test_a_merge_on_cudnn_becomes_attention_and_merge_with_the_same_results(case):
    B, Hq, Hkv, M, N, D, dtype, masked = case
    gen = torch.Generator().manual_seed(sum(case[:6]))
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    inputs = (randn(B, Hq, M, D), randn(B, Hkv, N, D), randn(B, Hkv, N, D), randn(B, Hkv, M, D),
              randn(B, Hkv, M, D), torch.rand(B, 1, M, M, generator=gen) > 0.3 if masked else None)
    if masked:
        inputs[-1][..., 0] = True  # every row keeps a key
    gm = fx.symbolic_trace(split_attention)
    expected, name = gm(*inputs), merge_name(gm)
    assert split_cudnn_merges(gm, frozenset({name})) == [name]
    assert OPS.attention_merge_lse.default not in targets(gm)
    assert targets(gm).count(OPS.attention_lse.default) == 2 and OPS.merge_lse.default in targets(gm)
    got = gm(*inputs)
    assert got[0].dtype == expected[0].dtype == dtype and got[1].dtype == expected[1].dtype
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


def test_calls_not_on_cudnn_or_used_whole_stay():
    gm = fx.symbolic_trace(split_attention)
    assert split_cudnn_merges(gm, frozenset({"another_call"})) == []
    whole = fx.symbolic_trace(returned_whole)
    assert split_cudnn_merges(whole, frozenset({merge_name(whole)})) == []
    for module in (gm, whole):
        assert OPS.attention_merge_lse.default in targets(module)
