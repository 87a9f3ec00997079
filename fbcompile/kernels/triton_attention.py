"""Triton kernels for the split attention of block diffusion.

Semantics are those of :mod:`fbcompile.kernels.reference`. Entry points:

* :func:`attention_lse` - the block-external part: a few block queries against a long cached KV.
  It is memory bound, so the kernel reads every KV byte once and spreads that read over all SMs:
  the key range is split across programs (flash-decoding) and each program packs all query heads of
  one KV head and all block queries into the rows of one ``tl.dot`` (GQA packing). A second small
  kernel combines the splits through their log-sum-exp.
* :func:`attention_merge_lse` - the block-internal part (the block over its own few keys), fused with
  the exact LSE merge against the cached external result, so a reuse step is one launch.
* Sparse external attention with residual reuse (see :mod:`fbcompile.kernels.reference`):
  :func:`attention_lse_tiles` - :func:`attention_lse` that also scores the KV tiles (their attention
  mass) from the probabilities of the same pass; :func:`sparse_attention_lse` - the external part over
  selected KV tiles only (gathered, split over the tiles); :func:`sparse_attention_merge_lse` - a
  whole sparse reuse step (selected tiles + the block's keys + the cached residual).

Tile sizes and split counts are a function of the shapes (and the SM count) alone: no autotuning, no
host syncs, no data-dependent allocation, so all entry points can be captured in CUDA graphs, and
their host code traces (``torch.library.triton_op`` in :mod:`fbcompile.ops`), the key count
symbolically, the batch and query counts within power-of-two buckets. Head dims up to 512.
Softmax runs in the log2 domain (``exp2``); stored LSEs are natural logs.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fbcompile.kernels.triton_common import cdiv as _cdiv
from fbcompile.kernels.triton_common import dot
from fbcompile.kernels.triton_common import num_sms as _num_sms
from fbcompile.kernels.triton_common import ptx_asm
from fbcompile.kernels.triton_common import upcast_dot

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 512
_MIN_TILES_PER_SPLIT = 4  # below ~256 keys per program the split overhead outweighs the parallelism
_MASS_BLOCK_T = 32  # KV tiles per tile-mass program of the split reduction (H200: the fastest of 8-64 in two sweeps)
_REDUCE_ROWS = 8  # packed rows per program of the split reduction (see :func:`_reduce`)


@triton.jit
def _merge_partial(m, l, acc, lse2, o):
    """Fold a normalised partial result (``lse2`` in log2 units, ``o`` fp32) into an online-softmax
    state ``(m, l, acc)``; ``-inf`` on either side gets weight 0 and never produces NaN."""
    m_new = tl.maximum(m, lse2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    w = tl.exp2(lse2 - m_safe)
    return m_new, l * alpha + w, acc * alpha[:, None] + w[:, None] * o


@triton.jit
def _store_final(Out, Lse, out_off, lse_off, row_ok, offs_dv, m, l, acc, DV: tl.constexpr):
    """Normalise and write ``out`` (its dtype; rows at ``out_off``, the head dim contiguous) and the
    natural-log ``lse`` (at ``lse_off``); empty rows get 0 / -inf."""
    has = l > 0.0
    l_safe = tl.where(has, l, 1.0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    out = tl.where(has[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(has, (m_safe + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(Out + out_off[:, None] + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(Lse + lse_off, lse, mask=row_ok)


@triton.jit
def _write_result(OutExt, LseExt, Out, Lse, OPart, LPart, seb, seh, sem, sed, slb, slh, slm, sob, soh, som,
                  b, h, m, rows, row_ok, offs_dv, pid_bh, pid_s, R, m_i, l_i, acc,
                  DV: tl.constexpr, HAS_EXT: tl.constexpr, SPLIT: tl.constexpr):
    """End of a split-attention program: ``SPLIT`` writes the normalised partial and its log2-LSE for
    :func:`_reduce_kernel` (an empty split is ``(0, -inf)``); otherwise the result, merged with
    ``OutExt``/``LseExt`` when ``HAS_EXT``."""
    if SPLIT:
        has = l_i > 0.0
        l_safe = tl.where(has, l_i, 1.0)
        part = (pid_bh * tl.num_programs(1) + pid_s) * R + rows
        tl.store(OPart + part[:, None] * DV + offs_dv[None, :], acc / l_safe[:, None],
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), eviction_policy="evict_last")  # read next
        tl.store(LPart + part, tl.where(has, m_i + tl.log2(l_safe), float("-inf")), mask=row_ok)
    else:
        if HAS_EXT:
            o_e = tl.load(OutExt + b * seb + h[:, None] * seh + m[:, None] * sem + offs_dv[None, :] * sed,
                          mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
            lse_e = tl.load(LseExt + b * slb + h * slh + m * slm, mask=row_ok, other=float("-inf"))
            m_i, l_i, acc = _merge_partial(m_i, l_i, acc, lse_e.to(tl.float32) * 1.4426950408889634, o_e)
        _store_final(Out, Lse, b * sob + h * soh + m * som, pid_bh * R + rows, row_ok, offs_dv, m_i, l_i, acc, DV)


@triton.jit
def _packed_rows(pid_r, pid_bh, Hkv, GROUP, M, R, BLOCK_R: tl.constexpr):
    """Row tile ``pid_r`` of (batch, KV head) ``pid_bh``: ``BLOCK_R`` packed rows, row ``r`` being query
    ``r % M`` of query head ``hkv * GROUP + r // M`` (GQA packing). Returns ``(b, hkv, rows, row_ok, h, m)``."""
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    h = (hkv * GROUP + rows // M).to(tl.int64)
    m = (rows % M).to(tl.int64)
    return b, hkv, rows, row_ok, h, m


@triton.jit
def _attend_tile(q, k_ptrs, v_ptrs, mask_ptrs, key_ok, row_ok, offs_d, offs_dv, m_i, l_i, acc, qk_scale,
                 D: tl.constexpr, DV: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, KEY_MASKED: tl.constexpr,
                 KV_EVICT: tl.constexpr):
    """One online-softmax step over a tile of keys (``key_ok`` marks the real ones; without
    ``KEY_MASKED`` all are, and no key mask is applied): returns the new ``(m, l, acc)`` state, the
    tile's probabilities ``p`` relative to ``m_safe`` and ``m_safe``. ``KV_EVICT``: the K and V loads'
    L2 eviction policy (see :func:`_attn_kernel`)."""
    k = tl.load(k_ptrs, mask=key_ok[:, None] & (offs_d[None, :] < D) if KEY_MASKED else offs_d[None, :] < D,
                other=0.0, eviction_policy=KV_EVICT)
    s = dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale
    if HAS_MASK:
        if MASK_BOOL:
            attend = tl.load(mask_ptrs, mask=row_ok[:, None] & key_ok[None, :], other=0)
            s = tl.where(attend != 0, s, float("-inf"))
        else:
            bias = tl.load(mask_ptrs, mask=row_ok[:, None] & key_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
    if KEY_MASKED:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=key_ok[:, None] & (offs_dv[None, :] < DV) if KEY_MASKED else offs_dv[None, :] < DV,
                other=0.0, eviction_policy=KV_EVICT)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
    return m_new, l_i, acc, p, m_safe


@triton.jit
def _attend_block(q, KB, VB, MaskB, b, hkv, h, m, skbb, skbh, skbn, skbd, svbb, svbh, svbn, svbd,
                  smbb, smbh, smbm, smbn, NB, row_ok, offs_n, offs_d, offs_dv, m_i, l_i, acc, qk_scale,
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK_B: tl.constexpr,
                  MASK_B_BOOL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                  KV_EVICT: tl.constexpr):
    """The online-softmax state ``(m, l, acc)`` after all ``NB`` keys of the block's own ``(KB, VB)``
    (with ``MaskB`` when ``HAS_MASK_B``): the block-internal part, taken by one split program."""
    kb_ptrs = KB + b * skbb + hkv * skbh + offs_n[:, None] * skbn + offs_d[None, :] * skbd
    vb_ptrs = VB + b * svbb + hkv * svbh + offs_n[:, None] * svbn + offs_dv[None, :] * svbd
    maskb_ptrs = MaskB + b * smbb + h[:, None] * smbh + m[:, None] * smbm + offs_n[None, :] * smbn
    for n0 in range(0, NB, BLOCK_N):
        m_i, l_i, acc, p, m_safe = _attend_tile(
            q, kb_ptrs, vb_ptrs, maskb_ptrs, (n0 + offs_n) < NB, row_ok, offs_d, offs_dv, m_i, l_i, acc,
            qk_scale, D, DV, HAS_MASK_B, MASK_B_BOOL, DOT_PRECISION, UPCAST_DOT, True, KV_EVICT)
        kb_ptrs += BLOCK_N * skbn
        vb_ptrs += BLOCK_N * svbn
        maskb_ptrs += BLOCK_N * smbn
    return m_i, l_i, acc


@triton.jit
def _log2_sum(p_sum, m):
    """``m + log2(p_sum)`` for probabilities relative to ``2^m``; ``-inf`` where they sum to 0."""
    return tl.where(p_sum > 0.0, m + tl.log2(tl.maximum(p_sum, 1e-30)), float("-inf"))  # 1e-38 would be fp64


@triton.jit
def _store_in_register_layout(ptrs, values, mask):
    """``tl.store(ptrs, values, mask=mask, eviction_policy="evict_last")`` of fp32 ``values`` as an
    inline PTX store: Triton gives every ``tl.store`` a blocked layout of its own, so row values of a
    ``tl.dot`` (a slice of the MMA layout) cross warps through shared memory in the key loop, where
    ptxas then serialises the asynchronous MMAs (warning C7515 for sm90: ``benchmarks/chunk_lse_ttgir.py``);
    an elementwise asm op keeps the values where they are. Threads that hold the same
    row store the same value to the same address. NVIDIA GPUs only (no interpreter). Torch's analysis of
    what a kernel writes cannot read it: :mod:`fbcompile.backends.kernel_analysis` has it analyse the
    ``tl.store`` form."""
    tl.inline_asm_elementwise(
        """{
        .reg .pred ok;
        .reg .b64 policy;
        setp.ne.b32 ok, $3, 0;
        createpolicy.fractional.L2::evict_last.b64 policy, 1.0;
        @ok st.global.L1::evict_last.L2::cache_hint.f32 [$1], $2, policy;
        mov.b32 $0, 0;
        }""",
        "=r,l,f,r", [ptrs.to(tl.int64), values, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _split_program(HAS_BLOCK: tl.constexpr):
    """``(row tile, split, batch x KV head)`` of this program. With ``HAS_BLOCK`` the programs of the
    last split (the block's few keys: short) launch after every key split's: in grid order they sit
    among the key splits, which at batch 8 nearly fill the GPU on their own (240 programs for 264
    slots on an H100), so some long key splits waited for a second wave. Measured: -1.2 ms per exact
    block at batch 8 (``benchmarks/results/session37_h100.md``)."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    if HAS_BLOCK:
        nr = tl.num_programs(0)
        keyed = tl.num_programs(1) - 1
        linear = pid_r + nr * (pid_s + tl.num_programs(1) * pid_bh)
        tile = linear // nr
        in_keys = linear < nr * keyed * tl.num_programs(2)
        pid_r = linear % nr
        pid_s = tl.where(in_keys, tile % keyed, keyed)
        pid_bh = tl.where(in_keys, tile // keyed, tile - keyed * tl.num_programs(2))
    return pid_r, pid_s, pid_bh


@triton.jit
def _attn_kernel(
    Q, K, V, Mask, KB, VB, MaskB, OutExt, LseExt, Out, Lse, OPart, LPart, ChunkLse, KeyCount,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    skbb, skbh, skbn, skbd,
    svbb, svbh, svbn, svbd,
    smbb, smbh, smbm, smbn,
    seb, seh, sem, sed,
    slb, slh, slm,
    sob, soh, som,
    Hkv, GROUP, M, N, NB, R, keys_per_split, qk_scale, NC,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_BLOCK: tl.constexpr, HAS_MASK_B: tl.constexpr,
    MASK_B_BOOL: tl.constexpr, HAS_EXT: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, CHUNK: tl.constexpr, CHUNK_STORE_PTX: tl.constexpr,
    HAS_COUNT: tl.constexpr, KV_EVICT: tl.constexpr,
):
    """One program: ``BLOCK_R`` packed rows (query head, block query) of one (batch, KV head) over one
    key split. ``SPLIT`` writes normalised partials for :func:`_reduce_kernel`; otherwise the result
    (merged with ``OutExt``/``LseExt`` when ``HAS_EXT``) is written directly. ``CHUNK > 0`` (a divisor
    of ``BLOCK_N``) also writes the log2-LSE of every chunk of ``CHUNK`` keys per row, ``[B*Hkv, NC, R]``,
    from the probabilities the softmax computes anyway: the tile scores cost no second KV read;
    ``CHUNK_STORE_PTX`` stores them by :func:`_store_in_register_layout`, else by ``tl.store``.
    ``HAS_COUNT``: only the first ``KeyCount[0]`` of the ``N`` keys count (the rest is padding of a
    buffer with spare capacity), and the splits divide those keys, read on the device, among them.
    ``HAS_BLOCK``: one more split program, the last, attends to the ``NB`` keys of ``(KB, VB)`` instead
    (the block's own, with ``MaskB``), so that :func:`_reduce_kernel` sees both parts of a split
    attention; its key range lies past ``N`` and so is empty. ``KV_EVICT``: the K/V loads' L2 policy;
    a split launch marks them ``evict_first``: each KV tile is read once (by the row tiles of its split,
    which run side by side), and the fp32 partials, stored ``evict_last``, then stay in L2 for the
    reduction rather than being pushed out by the streamed KV."""
    pid_r, pid_s, pid_bh = _split_program(HAS_BLOCK)
    pid_bh = pid_bh.to(tl.int64)
    qk_scale = tl.full([], qk_scale, tl.float32)  # Inductor passes Python floats as fp64
    b, hkv, rows, row_ok, h, m = _packed_rows(pid_r, pid_bh, Hkv, GROUP, M, R, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)

    q = tl.load(Q + b * sqb + h[:, None] * sqh + m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_ptrs = K + b * skb + hkv * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + b * svb + hkv * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd
    mask_ptrs = Mask + b * smb + h[:, None] * smh + m[:, None] * smm + offs_n[None, :] * smn

    if HAS_COUNT:
        N = tl.minimum(tl.load(KeyCount).to(tl.int32), N)
        keys_per_split = tl.cdiv(tl.cdiv(N, BLOCK_N), tl.num_programs(1) - (1 if HAS_BLOCK else 0)) * BLOCK_N
    n_start = pid_s * keys_per_split
    n_end = tl.maximum(tl.minimum(n_start + keys_per_split, N), n_start)  # empty past the end
    k_ptrs += n_start.to(tl.int64) * skn
    v_ptrs += n_start.to(tl.int64) * svn
    mask_ptrs += n_start.to(tl.int64) * smn

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    # Without a mask tile or chunk scores, the whole key tiles skip the key mask and the partial last
    # tile (if any) takes it: 4-12% faster at each of four shapes measured (H100, session39_h100.md).
    # With a mask the same split once gave wrong values natively in one fp16 case (33 masked keys, no
    # whole tile before the partial one; cause not found, attention_h200_notes.md), so every tile of
    # the loop below masks the keys past ``n_end``.
    if CHUNK == 0 and not HAS_MASK:
        n_whole = n_start + (n_end - n_start) // BLOCK_N * BLOCK_N
        for n0 in range(n_start, n_whole, BLOCK_N):
            m_i, l_i, acc, p, m_safe = _attend_tile(
                q, k_ptrs, v_ptrs, mask_ptrs, offs_n < BLOCK_N, row_ok, offs_d, offs_dv, m_i, l_i, acc, qk_scale,
                D, DV, HAS_MASK, MASK_BOOL, DOT_PRECISION, UPCAST_DOT, False, KV_EVICT)
            k_ptrs += BLOCK_N * skn
            v_ptrs += BLOCK_N * svn
        if n_whole < n_end:
            m_i, l_i, acc, p, m_safe = _attend_tile(
                q, k_ptrs, v_ptrs, mask_ptrs, (n_whole + offs_n) < n_end, row_ok, offs_d, offs_dv, m_i, l_i, acc,
                qk_scale, D, DV, HAS_MASK, MASK_BOOL, DOT_PRECISION, UPCAST_DOT, True, KV_EVICT)
        n_end = n_start  # the loop below runs no tile
    for n0 in range(n_start, n_end, BLOCK_N):
        key_ok = (n0 + offs_n) < n_end
        m_i, l_i, acc, p, m_safe = _attend_tile(
            q, k_ptrs, v_ptrs, mask_ptrs, key_ok, row_ok, offs_d, offs_dv, m_i, l_i, acc, qk_scale,
            D, DV, HAS_MASK, MASK_BOOL, DOT_PRECISION, UPCAST_DOT, True, KV_EVICT)
        # The log2-LSE of each chunk of CHUNK keys, per row, for _tile_mass. Masked row sums rather
        # than a reshape, which would move ``p`` out of the dot's register layout.
        if CHUNK > 0:
            for j in tl.static_range(BLOCK_N // CHUNK):
                if BLOCK_N == CHUNK:
                    p_sum = tl.sum(p, 1)
                else:
                    p_sum = tl.sum(tl.where((offs_n // CHUNK == j)[None, :], p, 0.0), 1)
                chunk = n0 // CHUNK + j + 0 * rows  # per row: the interpreter cannot `&` a scalar condition
                chunk_ptrs = ChunkLse + (pid_bh * NC + chunk) * R + rows
                if CHUNK_STORE_PTX:
                    _store_in_register_layout(chunk_ptrs, _log2_sum(p_sum, m_safe), row_ok & (chunk < NC))
                else:
                    tl.store(chunk_ptrs, _log2_sum(p_sum, m_safe), mask=row_ok & (chunk < NC),
                             eviction_policy="evict_last")
        if HAS_MASK:
            mask_ptrs += BLOCK_N * smn
        k_ptrs += BLOCK_N * skn
        v_ptrs += BLOCK_N * svn
    if HAS_BLOCK:
        if pid_s == tl.num_programs(1) - 1:
            m_i, l_i, acc = _attend_block(
                q, KB, VB, MaskB, b, hkv, h, m, skbb, skbh, skbn, skbd, svbb, svbh, svbn, svbd,
                smbb, smbh, smbm, smbn, NB, row_ok, offs_n, offs_d, offs_dv, m_i, l_i, acc, qk_scale,
                D, DV, BLOCK_N, HAS_MASK_B, MASK_B_BOOL, DOT_PRECISION, UPCAST_DOT, KV_EVICT)

    _write_result(OutExt, LseExt, Out, Lse, OPart, LPart, seb, seh, sem, sed, slb, slh, slm, sob, soh, som,
                  b, h, m, rows, row_ok, offs_dv, pid_bh, pid_s, R, m_i, l_i, acc, DV, HAS_EXT, SPLIT)


@triton.jit
def _reduce_rows(
    OPart, LPart, OutExt, LseExt, Out, Lse, SaveOut, SaveLse, seb, seh, sem, sed, slb, slh, slm, sob, soh, som,
    ssb, ssh, ssm, Hkv, GROUP, M, R, num_splits, pid_r, pid_bh,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_EXT: tl.constexpr, HAS_BLOCK: tl.constexpr,
):
    """Combine the per-split partials of ``BLOCK_R`` packed rows (and optionally an external result).

    ``BLOCK_S`` splits are loaded as one [rows, splits, Dv] tile, so the reads are issued together
    rather than one dependent round trip per split (which made this kernel latency bound).
    ``HAS_BLOCK``: partial ``num_splits`` (one past the splits) is the block-internal part; the splits
    before it, combined, are the external part, also written to ``SaveOut``/``SaveLse`` for reuse."""
    parts = num_splits + (1 if HAS_BLOCK else 0)  # partials per (batch, KV head)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        split_ok = (s0 + offs_s) < num_splits
        part = (pid_bh * parts + s0 + offs_s[None, :]) * R + rows[:, None]  # [rows, splits]
        ok = row_ok[:, None] & split_ok[None, :]
        lse2 = tl.load(LPart + part, mask=ok, other=float("-inf"))
        o = tl.load(OPart + part[:, :, None] * DV + offs_dv[None, None, :],
                    mask=ok[:, :, None] & dv_ok[None, None, :], other=0.0, eviction_policy="evict_first")
        m_new = tl.maximum(m_i, tl.max(lse2, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        w = tl.exp2(lse2 - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
        m_i = m_new
    b = pid_bh // Hkv
    h = ((pid_bh % Hkv) * GROUP + rows // M).to(tl.int64)
    m = (rows % M).to(tl.int64)
    if HAS_EXT:
        o_e = tl.load(OutExt + b * seb + h[:, None] * seh + m[:, None] * sem + offs_dv[None, :] * sed,
                      mask=row_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        lse_e = tl.load(LseExt + b * slb + h * slh + m * slm, mask=row_ok, other=float("-inf"))
        m_i, l_i, acc = _merge_partial(m_i, l_i, acc, lse_e.to(tl.float32) * 1.4426950408889634, o_e)
    if HAS_BLOCK:
        _store_final(SaveOut, SaveLse, b * ssb + h * ssh + m * ssm, pid_bh * R + rows, row_ok, offs_dv,
                     m_i, l_i, acc, DV)
        part = (pid_bh * parts + num_splits) * R + rows
        lse_i = tl.load(LPart + part, mask=row_ok, other=float("-inf"))
        o_i = tl.load(OPart + part[:, None] * DV + offs_dv[None, :], mask=row_ok[:, None] & dv_ok[None, :],
                      other=0.0)
        m_i, l_i, acc = _merge_partial(m_i, l_i, acc, lse_i, o_i)
    _store_final(Out, Lse, b * sob + h * soh + m * som, pid_bh * R + rows, row_ok, offs_dv, m_i, l_i, acc, DV)


@triton.jit
def _tile_mass(
    LPart, ChunkLse, TileMass, R, num_splits, NC, T, CPT, pid_t, pid_bh,
    BLOCK_T: tl.constexpr, BLOCK_RR: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Mass of ``BLOCK_T`` KV tiles of one (batch, KV head): ``sum 2^(chunk_lse - lse)`` over the rows
    and the ``CPT`` chunks of each tile, each row's final log2-LSE taken from the split partials
    (rows attending to nothing contribute 0)."""
    tiles = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tile_ok = tiles < T
    offs_r = tl.arange(0, BLOCK_RR)
    offs_s = tl.arange(0, BLOCK_S)
    mass = tl.zeros([BLOCK_T], tl.float32)
    for r0 in range(0, R, BLOCK_RR):
        rows = r0 + offs_r
        row_ok = rows < R
        m_i = tl.full([BLOCK_RR], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_RR], tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            ok = row_ok[:, None] & ((s0 + offs_s) < num_splits)[None, :]
            lse2 = tl.load(LPart + (pid_bh * num_splits + s0 + offs_s[None, :]) * R + rows[:, None], mask=ok,
                           other=float("-inf"))
            m_new = tl.maximum(m_i, tl.max(lse2, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(lse2 - m_safe[:, None]), 1)
            m_i = m_new
        live = l_i > 0.0
        row_lse2 = tl.where(live, _log2_sum(l_i, tl.where(live, m_i, 0.0)), 0.0)
        for c in range(0, CPT):
            chunk = tiles.to(tl.int64) * CPT + c
            ok = (tile_ok & (chunk < NC))[:, None] & live[None, :]
            clse = tl.load(ChunkLse + (pid_bh * NC + chunk[:, None]) * R + rows[None, :], mask=ok,
                           other=float("-inf"))
            mass += tl.sum(tl.where(ok, tl.exp2(clse - row_lse2[None, :]), 0.0), 1)
    tl.store(TileMass + pid_bh * T + tiles, mass, mask=tile_ok)


@triton.jit
def _reduce_kernel(
    OPart, LPart, OutExt, LseExt, Out, Lse, SaveOut, SaveLse, ChunkLse, TileMass,
    seb, seh, sem, sed,
    slb, slh, slm,
    sob, soh, som,
    ssb, ssh, ssm,
    Hkv, GROUP, M, R, num_splits, row_programs, NC, T, CPT,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_EXT: tl.constexpr, HAS_BLOCK: tl.constexpr, MASS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_RR: tl.constexpr, MASS_BLOCK_S: tl.constexpr,
):
    """The split reduction: programs ``< row_programs`` combine rows (:func:`_reduce_rows`); with
    ``MASS`` the others compute tile masses (:func:`_tile_mass`) in the same launch."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    if MASS:
        if pid_r < row_programs:
            _reduce_rows(OPart, LPart, OutExt, LseExt, Out, Lse, SaveOut, SaveLse, seb, seh, sem, sed, slb, slh, slm,
                         sob, soh, som, ssb, ssh, ssm, Hkv, GROUP, M, R, num_splits, pid_r, pid_bh,
                         DV, BLOCK_R, BLOCK_S, BLOCK_DV, HAS_EXT, HAS_BLOCK)
        else:
            _tile_mass(LPart, ChunkLse, TileMass, R, num_splits, NC, T, CPT, pid_r - row_programs, pid_bh,
                       BLOCK_T, BLOCK_RR, MASS_BLOCK_S)
    else:
        _reduce_rows(OPart, LPart, OutExt, LseExt, Out, Lse, SaveOut, SaveLse, seb, seh, sem, sed, slb, slh, slm,
                     sob, soh, som, ssb, ssh, ssm, Hkv, GROUP, M, R, num_splits, pid_r, pid_bh,
                     DV, BLOCK_R, BLOCK_S, BLOCK_DV, HAS_EXT, HAS_BLOCK)


@triton.jit
def _sparse_attn_kernel(
    Q, K, V, Mask, Idx, KB, VB, MaskB, OutExt, LseExt, Out, Lse, OPart, LPart,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smm, smn,
    sib, sih, sis,
    skbb, skbh, skbn, skbd,
    svbb, svbh, svbn, svbd,
    smbb, smbh, smbm, smbn,
    seb, seh, sem, sed,
    slb, slh, slm,
    sob, soh, som,
    Hkv, GROUP, M, N, NB, R, S, slots_per_split, qk_scale,
    TILE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HAS_BLOCK: tl.constexpr, HAS_MASK_B: tl.constexpr,
    MASK_B_BOOL: tl.constexpr, HAS_EXT: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """:func:`_attn_kernel` over the KV tiles listed in ``Idx`` (``[B, Hkv, S]``, ``-1`` = unused)
    instead of a key range: one program takes ``slots_per_split`` slots and reads only their keys.
    ``HAS_BLOCK``: the last split also attends to all ``NB`` keys of ``(KB, VB)`` (the block's own
    keys, with ``MaskB``), so that one launch (and its reduction) makes a whole sparse reuse step."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    qk_scale = tl.full([], qk_scale, tl.float32)
    b, hkv, rows, row_ok, h, m = _packed_rows(pid_r, pid_bh, Hkv, GROUP, M, R, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)

    q = tl.load(Q + b * sqb + h[:, None] * sqh + m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * skb + hkv * skh + offs_d[None, :] * skd
    v_base = V + b * svb + hkv * svh + offs_dv[None, :] * svd
    mask_base = Mask + b * smb + h[:, None] * smh + m[:, None] * smm

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    slot_start = pid_s * slots_per_split
    slot_end = tl.minimum(slot_start + slots_per_split, S)
    for slot in range(slot_start, slot_end):
        t = tl.load(Idx + b * sib + hkv * sih + slot * sis).to(tl.int64)
        for c0 in tl.static_range(0, TILE, BLOCK_N):
            n = t * TILE + c0 + offs_n
            key_ok = (c0 + offs_n < TILE) & (n < N) & (n >= 0)
            n = tl.where(key_ok, n, 0)
            m_i, l_i, acc, p, m_safe = _attend_tile(
                q, k_base + n[:, None] * skn, v_base + n[:, None] * svn, mask_base + n[None, :] * smn,
                key_ok, row_ok, offs_d, offs_dv, m_i, l_i, acc, qk_scale,
                D, DV, HAS_MASK, MASK_BOOL, DOT_PRECISION, UPCAST_DOT, True, "")

    if HAS_BLOCK:
        if pid_s == tl.num_programs(1) - 1:
            m_i, l_i, acc = _attend_block(
                q, KB, VB, MaskB, b, hkv, h, m, skbb, skbh, skbn, skbd, svbb, svbh, svbn, svbd,
                smbb, smbh, smbm, smbn, NB, row_ok, offs_n, offs_d, offs_dv, m_i, l_i, acc, qk_scale,
                D, DV, BLOCK_N, HAS_MASK_B, MASK_B_BOOL, DOT_PRECISION, UPCAST_DOT, "")

    _write_result(OutExt, LseExt, Out, Lse, OPart, LPart, seb, seh, sem, sed, slb, slh, slm, sob, soh, som,
                  b, h, m, rows, row_ok, offs_dv, pid_bh, pid_s, R, m_i, l_i, acc, DV, HAS_EXT, SPLIT)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, x - 1).bit_length())


def _bucketed(size, least: int = 16) -> int:
    """The size a launch is configured for: ``size`` itself when it is static; when it is symbolic (a
    size dynamo made dynamic: Fast-dLLM's prefix cache queries every row after the cache, a block fewer
    at each block; a batch that changes between requests), the power of two (at least ``least``) at or
    above it. Each comparison here is a guard on the graph's shapes, so a compiled graph serves every
    size of that bucket (``b / 2 < size <= b``) and is recompiled once per doubling rather than at
    every size."""
    if isinstance(size, int):
        return size
    bucket = least
    while not size <= bucket:
        bucket *= 2
    return bucket


def _config(B, Hkv, R, D, N, DV, itemsize, sms, split_keys, plain=False) -> dict:
    """Tile sizes, warps and stages from the shapes alone (``B`` and ``R``, the packed rows, from
    :func:`_bucketed`; ``N`` is None when it is symbolic; ``plain``: the key loop loads no mask tile).

    Long keys (``split_keys``) pack up to 64 rows (a second row tile of the same KV head runs next to
    the first and finds the KV tile in L2); short keys (the block-internal part) use smaller row
    tiles so that the few rows still occupy many SMs. Wide heads take narrower key tiles so that the
    K and V tiles of all pipeline stages fit in shared memory.
    """
    block_d, block_dv = _pow2(D), _pow2(DV)
    wide = max(block_d, block_dv)
    small = itemsize <= 2
    block_r = min(_pow2(R), 64)  # H100 sweep: 64 rows / 4 warps (two programs per SM) beat 128 / 8
    if not split_keys:
        while block_r > 16 and B * Hkv * _cdiv(R, block_r) < sms:
            block_r //= 2
    block_n = 128 if (small and wide <= 64) else 64 if (small and wide <= 128) else 32 if (small or wide <= 256) else 16
    if N is not None:
        block_n = min(block_n, _pow2(N))
    # H200 sweep (attention_h200_notes.md): 256-wide heads ran 2.0-2.4x faster on 4 warps than on 8,
    # 512-wide 16-bit ones 1.4-1.6x faster with 32-key tiles than with 16 (fp32 ones do not fit)
    big_tile = block_r * wide >= 128 * 128 and wide != 256
    stages = 3 if (small and wide <= 128) else 2
    # H100 sweep (attention_h100_wide.md): 256-wide 16-bit heads with >= 128 packed rows over long keys ran
    # 9-14% faster on 64-key tiles in 3 stages (224 KB of shared memory: no room for a mask tile), 11%
    # slower at 64 rows
    if plain and split_keys and small and wide == 256 and R >= 128 and (N is None or N >= 64):
        block_n, stages = 64, 3
    return dict(
        BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        num_warps=8 if big_tile else 4,
        num_stages=stages,
    )


def _splits_per_wave(B, Hkv, R, cfg, sms, per_sm):
    """How many splits give ``per_sm`` programs per SM over the row tiles of every (batch, KV head)."""
    return max(1, per_sm * sms // (B * Hkv * _cdiv(R, cfg["BLOCK_R"])))


def _split_keys(B, Hkv, R, N, cfg, sms, num_splits=None):
    """``(splits, keys_per_split)``: by default about two programs per SM (one wave at two programs
    per SM), one for heads wider than 256, whose programs fill an SM each (H100 sweep,
    ``benchmarks/results/attention_h100_wide.md``: half the splits ran 6-17% faster). The split
    count is a static int (it sizes the grid and the partials); when ``N`` is known it also keeps at
    least ``_MIN_TILES_PER_SPLIT`` key tiles per split. ``keys_per_split`` may be symbolic; splits
    past the end are empty and reduce to weight 0."""
    if num_splits is None:
        num_splits = _splits_per_wave(B, Hkv, R, cfg, sms, 1 if max(cfg["BLOCK_D"], cfg["BLOCK_DV"]) > 256 else 2)
        if isinstance(N, int):
            num_splits = max(1, min(num_splits, _cdiv(N, cfg["BLOCK_N"]) // _MIN_TILES_PER_SPLIT))
    tiles_per_split = _cdiv(_cdiv(N, cfg["BLOCK_N"]), num_splits)
    if isinstance(N, int):  # drop the splits that would be empty
        num_splits = max(1, _cdiv(_cdiv(N, cfg["BLOCK_N"]), max(1, tiles_per_split)))
    return num_splits, tiles_per_split * cfg["BLOCK_N"]


@functools.lru_cache(maxsize=4096)
def _config_cached(B, Hkv, R, D, N, DV, itemsize, device, split_keys, plain=False):
    """Cached so that an eager launch costs a dictionary lookup."""
    return _config(B, Hkv, R, D, N, DV, itemsize, _num_sms(device), split_keys, plain)


def _plan(q, k, v, split_keys, overrides, plain=False):
    """``(config, splits, keys_per_split)`` for these inputs. The head counts and head dims are made
    static ints (under tracing this specialises on them); the key count may stay symbolic, so one
    compiled graph serves a growing cache, and the batch and query counts symbolic within power-of-two
    buckets (:func:`_bucketed`)."""
    B, Hq, D = _bucketed(q.shape[0], 1), int(q.shape[1]), int(q.shape[3])
    Hkv, DV = int(k.shape[1]), int(v.shape[-1])
    rows = _bucketed((Hq // Hkv) * q.shape[2])
    N = k.shape[2]
    static_n = N if isinstance(N, int) else None
    cfg = _config_cached(B, Hkv, rows, D, static_n, DV, q.element_size(), q.device, split_keys, plain)
    cfg = dict(cfg, **{name: val for name, val in overrides.items() if name != "num_splits"})
    if not split_keys and "num_splits" not in overrides:
        return cfg, 1, N
    return (cfg, *_split_keys(B, Hkv, rows, N, cfg, _num_sms(q.device), overrides.get("num_splits")))


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether the kernels handle these inputs (otherwise callers use the reference)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if not (q.device == k.device == v.device):
        return False
    B, Hq, M, D = q.shape
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[-1] != D or k.shape[1] == 0:
        return False
    if Hq % k.shape[1] or D > _MAX_HEAD_DIM or v.shape[-1] > _MAX_HEAD_DIM:
        return False
    if mask is not None:
        if mask.device != q.device or mask.dim() > 4:
            return False
        if mask.dtype != torch.bool and mask.dtype not in _DTYPES:
            return False
        try:
            return torch.broadcast_shapes(mask.shape, (B, Hq, M, k.shape[2])) == (B, Hq, M, k.shape[2])
        except RuntimeError:
            return False
    return True


def _unused(q: torch.Tensor) -> torch.Tensor:
    """A placeholder for a pointer argument the kernel does not touch. Not ``q`` itself: under Inductor
    each argument that names an uncomputed value (``q`` after RoPE) is realized as a buffer of its
    own, so ``q`` in seven slots made its RoPE kernel store it eight times (measured on the H200)."""
    return q.new_empty(1)


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor, N: int, unused: torch.Tensor):
    """The mask as a strided ``[B, Hq, M, N]`` view (broadcast dims get stride 0, nothing is copied);
    ``unused`` (:func:`_unused`) when there is none. A bool mask is passed as it is (Triton loads a
    ``*i1`` pointer's bytes): viewed as ``uint8`` it made torch 2.11's Inductor fail to lower the op
    (its dtype bitcast asks ``torch.iinfo(torch.bool)``)."""
    if mask is None:
        return unused, (0, 0, 0, 0), False
    B, Hq, M, _ = q.shape
    full = mask.expand(B, Hq, M, N)
    return full, full.stride(), mask.dtype == torch.bool


def _ext_args(out_ext, lse_ext, unused: torch.Tensor):
    """Pointers and strides of the optional external result to merge (``unused`` when absent), and
    whether there is one."""
    if out_ext is None:
        return unused, unused, (0, 0, 0, 0), (0, 0, 0), False
    return out_ext, lse_ext, out_ext.stride(), lse_ext.stride(), True


def result_buffer(q: torch.Tensor, dv: int, merged: bool) -> torch.Tensor:
    """The output ``[B, Hq, M, dv]`` of an attention. A merged one (a split site's whole result) is laid
    out block-major, ``[B, M, Hq, dv]`` in memory, as flash attention's output is: the model's usual
    ``out.transpose(1, 2).reshape(B, M, Hq * dv)`` is then a view, where a head-major result needs a
    copy kernel per layer before the output projection. Partial results stay head-major."""
    B, Hq, M = q.shape[:3]
    if merged:
        return torch.empty(B, M, Hq, dv, device=q.device, dtype=q.dtype).transpose(1, 2)
    return torch.empty(B, Hq, M, dv, device=q.device, dtype=q.dtype)


def _partials(q, B, Hkv, num_splits, R, DV):
    """fp32 per-split partials ``(out, log2-lse)`` for :func:`_reduce_kernel`."""
    return (torch.empty(B * Hkv, num_splits, R, DV, device=q.device, dtype=torch.float32),
            torch.empty(B * Hkv, num_splits, R, device=q.device, dtype=torch.float32))


def _reduce(o_part, l_part, ext, out, lse, B, Hkv, group, M, num_splits, block_dv, mass=None, rows=_REDUCE_ROWS,
            save=None):
    """Launch :func:`_reduce_kernel` over ``rows`` packed rows per program; ``mass = (chunk_lse,
    tile_mass, chunks per tile)`` adds the tile-mass programs; ``save = (out_ext, lse_ext)``: the
    partials hold one more, the block-internal part, and the external part is written there too."""
    ext_o, ext_l, estr, lstr, has_ext = ext
    save_o, save_l = (ext_o, ext_l) if save is None else save
    R, DV = group * M, out.shape[-1]
    # 8 rows per program, a [8, BLOCK_S, Dv] fp32 tile <= 128 KB. With the partials kept in L2 (see
    # _attn_kernel) the LM's exact-step attention took 24.7 against 26.1-26.4 us at 32K keys / batch 1 and
    # 127.7 against 139.7-139.8 at batch 8 (H100, attention_edits_h100.json); 4 rows with the policies 25.1
    # and 141.6. Without them 8 rows had gained 1-3% (reduce_rows_h100.md).
    block_s = min(_pow2(num_splits, 2), max(2, 4096 // block_dv))
    row_programs = _cdiv(R, rows)
    chunk_lse, tile_mass, cpt = (o_part, o_part, 1) if mass is None else mass
    num_tiles = 0 if mass is None else tile_mass.shape[-1]
    # A mass program takes all rows at once (up to 256: the rows' LSEs are combined once, from a
    # [rows, splits] tile of <= 16K values) and few tiles, so that there are many such programs.
    block_rr = min(_pow2(_bucketed(R)), 256)
    wrap_triton(_reduce_kernel)[(row_programs + _cdiv(num_tiles, _MASS_BLOCK_T), B * Hkv)](
        o_part, l_part, ext_o, ext_l, out, lse, save_o, save_l, chunk_lse, tile_mass, *estr, *lstr,
        *out.stride()[:3], *(save_o.stride()[:3] if save is not None else (0, 0, 0)),
        Hkv, group, M, R, num_splits, row_programs, chunk_lse.shape[1], num_tiles, cpt,
        DV=DV, BLOCK_R=rows, BLOCK_S=block_s, BLOCK_DV=block_dv, HAS_EXT=has_ext, HAS_BLOCK=save is not None,
        MASS=mass is not None,
        BLOCK_T=_MASS_BLOCK_T, BLOCK_RR=block_rr, MASS_BLOCK_S=min(_pow2(num_splits, 2), max(2, 16384 // block_rr)),
        num_warps=8,
    )


def _attention(q, k, v, mask, scale, out_ext=None, lse_ext=None, split_keys=True, tiles=None, key_count=None,
               block=None, **overrides):
    """Shared launcher; ``overrides`` (``num_splits``, any of the tile/warp settings, ``CHUNK_STORE_PTX``
    and ``REDUCE_ROWS``, the packed rows per program of the split reduction) exist for the tests and the
    benchmark's tuning sweep. ``tiles = (tile, tile_mass)`` also fills ``tile_mass``
    ``[B, Hkv, ceil(N / tile)]``: the attention kernel stores per-row log2-LSEs
    of key chunks of ``gcd(tile, BLOCK_N)`` (always taking the split path, whose reduction launch
    computes the masses), through inline PTX where the device runs it (see :func:`_attn_kernel`).
    ``key_count`` (an int tensor of one element, on the device): only the first that many keys count.
    ``block = (k_blk, v_blk, mask_blk, out_ext, lse_ext)``: an extra split program also attends to the
    block's own keys, and the reduction writes the merged result and, into ``out_ext``/``lse_ext``, the
    external part alone.

    Traceable host code: kernels are launched through ``torch.library.wrap_triton`` (a plain launch
    in eager, a graph node under ``torch.library.triton_op`` tracing) and every Python decision reads
    shapes, dtypes and devices only (and whether Triton interprets). Unused pointer arguments get
    :func:`_unused`.
    """
    B, Hq, M, D = q.shape
    Hkv, N, DV = k.shape[1], k.shape[2], v.shape[-1]
    group = Hq // Hkv
    R = group * M
    out = result_buffer(q, DV, merged=out_ext is not None or block is not None)
    lse = torch.empty(B, Hq, M, device=q.device, dtype=torch.float32)
    if B * Hq * M == 0:
        return out, lse

    chunk_store_ptx = overrides.pop("CHUNK_STORE_PTX", ptx_asm(q))
    reduce_rows = overrides.pop("REDUCE_ROWS", _REDUCE_ROWS)
    plain = mask is None and (block is None or block[2] is None)
    cfg, num_splits, keys_per_split = _plan(q, k, v, split_keys, overrides, plain=plain)
    launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    unused = _unused(q)  # one placeholder for every pointer argument this launch leaves unused
    mask_t, mstr, mask_bool = _mask_args(mask, q, N, unused)
    k_blk, v_blk, mask_blk, *save = (unused, unused, None) if block is None else block
    NB = 0 if block is None else k_blk.shape[2]
    maskb_t, mbstr, maskb_bool = _mask_args(mask_blk, q, NB, unused)
    ext = _ext_args(out_ext, lse_ext, unused)
    split = num_splits > 1 or tiles is not None or block is not None
    programs = num_splits + (block is not None)  # the block's own keys: one program more
    o_part, l_part = _partials(q, B, Hkv, programs, R, DV) if split else (unused, unused)
    chunk, chunk_lse, mass = 0, unused, None
    if tiles is not None:
        chunk = math.gcd(tiles[0], cfg["BLOCK_N"])
        chunk_lse = torch.empty(B * Hkv, _cdiv(N, chunk), R, device=q.device, dtype=torch.float32)
        mass = (chunk_lse, tiles[1], tiles[0] // chunk)
    grid = (_cdiv(R, cfg["BLOCK_R"]), programs, B * Hkv)
    wrap_triton(_attn_kernel)[grid](
        q, k, v, mask_t, k_blk, v_blk, maskb_t, ext[0], ext[1], out, lse, o_part, l_part, chunk_lse,
        unused if key_count is None else key_count,
        *q.stride(), *k.stride(), *v.stride(), *mstr,
        *(k_blk.stride() if block is not None else (0,) * 4),
        *(v_blk.stride() if block is not None else (0,) * 4), *mbstr,
        *ext[2], *ext[3], *out.stride()[:3],
        Hkv, group, M, N, NB, R, keys_per_split, scale * _LOG2E, 0 if tiles is None else chunk_lse.shape[1],
        D=D, DV=DV, HAS_MASK=mask is not None, MASK_BOOL=mask_bool, HAS_BLOCK=block is not None,
        HAS_MASK_B=mask_blk is not None, MASK_B_BOOL=maskb_bool, HAS_EXT=ext[4],
        SPLIT=split, DOT_PRECISION=_dot_precision(q), UPCAST_DOT=upcast_dot(q), CHUNK=chunk,
        CHUNK_STORE_PTX=chunk > 0 and chunk_store_ptx, HAS_COUNT=key_count is not None,
        KV_EVICT="evict_first" if split else "", **cfg, **launch,
    )
    if split:
        _reduce(o_part, l_part, ext, out, lse, B, Hkv, group, M, num_splits, cfg["BLOCK_DV"], mass, reduce_rows,
                save or None)
    return out, lse


def _dot_precision(q):
    return "ieee" if q.dtype == torch.float32 else "tf32"


def attention_lse(q, k, v, mask, scale, key_count=None, *, num_splits: int | None = None):
    """``(out, lse)`` of ``q`` over a long ``(k, v)``: split-KV, GQA-packed; see the module docstring.
    ``key_count``: see :func:`supports_key_count`."""
    overrides = {} if num_splits is None else {"num_splits": num_splits}
    return _attention(q, k, v, mask, scale, key_count=key_count, **overrides)


def supports_key_count(q, key_count) -> bool:
    """Whether :func:`attention_lse` takes this ``key_count``: an integer tensor of one element on
    ``q``'s device, read by the kernel (only the first ``key_count`` keys count), so that a buffer
    with spare capacity behind the keys needs neither a host sync nor a new launch shape."""
    return key_count.device == q.device and key_count.numel() == 1 and not key_count.is_floating_point()


def attention_merge_lse(q, k, v, mask, scale, out_ext, lse_ext):
    """Block-internal attention fused with the merge against ``(out_ext, lse_ext)``.

    The block's own keys are few, so one program covers all of them and merges in registers (one
    launch); if they are many (> 16 tiles) the split path is used and the reduction does the merge.
    """
    long_keys = bool(k.shape[2] > 16 * _plan(q, k, v, False, {}, plain=mask is None)[0]["BLOCK_N"])  # a guard
    return _attention(q, k, v, mask, scale, out_ext, lse_ext, split_keys=long_keys)


def supports_refresh(q, k, v, mask, k_blk, v_blk, mask_blk) -> bool:
    """Whether :func:`attention_refresh_lse` handles these inputs: both parts supported, and the block's
    own keys few enough for the one program that takes them (at most 16 key tiles: the bound at which
    :func:`attention_merge_lse` also stops doing them in one program)."""
    if not (supports(q, k, v, mask) and supports(q, k_blk, v_blk, mask_blk)):
        return False
    if k_blk.shape[-1] != k.shape[-1] or v_blk.shape[-1] != v.shape[-1] or k_blk.shape[1] != k.shape[1]:
        return False
    block_n = _plan(q, k, v, True, {}, plain=mask is None and mask_blk is None)[0]["BLOCK_N"]
    return bool(k_blk.shape[2] <= 16 * block_n)  # a guard on a symbolic block length


def attention_refresh_lse(q, k, v, mask, scale, k_blk, v_blk, mask_blk, key_count=None, *,
                          num_splits: int | None = None):
    """Both parts of a split attention, ``(out, lse, out_ext, lse_ext)``: ``q`` over the long
    ``(k, v)`` (the external part, split-KV as :func:`attention_lse`; ``key_count`` as there) and over
    the block's own ``(k_blk, v_blk)`` (``mask_blk``), merged. One more split program takes the block's
    keys and the split reduction merges, so a refresh step costs the external part's two launches and
    no merge launch; the external part is returned too, for the steps that reuse it."""
    B, Hq, M = q.shape[:3]
    out_ext = result_buffer(q, v.shape[-1], merged=False)
    lse_ext = torch.empty(B, Hq, M, device=q.device, dtype=torch.float32)
    overrides = {} if num_splits is None else {"num_splits": num_splits}
    out, lse = _attention(q, k, v, mask, scale, key_count=key_count,
                          block=(k_blk, v_blk, mask_blk, out_ext, lse_ext), **overrides)
    return out, lse, out_ext, lse_ext


def supports_tile(tile: int) -> bool:
    """Whether :func:`attention_lse_tiles` handles this tile size: whole 16-key chunks, so that a
    chunk of the kernel's key tile (16 to 128 keys) never straddles two KV tiles."""
    return tile >= 16 and tile % 16 == 0


def attention_lse_tiles(q, k, v, mask, scale, tile: int, *, num_splits: int | None = None):
    """:func:`attention_lse` plus the mass of each KV tile ``[B, Hkv, ceil(N / tile)]`` (fp32).

    The attention kernel also stores each row's log2-LSE per chunk of ``gcd(tile, BLOCK_N)`` keys,
    from the probabilities it computes anyway (``R * 4 / chunk`` bytes per key against the KV's
    ``2 * D * itemsize``, kept in L2), and extra programs of the split reduction turn them into tile
    masses: no second KV read, no extra launch.
    """
    shape = (k.shape[0], k.shape[1], _cdiv(k.shape[2], tile))
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:  # no rows, no mass
        return *_attention(q, k, v, mask, scale), torch.zeros(shape, device=q.device, dtype=torch.float32)
    tile_mass = torch.empty(shape, device=q.device, dtype=torch.float32)
    overrides = {} if num_splits is None else {"num_splits": num_splits}
    return *_attention(q, k, v, mask, scale, tiles=(tile, tile_mass), **overrides), tile_mass


def supports_sparse(q, k, v, mask, idx) -> bool:
    """Whether :func:`sparse_attention_lse` handles these inputs (otherwise callers use the reference)."""
    return (supports(q, k, v, mask) and idx.device == q.device and idx.dtype in (torch.int32, torch.int64)
            and idx.dim() == 3 and tuple(idx.shape[:2]) == (q.shape[0], k.shape[1]))


def sparse_attention_lse(q, k, v, mask, scale, idx, tile: int, out_ext=None, lse_ext=None, block=None,
                         **overrides):
    """``(out, lse)`` of ``q`` over the KV tiles ``idx`` (``[B, Hkv, S]``, ``-1`` = unused), optionally
    merged with ``(out_ext, lse_ext)``: the gathered counterpart of :func:`attention_lse`. With
    ``block = (k_blk, v_blk, mask_blk)`` the block's own keys are attended too (by the last split).

    The slots are split over programs (about two programs per SM, at least one slot each) and the
    partials combined by :func:`_reduce_kernel`, which also does the merge; one program per row tile
    (and the merge in registers: a single launch) when the slots do not split. ``overrides``
    (``num_splits`` and any of the tile/warp settings) exist for the tests and the benchmark's sweep.
    """
    B, Hq, M, D = q.shape
    Hkv, N, DV = k.shape[1], k.shape[2], v.shape[-1]
    S = int(idx.shape[2])
    group = Hq // Hkv
    R = group * M
    out = result_buffer(q, DV, merged=out_ext is not None)
    lse = torch.empty(B, Hq, M, device=q.device, dtype=torch.float32)
    if B * Hq * M == 0:
        return out, lse

    batch, rows = _bucketed(B, 1), _bucketed(R)
    cfg = dict(_config_cached(batch, int(Hkv), rows, int(D), None, int(DV), q.element_size(), q.device, True))
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], _pow2(tile))
    num_splits = overrides.pop("num_splits", None)
    cfg.update(overrides)
    launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    sms = _num_sms(q.device)
    if num_splits is None:  # two per SM; for heads over 256 wide the dense kernel takes one, unmeasured here
        num_splits = _splits_per_wave(batch, Hkv, rows, cfg, sms, 2)
    slots_per_split = max(1, _cdiv(S, max(1, min(num_splits, S))))
    num_splits = max(1, _cdiv(S, slots_per_split))
    # Few slots split few ways leave SMs idle: smaller row tiles fill them (H200, 8 slots of 64 keys:
    # 16 rows 0.7-1.4 µs faster than 64 at 4, 8 and 16 splits; sparse_attention_h200_dense_step.md)
    while ("BLOCK_R" not in overrides and cfg["BLOCK_R"] > 16
           and batch * Hkv * _cdiv(rows, cfg["BLOCK_R"]) * num_splits < sms):
        cfg["BLOCK_R"] //= 2
    unused = _unused(q)  # one placeholder for every pointer argument this launch leaves unused
    mask_t, mstr, mask_bool = _mask_args(mask, q, N, unused)
    k_blk, v_blk, mask_blk = (unused, unused, None) if block is None else block
    NB = 0 if block is None else k_blk.shape[2]
    maskb_t, mbstr, maskb_bool = _mask_args(mask_blk, q, NB, unused)
    ext = _ext_args(out_ext, lse_ext, unused)
    o_part, l_part = _partials(q, B, Hkv, num_splits, R, DV) if num_splits > 1 else (unused, unused)
    wrap_triton(_sparse_attn_kernel)[(_cdiv(R, cfg["BLOCK_R"]), num_splits, B * Hkv)](
        q, k, v, mask_t, idx, k_blk, v_blk, maskb_t, ext[0], ext[1], out, lse, o_part, l_part,
        *q.stride(), *k.stride(), *v.stride(), *mstr, *idx.stride(),
        *(k_blk.stride() if block is not None else (0,) * 4),
        *(v_blk.stride() if block is not None else (0,) * 4), *mbstr,
        *ext[2], *ext[3], *out.stride()[:3],
        Hkv, group, M, N, NB, R, S, slots_per_split, scale * _LOG2E,
        TILE=tile, D=D, DV=DV, HAS_MASK=mask is not None, MASK_BOOL=mask_bool, HAS_BLOCK=block is not None,
        HAS_MASK_B=mask_blk is not None, MASK_B_BOOL=maskb_bool, HAS_EXT=ext[4], SPLIT=num_splits > 1,
        DOT_PRECISION=_dot_precision(q), UPCAST_DOT=upcast_dot(q), **cfg, **launch,
    )
    if num_splits > 1:
        _reduce(o_part, l_part, ext, out, lse, B, Hkv, group, M, num_splits, cfg["BLOCK_DV"])
    return out, lse


def sparse_attention_merge_lse(q, k, v, mask, scale, idx, tile: int, k_blk, v_blk, mask_blk, out_res, lse_res,
                               **overrides):
    """A whole sparse reuse step in one launch and its reduction (one launch with ``num_splits=1``):
    ``q`` over the tiles ``idx`` of ``(k, v)`` and over the block's own ``(k_blk, v_blk)``, merged with
    the cached residual ``(out_res, lse_res)``."""
    return sparse_attention_lse(q, k, v, mask, scale, idx, tile, out_res, lse_res, (k_blk, v_blk, mask_blk),
                                **overrides)
