"""Helpers the Triton kernel modules share."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``UPCAST`` (CPU interpreter only, whose bf16 dot is
    broken) does the same arithmetic on fp32 copies of the already-rounded operands."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


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
