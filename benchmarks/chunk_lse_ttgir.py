"""Where the tile masses' chunk-LSE store costs shared memory: ``_attn_kernel`` compiled for sm90 on the CPU.

Compiles the attention kernel of the sparse refresh (``attention_lse`` / ``attention_lse_tiles``: 12 q / 2 kv
heads, D 128, a block of 32 queries, bf16, KV tile 64, an H200's 132 SMs) with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``, its arguments specialised as the JIT would (16-byte divisibility of the
pointers and of the ints that have it; without it nothing is pipelined), once without tile masses
(``CHUNK=0``) and once per chunk-LSE store (``tl.store``; inline PTX, ``CHUNK_STORE_PTX``). For each it
counts, inside the pipelined key loop, ``ttg.convert_layout`` ops in the TTGIR, shared-memory ops
(``st.shared``, ``ld.shared``, ``bar.sync``) in the PTX and, in the SASS of Triton's own ptxas, the waits
on the asynchronous MMAs (``WARPGROUP.DEPBAR``: one per key tile when they overlap, one per instruction
when ptxas serialises them, which it reports as warning C7515). No GPU is needed.

    python benchmarks/chunk_lse_ttgir.py [--keys 32768] [--dump DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from unittest import mock

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from fbcompile.kernels import triton_attention as ta

HQ, HKV, D, BLOCK, TILE, H200_SMS = 12, 2, 128, 32, 64, 132
PTX_SHARED = ("st.shared", "ld.shared", "bar.sync")
SASS_OPS = ("WARPGROUP.DEPBAR", "BAR.SYNC", "STS", "LDS", "STG")


def launch_args(n: int, tiles: bool, **overrides) -> tuple[list, dict]:
    """``(positional args, keyword args)`` of the ``_attn_kernel`` launch of ``_attention`` for these
    shapes on an H200: the launcher runs on CPU tensors with the SM count patched, its launches recorded."""
    calls = []

    class Record:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.fn, args, kwargs))

    mk = lambda *s: torch.empty(*s, dtype=torch.bfloat16)  # noqa: E731
    q, k, v = mk(1, HQ, BLOCK, D), mk(1, HKV, n, D), mk(1, HKV, n, D)
    tile_mass = torch.empty(1, HKV, -(-n // TILE)) if tiles else None
    with mock.patch.object(ta, "wrap_triton", Record), mock.patch.object(ta, "_num_sms", lambda device: H200_SMS):
        ta._attention(q, k, v, None, D**-0.5, tiles=(TILE, tile_mass) if tiles else None, **overrides)
    args, kwargs = next((a, kw) for fn, a, kw in calls if fn is ta._attn_kernel)
    return list(args), dict(kwargs, UPCAST_DOT=False)  # the CPU launcher upcasts bf16 dots for the interpreter


def compile_sm90(args: list, kwargs: dict):
    """``triton.compile`` of ``_attn_kernel`` for sm90 with the JIT's specialisation of ``args``."""
    fn = ta._attn_kernel
    options = {name: kwargs.pop(name) for name in ("num_warps", "num_stages")}
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, arg) in enumerate(zip(fn.arg_names, args)):
        ty, spec = native_specialize_impl(BaseBackend, arg, False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = spec
        elif spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name, value in kwargs.items():
        signature[name], constexprs[name] = "constexpr", value
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def ttgir_loop(ttgir: str) -> str:
    """The body of the largest ``scf.for`` (the pipelined key loop)."""
    lines, best = ttgir.splitlines(), []
    for i in (i for i, line in enumerate(lines) if "scf.for" in line):
        depth, body = 0, []
        for line in lines[i:]:
            depth += line.count("{") - line.count("}")
            body.append(line)
            if depth <= 0 and len(body) > 1:
                break
        best = max(best, body, key=len)
    return "\n".join(best)


def ptx_loop(ptx: str) -> str:
    """The largest span from a label to a branch back to it (the key loop after unrolling/pipelining)."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__BB\d+_\d+):", line.strip()))}
    best = (0, 0)
    for i, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    return "\n".join(lines[best[0]:best[1] + 1])


def sass_loop(sass: str) -> str:
    """The largest span from an instruction to a branch back to it."""
    lines = sass.splitlines()
    at = {int(m.group(1), 16): i for i, line in enumerate(lines) if (m := re.search(r"/\*([0-9a-f]{4,})\*/", line))}
    best = (0, 0)
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA 0x([0-9a-f]+)", line)
        start = at.get(int(m.group(1), 16), i) if m else i
        if start < i and i - start > best[1] - best[0]:
            best = (start, i)
    return "\n".join(lines[best[0]:best[1] + 1])


def ptxas_report(ptx: str) -> tuple[str, str]:
    """``(ptxas -v messages, SASS)`` of ``ptx`` for sm_90a, by the ptxas Triton uses."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        info = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", "-o", cubin, src],
                              capture_output=True, text=True, check=True)
        cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return info.stdout + info.stderr, sass


def counts(kernel) -> tuple[dict, str]:
    """``(counts in the key loop and ptxas's verdict, SASS)`` of a compiled kernel."""
    loop_ir, loop_ptx = ttgir_loop(kernel.asm["ttgir"]), ptx_loop(kernel.asm["ptx"])
    info, sass = ptxas_report(kernel.asm["ptx"])
    loop_sass = "\n".join(line for line in sass_loop(sass).splitlines() if "@!PT" not in line)  # never executed
    row = {"convert_layout (loop)": loop_ir.count("ttg.convert_layout"),
           "convert_layout (kernel)": kernel.asm["ttgir"].count("ttg.convert_layout")}
    row.update({f"{op} (loop)": len(re.findall(re.escape(op) + r"\b", loop_ptx)) for op in PTX_SHARED})
    row["st.global (loop)"] = len(re.findall(r"\bst\.global", loop_ptx))
    row.update({f"SASS {op} (loop)": len(re.findall(r"\b" + re.escape(op) + r"\b", loop_sass)) for op in SASS_OPS})
    row["wgmma serialised (C7515)"] = "yes" if "C7515" in info else "no"
    row["registers"] = re.search(r"Used (\d+) registers", info).group(1)
    return row, sass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=32768)
    ap.add_argument("--dump", default=None, help="write each variant's TTGIR, PTX and SASS here")
    opts = ap.parse_args()
    variants = {"plain (CHUNK=0)": launch_args(opts.keys, tiles=False),
                "masses, tl.store": launch_args(opts.keys, tiles=True, CHUNK_STORE_PTX=False),
                "masses, PTX store": launch_args(opts.keys, tiles=True, CHUNK_STORE_PTX=True)}
    rows = {}
    for name, (args, kwargs) in variants.items():
        kernel = compile_sm90(args, dict(kwargs))
        rows[name], sass = counts(kernel)
        if opts.dump:
            os.makedirs(opts.dump, exist_ok=True)
            stem = os.path.join(opts.dump, re.sub(r"\W+", "_", name).strip("_"))
            for ext, text in (("ttgir", kernel.asm["ttgir"]), ("ptx", kernel.asm["ptx"]), ("sass", sass)):
                with open(f"{stem}.{ext}", "w") as f:
                    f.write(text)
    keys = list(next(iter(rows.values())))
    args, kwargs = variants["masses, PTX store"]
    print(f"_attn_kernel for sm90, {opts.keys} keys, triton {triton.__version__} ({get_ptxas(90).version}), "
          f"CHUNK={kwargs['CHUNK']} BLOCK_R={kwargs['BLOCK_R']} BLOCK_N={kwargs['BLOCK_N']} "
          f"warps {kwargs['num_warps']} stages {kwargs['num_stages']}")
    print("| variant | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
