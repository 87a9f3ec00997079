"""The custom ops that rewritten graphs call: ``torch.ops.fbcompile.*``.

They are registered with ``torch.library.triton_op``: eager calls run the op body directly, while
AOT/Inductor trace *through* it, so a compiled graph launches the Triton kernels itself (wrapped with
``torch.library.wrap_triton`` in :mod:`fbcompile.kernels.triton_attention`), with no Python op call
between them: Inductor can fuse around them and CUDA graphs capture them. Under fbcompile's CUDA
graphs the compiler keeps them opaque instead (:func:`fbcompile.backends.compiler._inductor`): the
replays run no host code either way, and an opaque op's launch plan adds no shape guards. The two
merges of plain PyTorch (``merge_lse``, ``subtract_lse``) are traced in either case
(:func:`_traced_by_aot`). The body picks the Triton kernels where they apply (CUDA tensors, supported
shapes), cuDNN's fused attention for parts of thousands of rows per head, and otherwise the plain PyTorch reference (:func:`attention_kernel` says which),
behind the opaque ops ``fbcompile::reference_*``: Inductor would compile the traced reference into
C++ for CPU graphs, which costs far more compile time than it saves on a path that has no kernels.
The choice depends on devices, dtypes and static sizes only, never on tensor values, so it is
traceable. Both paths follow :mod:`fbcompile.kernels.reference`. Explicit fake implementations give
shapes without running the bodies.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fbcompile.kernels import reference

try:  # Triton kernels are optional: CPU-only installs run the reference.
    from fbcompile.kernels import triton_attention, triton_linear
except ImportError:  # pragma: no cover - depends on the installed triton
    triton_attention = triton_linear = None


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be 4-D")
    torch._check(k.shape[2] == v.shape[2], lambda: f"keys ({k.shape[2]}) and values ({v.shape[2]}) differ in length")
    torch._check(k.shape[1] == v.shape[1] and q.shape[1] % k.shape[1] == 0,
                 lambda: f"{q.shape[1]} query heads cannot be grouped over {k.shape[1]} KV heads")
    torch._check(q.shape[-1] == k.shape[-1], lambda: "query and key head dims differ")


def _use_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    return triton_attention is not None and q.is_cuda and triton_attention.supports(q, k, v, mask)


# A part with a thousand query rows per head or more (a video chunk: 1560 per latent frame) is compute-bound,
# and there cuDNN's fused attention (SDPA's backend on Hopper) runs ~1.5x faster than the split-KV Triton
# kernels, which are tuned for a text block's tens of rows. cuDNN gives each 128 rows of a head one program
# that walks all the keys, so with fewer programs than the GPU has SMs it idles: measured at 12 heads, 1024
# rows (96 programs) 1.5x faster, 512 rows 0.85-0.93x, 256 rows 0.37-0.49x. A key count read on the device
# could only reach it as a -inf bias over the padding, which costs it its lead.
# (benchmarks/results/attention_backends_h200.md)
CUDNN_MIN_ROWS = 1024
CUDNN_MIN_PROGRAMS = 96


def _cudnn_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   key_count: torch.Tensor | None) -> bool:
    """Whether a part the Triton kernels take runs on cuDNN instead: unmasked bf16/fp16 attention over
    all its keys (no key count), one KV head per query head, head dims <= 128, at least
    :data:`CUDNN_MIN_ROWS` rows per head and :data:`CUDNN_MIN_PROGRAMS` tiles of 128 rows in all (known
    at trace time), on an sm90 GPU."""
    B, H, M, D = q.shape
    return (key_count is None and mask is None and q.dtype != torch.float32
            and k.shape[1] == H and D <= 128 and v.shape[-1] == D and all(map(_cudnn_layout, (q, k, v)))
            and statically_known_true(M >= CUDNN_MIN_ROWS)
            and statically_known_true(B * H * ((M + 127) // 128) >= CUDNN_MIN_PROGRAMS)
            and torch.cuda.get_device_capability(q.device) == (9, 0))


def _cudnn_layout(t: torch.Tensor) -> bool:
    """Rows cuDNN reads as they are: unit stride along the head dim, 16-byte aligned steps elsewhere
    (SDPA checks the same before it picks cuDNN; called directly, the op would fail on others)."""
    return statically_known_true(t.stride(-1) == 1) and all(statically_known_true(s % 8 == 0) for s in t.stride()[:-1])


def attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     key_count: torch.Tensor | None = None) -> str:
    """What runs an attention part (``attention_lse``; ``attention_merge_lse`` without a key count) on
    these inputs: ``"cuDNN"``, ``"Triton"`` or ``"reference"`` (the plain PyTorch ops)."""
    counted = key_count is None or (triton_attention is not None and triton_attention.supports_key_count(q, key_count))
    if not (_use_triton(q, k, v, mask) and counted):
        return "reference"
    return "cuDNN" if _cudnn_applies(q, k, v, mask, key_count) else "Triton"


def cudnn_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` from cuDNN, both contiguous (its output follows the query's layout)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                  scale=scale)[:2]
    return out.contiguous(), lse.reshape(q.shape[:3]).contiguous()


def _attention_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(out, lse)``; also where the shape contract is checked (at trace and at run time)."""
    _check_shapes(q, k, v)
    B, Hq, M, _ = q.shape
    return q.new_empty(B, Hq, M, v.shape[-1]), q.new_empty(B, Hq, M, dtype=torch.float32)


def _merged_outputs(q, k, v, on_triton: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(out, lse)`` of a merged result, ``out`` laid out as the kernel that makes it lays it out
    (block-major from the Triton kernels: :func:`fbcompile.kernels.triton_attention.result_buffer`)."""
    out, lse = _attention_outputs(q, k, v)
    if on_triton:
        out = triton_attention.result_buffer(q, v.shape[-1], merged=True)
    return out, lse


@torch.library.custom_op("fbcompile::reference_attention_lse", mutates_args=())
def reference_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    key_count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fbcompile.kernels.reference.attention_lse` as an opaque op (the fallback path)."""
    return reference.attention_lse(q, k, v, mask, scale, key_count)


reference_attention_lse.register_fake(lambda q, k, v, mask, scale, key_count=None: _attention_outputs(q, k, v))


@torch.library.custom_op("fbcompile::reference_merge_lse", mutates_args=())
def reference_merge_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fbcompile.kernels.reference.merge_lse` as an opaque op, with contiguous outputs."""
    out, lse = reference.merge_lse(out_a, lse_a, out_b, lse_b)
    return out.contiguous(), lse.contiguous()


def _merge_outputs(out_a, lse_a, out_b, lse_b):
    shape = torch.broadcast_shapes(out_a.shape, out_b.shape)
    return out_a.new_empty(shape), lse_a.new_empty(shape[:-1])


reference_merge_lse.register_fake(_merge_outputs)


@torch.library.triton_op("fbcompile::attention_lse", mutates_args=())
def attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    key_count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``q`` attending over ``(k, v)``: the external part of a split attention.

    ``key_count`` (an integer tensor of one element on the device): only the first that many keys
    count, the rest being spare capacity (see :mod:`fbcompile.passes.key_count`)."""
    _check_shapes(q, k, v)
    kernel = attention_kernel(q, k, v, mask, key_count)
    if kernel == "cuDNN":
        return cudnn_attention_lse(q, k, v, scale)
    if kernel == "Triton":
        return triton_attention.attention_lse(q, k, v, mask, scale, key_count)
    return reference_attention_lse(q, k, v, mask, scale, key_count)


@attention_lse.register_fake
def _(q, k, v, mask, scale, key_count=None):
    return _attention_outputs(q, k, v)


@torch.library.triton_op("fbcompile::attention_merge_lse", mutates_args=())
def attention_merge_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    out_ext: torch.Tensor,
    lse_ext: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Internal attention over ``(k, v)`` merged with the external ``(out_ext, lse_ext)``: the full result."""
    _check_shapes(q, k, v)
    kernel = attention_kernel(q, k, v, mask)
    if kernel == "cuDNN":
        out, lse = reference.merge_lse(out_ext, lse_ext, *cudnn_attention_lse(q, k, v, scale))
        return out.to(q.dtype).contiguous(), lse.contiguous()
    if kernel == "Triton":
        return triton_attention.attention_merge_lse(q, k, v, mask, scale, out_ext, lse_ext)
    out, lse = reference_merge_lse(out_ext, lse_ext, *reference_attention_lse(q, k, v, mask, scale))
    return out.to(q.dtype), lse


@attention_merge_lse.register_fake
def _(q, k, v, mask, scale, out_ext, lse_ext):
    return _merged_outputs(q, k, v, attention_kernel(q, k, v, mask) == "Triton")


def _refresh_on_triton(q, k, v, mask, key_count, k_blk, v_blk, mask_blk) -> bool:
    """Whether ``attention_refresh_lse`` runs both parts in the Triton kernels' one launch pair: where
    each part alone would run on them (neither on cuDNN nor on the reference)."""
    return (attention_kernel(q, k, v, mask, key_count) == "Triton"
            and attention_kernel(q, k_blk, v_blk, mask_blk) == "Triton"
            and triton_attention.supports_refresh(q, k, v, mask, k_blk, v_blk, mask_blk))


@torch.library.triton_op("fbcompile::attention_refresh_lse", mutates_args=())
def attention_refresh_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    k_blk: torch.Tensor, v_blk: torch.Tensor, mask_blk: torch.Tensor | None, key_count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both parts of a split attention, ``(out, lse, out_ext, lse_ext)``: ``attention_lse`` over
    ``(k, v)`` (with ``key_count``) and ``attention_merge_lse`` over the block's ``(k_blk, v_blk)``, in
    one op, so that on the Triton kernels the block's keys take one more split program of the external
    part and the merge costs no launch of its own (:func:`fbcompile.kernels.triton_attention.attention_refresh_lse`).
    Elsewhere it is the two ops."""
    _check_shapes(q, k, v)
    _check_shapes(q, k_blk, v_blk)
    if _refresh_on_triton(q, k, v, mask, key_count, k_blk, v_blk, mask_blk):
        return triton_attention.attention_refresh_lse(q, k, v, mask, scale, k_blk, v_blk, mask_blk, key_count)
    out_ext, lse_ext = attention_lse(q, k, v, mask, scale, key_count)
    return (*attention_merge_lse(q, k_blk, v_blk, mask_blk, scale, out_ext, lse_ext), out_ext, lse_ext)


@attention_refresh_lse.register_fake
def _(q, k, v, mask, scale, k_blk, v_blk, mask_blk, key_count=None):
    return (*_merged_outputs(q, k_blk, v_blk, attention_kernel(q, k_blk, v_blk, mask_blk) == "Triton"),
            *_attention_outputs(q, k, v))


def _traced_by_aot(op, body):
    """Make AOT trace ``op`` into ``body``'s ops, as it does a ``triton_op`` by default, but also where
    fbcompile keeps the ``triton_op``s opaque (under CUDA graphs: ``compiler._inductor``): ``body`` is
    plain PyTorch on CUDA, which Inductor fuses into one kernel with its neighbours, and opaque
    reference ops elsewhere."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def decompose(mode, func, types, args, kwargs):
        if any(t not in (torch.Tensor, FunctionalTensor) and not issubclass(t, FakeTensor) for t in types):
            return NotImplemented
        with mode:
            return body(*args, **kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, decompose)
    return op


def _merge_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attention results over disjoint key sets (e.g. a cached prefix and suffix).

    On CUDA plain PyTorch, which Inductor fuses into one elementwise kernel; elsewhere opaque."""
    if out_a.is_cuda:
        out, lse = reference.merge_lse(out_a, lse_a, out_b, lse_b)
        return out.contiguous(), lse.contiguous()
    return reference_merge_lse(out_a, lse_a, out_b, lse_b)


merge_lse = _traced_by_aot(torch.library.custom_op("fbcompile::merge_lse", _merge_lse, mutates_args=()), _merge_lse)
merge_lse.register_fake(_merge_outputs)


# --------------------------------------------------------------------------- flex_attention's listed blocks


@torch.library.custom_op("fbcompile::listed_key_blocks", mutates_args=())
def listed_key_blocks(num_blocks: torch.Tensor, indices: torch.Tensor, queries: int, q_block: int, start: int,
                      length: int, kv_block: int) -> torch.Tensor:
    """``[B, H, queries, length]``: is the block of query ``i`` and key ``start + j`` (blocks of ``q_block``
    and ``kv_block``) among the first ``num_blocks`` of its row's ``indices`` (a ``BlockMask``'s)? Keys
    past the mask's width are not. An op Inductor does not compile: over a key count that is symbolic,
    torch 2.13's Inductor computed this gather by key block wrongly on the CPU (keys of the last, partial
    block dropped; ``tests/test_split_exact.py``), or failed where the keys may number fewer than a block
    ("Invalid ranges [0:-1]": diffusers' AnyFlow FAR, whose mask-free BlockMask has blocks of 2^30)."""
    rows = torch.arange(queries, device=indices.device) // q_block
    cols = (torch.arange(length, device=indices.device) + start) // kv_block
    width = indices.shape[-1]
    valid = torch.arange(width, device=indices.device) < num_blocks.unsqueeze(-1)
    target = torch.where(valid, indices.long(), width)   # unused slots go to a spare column
    dense = torch.zeros(*indices.shape[:-1], width + 1, dtype=torch.bool, device=indices.device)
    dense = dense.scatter(-1, target, True)
    dense = torch.cat([dense[..., :width], torch.zeros_like(dense[..., :1])], dim=-1)
    return dense[..., rows, :][..., cols.clamp(max=width)]


@listed_key_blocks.register_fake
def _(num_blocks, indices, queries, q_block, start, length, kv_block):
    return indices.new_empty(*indices.shape[:-2], queries, length, dtype=torch.bool)


# --------------------------------------------------------------------------- sparse external attention
# MAGE-style tile selection with FlashBlock residual reuse; semantics in fbcompile.kernels.reference.


def _check_tile(tile: int) -> None:
    torch._check(tile >= 1, lambda: f"tile must be positive, got {tile}")


def _tile_outputs(q, k, v, tile):
    out, lse = _attention_outputs(q, k, v)
    num_tiles = (k.shape[2] + tile - 1) // tile
    return out, lse, q.new_empty(k.shape[0], k.shape[1], num_tiles, dtype=torch.float32)


@torch.library.custom_op("fbcompile::reference_attention_lse_tiles", mutates_args=())
def reference_attention_lse_tiles(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, tile: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`fbcompile.kernels.reference.attention_lse_tiles` as an opaque op (the fallback path)."""
    return reference.attention_lse_tiles(q, k, v, mask, scale, tile)


reference_attention_lse_tiles.register_fake(lambda q, k, v, mask, scale, tile: _tile_outputs(q, k, v, tile))


@torch.library.triton_op("fbcompile::attention_lse_tiles", mutates_args=())
def attention_lse_tiles(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, tile: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attention_lse` plus the attention mass of each KV tile of ``tile`` keys, ``[B, Hkv, T]``:
    the refresh step's importance scores, from the same pass over the KV (Triton for tiles of a
    multiple of 16 keys)."""
    _check_shapes(q, k, v)
    _check_tile(tile)
    if _use_triton(q, k, v, mask) and triton_attention.supports_tile(tile):
        return triton_attention.attention_lse_tiles(q, k, v, mask, scale, tile)
    return reference_attention_lse_tiles(q, k, v, mask, scale, tile)


attention_lse_tiles.register_fake(lambda q, k, v, mask, scale, tile: _tile_outputs(q, k, v, tile))


@torch.library.custom_op("fbcompile::reference_select_tiles", mutates_args=())
def reference_select_tiles(tile_mass: torch.Tensor, max_tiles: int, mass: float) -> torch.Tensor:
    """:func:`fbcompile.kernels.reference.select_tiles` as an opaque op."""
    return reference.select_tiles(tile_mass, max_tiles, mass)


def _select_outputs(tile_mass, max_tiles, mass):
    return tile_mass.new_empty(*tile_mass.shape[:2], max_tiles, dtype=torch.int32)


reference_select_tiles.register_fake(_select_outputs)


@torch.library.triton_op("fbcompile::select_tiles", mutates_args=())
def select_tiles(tile_mass: torch.Tensor, max_tiles: int, mass: float) -> torch.Tensor:
    """Per KV head the ``max_tiles`` heaviest tiles (``mass >= 1``) or the fewest reaching ``mass`` of
    the total (capped at ``max_tiles``): int32 ``[B, Hkv, max_tiles]``, ascending, ``-1`` = unused.

    On CUDA plain PyTorch (no host sync, static shape), which Inductor compiles; elsewhere opaque."""
    torch._check(tile_mass.dim() == 3, lambda: "tile_mass must be [B, Hkv, T]")
    torch._check(max_tiles >= 0, lambda: f"max_tiles must be >= 0, got {max_tiles}")
    if tile_mass.is_cuda:
        return reference.select_tiles(tile_mass, max_tiles, mass)
    return reference_select_tiles(tile_mass, max_tiles, mass)


select_tiles.register_fake(_select_outputs)


def _check_idx(k: torch.Tensor, idx: torch.Tensor) -> None:
    torch._check(idx.dim() == 3 and idx.shape[0] == k.shape[0] and idx.shape[1] == k.shape[1],
                 lambda: f"idx must be [B, Hkv, S] = [{k.shape[0]}, {k.shape[1]}, S], got {tuple(idx.shape)}")
    torch._check(not idx.is_floating_point(), lambda: "idx must be an integer tensor")


@torch.library.custom_op("fbcompile::reference_sparse_attention_lse", mutates_args=())
def reference_sparse_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    idx: torch.Tensor, tile: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fbcompile.kernels.reference.sparse_attention_lse` as an opaque op (the fallback path)."""
    return reference.sparse_attention_lse(q, k, v, mask, scale, idx, tile)


reference_sparse_attention_lse.register_fake(lambda q, k, v, mask, scale, idx, tile: _attention_outputs(q, k, v))


@torch.library.triton_op("fbcompile::sparse_attention_lse", mutates_args=())
def sparse_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    idx: torch.Tensor, tile: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``q`` over the keys of the KV tiles ``idx`` (``[B, Hkv, S]``, ``-1`` = unused)
    of its KV head only: the fresh part of a sparse reuse step."""
    _check_shapes(q, k, v)
    _check_tile(tile)
    _check_idx(k, idx)
    if _use_triton(q, k, v, mask) and triton_attention.supports_sparse(q, k, v, mask, idx):
        return triton_attention.sparse_attention_lse(q, k, v, mask, scale, idx, tile)
    return reference_sparse_attention_lse(q, k, v, mask, scale, idx, tile)


sparse_attention_lse.register_fake(lambda q, k, v, mask, scale, idx, tile: _attention_outputs(q, k, v))


@torch.library.custom_op("fbcompile::reference_sparse_attention_merge_lse", mutates_args=())
def reference_sparse_attention_merge_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    idx: torch.Tensor, tile: int, k_blk: torch.Tensor, v_blk: torch.Tensor, mask_blk: torch.Tensor | None,
    out_res: torch.Tensor, lse_res: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fbcompile.kernels.reference.sparse_attention_merge_lse` as an opaque op (the fallback path)."""
    return reference.sparse_attention_merge_lse(q, k, v, mask, scale, idx, tile, k_blk, v_blk, mask_blk,
                                                out_res, lse_res)


reference_sparse_attention_merge_lse.register_fake(lambda q, k, v, *args: _attention_outputs(q, k, v))


@torch.library.triton_op("fbcompile::sparse_attention_merge_lse", mutates_args=())
def sparse_attention_merge_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
    idx: torch.Tensor, tile: int, k_blk: torch.Tensor, v_blk: torch.Tensor, mask_blk: torch.Tensor | None,
    out_res: torch.Tensor, lse_res: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole sparse reuse step: ``q`` over the selected tiles ``idx`` of the cached ``(k, v)`` and
    over the block's own ``(k_blk, v_blk)``, merged with the cached residual ``(out_res, lse_res)``
    (:func:`subtract_lse` of the refresh step). Equals :func:`attention_merge_lse` of the block against
    :func:`merge_lse` of the residual and :func:`sparse_attention_lse`; on CUDA one kernel and its
    reduction instead of four launches."""
    _check_shapes(q, k, v)
    _check_shapes(q, k_blk, v_blk)
    _check_tile(tile)
    _check_idx(k, idx)
    if _sparse_merge_on_triton(q, k, v, mask, idx, k_blk, v_blk, mask_blk, out_res, lse_res):
        return triton_attention.sparse_attention_merge_lse(q, k, v, mask, scale, idx, tile, k_blk, v_blk, mask_blk,
                                                           out_res, lse_res)
    return reference_sparse_attention_merge_lse(q, k, v, mask, scale, idx, tile, k_blk, v_blk, mask_blk,
                                                out_res, lse_res)


@sparse_attention_merge_lse.register_fake
def _(q, k, v, mask, scale, idx, tile, k_blk, v_blk, mask_blk, out_res, lse_res):
    return _merged_outputs(q, k, v, _sparse_merge_on_triton(q, k, v, mask, idx, k_blk, v_blk, mask_blk, out_res, lse_res))


def _sparse_merge_on_triton(q, k, v, mask, idx, k_blk, v_blk, mask_blk, out_res, lse_res) -> bool:
    return (_use_triton(q, k, v, mask) and triton_attention.supports_sparse(q, k, v, mask, idx)
            and triton_attention.supports(q, k_blk, v_blk, mask_blk) and out_res.device == lse_res.device == q.device)


@torch.library.custom_op("fbcompile::reference_subtract_lse", mutates_args=())
def reference_subtract_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fbcompile.kernels.reference.subtract_lse` as an opaque op, with contiguous outputs."""
    out, lse = reference.subtract_lse(out_a, lse_a, out_b, lse_b)
    return out.contiguous(), lse.contiguous()


def _subtract_outputs(out_a, lse_a, out_b, lse_b):
    shape = torch.broadcast_shapes(out_a.shape, out_b.shape)
    return out_a.new_empty(shape, dtype=torch.float32), lse_a.new_empty(shape[:-1], dtype=torch.float32)


reference_subtract_lse.register_fake(_subtract_outputs)


def _subtract_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 attention over the keys of ``a`` without those of ``b`` (``b``'s keys a subset of ``a``'s):
    the residual a refresh step caches. On CUDA plain PyTorch (fused by Inductor); elsewhere opaque."""
    if out_a.is_cuda:
        out, lse = reference.subtract_lse(out_a, lse_a, out_b, lse_b)
        return out.contiguous(), lse.contiguous()
    return reference_subtract_lse(out_a, lse_a, out_b, lse_b)


subtract_lse = _traced_by_aot(torch.library.custom_op("fbcompile::subtract_lse", _subtract_lse, mutates_args=()),
                              _subtract_lse)
subtract_lse.register_fake(_subtract_outputs)


MAX_LINEAR_GROUP = triton_linear.MAX_GROUP if triton_linear is not None else 1  # weights one launch stacks


def linear_group_supported(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                           residual: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear_group` runs these operands in one launch (on CUDA), not as separate linears."""
    return (triton_linear is not None and triton_linear.supports(x, weights, biases)
            and (residual is None or triton_linear.supports_residual(x, sum(w.shape[0] for w in weights), residual)))


@torch.library.triton_op("fbcompile::linear_group", mutates_args=())
def linear_group(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                 residual: torch.Tensor | None = None) -> torch.Tensor:
    """``cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)`` (plus ``residual`` where given):
    linears over one input in one launch of the skinny-GEMM kernel on CUDA where it applies, the
    residual added as it stores; elsewhere the plain ops."""
    if x.is_cuda and linear_group_supported(x, weights, biases, residual):
        return triton_linear.linear(x, weights, biases, residual=residual)
    y = torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)
    return y if residual is None else residual + y


@linear_group.register_fake
def _(x, weights, biases, residual=None):
    return x.new_empty(*x.shape[:-1], sum(w.shape[0] for w in weights))


def linear_partials_supported(x: torch.Tensor, weights: list[torch.Tensor],
                              biases: list[torch.Tensor | None] | None = None) -> bool:
    """Whether :func:`linear_partials` runs these operands in one launch (on CUDA)."""
    return triton_linear is not None and triton_linear.supports(x, weights, biases or [None] * len(weights))


def linear_partials_splits(x: torch.Tensor, weights: list[torch.Tensor]) -> int:
    """How many partial sums :func:`linear_partials` should take for these operands (1: do not split)."""
    if triton_linear is None or not x.is_cuda:
        return 1
    return triton_linear.partials_splits(x.shape.numel() // max(1, x.shape[-1]), sum(w.shape[0] for w in weights),
                                         x.shape[-1], triton_linear.num_sms(x.device))


@torch.library.triton_op("fbcompile::linear_partials", mutates_args=())
def linear_partials(x: torch.Tensor, weights: list[torch.Tensor], splits: int,
                    biases: list[torch.Tensor | None]) -> torch.Tensor:
    """``cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)`` as fp32 partial sums over
    ``splits`` slices of the reduction, the biases in the first, ``[splits, *x.shape[:-1], N]``, for the
    graph to sum where it reads the result: on CUDA one launch of the skinny-GEMM kernel and no launch
    for the sum; elsewhere the slices' linears in fp32."""
    if x.is_cuda and linear_partials_supported(x, weights, biases):
        return triton_linear.linear_partials(x, weights, splits, biases)
    K = x.shape[-1]
    w = torch.cat(weights, 0)
    b = torch.cat(biases).float() if biases[0] is not None else None
    step = -(-K // splits)
    return torch.stack([F.linear(x[..., i * step:(i + 1) * step].float(), w[:, i * step:(i + 1) * step].float(),
                                 b if i == 0 else None) for i in range(splits)])


@linear_partials.register_fake
def _(x, weights, splits, biases):
    return x.new_empty(splits, *x.shape[:-1], sum(w.shape[0] for w in weights), dtype=torch.float32)


GATES = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}  # act -> the model's function


def gated_linear_supported(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor,
                           gate_bias: torch.Tensor | None, up_bias: torch.Tensor | None, act: str) -> bool:
    """Whether :func:`gated_linear` runs in one launch (on CUDA), not as two linears, activation and product."""
    return triton_linear is not None and triton_linear.supports_gate(x, [gate_weight, up_weight], [gate_bias, up_bias],
                                                                     act)


@torch.library.triton_op("fbcompile::gated_linear", mutates_args=())
def gated_linear(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, gate_bias: torch.Tensor | None,
                 up_bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """``act(F.linear(x, gate_weight, gate_bias)) * F.linear(x, up_weight, up_bias)``, a gated MLP's
    input projections: on CUDA one launch of the skinny-GEMM kernel, which reads both weights' rows in
    each program and applies the gate as it stores the result (rounded as the model's linears and
    Inductor's fused kernel for the product round); elsewhere the model's own ops."""
    torch._check(act in GATES, lambda: f"gated_linear: unknown activation {act!r}")
    if x.is_cuda and gated_linear_supported(x, gate_weight, up_weight, gate_bias, up_bias, act):
        return triton_linear.linear(x, [gate_weight, up_weight], [gate_bias, up_bias], act=act)
    return GATES[act](F.linear(x, gate_weight, gate_bias)) * F.linear(x, up_weight, up_bias)


@gated_linear.register_fake
def _(x, gate_weight, up_weight, gate_bias, up_bias, act):
    return x.new_empty(*x.shape[:-1], gate_weight.shape[0])


class AttentionArgs(NamedTuple):
    """The arguments of an ``attention_lse`` call node, by name (the op's schema order)."""

    q: object
    k: object
    v: object
    mask: object
    scale: object

    @classmethod
    def of(cls, node) -> "AttentionArgs":
        return cls(*node.args)


class MergeArgs(NamedTuple):
    """The arguments of an ``attention_merge_lse`` call node, by name (the op's schema order)."""

    q: object
    k: object
    v: object
    mask: object
    scale: object
    out_ext: object
    lse_ext: object

    @classmethod
    def of(cls, node) -> "MergeArgs":
        return cls(*node.args)

    def with_external(self, out_ext, lse_ext) -> tuple:
        """The call's argument tuple with another external ``(out_ext, lse_ext)``."""
        return tuple(self._replace(out_ext=out_ext, lse_ext=lse_ext))
