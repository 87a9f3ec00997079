"""The cache of Inductor's Triton kernel analysis (``fbcompile.backends.kernel_analysis``).

A stand-in analysis counts its calls: arguments equal in everything the analysis reads (dtypes,
sizes, strides, values) share one call; any difference, a kernel from outside fbcompile, or an
argument it cannot describe, calls through.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch._higher_order_ops import triton_kernel_wrap

from fbcompile.backends import kernel_analysis

triton = pytest.importorskip("triton")
from fbcompile.kernels import triton_attention, triton_linear  # noqa: E402


@triton.jit
def _outside_kernel(X):  # stands for a user's kernel: its module is not fbcompile's
    pass


_outside_kernel.fn.__module__ = "user_code"


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def analysis(kernel, kwargs, tma):
        seen.append(kwargs)
        return ("accesses", len(seen))

    for name in kernel_analysis._ANALYSES:  # torch 2.11 names it identify_mutated_tensors
        monkeypatch.setattr(triton_kernel_wrap, name, analysis, raising=False)
    kernel_analysis.install()
    assert _analyse() is not analysis
    return seen


def _analyse():
    """The analysis the installed torch calls (wrapped by the fixture)."""
    return getattr(triton_kernel_wrap, kernel_analysis._ANALYSES[0])


def _args(M=32, dtype=torch.bfloat16, stride=(64, 1)):
    return dict(X=torch.empty_strided((M, 64), stride, dtype=dtype), M=M, BLOCK_N=16)


def test_same_arguments_analysed_once(calls):
    analyse = _analyse()
    first = analyse(triton_linear._linear_kernel, _args(), {})
    assert analyse(triton_linear._linear_kernel, _args(), {}) == first  # new tensors, same description
    assert len(calls) == 1
    analyse(triton_linear._linear_kernel, _args(M=16), {})  # an int and a size differ
    analyse(triton_linear._linear_kernel, _args(dtype=torch.float16), {})
    analyse(triton_linear._linear_kernel, _args(stride=(128, 1)), {})
    analyse(triton_linear._sum_splits_kernel, _args(), {})  # another kernel
    analyse(triton_linear._linear_kernel, _args(), {"X": "tma"})  # other TMA descriptors
    assert len(calls) == 6


def test_outside_kernels_and_unknown_arguments_call_through(calls):
    analyse = _analyse()
    for _ in range(2):
        analyse(_outside_kernel, _args(), {})
        analyse(triton_linear._linear_kernel, dict(_args(), extra=object()), {})
    assert len(calls) == 4


def test_install_is_idempotent(calls):
    wrapped = _analyse()
    kernel_analysis.install()
    assert _analyse() is wrapped


def test_inline_ptx_stores_are_analysed_as_tl_stores(calls):
    """The analysis cannot read a store by inline PTX: an fbcompile kernel is analysed with its PTX
    stores switched to ``tl.store`` (the same accesses), one cache entry for both; others as they are."""
    analyse = _analyse()
    analyse(triton_attention._attn_kernel, dict(_args(), CHUNK_STORE_PTX=True), {})
    analyse(triton_attention._attn_kernel, dict(_args(), CHUNK_STORE_PTX=False), {})
    analyse(_outside_kernel, dict(_args(), CHUNK_STORE_PTX=True), {})
    assert [c["CHUNK_STORE_PTX"] for c in calls] == [False, True]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreted kernels have no TTIR to analyse")
def test_functionalization_clones_what_the_attention_kernel_writes(monkeypatch):
    """AOT/Inductor's functionalized refresh (fake CUDA tensors; torch's real analysis, compiling the
    kernels for sm90) clones only what the kernels write when the chunk LSEs are stored by inline PTX,
    as with ``tl.store``: not the queries, keys and values, as an analysis that cannot read the PTX would."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from triton.backends.compiler import GPUTarget

    class SM90:  # the analysis compiles for the active driver's target: there is none on the CPU
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    monkeypatch.setattr(triton.runtime.driver, "_active", SM90())
    monkeypatch.setattr(triton_attention, "_num_sms", lambda device: 132)

    def refresh(ptx):
        def run(q, k, v):
            tile_mass = torch.empty(1, 2, 16, device=q.device)
            return *triton_attention._attention(q, k, v, None, 0.1, tiles=(64, tile_mass), CHUNK_STORE_PTX=ptx), \
                tile_mass
        return run

    clones = {}
    for ptx in (False, True):
        with FakeTensorMode():
            q = torch.empty(1, 12, 32, 128, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.empty(1, 2, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            graph = make_fx(torch.func.functionalize(refresh(ptx)))(q, k, v).graph
        clones[ptx] = [node.kwargs["tensors_to_clone"] for node in graph.nodes
                       if node.target is triton_kernel_wrap.triton_kernel_wrapper_functional]
    assert clones[True] == clones[False] == [["OPart", "LPart", "ChunkLse"], ["Out", "Lse", "TileMass"]]
