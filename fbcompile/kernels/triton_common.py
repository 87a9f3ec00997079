"""Helpers the Triton kernel modules share."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch._inductor import config as inductor_config
from torch._library.triton import is_wrap_triton_enabled


@triton.jit
def dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``UPCAST`` (CPU interpreter only, whose bf16 dot is
    broken) does the same arithmetic on fp32 copies of the already-rounded operands."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def wait_for_prior_grid(PDL: tl.constexpr):
    """Under programmatic dependent launch (``PDL``, see :func:`pdl_launch`): let the next launch start
    now (its programs wait here in turn), then wait until the launch before this one has finished and
    its writes are visible. Every kernel launched with PDL must call this before it reads or writes
    global memory: a launch's completion then implies its predecessors', as without PDL."""
    if PDL == 1:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    elif PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


def pdl_launch(t: torch.Tensor) -> dict:
    """The launch options of a kernel over ``t`` that calls :func:`wait_for_prior_grid` first: with
    programmatic dependent launch (Hopper on; ``FBCOMPILE_PDL=0`` turns it off) where the kernel is
    launched directly, so that its launch and setup overlap the tail of the kernel before it; plain
    where ``wrap_triton`` records the launch into a graph for Inductor (which has no such option).

    Also plain while Inductor's own PDL is on (``torch._inductor.config.triton.enable_pdl``): its
    kernels wait only where they read what the kernel before them wrote, so one that does not could
    finish before an fbcompile kernel it followed, and the next kernel, waiting on it alone, would read
    that kernel's results too early."""
    if (t.is_cuda and _runs_pdl(t.device) and not is_wrap_triton_enabled()
            and not inductor_config.triton.enable_pdl):
        return {"PDL": 2 if os.environ.get("FBCOMPILE_PDL") == "early" else 1, "launch_pdl": True}
    return {"PDL": False}


@functools.lru_cache(maxsize=None)
def _runs_pdl(device: torch.device) -> bool:
    return (_runs_ptx(device) and torch.cuda.get_device_capability(device) >= (9, 0)
            and os.environ.get("FBCOMPILE_PDL", "1") != "0")


def upcast_dot(t: torch.Tensor) -> bool:
    """Whether ``dot`` must upcast: bf16 operands in the CPU interpreter."""
    return t.dtype == torch.bfloat16 and t.device.type != "cuda"


def ptx_asm(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device may run inline PTX of sm_80 (L2 cache policies): NVIDIA GPUs
    from Ampere on, compiled (Triton's interpreter and other GPUs run no PTX). ``False`` where there
    is no GPU to ask, as when host code is traced on fake CUDA tensors."""
    return t.is_cuda and _runs_ptx(t.device)


@functools.lru_cache(maxsize=None)
def _runs_ptx(device: torch.device) -> bool:
    """Cached: the launch path asks on every call."""
    return (torch.version.hip is None and os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter (CPU tensors): small, so tests still exercise several splits


# Plain-int helper: triton.cdiv costs ~3 us per call, too much on the launch path.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)
