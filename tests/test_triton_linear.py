"""The skinny-GEMM Triton kernel (``fbcompile.kernels.triton_linear``) against ``F.linear`` in fp64.

Shapes cover the block-step range (a few to a few hundred rows), partial tiles on every axis, split
reductions with and without a ragged last split, bias or none, and non-contiguous operands. The
kernel runs natively on a GPU, otherwise in Triton's CPU interpreter (:mod:`triton_interpreter`).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import triton_interpreter

IN_PROCESS = triton_interpreter.enable()
triton = pytest.importorskip("triton")

from fbcompile.kernels import triton_linear as tlin  # noqa: E402

DEVICE = "cuda" if triton_interpreter.CUDA else "cpu"
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton imported uncompiled: see test_in_subprocess")

# (dtype, M, N (a list: stacked weights), K, bias, config or None for the default, layout)
CASES = [
    (torch.bfloat16, 32, [64, 32, 32], 256, True, None, "contiguous"),  # q/k/v in one launch
    (torch.float16, 20, [48, 16, 40], 192, True, tlin.LinearConfig(16, 32, 64, 2), "contiguous"),  # + split
    (torch.bfloat16, 9, [32, 32], 128, False, tlin.LinearConfig(32, 16, 64, 1), "transposed_weight"),  # gate/up
    (torch.bfloat16, 32, 96, 256, True, None, "contiguous"),
    (torch.bfloat16, 5, 40, 200, False, None, "contiguous"),  # every axis ragged
    (torch.float16, 48, 64, 512, True, tlin.LinearConfig(16, 32, 64, 3), "contiguous"),  # ragged last split
    (torch.bfloat16, 32, 128, 512, True, tlin.LinearConfig(32, 32, 64, 4), "transposed_weight"),
    (torch.float16, 70, 48, 160, False, tlin.LinearConfig(16, 64, 32, 2), "strided_x"),
    (torch.bfloat16, 16, 16, 64, True, tlin.LinearConfig(16, 16, 64, 1), "contiguous"),
    (torch.bfloat16, 33, 80, 384, True, tlin.LinearConfig(64, 16, 128, 2), "contiguous"),
    (torch.bfloat16, 40, [256, 128, 128], 256, True, None, "contiguous"),  # stacked beyond 32 rows: 64-row tiles
]


def _operands(dtype, M, N, K, bias, layout, seed):
    """``x`` and lists of weights and biases (one per entry of ``N``, an int or a list)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen)
    if layout == "strided_x":  # rows of a wider activation
        x = torch.randn(M, 2 * K, generator=gen)[:, ::2]
    ws, bs = [], []
    for n in N if isinstance(N, list) else [N]:
        w = torch.randn(n, K, generator=gen) / K ** 0.5
        if layout == "transposed_weight":  # a [K, N] parameter used as w.T
            w = w.t().contiguous().t()
        ws.append(w)
        bs.append(torch.randn(n, generator=gen) if bias else None)
    to = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return to(x), [to(w) for w in ws], [to(b) for b in bs]


@in_process
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c[:5]) + f"-{c[6]}")
@pytest.mark.parametrize("seed", [0, 1])
def test_triton_linear_matches_fp64(case, seed):
    dtype, M, N, K, bias, config, layout = case
    x, ws, bs = _operands(dtype, M, N, K, bias, layout, seed)
    assert tlin.supports(x, ws, bs)
    y = tlin.linear(x, ws, bs, config=config)
    ref = torch.cat([F.linear(x.double(), w.double(), None if b is None else b.double()) for w, b in zip(ws, bs)], -1)
    assert y.dtype == dtype and y.shape == ref.shape
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 5e-3, f"rel err {err:.2e}"


def _act(name: str, t: torch.Tensor) -> torch.Tensor:
    return F.silu(t) if name == "silu" else F.gelu(t, approximate="tanh")


# (dtype, M, N (rows of each weight), K, bias, config or None for the default, act, layout)
GATED_CASES = [
    (torch.bfloat16, 32, 64, 256, False, None, "silu", "contiguous"),  # a gate/up pair
    (torch.float16, 20, 48, 192, True, tlin.LinearConfig(16, 32, 64, 2), "gelu_tanh", "contiguous"),  # + split
    (torch.bfloat16, 9, 40, 200, True, tlin.LinearConfig(16, 16, 64, 3), "silu", "strided_x"),  # ragged, split
    (torch.bfloat16, 48, 32, 256, False, tlin.LinearConfig(32, 32, 64, 1), "gelu_tanh", "transposed_weight"),
    (torch.bfloat16, 100, 512, 256, False, None, "silu", "contiguous"),  # beyond 32 rows: 64-row tiles, ragged
]


@in_process
@pytest.mark.parametrize("case", GATED_CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c[:5] + c[6:]))
def test_triton_linear_gated_matches_fp64(case):
    """``act(x W_gate^T + b) * (x W_up^T + b)`` with the gate applied as the GEMM stores (a gated MLP's
    input projections), with and without a split reduction, against fp64."""
    dtype, M, N, K, bias, config, act, layout = case
    x, ws, bs = _operands(dtype, M, [N, N], K, bias, layout, seed=M + N)
    assert tlin.supports_gate(x, ws, bs, act)
    y = tlin.linear(x, ws, bs, config=config, act=act)
    gate, up = (F.linear(x.double(), w.double(), None if b is None else b.double()) for w, b in zip(ws, bs))
    # the projections rounded to the dtype, as the model's linears round them; the gated product once
    ref = (_act(act, gate.to(dtype).double()) * up.to(dtype).double())
    err = ((y.double() - ref).norm() / ref.norm()).item()
    # Triton's interpreter truncates fp32 -> bf16 (about half its conversions differ from round-to-nearest,
    # measured): the kernel's three roundings (gate, up, product) add up to 1.03e-2 there (measured)
    bound = 5e-3 if triton_interpreter.CUDA else 2e-2
    assert y.dtype == dtype and y.shape == ref.shape and err < bound, f"rel err {err:.2e}"
    # the activation matters: the plain product is far off
    plain = gate * up
    assert ((y.double() - plain).norm() / plain.norm()).item() > 0.1


# (dtype, M, N (a list: stacked weights), K, bias, config or None, act or None)
RESIDUAL_CASES = [
    (torch.bfloat16, 32, [64], 256, False, None, None),  # o_proj
    (torch.float16, 20, [48], 384, True, tlin.LinearConfig(16, 32, 64, 3), None),  # down: a split reduction
    (torch.bfloat16, 17, [48, 32], 160, True, tlin.LinearConfig(16, 16, 32, 1), None),  # stacked
    (torch.bfloat16, 9, [40, 40], 200, True, tlin.LinearConfig(16, 16, 64, 2), "silu"),  # gated, split
]


@in_process
@pytest.mark.parametrize("case", RESIDUAL_CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c[:5] + c[6:]))
def test_triton_linear_residual_matches_fp64(case):
    """A residual added as the result is stored (``h + o_proj(a)``), with and without a gate and a split
    reduction, against fp64 rounded where the model rounds (the linear, then the sum)."""
    dtype, M, N, K, bias, config, act = case
    x, ws, bs = _operands(dtype, M, N, K, bias, "contiguous", seed=M + K)
    rows = N[0] if act else sum(N)
    res = (torch.randn(M, rows, generator=torch.Generator().manual_seed(K)) * 3).to(DEVICE, dtype)
    assert tlin.supports_residual(x, rows, res)
    y = tlin.linear(x, ws, bs, config=config, act=act, residual=res)
    outs = [F.linear(x.double(), w.double(), None if b is None else b.double()).to(dtype).double() for w, b in zip(ws, bs)]
    out = _act(act, outs[0]) * outs[1] if act else torch.cat(outs, -1)
    ref = out.to(dtype).double() + res.double()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    bound = 5e-3 if triton_interpreter.CUDA else 2e-2  # the interpreter's truncating casts: see above
    assert y.dtype == dtype and y.shape == ref.shape and err < bound, f"rel err {err:.2e}"
    out_err = (((y.double() - res.double()) - out).norm() / out.norm()).item()  # the product itself, not hidden
    assert out_err < 0.1, out_err


# (dtype, M, N (a list: stacked weights), K, splits, bias, config or None for the default)
PARTIALS_CASES = [
    (torch.bfloat16, 32, [64, 32, 32], 512, 4, True, None),  # q/k/v: four slices of 128
    (torch.float16, 20, [48], 384, 3, False, tlin.LinearConfig(16, 32, 64, 3)),  # ragged: slices of 128
    (torch.bfloat16, 9, [32, 16], 200, 2, True, tlin.LinearConfig(16, 16, 64, 2)),  # ragged rows and reduction
    (torch.bfloat16, 16, [32], 128, 4, True, tlin.LinearConfig(32, 16, 64, 4)),  # slices past K: zeros
]


@in_process
@pytest.mark.parametrize("case", PARTIALS_CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c[:6]))
def test_triton_linear_partials_match_fp64(case):
    """fp32 partial sums over slices of whole reduction tiles, each slice against fp64 (the first with
    the biases), and their sum against the whole product."""
    dtype, M, N, K, splits, bias, config = case
    x, ws, bs = _operands(dtype, M, N, K, bias, "contiguous", seed=M + K)
    p = tlin.linear_partials(x.reshape(1, M, K), ws, splits, bs, config=config)
    assert p.dtype == torch.float32 and p.shape == (splits, 1, M, sum(N))
    w = torch.cat(ws).double()
    b = torch.cat(bs).double() if bias else torch.zeros(sum(N), dtype=torch.float64, device=x.device)
    block_k = (config or tlin.partials_config_for(M, sum(N), K, splits, 132)).block_k
    step = tlin.cdiv(tlin.cdiv(K, splits), block_k) * block_k  # the kernel's slice: whole tiles
    for i in range(splits):
        ref = x[:, i * step:(i + 1) * step].double() @ w[:, i * step:(i + 1) * step].T + (b if i == 0 else 0)
        got = p[i, 0].double()
        if ref.numel() == 0 or i * step >= K:
            assert not got.any()
            continue
        assert ((got - ref).norm() / ref.norm()).item() < 5e-3, i
    ref = x.double() @ w.T + b
    assert ((p.sum(0)[0].double() - ref).norm() / ref.norm()).item() < 5e-3


def test_triton_linear_supports_residual():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert tlin.supports_residual(x, 24, torch.randn(4, 24, dtype=torch.bfloat16))
    assert not tlin.supports_residual(x, 24, torch.randn(1, 24, dtype=torch.bfloat16))  # broadcast
    assert not tlin.supports_residual(x, 24, torch.randn(4, 24))  # another dtype


def test_triton_linear_supports_gate():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.randn(32, 16, dtype=torch.bfloat16)
    assert tlin.supports_gate(x, [w, w.clone()], [None, None], "silu")
    assert tlin.supports_gate(x, [w, w], [None, None], "gelu_tanh")
    assert not tlin.supports_gate(x, [w, w], [None, None], "relu")
    assert not tlin.supports_gate(x, [w, w[:16]], [None, None], "silu")  # projections of different widths
    assert not tlin.supports_gate(x, [w], [None], "silu")
    assert not tlin.supports_gate(x, [w, w.float()], [None, None], "silu")


def test_gated_config_is_the_measured_best():
    """A gated launch stages as many bytes per program as the stacked pair's, over half its reduction tile;
    at Qwen2-1.5B's gate/up, the best config of the H100 and H200 sweeps (linear_tune_gated_h100.json,
    linear_tune_gated_h200.json): four stages, which beyond 32 rows stay three."""
    for M, N, K in [(32, 8960, 1536), (32, 1536, 8960), (256, 9216, 2304)]:
        pair, stacked = tlin.gated_config_for(M, N, K, 132), tlin.config_for(M, 2 * N, K, 132, (N,))
        assert pair.block_n == stacked.block_n and 2 * pair.block_k == stacked.block_k
        assert pair.num_stages == min(4, stacked.num_stages)
    assert tlin.gated_config_for(32, 8960, 1536, 132) == tlin.LinearConfig(64, 32, 64, 1, 4, 4)
    assert tlin.gated_config_for(256, 9216, 2304, 132).num_stages == 3


def test_partials_splits_are_the_measured_best_and_fuse():
    """At Qwen2-1.5B's 32 rows the split counts the H200 sweep found best (linear_tune_h200.md); any shape:
    fewer than 8 (a sum Inductor unrolls into its consumer), each slice at least two whole 128-wide tiles
    and none empty, at most one 64-row program per SM."""
    assert [tlin.partials_splits(32, N, K, 132) for N, K in ((2048, 1536), (1536, 1536), (1536, 8960))] == [4, 4, 5]
    for M, N, K, sms in itertools.product((8, 32), (64, 256, 1536, 4096), (256, 640, 1536, 8960, 20000), (78, 132)):
        s = tlin.partials_splits(M, N, K, sms)
        tiles = tlin.cdiv(K, 128)
        assert 1 <= s <= 7 and (s == 1 or tlin.cdiv(N, 64) * tlin.cdiv(M, 32) * s <= sms), (M, N, K, sms, s)
        assert s == 1 or tlin.cdiv(tiles, s) >= 2 and tlin.cdiv(tiles, tlin.cdiv(tiles, s)) == s, (M, N, K, sms, s)


@in_process
def test_triton_linear_keeps_leading_dims():
    x, ws, bs = _operands(torch.bfloat16, 24, 32, 64, True, "contiguous", 2)
    y = tlin.linear(x.reshape(2, 3, 4, 64), ws, bs)
    assert y.shape == (2, 3, 4, 32)
    torch.testing.assert_close(y.reshape(24, 32), tlin.linear(x, ws, bs))


def test_triton_linear_default_configs_are_the_measured_best():
    """At a block's 32 rows the default configs for a 1.5B model's weights are the H200 sweep's best
    (``benchmarks/results/skinny_linear_h200.md``); stacked weights split at tile boundaries."""
    best = {(1536, 1536): (16, 1), (256, 1536): (16, 4), (8960, 1536): (64, 1), (1536, 8960): (64, 4)}
    for (N, K), (block_n, split_k) in best.items():
        cfg = tlin.config_for(32, N, K, 132)
        assert (cfg.block_n, cfg.split_k, cfg.block_k, cfg.num_stages) == (block_n, split_k, 128, 5), (N, K, cfg)
    for N, bounds in ((2048, (1536, 1792)), (17920, (8960,)), (96, (48, 80))):
        cfg = tlin.config_for(32, N, 1536, 132, bounds)
        assert all(b % cfg.block_n == 0 for b in bounds), (N, bounds, cfg)


def test_triton_linear_supports():
    bf = dict(dtype=torch.bfloat16)
    w, w16, x, b = torch.randn(8, 16, **bf), torch.randn(16, 16, **bf), torch.randn(4, 16, **bf), torch.zeros(8, **bf)
    assert tlin.supports(x, [w], [None]) and tlin.supports(x, [w], [b])
    assert tlin.supports(x, [w16, w16, w], [None] * 3)
    assert not tlin.supports(x.float(), [w.float()], [None])
    assert not tlin.supports(x.half(), [w], [None])
    assert not tlin.supports(torch.randn(4, 8, **bf), [w], [None])
    assert not tlin.supports(x, [w], [torch.zeros(8)])
    assert not tlin.supports(x, [w, w16], [None, None])  # an inner group of 8 rows
    assert not tlin.supports(x, [w16, w16], [torch.zeros(16, **bf), None])  # biases for some only
    assert not tlin.supports(x, [w16, w16.t().contiguous().t()], [None, None])  # strides differ
    assert not tlin.supports(x, [w16] * 4, [None] * 4)


@pytest.mark.skipif(IN_PROCESS, reason="kernels tested in this process")
def test_in_subprocess():
    """``triton`` was imported before this module could switch on the interpreter: rerun here."""
    triton_interpreter.rerun_in_subprocess(__file__, "test_triton_linear")
