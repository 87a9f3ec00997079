"""The sparse external attention ops against plain dense float64 references.

``attention_lse_tiles`` (attention plus per-KV-tile mass), ``select_tiles`` (top-k / adaptive-mass
tile selection), ``sparse_attention_lse`` (attention over the selected tiles) and ``subtract_lse``
(the residual: attention over the keys not selected), each checked against masked dense attention
over explicitly listed keys: the ops ``torch.ops.fbcompile.*`` (the reference on CPU) across shapes,
GQA groups, masks and dtypes, and the Triton kernels on a few small shapes. The kernels run natively
on a GPU, otherwise in Triton's CPU interpreter: switched on here if ``triton`` is not imported yet,
else the ``test_triton_*`` cases rerun once in a subprocess with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os

import pytest
import torch

import triton_interpreter

CUDA = triton_interpreter.CUDA
IN_PROCESS = triton_interpreter.enable()

import fbcompile  # noqa: E402,F401  (registers torch.ops.fbcompile.*)
from fbcompile import ops as fbops  # noqa: E402

OPS = torch.ops.fbcompile
DEVICE = "cuda" if CUDA else "cpu"
NEG_INF = float("-inf")
in_process = pytest.mark.skipif(fbops.triton_attention is None or not IN_PROCESS,
                                reason="no triton, or triton imported uncompiled: see test_in_subprocess")


# --------------------------------------------------------------------------- dense references


def dense_attention(q, k, v, mask, scale):
    """float64 ``(out, lse, p)`` of masked dense attention (GQA by replicating the KV heads)."""
    group = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    s = q.double() @ k64.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool else s + mask.double()
    lse = torch.logsumexp(s, dim=-1)
    dead = torch.isneginf(lse).unsqueeze(-1)
    p = torch.where(dead, 0.0, torch.exp(s - lse.unsqueeze(-1)))
    return p @ v64, lse, p


def dense_tile_mass(p, num_kv_heads, tile):
    """Per-tile mass: the probabilities summed over the KV head's query heads, rows and the tile's keys."""
    B, Hq, M, N = p.shape
    per_key = p.reshape(B, num_kv_heads, Hq // num_kv_heads * M, N).sum(2)
    return torch.stack([per_key[..., t:t + tile].sum(-1) for t in range(0, N, tile)], dim=-1)


def selected_keys(idx, tile, N):
    """bool ``[B, Hkv, N]``: the keys of the listed tiles (``-1`` skipped), by explicit loops."""
    keys = torch.zeros(*idx.shape[:2], N, dtype=torch.bool)
    for (b, h, _), t in zip(torch.cartesian_prod(*(torch.arange(n) for n in idx.shape)).tolist(),
                            idx.flatten().tolist()):
        if t >= 0:
            keys[b, h, t * tile:(t + 1) * tile] = True
    return keys


def restrict(mask, keys, B, Hq, M):
    """``mask`` further limited to ``keys`` (``[B, Hkv, N]``), as a full-shape mask of the same kind."""
    allowed = keys.repeat_interleave(Hq // keys.shape[1], dim=1).unsqueeze(2).expand(B, Hq, M, -1)
    if mask is None:
        return allowed
    full = mask.expand(B, Hq, M, keys.shape[-1])
    return full & allowed if mask.dtype == torch.bool else torch.where(allowed, full, NEG_INF)


def select_reference(tile_mass, max_tiles, mass):
    """Tile selection spelled out: heaviest first, until the budget or the mass target is reached."""
    rows = []
    for head in tile_mass.double().reshape(-1, tile_mass.shape[-1]).tolist():
        order = sorted(range(len(head)), key=lambda t: -head[t])
        chosen, got, total = [], 0.0, sum(head)
        for t in order:
            if len(chosen) == max_tiles or (mass < 1.0 and got >= mass * total):
                break
            chosen.append(t)
            got += head[t]
        rows.append(sorted(chosen) + [-1] * (max_tiles - len(chosen)))
    return torch.tensor(rows, dtype=torch.int32).reshape(*tile_mass.shape[:2], max_tiles)


# --------------------------------------------------------------------------- inputs and checks


def make_mask(kind, B, Hq, M, N, gen):
    if kind == "none":
        return None
    if kind == "bool":  # full shape, random
        return torch.rand(B, Hq, M, N, generator=gen) > 0.3
    if kind == "float":  # a bias shared by the heads
        return torch.randn(B, 1, M, N, generator=gen)
    if kind == "empty_rows":  # bool, some rows attend to nothing
        mask = torch.rand(B, 1, M, N, generator=gen) > 0.4
        mask[:, :, ::3] = False
        return mask
    if kind == "float_inf":  # per-key bias with -inf padding, one dead query row
        mask = torch.randn(B, 1, M, N, generator=gen)
        mask[..., : N // 4] = NEG_INF
        mask[:, :, 0] = NEG_INF
        return mask
    raise ValueError(kind)


def make_inputs(case, dtype, device="cpu"):
    B, Hq, Hkv, M, N, D, tile, kind = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    q = torch.randn(B, Hq, M, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=gen).to(dtype)
    mask = make_mask(kind, B, Hq, M, N, gen)
    return [x if x is None else x.to(device) for x in (q, k, v, mask)]


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


def check_attention(out, lse, exp_out, exp_lse, dtype):
    assert out.dtype == dtype and out.shape == exp_out.shape
    assert lse.dtype == torch.float32 and lse.shape == exp_lse.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    dead = torch.isneginf(exp_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), dead.cpu()), "rows attending to nothing must have lse = -inf"
    assert (out[dead] == 0).all()
    o, e = out[~dead].double().cpu(), exp_out[~dead].cpu()
    assert (o - e).norm() <= tol(dtype) * e.norm() + 1e-12, f"out rel err {((o - e).norm() / e.norm()).item():.2e}"
    torch.testing.assert_close(lse[~dead].double().cpu(), exp_lse[~dead].cpu(), rtol=1e-5, atol=1e-4)


def partial_selection(tile_mass, max_tiles):
    """The heaviest tiles with the last (partial) one forced in, and an unused slot before the others."""
    forced = tile_mass.clone()
    forced[..., -1] = 1e30
    idx = OPS.select_tiles(forced, max_tiles, 1.0)
    idx[0, 0, 0] = -1
    return idx


# B, Hq, Hkv, M, N, D, tile, mask
CASES = [
    (1, 4, 4, 1, 37, 64, 16, "none"),
    (2, 6, 2, 32, 100, 64, 32, "bool"),
    (1, 8, 1, 64, 130, 128, 32, "float"),
    (2, 4, 2, 32, 75, 256, 16, "empty_rows"),
    (1, 12, 2, 32, 200, 128, 48, "float_inf"),   # tile not a power of two
    (1, 2, 1, 64, 50, 64, 64, "bool"),           # a single, partial tile
    (2, 12, 2, 1, 300, 128, 32, "float"),
]
DTYPES = [torch.float32, torch.bfloat16]


def case_id(c):
    return "B{}-H{}/{}-M{}-N{}-D{}-tile{}-{}".format(*c)


# --------------------------------------------------------------------------- the ops (reference on CPU)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_attention_lse_tiles(case, dtype):
    q, k, v, mask = make_inputs(case, dtype)
    tile, scale = case[6], case[5] ** -0.5
    out, lse, tile_mass = OPS.attention_lse_tiles(q, k, v, mask, scale, tile)
    exp_out, exp_lse, p = dense_attention(q, k, v, mask, scale)
    check_attention(out, lse, exp_out, exp_lse, dtype)
    exp_mass = dense_tile_mass(p, k.shape[1], tile)
    assert tile_mass.dtype == torch.float32 and tile_mass.shape == exp_mass.shape
    torch.testing.assert_close(tile_mass.double(), exp_mass, rtol=1e-4, atol=1e-5)


def test_attention_lse_tiles_over_no_keys():
    """A static cache's first chunk has no cached keys yet: nothing attended, no tiles, no crash."""
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)
    out, lse, tile_mass = OPS.attention_lse_tiles(q, k, v, None, 0.5, 16)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    assert tile_mass.shape == (1, 2, 0)


@pytest.mark.parametrize("mass", [1.0, 0.9, 0.5, 0.0])
@pytest.mark.parametrize("max_tiles", [1, 5, 40])
def test_select_tiles(max_tiles, mass):
    gen = torch.Generator().manual_seed(max_tiles)
    tile_mass = torch.rand(3, 2, 23, generator=gen) ** 4 * 10
    tile_mass[2, 1] = 0.0  # a head with no mass: no tile reaches a share of nothing
    idx = OPS.select_tiles(tile_mass, max_tiles, mass)
    assert idx.dtype == torch.int32 and idx.shape == (3, 2, max_tiles)
    expected = select_reference(tile_mass, max_tiles, mass)
    if mass >= 1.0:  # the zero-mass head takes arbitrary tiles among equals: check it by count
        assert ((idx[2, 1] >= 0).sum() == min(max_tiles, 23)).item()
        idx, expected = idx[:2], expected[:2]
    assert torch.equal(idx, expected), (idx, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_sparse_attention_lse(case, dtype):
    q, k, v, mask = make_inputs(case, dtype)
    B, Hq, _, M, N, D, tile, _ = case
    scale = D ** -0.5
    idx = partial_selection(OPS.attention_lse_tiles(q, k, v, mask, scale, tile)[2], 3)
    out, lse = OPS.sparse_attention_lse(q, k, v, mask, scale, idx, tile)
    exp_out, exp_lse, _ = dense_attention(q, k, v, restrict(mask, selected_keys(idx, tile, N), B, Hq, M), scale)
    check_attention(out, lse, exp_out, exp_lse, dtype)


@pytest.mark.parametrize("case", CASES[1:5], ids=case_id)
def test_residual_is_the_attention_over_the_other_tiles(case):
    """``subtract_lse(full, sparse)`` is the attention over the unselected keys, and merging it back
    with a fresh sparse attention over the same tiles gives the full external attention."""
    q, k, v, mask = make_inputs(case, torch.float32)
    B, Hq, _, M, N, D, tile, _ = case
    scale = D ** -0.5
    out, lse, tile_mass = OPS.attention_lse_tiles(q, k, v, mask, scale, tile)
    idx = OPS.select_tiles(tile_mass, 2, 1.0)
    sparse = OPS.sparse_attention_lse(q, k, v, mask, scale, idx, tile)
    rest_out, rest_lse = OPS.subtract_lse(out, lse, *sparse)
    assert rest_out.dtype == torch.float32 and rest_lse.dtype == torch.float32
    others = ~selected_keys(idx, tile, N)
    exp_out, exp_lse, _ = dense_attention(q, k, v, restrict(mask, others, B, Hq, M), scale)
    live = torch.isfinite(exp_lse) & (exp_lse > lse - 10)  # rows whose residual is not lost to rounding
    torch.testing.assert_close(rest_lse[live].double(), exp_lse[live], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rest_out[live].double(), exp_out[live], rtol=1e-3, atol=1e-4)
    merged = fbops.merge_lse(rest_out, rest_lse, *sparse)
    check_attention(merged[0].to(q.dtype), merged[1], *dense_attention(q, k, v, mask, scale)[:2], torch.float32)


def reuse_step_inputs(case, dtype, device):
    """Block keys (with a bool mask when the case has a mask), a selection and a random residual."""
    B, Hq, Hkv, M, N, D, tile, kind = case
    gen = torch.Generator().manual_seed(M + N)
    k_blk, v_blk = (torch.randn(B, Hkv, M, D, generator=gen).to(dtype).to(device) for _ in range(2))
    mask_blk = None if kind == "none" else (torch.rand(B, 1, M, M, generator=gen) > 0.3).to(device)
    idx = partial_selection(torch.rand(B, Hkv, -(-N // tile), generator=gen), 3).to(device)
    out_res = torch.randn(B, Hq, M, D, generator=gen).to(device)
    lse_res = (torch.randn(B, Hq, M, generator=gen) * 3).to(device)
    lse_res[..., ::3] = NEG_INF
    out_res[..., ::3, :] = 0
    return idx, k_blk, v_blk, mask_blk, out_res, lse_res


def dense_reuse_step(q, k, v, mask, scale, idx, tile, k_blk, v_blk, mask_blk, out_res, lse_res):
    """float64: dense attention over the selected keys and the block's keys (concatenated), merged with
    the residual."""
    B, Hq, M, _ = q.shape
    N = k.shape[2]
    ext_mask = restrict(mask, selected_keys(idx, tile, N), B, Hq, M)
    blk_mask = torch.ones(B, Hq, M, k_blk.shape[2], dtype=torch.bool) if mask_blk is None else mask_blk.expand(
        B, Hq, M, -1)
    if ext_mask.dtype != torch.bool:
        blk_mask = torch.where(blk_mask, 0.0, NEG_INF)
    fresh = dense_attention(q, torch.cat([k, k_blk], 2), torch.cat([v, v_blk], 2), torch.cat([ext_mask, blk_mask], -1),
                            scale)
    return fbops.reference.merge_lse(out_res.double(), lse_res.double(), *fresh[:2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES[:5], ids=case_id)
def test_sparse_attention_merge_lse(case, dtype):
    q, k, v, mask = make_inputs(case, dtype)
    scale = case[5] ** -0.5
    idx, *rest = reuse_step_inputs(case, dtype, "cpu")
    out, lse = OPS.sparse_attention_merge_lse(q, k, v, mask, scale, idx, case[6], *rest)
    check_attention(out, lse, *dense_reuse_step(q, k, v, mask, scale, idx, case[6], *rest), dtype)


def test_sparse_reuse_step_with_its_own_residual_is_exact():
    """Refresh (tile masses, selection, residual) then a reuse step on the same inputs: the full attention."""
    case = (2, 6, 2, 32, 100, 64, 32, "bool")
    q, k, v, mask = make_inputs(case, torch.float32)
    _, k_blk, v_blk, mask_blk, _, _ = reuse_step_inputs(case, torch.float32, "cpu")
    out, lse, tile_mass = OPS.attention_lse_tiles(q, k, v, mask, 0.125, 32)
    idx = OPS.select_tiles(tile_mass, 2, 0.5)
    residual = OPS.subtract_lse(out, lse, *OPS.sparse_attention_lse(q, k, v, mask, 0.125, idx, 32))
    step = OPS.sparse_attention_merge_lse(q, k, v, mask, 0.125, idx, 32, k_blk, v_blk, mask_blk, *residual)
    full_mask = torch.cat([mask, mask_blk.expand(2, 6, 32, 32)], -1)
    check_attention(*step, *dense_attention(q, torch.cat([k, k_blk], 2), torch.cat([v, v_blk], 2), full_mask,
                                            0.125)[:2], torch.float32)


def test_residual_extremes():
    """All tiles selected: nothing is left (``-inf``); none selected: the residual is the full result."""
    case = (2, 6, 2, 32, 100, 64, 32, "bool")
    q, k, v, mask = make_inputs(case, torch.float32)
    out, lse, tile_mass = OPS.attention_lse_tiles(q, k, v, mask, 0.125, 32)
    everything = OPS.select_tiles(tile_mass, 8, 1.0)
    rest_out, rest_lse = OPS.subtract_lse(out, lse, *OPS.sparse_attention_lse(q, k, v, mask, 0.125, everything, 32))
    assert torch.isneginf(rest_lse).all() and (rest_out == 0).all()
    nothing = torch.full_like(everything, -1)
    none_out, none_lse = OPS.sparse_attention_lse(q, k, v, mask, 0.125, nothing, 32)
    assert torch.isneginf(none_lse).all() and (none_out == 0).all()
    rest_out, rest_lse = OPS.subtract_lse(out, lse, none_out, none_lse)
    assert torch.equal(rest_out, out.float()) and torch.equal(rest_lse, lse)


def test_subtract_lse_formula():
    gen = torch.Generator().manual_seed(0)
    out_a, out_b = torch.randn(2, 3, 5, 8, generator=gen), torch.randn(2, 3, 5, 8, generator=gen)
    lse_a = torch.randn(2, 3, 5, generator=gen) * 3
    lse_b = lse_a + torch.log(torch.rand(2, 3, 5, generator=gen))  # e^Lb < e^La
    lse_b[0, 0, :2] = NEG_INF             # nothing selected: the residual is a itself
    lse_b[0, 1, 0] = lse_a[0, 1, 0]       # everything selected: empty
    lse_b[0, 1, 1] = lse_a[0, 1, 1] + 1e-3  # more than everything (rounding): empty
    lse_a[1, 2, 3] = lse_b[1, 2, 3] = NEG_INF
    out, lse = OPS.subtract_lse(out_a.bfloat16(), lse_a, out_b.bfloat16(), lse_b)
    assert out.dtype == torch.float32
    a, b = torch.exp(lse_a.double()), torch.exp(lse_b.double())
    exp_lse = torch.log(a - b)
    exp_out = (a[..., None] * out_a.bfloat16().double() - b[..., None] * out_b.bfloat16().double()) / (a - b)[..., None]
    empty = ~((a - b) > 1e-6 * a)
    assert torch.equal(torch.isneginf(lse), empty) and (out[empty] == 0).all()
    torch.testing.assert_close(lse[~empty].double(), exp_lse[~empty], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[~empty].double(), exp_out[~empty], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["attention_lse_tiles", "select_tiles", "sparse_attention_lse", "subtract_lse",
                                  "sparse_attention_merge_lse"])
def test_opcheck(name):
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck is not available")
    q, k, v, mask = make_inputs((1, 4, 2, 3, 40, 16, 16, "bool"), torch.float32)
    out, lse, tile_mass = OPS.attention_lse_tiles(q, k, v, mask, 0.25, 16)
    idx = OPS.select_tiles(tile_mass, 2, 1.0)
    args = {
        "attention_lse_tiles": (q, k, v, mask, 0.25, 16),
        "select_tiles": (tile_mass, 2, 0.8),
        "sparse_attention_lse": (q, k, v, mask, 0.25, idx, 16),
        "subtract_lse": (out, lse, *OPS.sparse_attention_lse(q, k, v, mask, 0.25, idx, 16)),
        "sparse_attention_merge_lse": (q, k, v, mask, 0.25, idx, 16, k[:, :, :3], v[:, :, :3], None, out, lse),
    }[name]
    torch.library.opcheck(getattr(OPS, name).default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_bad_idx_is_an_error():
    q, k, v, _ = make_inputs((1, 4, 2, 3, 40, 16, 16, "none"), torch.float32)
    with pytest.raises(RuntimeError, match="idx must be"):
        OPS.sparse_attention_lse(q, k, v, None, 0.25, torch.zeros(1, 4, 2, dtype=torch.int32), 16)


# --------------------------------------------------------------------------- the Triton kernels


# (case, dtype, num_splits): small, so that the interpreter stays within a few seconds each
TRITON_CASES = [
    ((1, 4, 2, 1, 150, 64, 32, "none"), torch.float32, None),
    ((1, 4, 2, 32, 100, 128, 16, "bool"), torch.bfloat16, 3),
    ((1, 4, 1, 32, 90, 64, 48, "float_inf"), torch.float32, 2),  # 128 rows per KV head
    ((1, 2, 2, 64, 70, 256, 32, "empty_rows"), torch.float32, 1),
    ((1, 2, 2, 1, 2100, 64, 32, "none"), torch.float32, 70),  # more splits than one reduction block
    ((1, 16, 1, 20, 150, 64, 32, "none"), torch.float32, 2),  # 320 rows: more than one tile-mass row block
]


def triton_id(c):
    return case_id(c[0]) + "-" + str(c[1]).replace("torch.", "") + f"-splits{c[2]}"


@in_process
@pytest.mark.parametrize("tcase", TRITON_CASES, ids=triton_id)
def test_triton_attention_lse_tiles(tcase):
    case, dtype, num_splits = tcase
    q, k, v, mask = make_inputs(case, dtype, DEVICE)
    tile, scale = case[6], case[5] ** -0.5
    out, lse, tile_mass = fbops.triton_attention.attention_lse_tiles(q, k, v, mask, scale, tile, num_splits=num_splits)
    exp_out, exp_lse, p = dense_attention(q.cpu(), k.cpu(), v.cpu(), None if mask is None else mask.cpu(), scale)
    check_attention(out, lse, exp_out, exp_lse, dtype)
    torch.testing.assert_close(tile_mass.double().cpu(), dense_tile_mass(p, k.shape[1], tile), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not CUDA or fbops.triton_attention is None, reason="needs a GPU: Inductor compiles the kernels")
def test_inductor_refresh_copies_no_input():
    """The refresh compiled by Inductor launches its two kernels on the inputs themselves: the attention
    kernel's chunk-LSE store by inline PTX is analysed as a ``tl.store`` (``fbcompile.backends.
    kernel_analysis``); unread, it would count as writing every argument, and q, k, v be copied first."""
    from torch._inductor.utils import run_and_get_code

    case = (1, 12, 2, 32, 1000, 128, 64, "none")
    q, k, v, _ = make_inputs(case, torch.bfloat16, DEVICE)
    compiled = torch.compile(lambda q, k, v: OPS.attention_lse_tiles(q, k, v, None, 0.1, 64), backend="inductor",
                             fullgraph=True)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        (out, lse, tile_mass), code = run_and_get_code(compiled, q, k, v)
    src = "\n".join(code)
    assert "_attn_kernel" in src and "_reduce_kernel" in src
    assert "triton_poi" not in src and "clone" not in src and "copy_" not in src, src
    exp_out, exp_lse, p = dense_attention(q.cpu(), k.cpu(), v.cpu(), None, 0.1)
    check_attention(out, lse, exp_out, exp_lse, torch.bfloat16)
    torch.testing.assert_close(tile_mass.double().cpu(), dense_tile_mass(p, k.shape[1], 64), rtol=1e-4, atol=1e-5)


@in_process
@pytest.mark.parametrize("tcase", TRITON_CASES, ids=triton_id)
def test_triton_sparse_attention_lse(tcase):
    """Includes the fused merge with an external result (the cached residual at a reuse step)."""
    case, dtype, num_splits = tcase
    q, k, v, mask = make_inputs(case, dtype, DEVICE)
    B, Hq, _, M, N, D, tile, _ = case
    scale = D ** -0.5
    cpu_mask = None if mask is None else mask.cpu()
    tile_mass = OPS.attention_lse_tiles(q.cpu(), k.cpu(), v.cpu(), cpu_mask, scale, tile)[2]
    idx = partial_selection(tile_mass, 3).to(DEVICE)
    ta = fbops.triton_attention
    out, lse = ta.sparse_attention_lse(q, k, v, mask, scale, idx, tile, num_splits=num_splits)
    exp = dense_attention(q.cpu(), k.cpu(), v.cpu(), restrict(cpu_mask, selected_keys(idx.cpu(), tile, N), B, Hq, M),
                          scale)[:2]
    check_attention(out, lse, *exp, dtype)
    gen = torch.Generator().manual_seed(1)
    out_ext = torch.randn(out.shape, generator=gen).to(dtype).to(DEVICE)
    lse_ext = torch.randn(lse.shape, generator=gen).to(DEVICE)
    lse_ext[..., ::2] = NEG_INF
    merged = ta.sparse_attention_lse(q, k, v, mask, scale, idx, tile, out_ext, lse_ext, num_splits=num_splits)
    exp_merged = fbops.reference.merge_lse(out_ext.cpu().double(), lse_ext.cpu().double(), *exp)
    check_attention(*merged, *exp_merged, dtype)


@in_process
@pytest.mark.parametrize("tcase", TRITON_CASES, ids=triton_id)
def test_triton_sparse_attention_merge_lse(tcase):
    """The whole reuse step in one kernel (the last split also takes the block's keys) and its reduction,
    or in registers when unsplit."""
    case, dtype, num_splits = tcase
    q, k, v, mask = make_inputs(case, dtype, DEVICE)
    scale = case[5] ** -0.5
    idx, *rest = reuse_step_inputs(case, dtype, DEVICE)
    out, lse = fbops.triton_attention.sparse_attention_merge_lse(q, k, v, mask, scale, idx, case[6], *rest,
                                                                 num_splits=num_splits)
    cpu = [x.cpu() if isinstance(x, torch.Tensor) else x for x in (q, k, v, mask, scale, idx, case[6], *rest)]
    check_attention(out, lse, *dense_reuse_step(*cpu), dtype)


@pytest.mark.skipif(fbops.triton_attention is None or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="no triton, or interpreted kernels (which do not trace): run after another module")
def test_cuda_host_code_traces_with_symbolic_keys(monkeypatch):
    """The CUDA path's host code (as Inductor traces it through the triton ops), on fake CUDA tensors
    with a symbolic key count: two launches per op, and no guard that ties the graph to a key count."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    ta = fbops.triton_attention
    monkeypatch.setattr(ta, "_num_sms", lambda device: 132)

    def reuse_pipeline(q, k, v, k_blk, v_blk, idx, out_res, lse_res):
        out, lse, tile_mass = ta.attention_lse_tiles(q, k, v, None, 0.1, 32)
        sparse = ta.sparse_attention_lse(q, k, v, None, 0.1, idx, 32)
        step = ta.sparse_attention_merge_lse(q, k, v, None, 0.1, idx, 32, k_blk, v_blk, None, out_res, lse_res)
        return out, lse, tile_mass, *sparse, *step

    env = ShapeEnv()
    with FakeTensorMode(shape_env=env):
        n = env.create_symintnode(env.create_symbol(1000, ConstantSource("N")), hint=1000)
        cuda = dict(device="cuda", dtype=torch.bfloat16)
        q, k_blk, v_blk = torch.empty(1, 12, 32, 128, **cuda), torch.empty(1, 2, 32, 128, **cuda), \
            torch.empty(1, 2, 32, 128, **cuda)
        k, v = torch.empty(1, 2, n, 128, **cuda), torch.empty(1, 2, n, 128, **cuda)
        idx = torch.empty(1, 2, 16, device="cuda", dtype=torch.int32)
        out_res, lse_res = torch.empty(1, 12, 32, 128, device="cuda"), torch.empty(1, 12, 32, device="cuda")
        gm = make_fx(reuse_pipeline)(q, k, v, k_blk, v_blk, idx, out_res, lse_res)
    launches = [node for node in gm.graph.nodes if "triton_kernel_wrapper" in str(node.target)]
    assert len(launches) == 6
    symbol = n.node.expr
    for keys in (33, 4097, 131072):  # the graph serves any cache length (beyond one tile)
        assert all(bool(guard.expr.subs(symbol, keys)) for guard in env.guards), env.guards


@pytest.mark.skipif(fbops.triton_attention is None or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="no triton, or interpreted kernels (which do not trace): run after another module")
def test_merged_results_are_block_major_in_fake_and_real_host_code(monkeypatch):
    """On fake CUDA tensors, a merged result (a split site's whole output) has the same strides from the
    ops' fake implementations as from the host code Inductor traces: block-major, so that the model's
    ``out.transpose(1, 2)`` is contiguous and its reshape for the output projection copies nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    ta = fbops.triton_attention
    monkeypatch.setattr(ta, "_num_sms", lambda device: 132)

    def merges(q, k, v, k_blk, v_blk, idx, out_res, lse_res):
        return (*ta.attention_merge_lse(q, k_blk, v_blk, None, 0.1, out_res.to(q.dtype), lse_res),
                *ta.sparse_attention_merge_lse(q, k, v, None, 0.1, idx, 32, k_blk, v_blk, None, out_res, lse_res))

    with FakeTensorMode():
        cuda = dict(device="cuda", dtype=torch.bfloat16)
        q, k_blk, v_blk = (torch.empty(2, 12, 32, 128, **cuda), torch.empty(2, 2, 32, 128, **cuda),
                           torch.empty(2, 2, 32, 128, **cuda))
        k, v = torch.empty(2, 2, 1000, 128, **cuda), torch.empty(2, 2, 1000, 128, **cuda)
        idx = torch.empty(2, 2, 16, device="cuda", dtype=torch.int32)
        out_res, lse_res = torch.empty(2, 12, 32, 128, device="cuda"), torch.empty(2, 12, 32, device="cuda")
        args = (q, k, v, k_blk, v_blk, idx, out_res, lse_res)
        traced = [n.meta["val"] for n in make_fx(merges)(*args).graph.find_nodes(op="output")[0].args[0]]
        faked = [*OPS.attention_merge_lse(q, k_blk, v_blk, None, 0.1, out_res.to(q.dtype), lse_res),
                 *OPS.sparse_attention_merge_lse(q, k, v, None, 0.1, idx, 32, k_blk, v_blk, None, out_res, lse_res)]
    for got, fake in zip(traced, faked):
        assert (got.shape, got.stride()) == (fake.shape, fake.stride())
    for out in traced[::2]:
        assert out.transpose(1, 2).is_contiguous(), out.stride()


@pytest.mark.skipif(IN_PROCESS or fbops.triton_attention is None, reason="kernels tested in this process")
def test_in_subprocess():
    """``triton`` was imported before this module could switch on the interpreter: rerun the kernel tests."""
    triton_interpreter.rerun_in_subprocess(__file__, "test_triton_")
