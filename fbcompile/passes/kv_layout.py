"""Trace an attention's keys (or values) back to the ``cat`` that joins cache and block.

Models hand attention their keys after a chain of layout ops, for example (HF Qwen2, ``repeat_kv``)::

    k = torch.cat([past_k, k], dim=-2)                       # [B, Hkv, S, D]
    k = k[:, :, None, :, :].expand(B, Hkv, R, S, D).reshape(B, Hkv * R, S, D)
    F.scaled_dot_product_attention(q, k, v)

or (video models, tokens first)::

    k = torch.cat([past_k, k], dim=1).transpose(1, 2)        # [B, S, H, D] -> [B, H, S, D]

or a preallocated cache that the graph itself writes at every step and reads in a window up to the
block's end (Self-Forcing style; see :mod:`.static_cache`), which is a concatenation in disguise::

    cache_k[:, start:end] = k                                # the block's own range
    k = cache_k[:, a:end].transpose(1, 2)                    # = cat([cache_k[:, a:start], k], 1)

or a full-length buffer that the graph writes at the block's positions and reads wholly (HF
``StaticCache``, Fast-dLLM's dual cache; see :mod:`.buffer_write`), split by positions rather than
ranges: the chain then ends at the buffer, whose stand-in pieces are "the buffer without the written
positions" and "the buffer's rows at them"::

    cache_k.index_copy_(2, positions, k)
    k = repeat_kv(cache_k)

:func:`trace_kv` walks such a chain back to the ``cat`` and simulates it on *factors*: every dim of
the cat's output is one factor (split when a reshape splits it); ``expand``/``repeat_interleave``/
``repeat`` add replication factors. The chain is accepted only if it ends as ``[batch, heads, S, D]``
with ``S`` the whole cat dim and every replication factor innermost in the heads dim - exactly the
query-head -> KV-head grouping of ``repeat_kv`` and of SDPA's ``enable_gqa``. The result knows how to
rebuild each cat operand as a canonical ``[B, Hkv, n, D]`` tensor *without* the replication, so the
split attention reads every cached byte once.

When the walk meets an op that is not a layout op (RoPE applied after the cat, a per-head norm),
:mod:`.positionwise` proves the ops between the cat (or a written buffer, which stands for one) and
that point position-wise and hands back one piece per cat operand; a cat operand that is itself such
ops of a cat (zero padding after RoPE) is replaced by that cat's pieces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from fbcompile.passes.buffer_write import BufferWriteError, read_buffer
from fbcompile.passes.graph_utils import arg, example, op_name, same_size, shape
from fbcompile.passes.positionwise import LayoutError, positionwise_pieces
from fbcompile.passes.static_cache import static_cache_read

_IDENTITY_OPS = {"contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "type", "type_as"}
_CHAIN_OPS = _IDENTITY_OPS | {"transpose", "permute", "view", "reshape", "unsqueeze", "getitem", "expand",
                              "repeat_interleave", "repeat", "flatten", "unflatten", "squeeze"}


@dataclass(eq=False)
class _Factor:
    """A run of elements of one cat-output dim (``atom``), or a replication (``atom is None``)."""

    atom: int | None
    size: object  # int or SymInt


@dataclass
class KVLayout:
    """How one attention operand (K or V) is laid out relative to its source ``cat``."""

    cat: fx.Node  # the cat, or the last position-wise op after it (see .positionwise)
    pieces: list  # fx.Node, or an object that emits one (static_cache.CacheWindow/CacheTail, PositionwisePiece,
    #               buffer_write.BufferExternal/BufferBlock): .length, .dtype, .describe(), .emit(graph)
    cat_dim: int
    leaves: list[list[_Factor]]  # per cat-output dim, its factors outer -> inner
    order: list[list[_Factor]]   # final [batch, heads, seq, head_dim] groups, replication dropped
    replication: int
    dtype: torch.dtype

    def piece_length(self, index: int):
        piece = self.pieces[index]
        return shape(piece)[self.cat_dim] if isinstance(piece, fx.Node) else piece.length

    def emit_canonical(self, graph: fx.Graph, piece) -> fx.Node:
        """Insert nodes that turn a cat operand into ``[B, Hkv, n, D]`` (no replication, final dtype)."""
        dtype = example(piece).dtype if isinstance(piece, fx.Node) else piece.dtype
        node = piece if isinstance(piece, fx.Node) else piece.emit(graph)
        # 1. split every cat-output dim into its factors (last dim first so indices stay valid)
        position = [f for factors in self.leaves for f in factors]  # dims after the splits
        for dim in reversed(range(len(self.leaves))):
            factors = self.leaves[dim]
            if len(factors) > 1:
                sizes = [f.size for f in factors]
                if not all(isinstance(s, int) for s in sizes):
                    raise LayoutError("a dynamic-size dim is split by a reshape")
                node = graph.call_method("unflatten", (node, dim, tuple(sizes)))
        # 2. permute into [batch..., heads..., seq, head_dim...]; size-1 factors missing from the
        #    final groups go first (they do not change the flattened sizes)
        placed = [f for group in self.order for f in group]
        spare = [f for f in position if f not in placed]
        perm = [position.index(f) for f in spare + placed]
        if perm != list(range(len(perm))):
            node = graph.call_method("permute", (node, *perm))
        # 3. merge each group into one dim
        start = 0
        for index, group in enumerate(self.order):
            width = len(group) + (len(spare) if index == 0 else 0)
            if width == 0:
                node = graph.call_method("unsqueeze", (node, start))
                width = 1
            elif width > 1:
                node = graph.call_method("flatten", (node, start, start + width - 1))
            start += 1
        if dtype != self.dtype:
            node = graph.call_method("to", (node, self.dtype))
        return node


def _flat_factors(dims: list[list[_Factor]]) -> list[_Factor]:
    return [f for d in dims for f in d]


def _regroup(dims: list[list[_Factor]], out_shape: tuple, leaves: list[list[_Factor]]) -> list[list[_Factor]]:
    """Simulate ``reshape(out_shape)``: regroup factors into the new dims, splitting static ones."""
    queue = [f for f in _flat_factors(dims) if not (isinstance(f.size, int) and f.size == 1)]
    result = []
    for size in out_shape:
        group: list[_Factor] = []
        if isinstance(size, int) and size == 1:
            result.append(group)
            continue
        need = size
        while True:
            if not queue:
                raise LayoutError("reshape does not regroup whole factors")
            f = queue[0]
            if same_size(f.size, need):
                group.append(queue.pop(0))
                break
            if isinstance(f.size, int) and isinstance(need, int) and need < f.size and f.size % need == 0:
                if f.atom is None:
                    raise LayoutError("reshape splits a replication")
                outer, inner = _Factor(f.atom, need), _Factor(f.atom, f.size // need)
                atom_leaves = leaves[f.atom]
                atom_leaves[atom_leaves.index(f):atom_leaves.index(f) + 1] = [outer, inner]
                queue[0] = inner
                group.append(outer)
                break
            if isinstance(f.size, int) and isinstance(need, int) and need % f.size == 0:
                group.append(queue.pop(0))
                need //= f.size
                continue
            # symbolic: accept a factor that provably divides out
            if not isinstance(need, int) or not isinstance(f.size, int):
                rest = need // f.size if isinstance(f.size, int) else None
                if rest is not None and same_size(rest * f.size, need):
                    group.append(queue.pop(0))
                    need = rest
                    continue
            raise LayoutError("reshape does not regroup whole factors")
        result.append(group)
    if any(not (isinstance(f.size, int) and f.size == 1) for f in queue):
        raise LayoutError("reshape leaves factors over")
    return result


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _simulate(node: fx.Node, dims: list[list[_Factor]], leaves) -> list[list[_Factor]]:
    """Factors of ``node``'s output given the factors of its input ``dims``."""
    name = op_name(node)
    out_shape = shape(node)
    nd = len(dims)
    if name in _IDENTITY_OPS:
        return dims
    if name == "transpose":
        a, b = _dim(arg(node, 1, "dim0"), nd), _dim(arg(node, 2, "dim1"), nd)
        dims = list(dims)
        dims[a], dims[b] = dims[b], dims[a]
        return dims
    if name == "permute":
        perm = node.args[1:] if len(node.args) > 2 or not isinstance(arg(node, 1, "dims"), (list, tuple)) \
            else arg(node, 1, "dims")
        return [dims[_dim(p, nd)] for p in perm]
    if name == "unsqueeze":
        d = _dim(arg(node, 1, "dim"), nd + 1)
        return dims[:d] + [[]] + dims[d:]
    if name == "getitem":
        index = node.args[1]
        index = index if isinstance(index, tuple) else (index,)
        result, source = [], iter(dims)
        for item in index:
            if item is None:
                result.append([])
            elif item == slice(None):
                result.append(next(source))
            elif item is Ellipsis:
                n_rest = sum(1 for i in index if i is not None and i is not Ellipsis)
                for _ in range(nd - n_rest):
                    result.append(next(source))
            else:
                raise LayoutError("indexing other than None, ':' or '...'")
        result.extend(source)
        return result
    if name == "expand":
        if len(out_shape) != nd:
            raise LayoutError("expand adds dims")
        result = []
        for factors, size in zip(dims, out_shape):
            if all(isinstance(f.size, int) and f.size == 1 for f in factors) and not (isinstance(size, int) and size == 1):
                result.append([_Factor(None, size)])
            else:
                result.append(factors)
        return result
    if name == "repeat_interleave":
        repeats, d = arg(node, 1, "repeats"), arg(node, 2, "dim")
        if not isinstance(repeats, int) or d is None:
            raise LayoutError("repeat_interleave without an int repeat count and a dim")
        d = _dim(d, nd)
        dims = list(dims)
        dims[d] = dims[d] + [_Factor(None, repeats)]
        return dims
    if name == "repeat":
        reps = node.args[1:] if not isinstance(node.args[1], (list, tuple)) else node.args[1]
        if len(reps) != nd or not all(isinstance(r, int) for r in reps):
            raise LayoutError("repeat with extra dims or dynamic counts")
        return [([_Factor(None, r)] if r > 1 else []) + factors for factors, r in zip(dims, reps)]
    if name in ("view", "reshape", "flatten", "unflatten", "squeeze"):
        if out_shape is None:
            raise LayoutError(f"no shape recorded for {node.name}")
        return _regroup(dims, out_shape, leaves)
    raise LayoutError(f"unsupported op '{name}' between the cat and the attention")


def _is_empty(piece_shape: tuple | None, cat_dim: int) -> bool:
    if piece_shape is None:
        return False
    if len(piece_shape) == 1:
        return same_size(piece_shape[0], 0)
    return len(piece_shape) > cat_dim and same_size(piece_shape[cat_dim], 0)


def _written_buffer(node: fx.Node):
    try:
        return read_buffer(node)
    except BufferWriteError as e:
        raise LayoutError(str(e)) from None


def _expand_piece(piece: fx.Node, cat_dim: int) -> list:
    """A cat operand that is itself position-wise ops of a cat along the sequence (RoPE, then zero
    padding with a second cat) stands for that cat's pieces; one that reads a written cache clone
    (LongLive's sinks and window, see :mod:`.static_cache`) for its window and tail."""
    if piece.op == "placeholder":
        return [piece]
    static = static_cache_read(piece)
    if static is not None:
        if static[0] != cat_dim:
            raise LayoutError("a static-cache window is read along another dim than the cat's")
        return static[1]
    try:
        return positionwise_pieces(piece, cat_dim)
    except LayoutError:
        return [piece]


def trace_kv(node: fx.Node, tokens_first: bool = False) -> KVLayout:
    """Find the cat feeding attention operand ``node`` and describe the layout; raise LayoutError.

    ``tokens_first``: the attention reads ``node`` as ``[B, S, H, D]`` (flash-attn), not ``[B, H, S, D]``.
    """
    chain, cursor, static, positionwise = [], node, None, False
    while (op_name(cursor) != "cat" and (static := static_cache_read(cursor)) is None
           and (static := _written_buffer(cursor)) is None):
        if op_name(cursor) not in _CHAIN_OPS or not cursor.args or not isinstance(cursor.args[0], fx.Node):
            positionwise = True  # maybe position-wise ops of a cat: checked once the sequence dim is known
            break
        chain.append(cursor)
        cursor = cursor.args[0]
    cat = cursor
    cat_shape = shape(cat)
    if positionwise and cat.op == "placeholder":  # no op at all between the input and the attention
        raise LayoutError("keys/values are not a concatenation: a graph input this graph neither joins with the "
                          "block nor writes (an earlier graph may have, before a graph break)")
    if positionwise:
        if cat_shape is None:
            raise LayoutError(f"keys/values are not a concatenation (reached '{op_name(cat) or cat.op}')")
        cat_dim, pieces = None, []
    elif static is not None:
        cat_dim, pieces = static
    else:
        pieces = arg(cat, 0, "tensors")
        if cat_shape is None or not isinstance(pieces, (list, tuple)) or len(pieces) < 2:
            raise LayoutError("cat of fewer than two tensors")
        cat_dim = _dim(arg(cat, 1, "dim", 0), len(cat_shape))
        # empty operands add nothing; a 1-D one is the legacy empty tensor a fresh HF cache layer holds
        pieces = [q for p in pieces if not _is_empty(shape(p), cat_dim) for q in _expand_piece(p, cat_dim)]
    leaves = [[_Factor(i, s)] for i, s in enumerate(cat_shape)]
    dims = [list(f) for f in leaves]
    for op in reversed(chain):
        dims = _simulate(op, dims, leaves)
    if len(dims) != 4:
        raise LayoutError(f"attention operand is {len(dims)}-D, not [B, H, S, D]")
    if tokens_first:
        dims[1], dims[2] = dims[2], dims[1]
    batch, heads, seq, head_dim = dims
    seq_real = [f for f in seq if not (isinstance(f.size, int) and f.size == 1)]
    if positionwise:
        if len(seq_real) != 1 or seq_real[0].atom is None:
            raise LayoutError(f"keys/values are not a concatenation (reached '{op_name(cat) or cat.op}')")
        cat_dim = seq_real[0].atom
        pieces = positionwise_pieces(cat, cat_dim, stand_in=_written_buffer)
    if len(seq_real) != 1 or seq_real[0].atom != cat_dim or len(leaves[cat_dim]) != 1:
        raise LayoutError("the cat is not along the key-sequence dim")
    if any(f.atom is None for f in batch + head_dim):
        raise LayoutError("replication outside the heads dim")
    reps = [i for i, f in enumerate(heads) if f.atom is None]
    kv_heads = [f for f in heads if f.atom is not None]
    innermost = list(range(len(heads) - len(reps), len(heads)))
    if reps != innermost and math.prod(f.size for f in kv_heads) != 1:
        raise LayoutError("heads replicated outer-most ('repeat'), not grouped like repeat_kv")
    replication = math.prod(heads[i].size for i in reps) if reps else 1
    return KVLayout(cat=cat, pieces=list(pieces), cat_dim=cat_dim, leaves=leaves,
                    order=[batch, kv_heads, seq_real, head_dim], replication=replication,
                    dtype=example(node).dtype)
