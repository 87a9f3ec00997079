"""The Triton split-attention kernels against :mod:`fbcompile.kernels.reference`.

On a GPU the kernels run natively. Without one they run in Triton's CPU interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before ``triton`` is first imported in the process: this module
sets it if it is first, and otherwise (another test module already imported ``triton``) runs its
own cases once in a subprocess with the variable set. Shapes are small to keep the interpreter
within CI time; ``FBCOMPILE_SLOW=1`` adds larger ones.
"""
from __future__ import annotations

import os

import pytest
import torch

import triton_interpreter

CUDA = triton_interpreter.CUDA
IN_PROCESS = triton_interpreter.enable()

triton = pytest.importorskip("triton")

from fbcompile.kernels import reference  # noqa: E402
from fbcompile.kernels import triton_attention as ta  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
SLOW = os.environ.get("FBCOMPILE_SLOW") == "1"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton already imported uncompiled; see subprocess test")


def _mask(kind: str, B: int, Hq: int, M: int, N: int, gen: torch.Generator) -> torch.Tensor | None:
    """Masks of each supported form; sizes are broadcastable to [B, Hq, M, N]."""
    if kind == "none":
        return None
    if kind == "bool":
        return torch.rand(B, Hq, M, N, generator=gen) > 0.3
    if kind == "float":
        return torch.randn(B, Hq, M, N, generator=gen)
    if kind == "sliding":  # bool [M, N]: query i (at position N - M + i) sees the last 24 keys up to itself
        pos = torch.arange(N - M, N)[:, None]
        keys = torch.arange(N)[None, :]
        return (keys <= pos) & (keys > pos - 24)
    if kind == "empty_rows":  # bool [B, 1, M, N] with some rows attending to nothing
        mask = torch.rand(B, 1, M, N, generator=gen) > 0.5
        mask[:, :, ::3] = False
        return mask
    if kind == "float_inf_rows":  # float [B, Hq, M, N] with some rows all -inf
        mask = torch.randn(B, Hq, M, N, generator=gen)
        mask[:, 1, :2] = float("-inf")
        return mask
    if kind == "bcast_batch":  # bool [1, Hq, M, N] broadcast over batch
        return torch.rand(1, Hq, M, N, generator=gen) > 0.2
    if kind == "bcast_row":  # float [B, 1, 1, N]: a per-key bias shared by all heads and queries
        return torch.randn(B, 1, 1, N, generator=gen)
    raise ValueError(kind)


def _inputs(dtype, B, Hq, Hkv, M, N, D, Dv, mask_kind, seed, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q, k, v = rnd(B, Hq, M, D), rnd(B, Hkv, N, D), rnd(B, Hkv, N, Dv)
    if layout == "bshd":  # HF-style [B, S, H, D] storage viewed as [B, H, S, D]: non-contiguous
        q = rnd(B, M, Hq, D).transpose(1, 2)
        k = rnd(B, N, Hkv, D).transpose(1, 2)
        v = rnd(B, N, Hkv, Dv).transpose(1, 2)
    mask = _mask(mask_kind, B, Hq, M, N, gen)
    to = dict(device=DEVICE)
    return q.to(**to), k.to(**to), v.to(**to), None if mask is None else mask.to(**to)


def _check(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "fully masked rows must have lse = -inf"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[empty] == 0).all(), "fully masked rows must be 0"
    tol = TOL[dtype]
    o, r = out[~empty].float(), ref_out[~empty].float()
    assert (o - r).norm() <= tol * r.norm() + 1e-30, f"out rel err {((o - r).norm() / r.norm()).item():.2e}"
    lo, lr = lse[~empty], ref_lse[~empty]
    assert (lo - lr).norm() <= tol * lr.norm() + 1e-6, f"lse rel err {((lo - lr).norm() / lr.norm()).item():.2e}"


# (dtype, B, Hq, Hkv, M, N, D, Dv, mask, num_splits, layout)
LSE_CASES = [
    (torch.float32, 1, 4, 4, 4, 37, 64, 64, "none", None, "contiguous"),
    (torch.float32, 2, 8, 2, 8, 300, 64, 64, "bool", None, "contiguous"),
    (torch.float32, 1, 8, 1, 16, 130, 128, 128, "float", 3, "contiguous"),
    (torch.float32, 1, 4, 1, 5, 77, 96, 48, "sliding", None, "contiguous"),
    (torch.float32, 2, 4, 2, 6, 200, 64, 64, "empty_rows", 4, "contiguous"),
    (torch.float32, 1, 4, 4, 8, 90, 32, 32, "float_inf_rows", 2, "bshd"),
    (torch.float32, 2, 8, 1, 4, 65, 64, 64, "bcast_batch", None, "contiguous"),
    (torch.float32, 1, 4, 4, 64, 40, 16, 16, "bcast_row", 1, "contiguous"),
    (torch.float32, 1, 2, 1, 3, 20, 256, 256, "none", None, "contiguous"),
    (torch.float32, 1, 4, 2, 8, 100, 512, 512, "bool", None, "contiguous"),  # DiffusionGemma global layers
    (torch.float32, 1, 8, 4, 32, 70, 512, 512, "none", None, "contiguous"),  # 64 rows: tiles must fit in fp32
    (torch.float32, 1, 4, 1, 6, 45, 320, 320, "float", 2, "bshd"),  # padded wide head
    (torch.bfloat16, 1, 8, 2, 32, 260, 128, 128, "none", None, "contiguous"),
    (torch.bfloat16, 1, 8, 1, 4, 300, 64, 64, "sliding", None, "bshd"),
    (torch.bfloat16, 2, 4, 4, 16, 100, 64, 64, "empty_rows", 3, "contiguous"),
    (torch.bfloat16, 1, 16, 2, 8, 129, 64, 64, "float", None, "contiguous"),
    (torch.bfloat16, 1, 8, 4, 16, 90, 256, 256, "sliding", None, "contiguous"),
    (torch.bfloat16, 1, 4, 2, 8, 70, 512, 512, "none", 2, "bshd"),
    (torch.bfloat16, 1, 8, 4, 64, 300, 256, 256, "none", None, "contiguous"),  # 128 rows: 64-key tiles, 3 stages
    (torch.float16, 1, 8, 2, 12, 257, 128, 128, "bool", None, "contiguous"),
    (torch.float16, 1, 4, 4, 32, 64, 64, 64, "bcast_row", None, "bshd"),
    (torch.float16, 1, 8, 1, 8, 33, 64, 32, "float_inf_rows", None, "contiguous"),
]
if SLOW:
    LSE_CASES += [
        (torch.float32, 1, 32, 8, 64, 2100, 128, 128, "bool", None, "contiguous"),
        (torch.bfloat16, 1, 32, 8, 32, 4100, 128, 128, "none", None, "bshd"),
        (torch.float16, 2, 32, 4, 64, 1500, 64, 64, "sliding", None, "contiguous"),
    ]


@in_process
@pytest.mark.parametrize("case", LSE_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_attention_lse(case):
    dtype, B, Hq, Hkv, M, N, D, Dv, mask_kind, num_splits, layout = case
    q, k, v, mask = _inputs(dtype, B, Hq, Hkv, M, N, D, Dv, mask_kind, seed=N, layout=layout)
    assert ta.supports(q, k, v, mask)
    scale = D**-0.5
    out, lse = ta.attention_lse(q, k, v, mask, scale, num_splits=num_splits)
    _check(out, lse, *reference.attention_lse(q, k, v, mask, scale), dtype)


# (dtype, Hq, Hkv, M, D, mask, ext_kind): ext_kind "random" | "empty_ext" (lse_ext -inf on some rows)
MERGE_CASES = [
    (torch.float32, 4, 4, 4, 64, "none", "random"),
    (torch.float32, 8, 2, 16, 128, "bool", "empty_ext"),
    (torch.float32, 8, 1, 32, 64, "empty_rows", "empty_ext"),  # rows where both sides are empty
    (torch.float32, 4, 2, 8, 80, "float", "random"),
    (torch.bfloat16, 8, 2, 32, 128, "none", "random"),
    (torch.bfloat16, 8, 1, 64, 64, "sliding", "empty_ext"),
    (torch.float16, 4, 4, 8, 64, "bcast_batch", "random"),
    (torch.float16, 8, 2, 16, 64, "float_inf_rows", "empty_ext"),
    (torch.float32, 4, 2, 8, 512, "bool", "empty_ext"),
    (torch.bfloat16, 4, 2, 16, 256, "none", "random"),
]


@in_process
@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
@pytest.mark.parametrize("n_keys", ["block", "long"])
def test_attention_merge_lse(case, n_keys):
    """Internal attention over the block's own keys fused with the merge; ``long`` internal keys
    take the split path whose reduction does the merge."""
    dtype, Hq, Hkv, M, D, mask_kind, ext_kind = case
    N = M if n_keys == "block" else 1100 + M
    if n_keys == "long" and dtype != torch.float32 and not SLOW:
        pytest.skip("the split path is covered by fp32 here; FBCOMPILE_SLOW=1 runs all")
    q, k, v, mask = _inputs(dtype, 2, Hq, Hkv, M, N, D, D, mask_kind, seed=M + N)
    gen = torch.Generator().manual_seed(7)
    out_ext = (torch.randn(2, Hq, M, D, generator=gen)).to(dtype).to(DEVICE)
    lse_ext = (torch.randn(2, Hq, M, generator=gen) * 3).to(DEVICE)
    if ext_kind == "empty_ext":
        lse_ext[:, :, ::2] = float("-inf")
        out_ext[:, :, ::2] = 0
    scale = D**-0.5
    out, lse = ta.attention_merge_lse(q, k, v, mask, scale, out_ext, lse_ext)
    ref = reference.attention_merge_lse(q, k, v, mask, scale, out_ext, lse_ext)
    _check(out, lse, *ref, dtype)
    # block-major, as flash attention's output: the model's transpose(1, 2) before its projection is free
    assert out.transpose(1, 2).is_contiguous() and lse.is_contiguous(), (out.stride(), lse.stride())


@in_process
def test_merge_of_split_equals_full():
    """External part + fused internal merge reproduces attention over the concatenated keys."""
    q, k, v, _ = _inputs(torch.float32, 1, 8, 2, 16, 200, 64, 64, "none", seed=3)
    scale = 0.125
    out_e, lse_e = ta.attention_lse(q, k[:, :, :184], v[:, :, :184], None, scale)
    out, lse = ta.attention_merge_lse(q, k[:, :, 184:], v[:, :, 184:], None, scale, out_e, lse_e)
    _check(out, lse, *reference.attention_lse(q, k, v, None, scale), torch.float32)


def test_wide_heads_take_deeper_key_tiles_only_without_a_mask_over_many_rows():
    """256-wide 16-bit heads over long keys with >= 128 packed rows and no mask tile to load take 64-key
    tiles in 3 stages (the H100 sweep's faster setting, 224 KB of shared memory); with a mask, fewer rows,
    fp32 or the block's own keys they keep 32-key tiles in 2."""
    def tiles(R=128, itemsize=2, split_keys=True, plain=True, N=32768):
        cfg = ta._config(1, 4, R, 256, N, 256, itemsize, 132, split_keys, plain)
        return cfg["BLOCK_N"], cfg["num_stages"]

    assert tiles() == tiles(R=512) == tiles(N=None) == (64, 3)
    assert tiles(plain=False) == tiles(R=64) == tiles(split_keys=False) == (32, 2)
    assert tiles(itemsize=4)[0] < 64


@in_process
@pytest.mark.parametrize("D, N, splits", [(64, 500, (1, 2, 7)), (256, 1300, (1, 3, 41))])
def test_split_count_does_not_change_result(D, N, splits):
    """Includes more splits than the reduction loads at once (41 > 16 for Dv=256)."""
    q, k, v, mask = _inputs(torch.float32, 1, 4, 2, 3, N, D, D, "bool", seed=5)
    outs = [ta.attention_lse(q, k, v, mask, 0.1, num_splits=s) for s in splits]
    for out, lse in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, outs[0][1], rtol=1e-5, atol=1e-6)


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_whole_key_tiles_run_unmasked_and_read_no_key_past_the_end(dtype):
    """Without a mask the kernel skips the key mask on whole key tiles and masks only a partial last
    tile: key counts at each boundary (no whole tile, exactly whole tiles, whole tiles and a partial
    one) in one split or several, external part and refresh, over buffers whose entries past the keys
    are NaN, so that a tile read past the end shows in the result."""
    D = 64
    probe = torch.empty(1, 4, 3, D, dtype=dtype)
    tile = ta._plan(probe, torch.empty(1, 2, 4096, D, dtype=dtype), torch.empty(1, 2, 4096, D, dtype=dtype), True,
                    {}, plain=True)[0]["BLOCK_N"]
    for n in (1, tile - 1, tile, tile + 1, 2 * tile, 3 * tile + 5):
        q, k, v, _ = _inputs(dtype, 1, 4, 2, 3, n + 9, D, D, "none", seed=n)
        k[:, :, n:], v[:, :, n:] = float("nan"), float("nan")
        k, v = k[:, :, :n], v[:, :, :n]
        _, k_blk, v_blk, _ = _inputs(dtype, 1, 4, 2, 3, 3, D, D, "none", seed=n + 1)
        ref_ext = reference.attention_lse(q, k, v, None, 0.125)
        ref = reference.attention_lse(q, torch.cat([k, k_blk], 2), torch.cat([v, v_blk], 2), None, 0.125)
        for splits in (1, 3):
            _check(*ta.attention_lse(q, k, v, None, 0.125, num_splits=splits), *ref_ext, dtype)
            out, lse, out_ext, lse_ext = ta.attention_refresh_lse(q, k, v, None, 0.125, k_blk, v_blk, None,
                                                                  num_splits=splits)
            _check(out, lse, *ref, dtype)
            _check(out_ext, lse_ext, *ref_ext, dtype)


@in_process
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_rows_per_reduction_program_do_not_change_result(rows):
    """The split reduction's rows per program (``REDUCE_ROWS``, 8 by default) over ragged rows (3 query
    heads of 5 rows per KV head: 15 packed rows), with the external part merged in."""
    q, k, v, mask = _inputs(torch.float32, 2, 6, 2, 5, 700, 64, 64, "bool", seed=7)
    out_e, lse_e = ta.attention_lse(q, k[:, :, :100], v[:, :, :100], None, 0.1)
    default = ta._attention(q, k[:, :, 100:], v[:, :, 100:], mask[..., 100:], 0.1, out_e, lse_e, num_splits=5)
    out, lse = ta._attention(q, k[:, :, 100:], v[:, :, 100:], mask[..., 100:], 0.1, out_e, lse_e, num_splits=5,
                             REDUCE_ROWS=rows)
    torch.testing.assert_close(out, default[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, default[1], rtol=1e-5, atol=1e-6)
    _check(out, lse, *reference.attention_lse(q, k, v, torch.cat([torch.ones_like(mask[..., :100]), mask[..., 100:]],
                                                                  -1), 0.1), torch.float32)


# (dtype, Hq, Hkv, M, capacity, counts, D, mask, num_splits)
KEY_COUNT_CASES = [
    (torch.float32, 4, 2, 8, 300, (0, 1, 17, 64, 299, 300), 64, "none", None),
    (torch.float32, 8, 2, 16, 260, (5, 130, 259), 128, "bool", 3),
    (torch.float32, 4, 1, 5, 200, (77, 200), 96, "float", 41),  # more splits than key tiles
    (torch.bfloat16, 8, 2, 32, 400, (33, 320), 128, "none", None),
    (torch.float16, 4, 4, 8, 180, (90,), 64, "empty_rows", 2),
    (torch.bfloat16, 4, 2, 8, 150, (100,), 256, "none", None),
]


@in_process
@pytest.mark.parametrize("case", KEY_COUNT_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_attention_lse_key_count(case):
    """Keys past ``key_count`` (a device tensor) are padding: the result equals attention over the
    first ``key_count`` keys only, whatever the padding holds (here NaN and inf), for any split count."""
    dtype, Hq, Hkv, M, capacity, counts, D, mask_kind, num_splits = case
    q, k, v, mask = _inputs(dtype, 1, Hq, Hkv, M, capacity, D, D, mask_kind, seed=capacity)
    for count in counts:
        k_pad, v_pad = k.clone(), v.clone()
        k_pad[:, :, count:] = float("nan")
        v_pad[:, :, count:] = float("inf")
        key_count = torch.tensor([count], device=DEVICE, dtype=torch.int32)
        assert ta.supports_key_count(q, key_count)
        out, lse = ta.attention_lse(q, k_pad, v_pad, mask, D**-0.5, key_count, num_splits=num_splits)
        ref_mask = None if mask is None else mask[..., :count]
        _check(out, lse, *reference.attention_lse(q, k[:, :, :count], v[:, :, :count], ref_mask, D**-0.5), dtype)
        ref_out, ref_lse = reference.attention_lse(q, k_pad, v_pad, mask, D**-0.5, key_count)
        _check(out, lse, ref_out, ref_lse, dtype)


# (dtype, B, Hq, Hkv, M, N, NB, D, external mask, block mask, num_splits, key count)
REFRESH_CASES = [
    (torch.float32, 1, 8, 2, 16, 200, 16, 64, "none", "none", None, None),
    (torch.float32, 2, 8, 2, 8, 300, 32, 64, "bool", "float", 3, None),
    (torch.float32, 1, 4, 1, 5, 0, 7, 64, "none", "bool", None, None),  # nothing cached yet
    (torch.float32, 1, 8, 2, 8, 300, 20, 64, "none", "none", None, 150),
    (torch.float32, 1, 8, 2, 8, 300, 20, 64, "float", "none", 1, None),  # the block is a second split
    (torch.float32, 2, 4, 2, 6, 130, 70, 96, "empty_rows", "empty_rows", 2, None),  # rows with neither part
    (torch.float32, 1, 4, 2, 8, 100, 8, 512, "none", "bool", None, None),
    (torch.bfloat16, 1, 12, 2, 32, 260, 32, 128, "none", "none", None, None),  # the 1.5B LM's heads
    (torch.bfloat16, 1, 8, 4, 64, 300, 64, 256, "none", "none", None, 257),  # 64-key tiles in 3 stages
    (torch.float16, 2, 8, 2, 12, 257, 12, 128, "bool", "bool", None, None),
    # 3 row tiles x 3 splits + the block x 6 (batch, KV head): the block's programs reordered last
    (torch.float32, 3, 12, 2, 24, 260, 16, 64, "none", "bool", 3, None),
]


def _block_mask(kind: str, B: int, Hq: int, M: int, NB: int, seed: int) -> torch.Tensor | None:
    mask = _mask(kind, B, Hq, M, NB, torch.Generator().manual_seed(seed))
    return None if mask is None else mask.to(DEVICE)


def _additive(mask: torch.Tensor | None, shape) -> torch.Tensor:
    if mask is None:
        return torch.zeros(shape, device=DEVICE)
    mask = mask.expand(shape)
    return torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask.float()


@in_process
@pytest.mark.parametrize("case", REFRESH_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_attention_refresh_lse(case):
    """Both parts in one launch pair: the merged result equals attention over the cached keys (the first
    ``key count`` of them) and the block's joined, the external part returned equals attention over the
    cached keys alone; the padding past the key count holds NaN."""
    dtype, B, Hq, Hkv, M, N, NB, D, ext_mask, blk_mask, num_splits, count = case
    q, k, v, mask = _inputs(dtype, B, Hq, Hkv, M, N, D, D, ext_mask, seed=N + NB)
    _, k_blk, v_blk, _ = _inputs(dtype, B, Hq, Hkv, M, NB, D, D, "none", seed=N + NB + 1)
    mask_blk = _block_mask(blk_mask, B, Hq, M, NB, seed=NB)
    key_count, n = None, N
    if count is not None:
        key_count, n = torch.tensor([count], device=DEVICE, dtype=torch.int32), count
        k, v = k.clone(), v.clone()
        k[:, :, n:], v[:, :, n:] = float("nan"), float("nan")
    assert ta.supports_refresh(q, k, v, mask, k_blk, v_blk, mask_blk)
    scale = D**-0.5
    out, lse, out_ext, lse_ext = ta.attention_refresh_lse(q, k, v, mask, scale, k_blk, v_blk, mask_blk, key_count,
                                                          num_splits=num_splits)
    head = None if mask is None else mask[..., :n]
    ref_ext = reference.attention_lse(q, k[:, :, :n], v[:, :, :n], head, scale)
    joined = torch.cat([_additive(head, (B, Hq, M, n)), _additive(mask_blk, (B, Hq, M, NB))], -1)
    ref = reference.attention_lse(q, torch.cat([k[:, :, :n], k_blk], 2), torch.cat([v[:, :, :n], v_blk], 2),
                                  joined, scale)
    _check(out, lse, *ref, dtype)
    if n == 0:
        assert (out_ext == 0).all() and torch.isneginf(lse_ext).all()
    else:
        _check(out_ext, lse_ext, *ref_ext, dtype)
    # the merged result block-major (as attention_merge_lse's), the external part head-major (as attention_lse's)
    assert out.transpose(1, 2).is_contiguous() and out_ext.is_contiguous() and lse_ext.is_contiguous()


def test_refresh_takes_a_block_of_at_most_sixteen_key_tiles():
    q, k, v = torch.randn(1, 4, 8, 64), torch.randn(1, 2, 4096, 64), torch.randn(1, 2, 4096, 64)
    block_n = ta._plan(q, k, v, True, {}, plain=True)[0]["BLOCK_N"]
    for keys, taken in [(8, True), (16 * block_n, True), (16 * block_n + 1, False)]:
        k_blk, v_blk = torch.randn(1, 2, keys, 64), torch.randn(1, 2, keys, 64)
        assert ta.supports_refresh(q, k, v, None, k_blk, v_blk, None) is taken
    assert not ta.supports_refresh(q, k, v, None, torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), None)
    assert not ta.supports_refresh(q, k, v, None, torch.randn(1, 4, 8, 64), torch.randn(1, 4, 8, 64), None)


@in_process
def test_empty_keys():
    q, k, v, _ = _inputs(torch.float32, 1, 4, 2, 4, 0, 64, 64, "none", seed=1)
    out, lse = ta.attention_lse(q, k, v, None, 0.1)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_supports_rejects_unsupported():
    q, k, v = torch.randn(1, 4, 8, 64), torch.randn(1, 2, 16, 64), torch.randn(1, 2, 16, 64)
    assert ta.supports(q, k, v, None)
    assert ta.supports(q, k, v, torch.ones(8, 16, dtype=torch.bool))
    assert not ta.supports(q, k, v, torch.ones(8, 17, dtype=torch.bool))  # not broadcastable
    assert not ta.supports(q, k, v, torch.ones(8, 16, dtype=torch.int32))
    assert not ta.supports(q, torch.randn(1, 3, 16, 64), torch.randn(1, 3, 16, 64), None)  # 4 % 3
    assert not ta.supports(q.double(), k.double(), v.double(), None)
    assert ta.supports(torch.randn(1, 4, 8, 512), torch.randn(1, 2, 16, 512), torch.randn(1, 2, 16, 512), None)
    assert not ta.supports(torch.randn(1, 4, 8, 640), torch.randn(1, 2, 16, 640), v, None)


def _traced_launches(monkeypatch, part: str, queries, batch):
    """The launches (kernel, grid, constexprs and launch settings) of one part's host code, run on fake
    tensors with ``queries`` queries of 4 heads over 2 KV heads and ``batch`` rows (each a SymInt or an
    int); the internal part attends over as many keys as queries (the block over itself), the external
    one over 4096."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    launches = []

    class Recorder:  # stands in for wrap_triton: the launch traced, the kernel not run
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append((self.kernel.fn.__name__, grid, meta))

    monkeypatch.setattr(ta, "wrap_triton", Recorder)
    symbolic = [x for x in (queries, batch) if isinstance(x, torch.SymInt)]
    with FakeTensorMode(shape_env=symbolic[0].node.shape_env if symbolic else None):
        q = torch.empty(batch, 4, queries, 64)
        if part == "external":
            k = v = torch.empty(batch, 2, 4096, 64)
            ta.attention_lse(q, k, v, None, 0.125)
        else:
            k = v = torch.empty(batch, 2, queries, 64)
            ta.attention_merge_lse(q, k, v, None, 0.125, torch.empty(batch, 4, queries, 64),
                                   torch.empty(batch, 4, queries))
    return launches


# (the symbolic size, its value when traced, its bucket's top, the sizes the guards admit), the other one static
SYMBOLIC_SIZES = [("queries", 24, 32, range(17, 33)),   # packed rows 34..64 (2 query heads per KV head)
                  ("batch", 3, 4, range(3, 5))]


@pytest.mark.parametrize("part", ["external", "internal"])
@pytest.mark.parametrize("size", SYMBOLIC_SIZES, ids=[size[0] for size in SYMBOLIC_SIZES])
def test_a_symbolic_size_launches_per_power_of_two(monkeypatch, part, size):
    """Host code traced with a symbolic query count or batch guards it to a power-of-two bucket and
    launches as at the bucket's top, over a grid of the call's sizes. It once made an int of both,
    which specialised the graph to each: Fast-dLLM's Dream, whose queries are every row after the cache
    (a block fewer at each block), compiled a graph per block on the H100 (9 graphs in the first
    generate, 190 s); a batch that changed compiled the split graphs again for each batch size."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    name, hint, top, bucket = size
    env = ShapeEnv()
    symbol = env.create_symbol(hint, ConstantSource(name))
    static = dict(queries=24, batch=1)
    traced = _traced_launches(monkeypatch, part, **{**static, name: env.create_symintnode(symbol, hint=hint)})
    at_top = _traced_launches(monkeypatch, part, **{**static, name: top})
    assert [kernel for kernel, _, _ in traced] == [kernel for kernel, _, _ in at_top] and traced
    for (_, grid, meta), (_, top_grid, top_meta) in zip(traced, at_top):
        assert meta == top_meta
        assert [int(g.node.expr.xreplace({symbol: top})) if isinstance(g, torch.SymInt) else g for g in grid] == list(
            top_grid)
    assert any(isinstance(g, torch.SymInt) for _, grid, _ in traced for g in grid)  # the sizes of each call

    def holds(value: int) -> bool:
        return all(bool(guard.expr.xreplace({symbol: value})) for guard in env.guards)

    assert [value for value in range(1, 80) if holds(value)] == list(bucket)


@pytest.mark.skipif(IN_PROCESS, reason="kernels already tested in this process")
def test_in_subprocess():
    """``triton`` was imported before this module could switch on the interpreter: rerun here."""
    triton_interpreter.rerun_in_subprocess(__file__)
