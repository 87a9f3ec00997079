"""Where the external kernel's time goes at the exact step's shape, and one program per KV head's row tiles.

At 12 query / 2 KV heads a block of 32 queries packs 192 rows per KV head: three 64-row programs per key
split, each loading the same K/V tiles (L2 -> SM traffic three times the KV). This probe times, at that
shape (bf16, 32K and 128K keys at batch 1, 32K at batch 8):

- fbcompile's ``_attention`` whole, and without its split reduction (``_reduce`` replaced by a no-op);
- a read of the KV's bytes alone (:func:`benchmarks.gemm_sweep.read_us`), the ceiling;
- a minimal split kernel of the same tiles (no masks, whole tiles, fp32 partials, no reduction) with one
  row tile per program (``rt1``) and with all three row tiles of a KV head in one program (``rt3``: each
  K/V tile loaded once for three pairs of dots), over warps, stages and split counts; each checked
  against float64 after an LSE merge of its partials in PyTorch.

    PYTHONPATH=. python benchmarks/row_tiles.py OUTDIR

Results: ``benchmarks/results/attention_row_tiles_h100_s40.json`` (``session40_h100.md``).
"""
import json
import sys

import torch
import triton
import triton.language as tl

from fbcompile.kernels import triton_attention as ta
from benchmarks.attention import graph_us
from benchmarks.gemm_sweep import read_us


@triton.jit
def _step(q, k, v, m_i, l_i, acc, qk_scale):
    """One online-softmax step of one row tile over one whole key tile."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _store(OP, LP, part_base, rows, offs_d, m_i, l_i, acc, R, D: tl.constexpr):
    """A row tile's normalised partial and its log2-LSE."""
    part = part_base * R + rows
    tl.store(OP + part[:, None] * D + offs_d[None, :], acc / l_i[:, None])
    tl.store(LP + part, m_i + tl.log2(l_i))


@triton.jit
def _probe_kernel(Q, K, V, OP, LP, R, N, keys_per_split, qk_scale,
                  D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, RT: tl.constexpr):
    """Q packed [BH, R, D]; K, V [BH, N, D]; RT row tiles per program (1: grid dim 0 picks the tile)."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    r0 = pid_r * BLOCK_R * RT + tl.arange(0, BLOCK_R)
    qb = Q + pid_bh * R * D
    q0 = tl.load(qb + r0[:, None] * D + offs_d[None, :])
    m0 = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l0 = tl.zeros([BLOCK_R], tl.float32)
    a0 = tl.zeros([BLOCK_R, D], tl.float32)
    if RT > 1:
        q1 = tl.load(qb + (r0 + BLOCK_R)[:, None] * D + offs_d[None, :])
        m1 = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l1 = tl.zeros([BLOCK_R], tl.float32)
        a1 = tl.zeros([BLOCK_R, D], tl.float32)
    if RT > 2:
        q2 = tl.load(qb + (r0 + 2 * BLOCK_R)[:, None] * D + offs_d[None, :])
        m2 = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l2 = tl.zeros([BLOCK_R], tl.float32)
        a2 = tl.zeros([BLOCK_R, D], tl.float32)
    n_start = pid_s * keys_per_split
    kp = K + pid_bh * N * D + (n_start + offs_n)[:, None].to(tl.int64) * D + offs_d[None, :]
    vp = V + pid_bh * N * D + (n_start + offs_n)[:, None].to(tl.int64) * D + offs_d[None, :]
    for n0 in range(0, tl.minimum(keys_per_split, N - n_start), BLOCK_N):
        k = tl.load(kp)
        v = tl.load(vp)
        m0, l0, a0 = _step(q0, k, v, m0, l0, a0, qk_scale)
        if RT > 1:
            m1, l1, a1 = _step(q1, k, v, m1, l1, a1, qk_scale)
        if RT > 2:
            m2, l2, a2 = _step(q2, k, v, m2, l2, a2, qk_scale)
        kp += BLOCK_N * D
        vp += BLOCK_N * D
    base = pid_bh * tl.num_programs(1) + pid_s
    _store(OP, LP, base, r0, offs_d, m0, l0, a0, R, D)
    if RT > 1:
        _store(OP, LP, base, r0 + BLOCK_R, offs_d, m1, l1, a1, R, D)
    if RT > 2:
        _store(OP, LP, base, r0 + 2 * BLOCK_R, offs_d, m2, l2, a2, R, D)


def probe(q, k, v, splits, rt, warps, stages, block_r=64, block_n=64, parts=None):
    """Launch the probe kernel over about ``splits`` key splits of whole tiles (``N`` a multiple of
    ``block_n``); returns the partials."""
    BH, R, D = q.shape
    N = k.shape[1]
    tiles = N // block_n
    kps = triton.cdiv(tiles, splits) * block_n
    splits = triton.cdiv(N, kps)
    op, lp = parts if parts is not None else (
        torch.empty(BH, splits, R, D, device=q.device, dtype=torch.float32),
        torch.empty(BH, splits, R, device=q.device, dtype=torch.float32))
    _probe_kernel[(R // (block_r * rt), splits, BH)](q, k, v, op, lp, R, N, kps, D**-0.5 * 1.4426950408889634,
                                                    D=D, BLOCK_R=block_r, BLOCK_N=block_n, RT=rt,
                                                    num_warps=warps, num_stages=stages)
    return op, lp


def combine(op, lp):
    """The partials ``[BH, splits, R, D]`` merged by their log2-LSEs."""
    w = torch.softmax(lp * 0.6931471805599453, dim=1)  # [BH, S, R]
    return (w[..., None] * op).sum(1)


def main(out):
    torch.manual_seed(0)
    dev = "cuda"
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=[])
    for B, N in ((1, 32768), (1, 131072), (8, 32768)):
        Hq, Hkv, M, D = 12, 2, 32, 128
        R = Hq // Hkv * M
        kv_bytes = 2 * B * Hkv * N * D * 2
        nsets = max(1, -(-240 * 2**20 // kv_bytes))
        lib_sets = [(torch.randn(B, Hq, M, D, device=dev, dtype=torch.bfloat16),
                     torch.randn(B, Hkv, N, D, device=dev, dtype=torch.bfloat16),
                     torch.randn(B, Hkv, N, D, device=dev, dtype=torch.bfloat16)) for _ in range(nsets)]
        scale = D**-0.5
        row = dict(B=B, N=N)
        row["lib_us"] = graph_us(lambda q, k, v: ta._attention(q, k, v, None, scale), lib_sets)
        real_reduce = ta._reduce
        ta._reduce = lambda *a, **kw: None
        try:
            row["lib_split_only_us"] = graph_us(lambda q, k, v: ta._attention(q, k, v, None, scale), lib_sets)
        finally:
            ta._reduce = real_reduce
        cfg, splits, _ = ta._plan(*lib_sets[0], True, {})
        row["lib_splits"] = splits
        row["read_us"], row["read_grid"] = read_us(kv_bytes // 2, nsets, dev)
        # the probe's layout: the packed rows of each KV head contiguous
        sets = [(s[0].view(B, Hkv, R, D).reshape(B * Hkv, R, D).contiguous(),
                 s[1].reshape(B * Hkv, N, D), s[2].reshape(B * Hkv, N, D)) for s in lib_sets]
        q, k, v = sets[0]
        ref = torch.softmax((q.double() @ k.double().transpose(1, 2)) * scale, -1) @ v.double()
        for rt, warps, stages, sp in ((1, 4, 3, splits), (3, 8, 3, splits), (3, 8, 3, 2 * splits),
                                      (3, 8, 3, 3 * splits), (3, 8, 2, 2 * splits), (3, 8, 4, 2 * splits),
                                      (3, 4, 3, 2 * splits), (3, 8, 3, splits * 3 // 2), (1, 4, 3, splits * 2 // 3)):
            tiles = N // 64
            sp = triton.cdiv(N, triton.cdiv(tiles, sp) * 64)
            name = f"rt{rt}_w{warps}_s{stages}_splits{sp}"
            try:
                op, lp = probe(q, k, v, sp, rt, warps, stages)
                err = ((combine(op, lp).double() - ref).norm() / ref.norm()).item()
                parts = (torch.empty_like(op), torch.empty_like(lp))
                us = graph_us(lambda q, k, v: probe(q, k, v, sp, rt, warps, stages, parts=parts), sets)
            except Exception as e:  # noqa: BLE001
                err, us = None, f"{type(e).__name__}: {str(e)[:200]}"
            row[name] = dict(us=us, err=err)
            print(B, N, name, row[name], flush=True)
        print(row, flush=True)
        res["rows"].append(row)
        del lib_sets, sets, ref
        torch.cuda.empty_cache()
    with open(f"{out}/row_tiles.json", "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
