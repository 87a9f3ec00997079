"""A Triton GEMM for the weight projections of a block step: ``y = x @ w.T + b`` with few rows.

A block step multiplies a block's few rows (batch x block: 32-256) by every weight matrix, so its
GEMMs are bound by reading the weights once from HBM. cuBLAS reaches 27-39% of the bandwidth there
(``benchmarks/results/small_m_linear_h200.md``): its tiles are shaped for many rows, so a 1536-wide
projection becomes a dozen programs that cannot keep the memory system busy. This kernel tiles the
*weight rows* instead (the operands swapped: ``y.T = w @ x.T``), in narrow tiles so that even small
projections spread over all SMs, and splits long reductions (``K``) over programs whose fp32
partials a second small kernel sums (with the cast; the first partial holds the bias), or (:func:`linear_partials`) the
caller's graph sums where it reads the result.

Configs are a function of ``(M, N, K)`` and the SM count only: no autotuning, no host syncs, so the
launches trace (``torch.library.triton_op``) and are captured in CUDA graphs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fbcompile.kernels.triton_common import cdiv, dot, num_sms, upcast_dot

_DTYPES = (torch.float16, torch.bfloat16)


class LinearConfig(NamedTuple):
    """One launch shape: weight rows per program, rows of ``x`` per program, the reduction tile, how
    many programs share one reduction, and Triton's warps and pipeline stages."""

    block_n: int
    block_m: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _gate(g, up, ACT: tl.constexpr):
    """``act(g) * up`` in fp32 from the two projections rounded to ``g``'s dtype (as the model's linears
    round them), rounded once (as Inductor's fused kernel for it does); ``ACT``: 1 SiLU, 2 GELU with
    the tanh approximation (``tanh(y) = 2 sigmoid(2y) - 1``)."""
    gf = g.to(tl.float32)
    if ACT == 1:
        a = gf * tl.sigmoid(gf)
    else:
        a = gf * tl.sigmoid(1.5957691216057308 * (gf + 0.044715 * gf * gf * gf))
    return (a * up.to(tl.float32)).to(g.dtype)


@triton.jit
def _linear_kernel(X, W0, W1, W2, B0, B1, B2, R, Y, sxm, sxk, swn, swk, srm, srn, sym, syn, M, N, N1, N2, K,
                   k_per_split, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, EVEN_K: tl.constexpr,
                   UPCAST_DOT: tl.constexpr, ACT: tl.constexpr, RESIDUAL: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``Y[m, n] = sum_k X[m, k] W[n, k] (+ B[n])`` over the ``k`` range ``pid_k`` owns, where ``W``
    and ``B`` stack up to three weights and biases (rows ``[0, N1)``, ``[N1, N2)``, ``[N2, N)``; the
    boundaries are multiples of ``BLOCK_N``, so each program reads one). ``ACT > 0``: a gated MLP's
    ``act(X W0^T + B0) * (X W1^T + B1)`` instead (``N1 = N2 = N``), each program reading the same rows of
    both weights, the gate applied in the epilogue (:func:`_gate`). With ``PARTIAL`` it stores the
    fp32 partials at ``Y[pid_k]`` instead (no gate; with ``ACT`` the up projection's after the gate's,
    ``2 N`` per row), the bias in the first slice's only, so that a sum of the slices is the result and
    reads no bias of its own. ``RESIDUAL``: ``R`` added to the result, rounded as the model's
    ``residual + linear(...)`` rounds."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    n_start = pid_n * BLOCK_N
    if n_start < N1:
        W, B, n_lo, n_hi = W0, B0, 0, N1
    elif n_start < N2:
        W, B, n_lo, n_hi = W1, B1, N1, N2
    else:
        W, B, n_lo, n_hi = W2, B2, N2, N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < n_hi
    m_ok = offs_m < M
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_offs = (offs_n - n_lo)[:, None] * swn + (k_lo + offs_k)[None, :] * swk
    w_ptrs = W + w_offs
    u_ptrs = W1 + w_offs  # the up projection's rows (ACT)
    x_ptrs = X + offs_m[None, :] * sxm + (k_lo + offs_k)[:, None] * sxk
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            x_ok = m_ok[None, :]
            w_ok = n_ok[:, None]
        else:
            k_ok = (k + offs_k) < k_hi
            x_ok = m_ok[None, :] & k_ok[:, None]
            w_ok = n_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptrs, mask=x_ok, other=0.0)
        acc += dot(tl.load(w_ptrs, mask=w_ok, other=0.0), x, "ieee", UPCAST_DOT)
        if ACT != 0:
            acc_up += dot(tl.load(u_ptrs, mask=w_ok, other=0.0), x, "ieee", UPCAST_DOT)
            u_ptrs += BLOCK_K * swk
        w_ptrs += BLOCK_K * swk
        x_ptrs += BLOCK_K * sxk
    y_mask = n_ok[:, None] & m_ok[None, :]
    if HAS_BIAS:
        b_ok = n_ok & (pid_k + 0 * offs_n == 0)  # the first slice's (the only one without PARTIAL)
        acc += tl.load(B + offs_n - n_lo, mask=b_ok, other=0.0).to(tl.float32)[:, None]
        if ACT != 0:
            acc_up += tl.load(B1 + offs_n, mask=b_ok, other=0.0).to(tl.float32)[:, None]
    if PARTIAL:
        row = 2 * N if ACT != 0 else N
        y_ptrs = Y + pid_k * M * row + offs_m[None, :] * row + offs_n[:, None]
        tl.store(y_ptrs, acc, mask=y_mask)
        if ACT != 0:
            tl.store(y_ptrs + N, acc_up, mask=y_mask)
    else:
        y = acc.to(Y.dtype.element_ty)
        if ACT != 0:
            y = _gate(y, acc_up.to(Y.dtype.element_ty), ACT)
        if RESIDUAL:
            r = tl.load(R + offs_m[None, :] * srm + offs_n[:, None] * srn, mask=y_mask, other=0.0)
            y = (y.to(tl.float32) + r.to(tl.float32)).to(Y.dtype.element_ty)
        tl.store(Y + offs_m[None, :] * sym + offs_n[:, None] * syn, y, mask=y_mask)


@triton.jit
def _sum_splits_kernel(P, R, Y, M, N, srm, srn, sym, syn, SPLIT_K: tl.constexpr, ACT: tl.constexpr,
                       RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """``Y = sum_s P[s]``: the fp32 partials of a split reduction (the first holds the bias), cast to
    ``Y``'s dtype. ``ACT > 0``: ``P`` holds the gate's and the up projection's partials side by side,
    and ``Y`` is the gated product. ``RESIDUAL``: ``R`` added after the cast."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    m = offs // N
    n = offs % N
    row = 2 * N if ACT != 0 else N
    p = P + m * row + n
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p + s * M * row, mask=ok, other=0.0)
        if ACT != 0:
            acc_up += tl.load(p + s * M * row + N, mask=ok, other=0.0)
    y = acc.to(Y.dtype.element_ty)
    if ACT != 0:
        y = _gate(y, acc_up.to(Y.dtype.element_ty), ACT)
    if RESIDUAL:
        r = tl.load(R + m * srm + n * srn, mask=ok, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + m * sym + n * syn, y, mask=ok)


MAX_GROUP = 3  # weights one launch can stack: a q/k/v projection
ACTIVATIONS = {"silu": 1, "gelu_tanh": 2}  # the gates the kernel applies in its epilogue (ACT)


def config_for(M: int, N: int, K: int, sms: int, boundaries: tuple[int, ...] = ()) -> LinearConfig:
    """The launch shape for ``M`` rows over an ``[N, K]`` weight (stacked at ``boundaries``).

    From the H200 sweep (``benchmarks/results/skinny_linear_h200.md``, 32 rows): 64-row weight tiles,
    narrowed to 16 (dividing the boundaries) while they make fewer than half as many programs as SMs,
    unless the reduction is long (K >= 4096: wide tiles read better, and a split finds the programs),
    then a split reduction while the programs still fit the SMs once; five stages.
    """
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    m_tiles = cdiv(M, block_m)
    block_n = 64
    while block_n > 16 and ((cdiv(N, block_n) * m_tiles < sms // 2 and K < 4096)
                            or any(b % block_n for b in boundaries)):
        block_n //= 2
    programs = cdiv(N, block_n) * m_tiles
    block_k = 128
    split_k = 1
    while 2 * programs * split_k <= sms and K // (2 * split_k) >= 2 * block_k:
        split_k *= 2
    return LinearConfig(block_n, block_m, block_k, split_k, 4, 5 if block_m <= 32 else 3)


def partials_splits(M: int, N: int, K: int, sms: int) -> int:
    """How many slices of the reduction :func:`linear_partials` should take at ``M`` rows over an
    ``[N, K]`` weight: as many as keep 64-row weight tiles within one program per SM, each slice at least
    two 128-wide reduction tiles, at most 7 (Inductor unrolls a sum of fewer than 8 terms into the
    consumer's kernel; 8 became a kernel of its own), counting only slices that hold a tile. At Qwen2-1.5B's
    32 rows: q/k/v 4 (128 programs), o_proj 4 (5 would leave one empty), down 5 (120 programs: 9.42 us
    against 9.89 at 4, ``benchmarks/results/linear_tune_h200.md``)."""
    programs = cdiv(N, 64) * cdiv(M, 32)
    splits = 1
    while splits < 7 and programs * (splits + 1) <= sms and K // (splits + 1) >= 2 * 128:
        splits += 1
    tiles = cdiv(K, 128)
    return cdiv(tiles, cdiv(tiles, splits))


def partials_config_for(M: int, N: int, K: int, splits: int, sms: int, boundaries: tuple[int, ...] = ()) -> LinearConfig:
    """The launch shape of :func:`linear_partials`: 64-row weight tiles (dividing the boundaries)."""
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 64
    while block_n > 16 and any(b % block_n for b in boundaries):
        block_n //= 2
    return LinearConfig(block_n, block_m, 128, splits, 4, 5 if block_m <= 32 else 3)


def gated_config_for(M: int, N: int, K: int, sms: int) -> LinearConfig:
    """The launch shape of a gated pair of ``[N, K]`` weights: that of the two stacked, each program
    reading its rows of both weights over half the reduction tile (the same shared memory per stage,
    half as many programs). At Qwen2-1.5B's gate/up (32 rows) that took 17.6 us against 21.7 for the
    rows split between the weights at the full tile, and 23.8 for cuBLAS and the gate's own kernel
    (``benchmarks/results/gated_linears_h200.md``). Four pipeline stages rather than five at up to 32
    rows: at that gate/up 22.97 against 23.60 us on the H100 (the fastest of 24 configs; a read of the
    same bytes alone takes 20.22), 17.26 against 17.35 on the H200 (``linear_tune_gated_h100.json``,
    ``linear_tune_gated_h200.json``)."""
    cfg = config_for(M, 2 * N, K, sms, (N,))
    return cfg._replace(block_k=max(16, cfg.block_k // 2), num_stages=min(cfg.num_stages, 4))


def supports(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None]) -> bool:
    """Half-precision operands of one dtype; up to :data:`MAX_GROUP` 2-D weights over ``x``'s last
    dim with the same strides, the inner ones with multiples of 16 rows; biases for all or none."""
    K = x.shape[-1] if x.dim() >= 1 else -1
    return (x.dtype in _DTYPES and 1 <= len(weights) <= MAX_GROUP and len(biases) == len(weights)
            and all(w.dtype == x.dtype and w.dim() == 2 and w.shape[1] == K and w.stride() == weights[0].stride()
                    for w in weights)
            and all(w.shape[0] % 16 == 0 for w in weights[:-1])
            and (all(b is None for b in biases)
                 or all(b is not None and b.dtype == x.dtype and b.shape == (w.shape[0],) and b.stride() == (1,)
                        for w, b in zip(weights, biases))))


def supports_gate(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], act: str) -> bool:
    """Whether :func:`linear` computes ``act(x @ weights[0].T) * (x @ weights[1].T)`` (with the
    biases): a known activation and two weights of one shape and layout, each of which :func:`supports`
    (any number of rows: the two are not stacked), biases for both or neither."""
    return (act in ACTIVATIONS and len(weights) == len(biases) == 2 and weights[0].shape == weights[1].shape
            and weights[0].stride() == weights[1].stride() and (biases[0] is None) == (biases[1] is None)
            and all(supports(x, [w], [b]) for w, b in zip(weights, biases)))


def supports_residual(x: torch.Tensor, rows: int, residual: torch.Tensor) -> bool:
    """Whether :func:`linear` can add ``residual`` to its ``[..., rows]`` result over ``x``: the result's
    shape (no broadcasting) and dtype."""
    return (residual.dtype == x.dtype and residual.device == x.device
            and tuple(residual.shape) == (*x.shape[:-1], rows))


def _launch(x2, weights, biases, out, y, residual, cfg, gate, split_k, N, N1, N2, partial):
    """One launch of :func:`_linear_kernel` over ``split_k`` slices of the reduction: the result into
    ``y``, or (``partial``) the fp32 partials into ``out``."""
    M, K = x2.shape
    ws = (weights + [weights[-1]] * MAX_GROUP)[:MAX_GROUP]
    has_bias = biases[0] is not None
    bs = (list(biases) + [biases[-1]] * MAX_GROUP)[:MAX_GROUP] if has_bias else ws
    k_per_split = cdiv(cdiv(K, split_k), cfg.block_k) * cfg.block_k
    r2 = residual if residual is not None else y
    wrap_triton(_linear_kernel)[(cdiv(N, cfg.block_n), split_k, cdiv(M, cfg.block_m))](
        x2, *ws, *bs, r2, out, x2.stride(0), x2.stride(1), ws[0].stride(0), ws[0].stride(1),
        r2.stride(0), r2.stride(1), y.stride(0), y.stride(1), M, N, N1, N2, K, k_per_split,
        HAS_BIAS=has_bias, PARTIAL=partial, UPCAST_DOT=upcast_dot(x2), EVEN_K=K % k_per_split == 0,
        ACT=gate, RESIDUAL=residual is not None, BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _stack_bounds(sizes: list[int]) -> tuple[int, int, int]:
    """``N`` and the boundaries ``N1``, ``N2`` of up to three stacked weights of ``sizes`` rows."""
    N = sum(sizes)
    N1 = sizes[0] if len(sizes) > 1 else N
    N2 = N1 + sizes[1] if len(sizes) > 2 else N
    return N, N1, N2


def linear(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None], *,
           config: LinearConfig | None = None, act: str | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)`` in one launch (two with
    a split reduction) through :func:`_linear_kernel`. With ``act`` (:data:`ACTIVATIONS`) and a gate
    and an up weight, a gated MLP's ``act(F.linear(x, w0, b0)) * F.linear(x, w1, b1)``: the gate
    applied where the GEMM stores its result, so it has no kernel of its own (``config.block_n``: the
    rows of each weight per program). ``residual``: added to the result as it is stored. Traceable
    host code (shapes must be static for the config choice)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    sizes = [w.shape[0] for w in weights]
    if act is not None:
        N = N1 = N2 = sizes[0]
        cfg = config or gated_config_for(M, N, K, num_sms(x.device))
    else:
        N, N1, N2 = _stack_bounds(sizes)
        cfg = config or config_for(M, N, K, num_sms(x.device), (N1, N2))
        torch._check(N1 % cfg.block_n == 0 and N2 % cfg.block_n == 0 or len(sizes) == 1,
                     lambda: f"stacked weights {sizes} must split at multiples of {cfg.block_n} rows")
    gate = 0 if act is None else ACTIVATIONS[act]
    y = x.new_empty(M, N)
    split_k = cdiv(K, cdiv(cdiv(K, cfg.split_k), cfg.block_k) * cfg.block_k)
    partial = split_k > 1
    out = x.new_empty(split_k, M, 2 * N if gate else N, dtype=torch.float32) if partial else y
    r2 = residual.reshape(M, N) if residual is not None else None
    _launch(x2, weights, biases, out, y, r2, cfg, gate, split_k, N, N1, N2, partial)
    if partial:
        block = 1024
        res = y if r2 is None else r2  # (a pointer the kernel does not read without RESIDUAL)
        wrap_triton(_sum_splits_kernel)[(cdiv(M * N, block),)](
            out, res, y, M, N, res.stride(0), res.stride(1), y.stride(0), y.stride(1),
            SPLIT_K=split_k, ACT=gate, RESIDUAL=r2 is not None, BLOCK=block, num_warps=4)
    return y.reshape(*x.shape[:-1], N)


def linear_partials(x: torch.Tensor, weights: list[torch.Tensor], splits: int,
                    biases: list[torch.Tensor | None] | None = None, *,
                    config: LinearConfig | None = None) -> torch.Tensor:
    """``torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)`` as fp32 partial sums
    over ``splits`` slices of the reduction (of whole ``block_k`` tiles), ``[splits, *x.shape[:-1], N]``,
    the biases in the first, in one launch and without the kernel that sums them: the caller's compiler
    sums them where it reads the result (Inductor fuses a sum of up to 8 terms into the consumer's
    kernel), so a split reduction costs no launch of its own. Slices past ``K`` hold zeros."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    sizes = [w.shape[0] for w in weights]
    N, N1, N2 = _stack_bounds(sizes)
    cfg = config or partials_config_for(M, N, K, splits, num_sms(x.device), (N1, N2))
    torch._check(N1 % cfg.block_n == 0 and N2 % cfg.block_n == 0 or len(sizes) == 1,
                 lambda: f"stacked weights {sizes} must split at multiples of {cfg.block_n} rows")
    out = x.new_empty(splits, M, N, dtype=torch.float32)
    _launch(x2, weights, biases or [None], out, out[0], None, cfg._replace(split_k=splits), 0, splits, N, N1, N2,
            True)
    return out.reshape(splits, *x.shape[:-1], N)
