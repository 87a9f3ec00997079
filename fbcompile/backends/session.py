"""Runtime state of fbcompile: compiled graphs, per-site counters and the external-attention cache.

One :class:`Session` per optimized model (``fbcompile.optimize``) or one shared by plain
``torch.compile(..., backend="fbcompile")`` calls. Passes and kernels hold no state; everything that
changes while a model runs lives here, can be inspected (:meth:`Session.stats`, :meth:`Session.report`)
and dropped (:meth:`Session.reset`).
"""
from __future__ import annotations

import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from tabulate import tabulate

from fbcompile.config import Config


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
    refreshes: int = 0
    reuses: int = 0
    calls: int = 0

    @property
    def rewritten(self) -> int:
        return sum(site["decision"] == "rewritten" for site in self.sites)


@dataclass
class CacheEntry:
    """Cached ``(O_e, L_e)`` of one site, with what they were computed from."""

    sources: list            # weakrefs to the tensors holding the external KV
    versions: list[int]
    shapes: list
    offsets: list            # where static-cache external ranges end
    block: torch.Tensor | None  # the block's input at the refresh ("tokens" policy)
    tensors: list            # [O_e, L_e]
    steps: int = 0           # reuses since the refresh
    positions: list = field(default_factory=list)  # copies of what a written buffer's positions come from


@dataclass
class Stats:
    """Counts since the last reset: ``.compiles``, ``.refreshes``, ``.reuses``, ``.guard_failures``."""

    compiles: int
    refreshes: int
    reuses: int
    guard_failures: dict
    sites: list[dict] = field(default_factory=list)
    external_fraction: float = 1.0  # KV heads the external parts read / what exact mode would read

    def __str__(self):
        head = (f"fbcompile stats: {self.compiles} graph(s) compiled, {self.refreshes} refresh call(s), "
                f"{self.reuses} reuse call(s), external attention computed for "
                f"{self.external_fraction:.1%} of the KV heads exact mode would read")
        lines = [head]
        if self.sites:
            lines.append(tabulate(self.sites, headers="keys"))
        if self.guard_failures:
            lines.append("refresh reasons: " + ", ".join(f"{k}: {v}" for k, v in self.guard_failures.items()))
        return "\n".join(lines)


class Session:
    """All runtime state of one fbcompile user (a model, or the shared backend)."""

    def __init__(self, config: Config | None = None, module: torch.nn.Module | None = None):
        self.config = config or Config()
        self._module = weakref.ref(module) if module is not None else None
        self.graphs: list[GraphRecord] = []
        self.cache: OrderedDict = OrderedDict()  # (KV tensor ids, occurrence) -> CacheEntry
        self.refresh_reasons: Counter = Counter()
        # fidelity measurements: called per site and call with (graph, site, step, fresh, cached, kv heads)
        self.observer = None
        self.generation = 0  # bumped whenever the cache changes; dispatchers' fast paths check it
        self.pending_drift = None  # "adaptive": query drift of the last reuse call (a 0-d tensor)
        self.external_units = [0, 0]  # KV heads the external parts read: [computed, exact mode's]

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
        for old in [k for k, e in cache.items() if any(ref() is None for ref in e.sources)]:
            del cache[old]
        while len(cache) > self.config.max_cache_entries:
            cache.popitem(last=False)
        self.generation += 1

    @property
    def cached_bytes(self) -> int:
        """Memory held by cached external results (O_e and L_e of every live entry)."""
        return sum(t.numel() * t.element_size() for e in self.cache.values() for t in e.tensors)

    def reset(self) -> None:
        """Drop every cached external result and zero the counters (compiled graphs stay)."""
        self.cache.clear()
        self.generation += 1
        self.pending_drift = None
        self.refresh_reasons.clear()
        self.external_units = [0, 0]
        for record in self.graphs:
            record.refreshes = record.reuses = record.calls = 0

    def stats(self) -> Stats:
        sites = []
        for record in self.graphs:
            for site in record.sites:
                if site["decision"] == "rewritten":
                    sites.append({"graph": record.index, "node": site["node"], "calls": record.calls,
                                  "refreshes": record.refreshes, "reuses": record.reuses})
        split_graphs = [r for r in self.graphs if r.rewritten]
        return Stats(compiles=len(self.graphs), refreshes=sum(r.refreshes for r in split_graphs),
                     reuses=sum(r.reuses for r in split_graphs),
                     guard_failures=dict(self.refresh_reasons), sites=sites,
                     external_fraction=self.external_units[0] / self.external_units[1] if self.external_units[1] else 1.0)
