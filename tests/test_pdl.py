"""Programmatic dependent launch (``triton_common.pdl_launch``): where the kernels take it, and (on a
Hopper GPU) that a chain of fbcompile's ops computes the same bits with it as without, eagerly and
replayed from a CUDA graph."""
from __future__ import annotations

import types

import pytest
import torch
from torch._library.triton import set_wrap_triton_enabled

triton = pytest.importorskip("triton")

import fbcompile.ops  # noqa: E402,F401  (registers torch.ops.fbcompile)
from fbcompile.kernels import triton_common  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def test_pdl_only_where_a_kernel_is_launched_directly(monkeypatch):
    """A launch that ``wrap_triton`` records for Inductor (tracing: its default) has no PDL option, so
    its kernel must not wait either way; an op's own call (wrap_triton off) launches with PDL, unless
    Inductor's own PDL is on."""
    monkeypatch.setattr(triton_common, "_runs_pdl", lambda device: True)
    gpu = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    assert triton_common.pdl_launch(gpu) == {"PDL": False}
    with set_wrap_triton_enabled(False):
        assert triton_common.pdl_launch(gpu) == {"PDL": True, "launch_pdl": True}
        assert triton_common.pdl_launch(torch.empty(1)) == {"PDL": False}
        with torch._inductor.config.patch({"triton.enable_pdl": True}):  # Inductor's kernels may skip the wait
            assert triton_common.pdl_launch(gpu) == {"PDL": False}
    monkeypatch.setattr(triton_common, "_runs_pdl", lambda device: False)  # before Hopper, or FBCOMPILE_PDL=0
    with set_wrap_triton_enabled(False):
        assert triton_common.pdl_launch(gpu) == {"PDL": False}


def _chain(h, w, out_ext, lse_ext):
    """One layer's reuse step as the LM runs it: q/k/v, attention merged with a cached external part,
    o_proj plus residual, a gated MLP, down plus residual (a split reduction and its sum launch)."""
    ops = torch.ops.fbcompile
    b, m, hidden = h.shape
    d = out_ext.shape[-1]
    kv_heads = w["k"].shape[0] // d
    q, k, v = ops.linear_group(h, [w["q"], w["k"], w["v"]], [w["bq"], w["bk"], w["bv"]]).split(
        [hidden, kv_heads * d, kv_heads * d], -1)
    q, k, v = (t.view(b, m, -1, d).transpose(1, 2) for t in (q, k, v))
    a = ops.attention_merge_lse(q, k, v, None, d ** -0.5, out_ext, lse_ext)[0]
    h = ops.linear_group(a.transpose(1, 2).reshape(b, m, hidden), [w["o"]], [None], h)
    g = ops.gated_linear(h, w["gate"], w["up"], None, None, "silu")
    return ops.linear_group(g, [w["down"]], [None], h)


@pytest.mark.skipif(not HOPPER, reason="programmatic dependent launch needs a Hopper GPU")
@pytest.mark.parametrize("rows", [32, 256])
def test_gpu_a_chain_of_ops_computes_the_same_bits_with_pdl(monkeypatch, rows):
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    hidden, inter, heads, kv_heads, d = 512, 2048, 4, 2, 128
    rand = lambda *s: torch.randn(*s, device=dev, dtype=dt) * 0.05  # noqa: E731
    layers = [dict(q=rand(hidden, hidden), k=rand(kv_heads * d, hidden), v=rand(kv_heads * d, hidden),
                   bq=rand(hidden), bk=rand(kv_heads * d), bv=rand(kv_heads * d), o=rand(hidden, hidden),
                   gate=rand(inter, hidden), up=rand(inter, hidden), down=rand(hidden, inter)) for _ in range(3)]
    b, m = rows // 32, 32
    ext = [(rand(b, heads, m, d), torch.randn(b, heads, m, device=dev) + 3) for _ in layers]
    h0 = rand(b, m, hidden)

    def run():
        h = h0
        for w, (o, lse) in zip(layers, ext):
            h = _chain(h, w, o, lse)
        return h

    results = {}
    for pdl in ("0", "1"):
        monkeypatch.setenv("FBCOMPILE_PDL", pdl)
        triton_common._runs_pdl.cache_clear()
        with set_wrap_triton_enabled(False):
            assert triton_common.pdl_launch(h0).get("launch_pdl", False) == (pdl == "1")
        eager = run()
        graph = torch.cuda.CUDAGraph()
        run()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            captured = run()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
        results[pdl] = eager
    triton_common._runs_pdl.cache_clear()
    assert torch.equal(results["0"], results["1"])
