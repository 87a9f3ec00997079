"""The cache of Inductor's Triton kernel analysis (``fbcompile.backends.kernel_analysis``).

A stand-in analysis counts its calls: arguments equal in everything the analysis reads (dtypes,
sizes, strides, values) share one call; any difference, a kernel from outside fbcompile, or an
argument it cannot describe, calls through.
"""
from __future__ import annotations

import pytest
import torch
from torch._higher_order_ops import triton_kernel_wrap

from fbcompile.backends import kernel_analysis

triton = pytest.importorskip("triton")
from fbcompile.kernels import triton_linear  # noqa: E402


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
