"""Derive, from a split graph, what the runtime must check before it reuses a site's external part.

Per split site (graph order) a :class:`SiteGuard` says which graph inputs hold the cached keys/
values, where a static cache's external range ends, which inputs a buffer's written positions are
computed from, and how to read the expected shape of
``O_e`` off the call's arguments (a query block of another batch or length must refresh). Also:
whether the graph commits the block into the cache (:func:`commits_block_kv`), since a commit pass
must run exactly. Pure graph analysis; the runtime evaluates the guards on each call.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from fbcompile.passes.graph_utils import VIEW_OPS, fingerprint, is_module_state, is_parameter, op_name
from fbcompile.passes.int_sources import SymbolicInt, evaluate_int, int_source, size_source
from fbcompile.ops import AttentionArgs
from fbcompile.passes.positionwise import PositionwisePiece
from fbcompile.passes.slice_writes import rows_written, slice_rows
from fbcompile.passes.static_cache import CacheTail


@dataclass(frozen=True)
class SiteGuard:
    """How to find and check one site's cached ``(O_e, L_e)`` from a call's arguments."""

    external: tuple[int, ...]      # argument indices of the tensors holding the external KV
    occurrence: int                # n-th site of this graph over the same external tensors
    computation: int               # fingerprint of how the cached part's keys/values are computed
    out_shape: tuple               # per dim of O_e: int, or (argument index, dim) it equals
    dtype: torch.dtype
    device: torch.device
    offsets: tuple                 # static caches: where each window and its block start (int, (argument
    #                                index, None) or a SymbolicInt); symbolic ints and sizes positions move with
    block_input: int | None = None  # argument index of the block's input (token ids, else the first tensor)
    positions: tuple[int, ...] = ()  # argument indices of tensors compared by value: those a buffer's
    #                                  data-dependent written positions are computed from, per-call position tables
    rewrites: str | None = None    # why every call refreshes: the graph itself writes the external rows (a roll)
    joined: tuple = ()             # per external tensor, None or (dim, block length): an input joined by an
    #                                earlier graph whose first size(dim) - block positions are cached
    #                                (see .split_joined_inputs); their provenance is compared
    module_state: tuple[int, ...] = ()  # those of ``external`` lifted from the module (weights, RoPE
    #                                     buffers): read by the cached part, no cache
    block_rows: tuple = ()         # per external tensor, None or (dim, start, end) int sources: a static
    #                                cache's block rows, where writes another graph logged leave the
    #                                external rows as they were (see .static_cache, .slice_writes)
    clone_writes: tuple = ()       # per external tensor, the writes (.slice_writes.slice_rows) of the clone
    #                                the site reads instead (LongLive's deferred write; a roll among them),
    #                                () if it reads the tensor as the call leaves it, None if unknown

    def expected_shape(self, args) -> tuple:
        return tuple(evaluate_int(d, args) for d in self.out_shape)

    def offset_values(self, args) -> list:
        return [evaluate_int(o, args) for o in self.offsets]

    def block_rows_of(self, position: int, args) -> tuple | None:
        """``(dim, start, end)`` of the block's rows in external tensor ``position``, or None."""
        rows = self.block_rows[position] if self.block_rows else None
        return None if rows is None else (rows[0], evaluate_int(rows[1], args), evaluate_int(rows[2], args))

    def clone_rows_of(self, args) -> list:
        """Per external tensor, the rows its clone's writes wrote in this call (``(dim, start, stop,
        copied)`` each, :func:`~fbcompile.passes.slice_writes.rows_written`), () or None as ``clone_writes``."""
        return [writes and rows_written(writes, args[index].shape, args)
                for index, writes in zip(self.external, self.clone_writes)]

    @property
    def size_sources(self) -> set[int]:
        """Argument indices whose sizes (or int values) the guard reads."""
        sources = [s for src in self.out_shape + self.offsets
                   for s in ([s for _, s in src.symbols] if isinstance(src, SymbolicInt) else (src,))]
        return {src[0] for src in sources if not isinstance(src, int)}


def site_guards(gm: fx.GraphModule, sites: list, external_outputs: list[fx.Node]) -> list[SiteGuard] | None:
    """One guard per split site (graph order) of the split graph ``gm``; None if a query size cannot
    be read off the inputs. ``sites``: the split :class:`AttentionSite` s, ``external_outputs``:
    their ``O_e`` nodes in ``gm``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    guards, seen = [], []
    for site, out in zip(sites, external_outputs):
        value = out.meta["example_value"]
        shape = tuple(size_source(s, placeholders) for s in value.shape)
        if any(s is None for s in shape):
            return None
        offsets = tuple(int_source(o, placeholders) for o in site.cache_offsets())
        if any(o is None for o in offsets):
            return None
        indices = tuple(placeholders.index(n) for n in site.external_inputs)
        block = _block_input(site)
        windows = site.cache_windows()
        rows = {w.source: (w.dim, int_source(w.block_start, placeholders), int_source(w.block_end, placeholders))
                for w in windows}
        block_rows = tuple(rows.get(n) for n in site.external_inputs) if rows else ()
        if any(r is not None and None in r for r in block_rows):
            block_rows = ()
        cloned = {w.source: _clone_writes(w, placeholders) for w in windows if w.deferred}
        guards.append(SiteGuard(
            external=indices, occurrence=seen.count(indices),
            computation=_external_computation(out, opaque={w.emitted for w in windows}),
            out_shape=shape, dtype=value.dtype,
            device=value.device,
            offsets=offsets,
            block_input=placeholders.index(block) if block is not None else None,
            positions=tuple(placeholders.index(n) for n in site.position_tensors()),
            rewrites="cache written outside the block" if any(w.rewrites for w in windows) else None,
            joined=tuple(n.meta.get("fbcompile_joined") for n in site.external_inputs),
            module_state=tuple(placeholders.index(n) for n in site.external_inputs if is_module_state(n)),
            block_rows=block_rows,
            clone_writes=tuple(cloned.get(n, ()) for n in site.external_inputs) if cloned else ()))
        seen.append(indices)
    return guards


def _clone_writes(window, placeholders: list[fx.Node]) -> tuple | None:
    """The writes of the clone a deferred static-cache window reads, as :func:`slice_rows` gives them
    (None if one is no slice write)."""
    rows = tuple(slice_rows(write, window.base, placeholders) for write in window.writes)
    return None if None in rows else rows


def _external_computation(out_ext: fx.Node, opaque: set = frozenset()) -> int:
    """Fingerprint of the keys, values and scale every external attention under ``O_e`` reads.

    Cache entries are shared between graphs over the same KV tensors (DiffusionGemma compiles one
    graph for a block's first step and one for the others); this keeps them apart where the cached
    part itself is computed differently - another slice of the cache, another RoPE table constant -
    while the query's computation may differ freely (it is the block's side). ``opaque``: static-cache
    window slices, whose bounds the guard compares by value (each graph computes them its own way)."""
    attention, merge = torch.ops.fbcompile.attention_lse.default, torch.ops.fbcompile.merge_lse.default
    roots, scales, stack, seen = [], [], [out_ext], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.target is operator.getitem or node.target is merge:
            stack.extend(node.all_input_nodes)
        elif node.target is attention:
            args = AttentionArgs.of(node)
            roots += [args.k, args.v]
            scales.append(args.scale)
    return fingerprint(roots, scales, opaque)


def _block_input(site) -> fx.Node | None:
    """The block's input the query is computed from: token ids if there are, else the first tensor."""
    seen, stack, found = set(), [site.q], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and not is_parameter(node):
                found.append(node)
        stack.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(site.q.graph.nodes)}
    found.sort(key=lambda n: (n.meta["example_value"].is_floating_point(), order[n]))
    return found[0] if found else None


def _graph_outputs(gm: fx.GraphModule) -> tuple:
    return tuple(next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0])


def commits_block_kv(gm: fx.GraphModule, sites) -> bool:
    """Does the graph return (a view or a copy of) a split site's block keys/values, or the whole
    ``cat`` of cache and block, i.e. commit the block? The second is how an HF ``DynamicCache`` updated
    inside the graph looks to dynamo::

        self.layers[i].keys = torch.cat([self.layers[i].keys, key_states], dim=-2)   # a graph output

    and a copy is how diffusers' SANA-WM refiner captures a finished block for its history::

        kv_cache.store_captured_post_rope(key.detach().clone(), value.detach().clone())

    A denoising step whose block the loop crops off again (``cache.crop``) looks the same; the
    runtime tells them apart per call (``SplitGraphDispatcher._cropped``).
    """
    outputs = set()
    for value in _graph_outputs(gm):
        node = value
        while isinstance(node, fx.Node):
            outputs.add(node)
            node = node.args[0] if op_name(node) in VIEW_OPS | {"clone"} and node.args else None
    for site in sites:
        if not site.splittable:
            continue
        for layout in (site.k_layout, site.v_layout):
            cats = {layout.cat} | {p.chain.cat for p in layout.pieces if isinstance(p, PositionwisePiece)}
            # a static cache's block is the value its write stores
            block = [p.window.write.args[2] if isinstance(p, CacheTail) else p
                     for p in map(layout.pieces.__getitem__, site.internal)]
            if cats & outputs or any(p in outputs for p in block if isinstance(p, fx.Node)):
                return True
    return False
