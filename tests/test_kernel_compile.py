"""The attention kernels compile for an H100 (sm90) on a machine without a GPU.

Triton's interpreter runs the kernels' semantics on the CPU (``test_triton_kernels.py``) but compiles
nothing; here Triton's own compiler takes them down to a cubin for sm90 (its bundled ``ptxas``), so a
form the compiler rejects, or shared memory past an H100's 227 KB, shows in CI rather than on the GPU.
The configurations are those of the joint refresh launch (the block's keys as one more split program)
and of its split reduction.
"""
from __future__ import annotations

import inspect

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fbcompile.kernels import triton_attention as ta  # noqa: E402

H100_SHARED = 227 * 1024
POINTERS = {**dict.fromkeys(["Q", "K", "V", "KB", "VB", "OutExt", "Out"], "*bf16"),
            **dict.fromkeys(["Lse", "OPart", "LPart", "ChunkLse", "LseExt", "SaveOut", "SaveLse", "TileMass"], "*fp32"),
            "Mask": "*i1", "MaskB": "*fp32", "KeyCount": "*i32"}

if not isinstance(ta._attn_kernel, triton.runtime.JITFunction):
    pytest.skip("Triton's interpreter is on in this process: nothing to compile", allow_module_level=True)


def compile_sm90(kernel, constants: dict, num_warps: int, num_stages: int):
    params = inspect.signature(kernel.fn).parameters
    signature = {p: "constexpr" if p in constants else POINTERS.get(p, "fp32" if p == "qk_scale" else "i32")
                 for p in params}
    source = ASTSource(kernel, signature, constexprs={k: v for k, v in constants.items() if k in params})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


# (head dim, key tile, warps, stages, cached mask, block mask, key count): the 1.5B LM's heads over a cache
# with spare capacity; 256-wide heads in the 64-key, 3-stage tiles taken without masks; 512-wide heads
REFRESH_LAUNCHES = [(128, 64, 4, 3, False, True, True), (256, 64, 4, 3, False, False, False),
                    (512, 32, 8, 2, True, False, False)]


@pytest.mark.parametrize("launch", REFRESH_LAUNCHES, ids=lambda c: f"d{c[0]}")
def test_joint_refresh_launch_compiles(launch):
    D, block_n, warps, stages, mask, mask_blk, count = launch
    kernel = compile_sm90(ta._attn_kernel, dict(
        D=D, DV=D, BLOCK_R=64, BLOCK_N=block_n, BLOCK_D=D, BLOCK_DV=D, HAS_MASK=mask, MASK_BOOL=True,
        HAS_BLOCK=True, HAS_MASK_B=mask_blk, MASK_B_BOOL=False, HAS_EXT=False, SPLIT=True,
        DOT_PRECISION="tf32", UPCAST_DOT=False, CHUNK=0, CHUNK_STORE_PTX=False, HAS_COUNT=count,
        KV_EVICT="evict_first"), warps, stages)
    assert "cubin" in kernel.asm and kernel.metadata.shared <= H100_SHARED
    # a split launch streams the KV out of L2 first and keeps its partials there for the reduction
    assert "L2::evict_first" in kernel.asm["ptx"] and "L2::evict_last" in kernel.asm["ptx"]


def test_reduction_that_merges_the_block_compiles():
    kernel = compile_sm90(ta._reduce_kernel, dict(
        DV=128, BLOCK_R=ta._REDUCE_ROWS, BLOCK_S=32, BLOCK_DV=128, HAS_EXT=False, HAS_BLOCK=True, MASS=False, BLOCK_T=32,
        BLOCK_RR=256, MASS_BLOCK_S=64), 8, 1)
    assert "cubin" in kernel.asm and kernel.metadata.shared <= H100_SHARED
