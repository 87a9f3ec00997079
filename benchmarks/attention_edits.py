"""Probe: the exact step's external attention with one edit of the kernel source at a time.

In exact mode the LM's external attention (12 query / 2 KV heads, 32 queries: 192 packed rows per KV
head) takes 25.9 us at 32K keys on the H100, of which the split reduction takes 5.8 (``session40_h100.md``);
it writes 8.7 MB of fp32 partials, and the KV (33.5 MB) streams through L2 before the reduction reads
them. Each variant imports a copy of ``fbcompile/kernels/triton_attention.py`` with edits (each checked
to apply once):

- ``kv_evict_first``: the K and V tile loads marked ``evict_first``, so the streamed KV leaves L2 first;
- ``partials_evict_last``: the partials stored ``evict_last`` and loaded by the reduction ``evict_first``;
- ``reduce_tile_64``: the reduction's ``[rows, splits, Dv]`` tile allowed 8192 / Dv splits (64 at Dv
  128, all 44 in one tile) instead of 4096 / Dv;
- ``warp_specialize``: the loop over whole key tiles as ``tl.range(..., warp_specialize=True)``;
- ``unroll_2``: that loop as ``tl.range(..., loop_unroll_factor=2)``;

with ``REDUCE_ROWS`` 2, 4 (the default) or 8. Times the external part alone and the refresh (external
part, the block's 32 keys and the merge: the exact step's op), CUDA-graph replays over KV copies
beyond L2, at 32K and 128K keys (batch 1) and 32K (batch 8). A variant Triton cannot compile is
recorded with its error.

    git show 334b04f:fbcompile/kernels/triton_attention.py > /tmp/triton_attention_334b04f.py
    PYTHONPATH=. python benchmarks/attention_edits.py --source /tmp/triton_attention_334b04f.py \
        --out benchmarks/results/attention_edits_h100.json

The edits are of that tree's kernel (``334b04f``), which the run measured; the kernel has since taken
the two L2 policies and 8 rows per reduction program (``benchmarks/results/session41_h100.md``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled

from attention import graph_us, inputs

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fbcompile", "kernels", "triton_attention.py")

EDITS = {
    "kv_evict_first": [
        ("other=0.0)\n    s = dot(q, tl.trans(k)", "other=0.0, eviction_policy=\"evict_first\")\n    s = dot(q, tl.trans(k)"),
        ("other=0.0)\n    acc = acc * alpha[:, None] + dot(p.to(v.dtype)",
         "other=0.0, eviction_policy=\"evict_first\")\n    acc = acc * alpha[:, None] + dot(p.to(v.dtype)"),
    ],
    "partials_evict_last": [
        ("acc / l_safe[:, None],\n                 mask=row_ok[:, None] & (offs_dv[None, :] < DV))",
         "acc / l_safe[:, None],\n                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), eviction_policy=\"evict_last\")"),
        ("mask=ok[:, :, None] & dv_ok[None, None, :], other=0.0)",
         "mask=ok[:, :, None] & dv_ok[None, None, :], other=0.0, eviction_policy=\"evict_first\")"),
    ],
    "reduce_tile_64": [("max(2, 4096 // block_dv))", "max(2, 8192 // block_dv))")],
    "warp_specialize": [("for n0 in range(n_start, n_whole, BLOCK_N):",
                         "for n0 in tl.range(n_start, n_whole, BLOCK_N, warp_specialize=True):")],
    "unroll_2": [("for n0 in range(n_start, n_whole, BLOCK_N):",
                  "for n0 in tl.range(n_start, n_whole, BLOCK_N, loop_unroll_factor=2):")],
}

VARIANTS = [  # (name, edits, REDUCE_ROWS)
    ("main", (), 4),
    ("main, rows 8", (), 8),
    ("kv_evict_first", ("kv_evict_first",), 4),
    ("partials_evict_last", ("partials_evict_last",), 4),
    ("both evictions", ("kv_evict_first", "partials_evict_last"), 4),
    ("both evictions, rows 8", ("kv_evict_first", "partials_evict_last"), 8),
    ("reduce_tile_64, rows 2", ("reduce_tile_64",), 2),
    ("reduce_tile_64, rows 4", ("reduce_tile_64",), 4),
    ("all three, rows 2", ("kv_evict_first", "partials_evict_last", "reduce_tile_64"), 2),
    ("warp_specialize", ("warp_specialize",), 4),
    ("unroll_2", ("unroll_2",), 4),
    ("main (again)", (), 4),
]
SHAPES = [(32768, 1), (131072, 1), (32768, 8)]  # (keys, batch) at 12/2 heads, D128, 32 queries


def variant_module(edits, tmp, source=SOURCE):
    """The kernel module with ``edits`` applied, imported from a file of its own (Triton reads the source)."""
    with open(source) as f:
        src = f.read()
    for name in edits:
        for old, new in EDITS[name]:
            assert src.count(old) == 1, (name, old)
            src = src.replace(old, new)
    path = os.path.join(tmp, "ta_" + "_".join(edits or ("main",)) + ".py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--source", default=SOURCE, help="the kernel module to edit (default: this tree's)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, set_wrap_triton_enabled(False):
        modules = {edits: variant_module(edits, tmp, args.source) for _, edits, _ in VARIANTS}
        failed = {}
        for n, batch in SHAPES:
            sets = inputs(12, 2, 128, 32, n, max(1, -(-240 * 2**20 // (4 * batch * 2 * n * 128))), batch=batch)
            blk = [(torch.randn(batch, 2, 32, 128, device="cuda", dtype=torch.bfloat16),
                    torch.randn(batch, 2, 32, 128, device="cuda", dtype=torch.bfloat16)) for _ in sets]
            sets = [(*s, *b) for s, b in zip(sets, blk)]
            scale = 128 ** -0.5
            ref = None
            for name, edits, per_program in VARIANTS:
                ta = modules[edits]

                def ext(q, k, v, kb, vb):
                    return ta._attention(q, k, v, None, scale, REDUCE_ROWS=per_program)

                def refresh(q, k, v, kb, vb):
                    out_ext = ta.result_buffer(q, 128, merged=False)
                    lse_ext = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
                    return ta._attention(q, k, v, None, scale, block=(kb, vb, None, out_ext, lse_ext),
                                         REDUCE_ROWS=per_program)
                row = dict(keys=n, batch=batch, variant=name)
                try:
                    if edits in failed:
                        raise failed[edits]
                    out = refresh(*sets[0])[0].float()
                    ref = out if ref is None else ref
                    row.update(ext_us=round(graph_us(ext, sets), 2), refresh_us=round(graph_us(refresh, sets), 2),
                               rel_diff_vs_main=float((out - ref).norm() / ref.norm()))
                except Exception as error:  # a variant Triton rejects: recorded, the others still run
                    failed[edits] = error
                    row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                rows.append(row)
                print(row, flush=True)
            del sets, blk
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=triton.__version__, python=platform.python_version(),
                command=f"PYTHONPATH=. python benchmarks/attention_edits.py --source {args.source} --out {args.out}")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
