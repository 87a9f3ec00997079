"""Runtime state of fbcompile: compiled graphs, per-site counters and the external-attention cache.

One :class:`Session` per optimized model (``fbcompile.optimize``) or one shared by plain
``torch.compile(..., backend="fbcompile")`` calls. Passes and kernels hold no state; everything that
changes while a model runs lives here, can be inspected (:meth:`Session.stats`, :meth:`Session.report`)
and dropped (:meth:`Session.reset`).
"""
from __future__ import annotations

import warnings
import weakref
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from tabulate import tabulate

from fbcompile.config import Config


def mode_uses_cuda_graphs(mode: str | None) -> bool:
    """Whether ``torch.compile``'s ``mode`` asks for CUDA graphs (``"reduce-overhead"``, ``"max-autotune"``)."""
    if mode in (None, "default"):
        return False
    from torch._inductor import list_mode_options

    return bool(list_mode_options(mode).get("triton.cudagraphs"))


@dataclass
class SiteCounters:
    """One split site of a graph. Its sites refresh and reuse together (a refresh reads every KV
    head), but a reuse plan's steps recompute different KV heads per site: ``plan_kv_read``."""

    node: str
    kv_heads: int
    plan_kv_read: int = 0
    sparse_reuses: int = 0     # sparse reuse: reuse calls that read selected tiles
    tiles_read: object = 0.0   # their shares of the external KV tiles, summed (on the device), but for
    last_share: object = None  # the share of the entry the last ones used,
    last_count: int = 0        # and how many did

    def count_tiles(self, share: torch.Tensor) -> None:
        """A sparse reuse call that read ``share`` (0-dim, on the device) of the external KV tiles.
        Calls are counted on the host; the device adds up once per cache entry."""
        if share is not self.last_share:
            if self.last_count:
                self.tiles_read = self.tiles_read + self.last_share * self.last_count
            self.last_share, self.last_count = share, 0
        self.last_count += 1
        self.sparse_reuses += 1

    @property
    def sparse_share(self) -> float | None:
        """Sparse reuse: the mean share of the external KV a reuse call read (None: no sparse reuse)."""
        if not self.sparse_reuses:
            return None
        last = self.last_share * self.last_count if self.last_count else 0.0
        return float(self.tiles_read + last) / self.sparse_reuses


@dataclass
class GraphRecord:
    """One graph dynamo handed to the backend: what the pass found and did, and how often it ran."""

    index: int
    sites: list[dict]
    code_before: str
    code_refresh: str | None = None   # the split graph (computes the external part)
    code_reuse: str | None = None     # the graph that takes the cached external part as input
    split_graph: fx.GraphModule | None = None
    reuse_graph: fx.GraphModule | None = None
    plan_graphs: dict = field(default_factory=dict)  # reuse plan: "reuse, steps 1, 2" -> its graph
    no_reuse: str | None = None       # why the graph never reuses (exact mode, save pass, ...)
    commits: bool = False             # returns the block's keys/values: a call reuses only over a cut cache
    cuda_graphs: dict = field(default_factory=dict)  # with CUDA graphs: role -> how it runs over a moving cache
    linear_groups: dict = field(default_factory=dict)  # role -> the linears it runs in one launch per group
    gated_linears: dict = field(default_factory=dict)  # role -> the gated MLPs whose GEMM applies their gate
    residual_linears: dict = field(default_factory=dict)  # role -> the residual adds moved into GEMM stores
    linear_partials: dict = field(default_factory=dict)  # role -> the GEMMs whose split sum their consumer takes
    joint_attention: dict = field(default_factory=dict)  # role -> the merges now one op with their external part
    uncompiled: dict = field(default_factory=dict)  # role -> why Inductor could not compile it (runs as FX)
    # role -> (the graph as compiled, a fake mode, fake example inputs): what explain's kernel counts run on
    attention_graphs: dict = field(default_factory=dict)
    split_sites: list[SiteCounters] = field(default_factory=list)  # per split site, graph order
    refreshes: int = 0
    reuses: int = 0
    calls: int = 0

    @property
    def rewritten(self) -> int:
        return sum(site["decision"] == "rewritten" for site in self.sites)

    def count_reuse(self, kv_read: tuple | None = None) -> None:
        """A reuse call; ``kv_read``: per site, KV heads a reuse plan's step recomputed."""
        self.reuses += 1
        if kv_read:
            for site, read in zip(self.split_sites, kv_read):
                site.plan_kv_read += read

    def count_tiles(self, shares: list) -> None:
        """A reuse call; ``shares``: per site, the share of the external KV tiles it read (None: all)."""
        for site, share in zip(self.split_sites, shares):
            if share is not None:
                site.count_tiles(share)

    def reset_counts(self) -> None:
        self.refreshes = self.reuses = self.calls = 0
        for site in self.split_sites:
            site.plan_kv_read = site.sparse_reuses = site.last_count = 0
            site.tiles_read, site.last_share = 0.0, None


@dataclass(slots=True)
class CacheEntry:
    """Cached external part of one site, with what it was computed from (the guards' reference)."""

    sources: list            # weakrefs to the content tokens of the tensors holding the external KV
    #                          (fbcompile.backends.provenance: a tensor, or what a crop of a cat still holds)
    versions: list           # _version of each (None: an inference tensor, which has none)
    shapes: list
    offsets: list            # where static-cache external ranges end
    out_ext: torch.Tensor    # O_e
    lse_ext: torch.Tensor    # L_e
    tiles: torch.Tensor | None = None        # sparse reuse: the KV tiles selected at the refresh
    tiles_read: torch.Tensor | None = None   # and their share of the external KV tiles (0-dim)
    query: torch.Tensor | None = None        # the query at the refresh ("adaptive")
    block_input: torch.Tensor | None = None  # the block's input at the refresh ("tokens")
    drift: tuple | None = None  # ("adaptive") (DriftVector, site index) of the last reuse call
    steps: int = 0           # reuses since the refresh
    positions: list = field(default_factory=list)  # copies of what a written buffer's positions come from
    cloned: list = field(default_factory=list)  # per KV tensor read as a written clone: the rows the clone's
    #                                             writes wrote since ``versions`` (SiteGuard.clone_rows_of)


@dataclass(frozen=True)
class SiteStats:
    """One split site of one graph: its calls, refreshes, reuses and external-read fraction."""

    graph: int
    node: str
    calls: int
    refreshes: int
    reuses: int
    external_fraction: float  # external KV its external part read (KV heads; sparse: x tiles) / exact mode's
    sparse_read: float | None = None  # sparse reuse: share of the external KV a reuse step reads


@dataclass(frozen=True)
class Stats:
    """Counts since the last reset. ``refresh_reasons``: why each refresh (or exact call) happened."""

    compiles: int
    refreshes: int
    reuses: int
    refresh_reasons: dict
    sites: list[SiteStats] = field(default_factory=list)
    external_fraction: float = 1.0  # external KV read (KV heads; sparse: x tiles) / what exact mode would read
    cuda_graphs: dict = field(default_factory=dict)  # captures, replays, uncaptured runs (and why)
    uncompiled: int = 0  # graphs Inductor could not compile, which run uncompiled (correct, slow)

    @property
    def guard_failures(self) -> dict:
        """Deprecated name of :attr:`refresh_reasons`."""
        warnings.warn("Stats.guard_failures is now Stats.refresh_reasons", DeprecationWarning, stacklevel=2)
        return self.refresh_reasons

    def __str__(self):
        head = (f"fbcompile stats: {self.compiles} graph(s) compiled, {self.refreshes} refresh call(s), "
                f"{self.reuses} reuse call(s), external attention computed for "
                f"{self.external_fraction:.1%} of the external KV exact mode would read")
        lines = [head]
        if self.sites:
            lines.append(tabulate([vars(s) for s in self.sites], headers="keys", floatfmt=".3f"))
        if self.refresh_reasons:
            lines.append("refresh reasons: " + ", ".join(f"{k}: {v}" for k, v in self.refresh_reasons.items()))
        if self.cuda_graphs:
            lines.append("CUDA graphs: " + ", ".join(f"{k}: {v}" for k, v in self.cuda_graphs.items()))
        if self.uncompiled:
            lines.append(f"{self.uncompiled} graph(s) run without Inductor, which could not compile them "
                         "(explain(model) says why)")
        return "\n".join(lines)


class Session:
    """All runtime state of one fbcompile user (a model, or the shared backend)."""

    def __init__(self, config: Config | None = None, module: torch.nn.Module | None = None,
                 mode: str | None = None):
        self.config = config or Config()
        self.mode = mode  # torch.compile's mode (Inductor options)
        self.cuda_graphs = self.config.cuda_graphs or mode_uses_cuda_graphs(mode)
        self.cuda_graph_counts: Counter = Counter()  # captures, replays, uncaptured runs (and why)
        self._cuda_graph_pool = None
        # (layout, slot) -> SpareBuffers (cuda_graphs): graphs over the same cache share one copy of it;
        # several slots of a layout hold caches read in turn (one per layer)
        self.spare_buffers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.spare_calls = 0  # calls that ran over spare buffers (their last use orders the sets)
        self.evicted_contents: weakref.WeakSet = weakref.WeakSet()  # content tokens a set took another cache over
        # the CapturedGraphs (cuda_graphs): one that meets another's output as a cache it takes by address
        # has that output recycled
        self.captured_graphs: weakref.WeakSet = weakref.WeakSet()
        # a graph read tensors on the CUDA graphs' device: one reading host tensors only is then host work
        # of a model on the device (Wan's ops on its CPU grid_sizes), not a model on the CPU
        self.device_inputs_seen = False
        self._module = weakref.ref(module) if module is not None else None
        self.graphs: list[GraphRecord] = []
        self.cache: OrderedDict = OrderedDict()  # (KV tensor ids, occurrence, computation) -> CacheEntry
        self.refresh_reasons: Counter = Counter()
        # fidelity measurements: called per site and call with (graph, site, step, fresh parts, entry, kv heads)
        self.observer = None
        self.generation = 0  # bumped whenever the cache changes; dispatchers' fast paths check it
        self.warned: set[str] = set()  # warnings given once per session
        self.committing = False  # inside commit(): every split graph runs exactly

    @contextmanager
    def commit(self):
        """Calls inside commit the block into the cache: they run exactly (refresh reason "commit")."""
        before, self.committing = self.committing, True
        try:
            yield
        finally:
            self.committing = before

    def cuda_graph_pool(self):
        """The memory pool all of this session's CUDA graphs share (they never run concurrently)."""
        if self._cuda_graph_pool is None:
            self._cuda_graph_pool = torch.cuda.graph_pool_handle()
        return self._cuda_graph_pool

    @property
    def exact_only(self) -> bool:
        """Training (module in train mode or grad enabled) never reuses."""
        module = self._module() if self._module is not None else None
        return torch.is_grad_enabled() or (module is not None and module.training)

    def new_graph(self, sites: list[dict], code_before: str) -> GraphRecord:
        record = GraphRecord(index=len(self.graphs), sites=sites, code_before=code_before)
        self.graphs.append(record)
        return record

    def store(self, entries: list[tuple]) -> None:
        """Keep ``(key, entry)`` pairs; drop entries whose KV tensors are gone, then the oldest beyond the limit."""
        cache = self.cache
        for key, entry in entries:
            cache[key] = entry
            cache.move_to_end(key)
        self.drop()
        while len(cache) > self.config.max_cache_entries:
            cache.popitem(last=False)

    def drop(self, keys=()) -> None:
        """Drop the entries of ``keys`` (stale: a refresh replaces them) and those whose KV tensors are gone,
        so that the memory they held is free for the refresh's results (:mod:`.cuda_graphs` recycles it)."""
        cache = self.cache
        for key in keys:
            cache.pop(key, None)
        for old in [k for k, e in cache.items() if any(ref() is None for ref in e.sources)]:
            del cache[old]
        self.generation += 1

    @property
    def cached_bytes(self) -> int:
        """Memory held by cached external results (O_e and L_e of every live entry)."""
        return sum(t.numel() * t.element_size() for e in self.cache.values() for t in (e.out_ext, e.lse_ext))

    def new_request(self) -> None:
        """Start a new request: no cached external part of an earlier one is reused (counters stay)."""
        self.cache.clear()
        self.generation += 1

    def reset(self) -> None:
        """Drop every cached external result and zero the counters (compiled graphs stay)."""
        self.new_request()
        self.refresh_reasons.clear()
        self.cuda_graph_counts.clear()
        for record in self.graphs:
            record.reset_counts()

    def stats(self) -> Stats:
        sites, read, exact = [], 0, 0
        for record in self.graphs:
            for site in record.split_sites:
                share = site.sparse_share
                did_read = record.refreshes * site.kv_heads + site.plan_kv_read
                if share is not None:
                    did_read += site.sparse_reuses * site.kv_heads * share
                would_read = record.calls * site.kv_heads
                read, exact = read + did_read, exact + would_read
                sites.append(SiteStats(graph=record.index, node=site.node, calls=record.calls,
                                       refreshes=record.refreshes, reuses=record.reuses,
                                       external_fraction=did_read / would_read if would_read else 1.0,
                                       sparse_read=share))
        split_graphs = [r for r in self.graphs if r.split_sites]
        return Stats(compiles=len(self.graphs), refreshes=sum(r.refreshes for r in split_graphs),
                     reuses=sum(r.reuses for r in split_graphs), refresh_reasons=dict(self.refresh_reasons),
                     sites=sites, external_fraction=read / exact if exact else 1.0,
                     cuda_graphs=dict(self.cuda_graph_counts),
                     uncompiled=sum(len(r.uncompiled) for r in self.graphs))
