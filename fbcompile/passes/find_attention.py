"""Find attention over a KV cache in a dynamo FX graph and decide whether it can be split.

Two forms are matched and normalised to one :class:`AttentionSite`:

* SDPA::

      F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s, enable_gqa=g)

* the eager form (HF ``eager_attention_forward`` and hand-written variants)::

      w = q @ k.transpose(-1, -2)          # or k.mT
      w = w * s  |  w / s                  # any number of scalar factors, before or after the mask
      w = w + mask  |  w.masked_fill(m, float("-inf"))
      w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
      w = F.dropout(w, p=0.0, training=False)   # optional, must be a no-op
      out = w @ v

and, through their own matchers, ``flex_attention`` (:mod:`.match_flex`) and flash-attn's forward op
(:mod:`.match_flash`; its varlen op once :mod:`.flash_varlen` unpacked it).

A site is split only when its keys and values are a ``cat`` (see :mod:`.kv_layout`), possibly seen
through position-wise ops (:mod:`.positionwise`), a buffer the graph writes at the block's
positions (:mod:`.buffer_write`), or a window of a cache whose tail the graph writes
(:mod:`.static_cache`), whose operands divide into *external* ones and *internal* ones (the block, the
rows the graph wrote, and constants such as zero padding). Everything else is left untouched with a
reason.

A piece is external when it reads graph inputs (a constant piece has no tensor whose identity could
guard a reused result, so it goes with the block), the cat operand itself depends on no graph input
that the query depends on (module parameters aside, and the inputs an earlier site of the graph reads
as its cached part: a later layer's query reads those through that site's output only, as every
layer after the first reads the attention sink's RoPE table that diffusers' SANA-WM refiner applies
to each layer's cached sink keys), and every input of the position-wise ops applied
to it (RoPE tables, ``inv_freq``, norm weights, position ids) is either not read by the query, or
module state (a parameter, buffer or tensor attribute reached from ``self``): those do not change
between a block's steps. All of them are listed in ``external_inputs`` and guarded at run time
(identity, version, shape), so a changed table or a new position-ids tensor forces a refresh; inputs
the query reads and that are passed per call (hidden states, token ids) keep the piece internal.
A position table passed per call that the query does not read (a regionally compiled layer whose
RoPE table the code around it recomputes at every call) is listed in ``table_inputs`` instead and
compared by value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fbcompile.passes.buffer_write import (BufferBlock, BufferExternal, BufferWriteError, check_pair,
                                           position_inputs)
from fbcompile.passes.graph_utils import (DependencyGraph, arg, describe_shape, example, is_parameter,
                                          is_module_state, op_name, same_size, shape, view_base)
from fbcompile.passes.kv_layout import KVLayout, LayoutError, trace_kv
from fbcompile.passes.positionwise import PositionwisePiece
from fbcompile.passes.static_cache import CacheTail, CacheWindow, check_pair as check_windows

_CASTS = {"to", "float", "half", "bfloat16", "type", "type_as", "contiguous"}
_MATMULS = {"matmul", "__matmul__"}


class NotSplittable(Exception):
    """Raised with the reason an attention site must be left untouched."""


class KeyMask:
    """A mask the split builds per key range instead of slicing one tensor (flex masks, flash's causal)."""

    per_head = False  # the emitted mask has the query heads in dim 1 (else it broadcasts over heads)

    def emit(self, graph: fx.Graph, start, length) -> fx.Node | None:
        """Nodes computing the mask (ops' convention: bool = attend, float = added to the scaled scores) of all
        queries over keys ``[start, start + length)``; None when every query sees every one of them."""
        raise NotImplementedError


@dataclass
class AttentionSite:
    """One attention node, normalised; ``reason`` is None when the split is proven safe."""

    node: fx.Node                      # the node whose value the rewrite replaces
    form: str                          # "sdpa" | "eager" | "flex" | "flash" | "flash varlen"
    q: fx.Node
    k: fx.Node                         # [B, H, N, D] as attention sees it ([B, N, H, D] if tokens_first)
    v: fx.Node
    tokens_first: bool = False         # q, k, v and the output are [B, S, H, D] (flash-attn)
    lse: fx.Node | None = None         # a used log-sum-exp output [B, H, M], replaced too
    lse_factor: float = 1.0            # that output is the natural-log LSE times this factor
    key_mask: KeyMask | None = None    # replaces ``mask``: built per key range
    mask: fx.Node | None = None
    mask_kind: str = "none"            # none | bool | additive | masked_fill
    mask_scale: float = 1.0            # additive masks added before a scalar factor are scaled by it
    scale: float | None = None
    k_layout: KVLayout | None = None
    v_layout: KVLayout | None = None
    external: list[int] = field(default_factory=list)   # cat operand indices
    internal: list[int] = field(default_factory=list)
    external_inputs: list[fx.Node] = field(default_factory=list)  # placeholders the cached KV reads
    position_inputs: list[fx.Node] = field(default_factory=list)  # placeholders the buffer's written positions read
    table_inputs: list[fx.Node] = field(default_factory=list)  # per-call position tables the cached KV reads
    reason: str | None = None

    @property
    def splittable(self) -> bool:
        return self.reason is None

    @property
    def decision(self) -> str:
        return "rewritten" if self.reason is None else f"skipped: {self.reason}"

    def describe(self) -> dict:
        """One row of the explain table."""
        heads = "?"
        if shape(self.q) is not None and self.k_layout is not None:
            query_heads, kv_heads = self.query_heads(), self.kv_heads()
            heads = f"{query_heads}/{kv_heads}" + (f" (GQA {query_heads // kv_heads})" if query_heads != kv_heads else "")
        kv = describe_shape(self.k)
        if self.k_layout is not None:
            kinds = ["ext" if i in self.external else "int" for i in range(len(self.k_layout.pieces))]
            parts = [describe_shape(p) if isinstance(p, fx.Node) else p.describe() for p in self.k_layout.pieces]
            kv += " = cat(" + ", ".join(f"{kind}:{part}" for kind, part in zip(kinds, parts)) + ")"
        return {"node": self.node.name, "form": self.form, "q": describe_shape(self.q), "kv": kv,
                "heads": heads, "mask": self.mask_kind, "decision": self.decision}

    def cache_offsets(self) -> list:
        """Where each static-cache window starts and its block starts (ints or symbolic-int nodes),
        the symbolic-int inputs a written buffer's positions are computed from, and the sizes position
        tables' rows move with (see :mod:`.positionwise`)."""
        chains = {p.chain: None for layout in (self.k_layout, self.v_layout) for p in layout.pieces
                  if isinstance(p, PositionwisePiece)}
        return [b for window in self.cache_windows() for b in window.bounds] + [
            n for n in self.position_inputs if example(n) is None] + [
                size for chain in chains for size in chain.guarded_sizes]

    def cache_windows(self) -> list[CacheWindow]:
        """The keys' and values' static-cache windows (see :mod:`.static_cache`)."""
        return [p for layout in (self.k_layout, self.v_layout) for p in layout.pieces if isinstance(p, CacheWindow)]

    def position_tensors(self) -> list[fx.Node]:
        """Tensor inputs a written buffer's positions are computed from, and per-call position tables
        (reuse compares their values)."""
        return [n for n in self.position_inputs if example(n) is not None] + self.table_inputs

    def buffer_writes(self) -> list:
        """The keys' and values' :class:`~.buffer_write.BufferWrite` of a written-buffer site (else [])."""
        return [_stand_in(p).write for layout in (self.k_layout, self.v_layout) for p in layout.pieces[:1]
                if isinstance(_stand_in(p), BufferExternal)]

    def query_heads(self) -> int:
        return shape(self.q)[2 if self.tokens_first else 1]

    def kv_heads(self) -> int:
        return math.prod(f.size for f in self.k_layout.order[1]) if self.k_layout.order[1] else 1


def _match_sdpa(node: fx.Node) -> AttentionSite:
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    site = AttentionSite(node=node, form="sdpa", q=q, k=k, v=v)
    mask = arg(node, 3, "attn_mask")
    dropout, causal, scale = arg(node, 4, "dropout_p", 0.0), arg(node, 5, "is_causal", False), arg(node, 6, "scale")
    if mask is not None:
        site.mask = mask
        site.mask_kind = "bool" if example(mask) is not None and example(mask).dtype == torch.bool else "additive"
    if not isinstance(dropout, (int, float)) or dropout != 0:
        site.reason = f"dropout_p={dropout} is not a constant 0"
    elif causal is not False:
        site.reason = "is_causal=True (a causal mask over cache + block is not split)"
    elif scale is not None and not isinstance(scale, (int, float)):
        site.reason = "scale is not a constant"
    site.scale = scale
    return site


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_last_two_transpose(node: fx.Node) -> bool:
    name, nd = op_name(node), len(shape(node) or ())
    if name == "mT":
        return True
    if name == "transpose":
        dims = {d % nd for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1"))}
        return dims == {nd - 1, nd - 2}
    if name == "permute":
        perm = [p % nd for p in (node.args[1:] if not isinstance(node.args[1], (list, tuple)) else node.args[1])]
        return perm == list(range(nd - 2)) + [nd - 1, nd - 2]
    return False


def _walk_scores(node: fx.Node, factor: float, site_masks: list) -> tuple[fx.Node, float]:
    """Walk from the softmax input down to ``q @ k^T``; returns (matmul, scale), collects masks."""
    name = op_name(node)
    if name in _MATMULS:
        return node, factor
    if _single_user(node) is None:
        raise NotSplittable("attention scores are used outside the softmax")
    if name in _CASTS:
        return _walk_scores(node.args[0], factor, site_masks)
    if name in ("mul", "div", "truediv") and len(node.args) == 2:
        a, b = node.args
        if name == "mul" and isinstance(a, (int, float)):
            a, b = b, a
        if isinstance(a, fx.Node) and isinstance(b, (int, float)) and b > 0:
            c = b if name == "mul" else 1.0 / b
            return _walk_scores(a, factor * c, site_masks)
    if name in ("add", "iadd") and len(node.args) == 2 and all(isinstance(x, fx.Node) for x in node.args):
        for scores, mask in (node.args, node.args[::-1]):
            if op_name(scores) in _MATMULS or _single_user(scores) is node:
                try:
                    matmul, scale = _walk_scores(scores, factor, site_masks)
                except NotSplittable:
                    continue
                site_masks.append(("additive", mask, factor))
                return matmul, scale
    if name == "masked_fill" and isinstance(arg(node, 1, "mask"), fx.Node):
        value = arg(node, 2, "value")
        if isinstance(value, (int, float)) and value == float("-inf"):
            matmul, scale = _walk_scores(node.args[0], factor, site_masks)
            site_masks.append(("masked_fill", arg(node, 1, "mask"), 1.0))
            return matmul, scale
        raise NotSplittable("masked_fill with a finite value (changes fully masked rows)")
    raise NotSplittable(f"'{name}' on the attention scores")


def _match_eager(softmax: fx.Node) -> AttentionSite | None:
    """Match ``softmax(scores) @ v``; returns None if ``softmax`` is not an attention's."""
    nd = len(shape(softmax) or ())
    dim = arg(softmax, 1, "dim")
    if nd != 4 or dim is None or dim % nd != nd - 1:
        return None
    probs, dropout = softmax, None
    while (user := _single_user(probs)) is not None and (op_name(user) in _CASTS or op_name(user) == "dropout"):
        if op_name(user) == "dropout" and arg(user, 2, "training", True) is not False and arg(user, 1, "p", 0.5) != 0:
            dropout = f"dropout (p={arg(user, 1, 'p', 0.5)}) on the attention probabilities"
        probs = user
    out = _single_user(probs)
    if out is None or op_name(out) not in _MATMULS or out.args[0] is not probs:
        return None
    masks: list = []
    try:
        if dropout:
            raise NotSplittable(dropout)
        matmul, scale = _walk_scores(softmax.args[0], 1.0, masks)
    except NotSplittable as e:
        return AttentionSite(node=out, form="eager", q=softmax, k=softmax, v=out.args[1], reason=str(e))
    q, k_t = matmul.args[0], matmul.args[1]
    site = AttentionSite(node=out, form="eager", q=q, k=k_t, v=out.args[1], scale=scale)
    if not _is_last_two_transpose(k_t):
        site.reason = "keys are not transposed in the graph (k^T not found)"
        return site
    site.k = k_t.args[0]
    if len(masks) > 1:
        site.reason = "more than one mask term"
    elif masks:
        site.mask_kind, site.mask, site.mask_scale = masks[0]
    return site


def _classify(site: AttentionSite, deps: DependencyGraph, cached: set[fx.Node]) -> None:
    """Split cat operands into external (cache) and internal (block) ones, or raise NotSplittable.
    ``cached``: the inputs earlier sites of the graph read as their cached parts."""
    query_inputs = _cache_inputs(deps, site.q) - cached
    k_layout, v_layout = site.k_layout, site.v_layout
    if len(k_layout.pieces) != len(v_layout.pieces):
        raise NotSplittable("keys and values are concatenated from different numbers of parts")
    external_inputs: set[fx.Node] = set()
    table_inputs: set[fx.Node] = set()
    for i, (kp, vp) in enumerate(zip(k_layout.pieces, v_layout.pieces)):
        k_len, v_len = k_layout.piece_length(i), v_layout.piece_length(i)
        if isinstance(k_len, int) and isinstance(v_len, int) and k_len != v_len:
            raise NotSplittable("keys and values are concatenated from parts of different lengths")
        # symbolic lengths: the split ops check k/v lengths match at run time (see fbcompile.ops)
        k_inputs, v_inputs = (_cache_inputs(deps, p) for p in (kp, vp))
        k_why, v_why = (_internal_reason(deps, p, query_inputs) for p in (kp, vp))
        k_ext, v_ext = k_why is None, v_why is None
        if k_ext != v_ext:
            which, other, why = ("keys", "values", v_why) if k_ext else ("values", "keys", k_why)
            raise NotSplittable(f"part {i} is cached for {which} only: its {other} {why}")
        if k_ext:
            site.external.append(i)
            external_inputs |= k_inputs | v_inputs
            table_inputs |= {n for piece in (kp, vp) for n in _per_call_tables(deps, piece)}
        else:
            site.internal.append(i)
    if not site.external:
        raise NotSplittable("every key depends on the current block (no cached part)")
    if not site.internal:
        raise NotSplittable("no key depends on the current block")
    if site.key_mask is not None and site.internal != list(range(site.internal[0], site.internal[-1] + 1)):
        raise NotSplittable(f"the block's keys are not contiguous (a {site.form} mask is built per key range)")
    own_writes = {w for window in site.cache_windows() for w in window.writes}
    own_writes |= {w.node for w in site.buffer_writes()}
    if any(set(deps.mutations.get(view_base(n), ())) - own_writes for n in external_inputs):
        raise NotSplittable("the graph writes the cached keys/values in place")
    placeholders = [n for n in site.node.graph.nodes if n.op == "placeholder"]
    site.external_inputs = [n for n in placeholders if n in external_inputs - table_inputs]
    site.table_inputs = [n for n in placeholders if n in table_inputs]


def _per_call_tables(deps: DependencyGraph, piece) -> set[fx.Node]:
    """Position tables passed to the graph per call (not module state, read by no cat operand): a
    regionally compiled layer gets its RoPE table computed anew at each call by the code around it
    (diffusers' AnyFlow FAR blocks), so reuse compares them by value, not by identity."""
    if not isinstance(piece, PositionwisePiece):
        return set()
    return {n for n in piece.side_inputs if not is_module_state(n)} - _cache_inputs(deps, piece.source)


def _cache_inputs(deps: DependencyGraph, node) -> set[fx.Node]:
    """Graph inputs ``node`` reads, module parameters aside (they do not change between steps).

    A static-cache window, or a written buffer without its written positions, reads only its cache:
    the graph's write goes to the block's own range. A position-wise piece reads its cat operand's
    inputs and those of the ops' other operands.
    """
    if isinstance(node, CacheWindow):
        return {node.source}
    if isinstance(node, BufferExternal):
        return {node.base}
    if isinstance(node, BufferBlock):  # the buffer's rows at the written positions hold the block
        node = node.write.value
    if isinstance(node, CacheTail):  # the rows the graph wrote: always the block
        return set()
    if isinstance(node, PositionwisePiece):
        return _cache_inputs(deps, node.source) | {n for n in node.side_inputs if not is_parameter(n)}
    return {n for n in deps.tensor_inputs(node) if not is_parameter(n)}


def _check_buffer_writes(site: AttentionSite, deps: DependencyGraph) -> None:
    """Keys and values both written buffers at the same positions (or neither); note the positions' inputs."""
    writes = site.buffer_writes()
    if not writes:
        return
    if len(writes) != 2:
        raise NotSplittable("only one of keys/values is a buffer the graph writes")
    if site.key_mask is not None:
        raise NotSplittable(f"a {site.form} mask over a buffer written at the block's positions is not split")
    try:
        check_pair(*writes)
    except BufferWriteError as e:
        raise NotSplittable(str(e)) from None
    site.position_inputs = position_inputs(writes[0], deps)


def _stand_in(piece):
    """The piece a position-wise piece computes from (a written buffer's rows, keys rotated after the
    write), else ``piece``."""
    return piece.source if isinstance(piece, PositionwisePiece) else piece


def _internal_reason(deps: DependencyGraph, piece, query_inputs: set) -> str | None:
    """Why ``piece`` belongs to the block, or None if it is external (see the module docstring)."""
    if isinstance(_stand_in(piece), (BufferBlock, CacheTail)):
        return "are the rows this graph writes (the block)"
    if isinstance(piece, fx.Node) and piece.meta.get("fbcompile_block"):
        return "are the block an earlier graph appended (see .split_joined_inputs)"
    inputs = _cache_inputs(deps, piece)
    if not inputs:
        return "read no input (a constant goes with the block)"
    if isinstance(_stand_in(piece), fx.Node) and any(deps.mutations.get(n) for n in inputs):
        # Fast-dLLM v2's block cache: ``block_k[:, :, s:s + n] = k`` then ``cat([past_k, block_k])``
        return "read an input this graph writes in place (a block cache)"
    source = piece.source if isinstance(piece, PositionwisePiece) else piece
    if _cache_inputs(deps, source) & query_inputs:
        return "depend on an input the query depends on"
    if isinstance(piece, PositionwisePiece):
        per_call = [n.name for n in piece.side_inputs & query_inputs if not is_module_state(n)]
        if per_call:
            return f"go through ops that read {', '.join(sorted(per_call))}, a per-call input the query reads too"
    return None


def _check_mask(site: AttentionSite) -> None:
    if site.mask is None:
        return
    mask_shape, key_len = shape(site.mask), shape(site.k)[-2]
    if mask_shape is None:
        raise NotSplittable("mask without a recorded shape")
    if len(mask_shape) > 4:
        raise NotSplittable("mask has more than 4 dims")
    if not (same_size(mask_shape[-1], 1) or same_size(mask_shape[-1], key_len)):
        raise NotSplittable("mask's last dim is not the key length")


def match_attention(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every attention in ``gm``, its operands matched, nothing proven yet."""
    from fbcompile.passes.flash_ops import flash_call
    from fbcompile.passes.flash_varlen import packed_site  # they build AttentionSites
    from fbcompile.passes.match_flash import match_flash
    from fbcompile.passes.match_flex import is_flex_attention, match_flex

    sites = []
    for node in list(gm.graph.nodes):
        name = op_name(node)
        if name == "scaled_dot_product_attention":
            site = _match_sdpa(node)
        elif name == "softmax":
            site = _match_eager(node)
        elif is_flex_attention(node):
            site = match_flex(gm, node)
        elif (call := flash_call(node)) is not None:  # packed: one :mod:`.flash_varlen` left so
            site = packed_site(call) if call.packed else match_flash(call)
        else:
            continue
        if site is not None:
            sites.append(site)
    return sites


def find_attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    """All attention sites in ``gm`` with their split decision (``site.reason``)."""
    deps: DependencyGraph | None = None
    cached: set[fx.Node] = set()  # the external inputs of the sites split so far (graph order)
    sites = match_attention(gm)
    for site in sites:
        if site.reason is not None:
            continue
        try:
            if len(shape(site.q) or ()) != 4:
                raise NotSplittable("query is not 4-D [B, H, M, D]")
            try:
                site.k_layout = trace_kv(site.k, tokens_first=site.tokens_first)
                site.v_layout = trace_kv(site.v, tokens_first=site.tokens_first)
                check_windows(*([p for p in layout.pieces if isinstance(p, CacheWindow)]
                                for layout in (site.k_layout, site.v_layout)))
            except LayoutError as e:
                raise NotSplittable(str(e)) from None
            _check_mask(site)
            deps = deps or DependencyGraph(gm.graph)
            _check_buffer_writes(site, deps)
            _classify(site, deps, cached)
            if site.query_heads() % site.kv_heads():
                raise NotSplittable("query heads are not a multiple of the KV heads")
            cached |= set(site.external_inputs)
        except NotSplittable as e:
            site.reason = str(e)
    return sites

