"""Per-call choice between a graph's refresh and reuse specialisations.

Cached external results are kept per *site*, keyed by the tensors holding that site's external KV
(so graphs that dynamo compiled for different steps of one block - e.g. with and without
self-conditioning - share them). A site's entry serves a call only if

* its KV tensors are the same objects, not written in place since (``_version``), of the same shape;
  versions are read *after* each call, so a static cache that the graph itself writes (the block's
  own range, proven by the pass) stays valid, while any write from outside forces a refresh;
* the cached range starts where it did (static caches: the block's offset);
* a buffer the graph writes at data-dependent positions is written at the same positions: the
  tensors the positions are computed from (``SiteGuard.positions``, e.g. HF ``StaticCache``'s
  ``cumulative_length`` or Fast-dLLM's index) equal, by value, a copy kept at the refresh; taken
  before the call, since the graph may advance them in place; this compare is one host sync per
  call on a small tensor;
* the query block has the same batch, length, dtype and device (``O_e``'s expected shape, read
  off the inputs' sizes, and its dtype/device);
* the policy does not ask for a refresh ("adaptive": the largest relative change of a site's
  query since the refresh, computed on the device by the previous reuse call, is below
  ``Config.drift``; reading it is the policy's one host sync, one step late), and the step is
  within the reuse plan, if there is one.

With a reuse plan, each step since the refresh runs its own reuse graph, which recomputes the
plan's KV heads and returns their fresh ``(O_e, L_e)``; those overwrite the cached ones.

The dispatcher reads no tensor data and never syncs with the device, except to compare a written
buffer's positions (above) and for the "tokens" and "adaptive" policies.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from fbcompile.backends.session import CacheEntry, GraphRecord, Session

log = logging.getLogger("fbcompile")


@dataclass
class SiteGuard:
    """How to find and check one site's cached ``(O_e, L_e)`` from a call's arguments."""

    external: list[int]            # argument indices of the tensors holding the external KV
    occurrence: int                # n-th site of this graph over the same external tensors
    out_shape: list                # per dim of O_e: int, or (argument index, dim) it equals
    dtype: torch.dtype
    device: torch.device
    offsets: list                  # static caches: where each external range ends (int or (argument index, None))
    block_input: int | None = None  # argument index of the block's input ("tokens" policy)
    positions: list[int] = field(default_factory=list)  # argument indices of the tensors a written
    #                                                     buffer's positions are computed from

    def expected_shape(self, args) -> tuple:
        return tuple(_size(d, args) for d in self.out_shape)

    def offset_values(self, args) -> list:
        return [_size(o, args) for o in self.offsets]


@dataclass
class StepGraph:
    """The reuse graph of one step of a reuse plan, and what it recomputes."""

    run: Callable | None        # None in probe mode (the probe graph's exact parts are mixed instead)
    updated: list[int]          # sites whose updated (O_e, L_e) the graph returns, in order
    recompute: list[list]       # per site, query-head ranges [start, end) computed afresh
    units: int                  # KV heads read in all


def _size(source, args):
    """A size known at compile time (int) or read off the arguments: ``(index, dim)``, dim None for an int."""
    if isinstance(source, int):
        return source
    index, dim = source
    return args[index] if dim is None else args[index].shape[dim]


class SplitGraphDispatcher:
    """Callable handed back to dynamo for a graph with split attention sites."""

    def __init__(self, session: Session, record: GraphRecord, refresh: Callable, reuse: Callable | None,
                 num_outputs: int, sites: list[SiteGuard], kv_heads: list[int], probe: bool = False,
                 exact_reason: str = "exact mode", plan_steps: list[StepGraph] | None = None):
        self.session, self.record = session, record
        self.refresh, self.reuse = refresh, reuse
        self.num_outputs = num_outputs
        self.sites = sites
        self.kv_heads = kv_heads  # per split site
        self.units = sum(kv_heads)  # KV heads the external parts read at a refresh
        self.plan_steps = plan_steps
        self.probe = probe  # refresh is a probe graph: run exactly, simulate the policy beside it
        self.exact_reason = exact_reason  # why a graph without reuse is exact (stats)
        # fast path of the "block" policy: if nothing the guards read changed since the last call
        # (same tensors, versions, shapes, ints) and the session cache did not change, reuse again
        watched = {i for site in sites for i in site.external}
        watched |= {src[0] for site in sites for src in site.out_shape + site.offsets if not isinstance(src, int)}
        watched |= {i for site in sites for i in site.positions}
        self._watched = sorted(watched)
        self._writes_external = any(site.offsets for site in sites)  # static caches the graph writes
        self._compares_values = any(site.positions for site in sites)  # buffers written at data-dependent positions
        self._last = None  # (session generation, signature after the call, cached tensors, entries, weakrefs)

    def _lookup(self, args) -> tuple[list, str | None]:
        """Keys of every site and the cached entries, or the reason a refresh is needed."""
        cache, config = self.session.cache, self.session.config
        keys, entries = [], []
        reason = None
        for site in self.sites:
            sources = [args[i] for i in site.external]
            key = (tuple(map(id, sources)), site.occurrence)
            keys.append(key)
            if reason is not None:
                continue
            entry = cache.get(key)
            reason = _stale(entry, sources, site, args, config.refresh)
            if reason is None and self.plan_steps is not None and entry.steps >= len(self.plan_steps):
                reason = "past the reuse plan"
            if reason is None and config.refresh == "tokens" and _changed_positions(
                    entry.block, None if site.block_input is None else args[site.block_input]) >= config.tokens:
                reason = "policy"
            entries.append(entry)
        drift = self.session.pending_drift
        if reason is None and config.refresh == "adaptive" and drift is not None and float(drift) > config.drift:
            reason = "drift"
        return keys, (entries if reason is None else reason)

    def __call__(self, *args):
        session, record = self.session, self.record
        record.calls += 1
        session.external_units[1] += self.units
        if not self.sites or session.exact_only:
            record.refreshes += 1
            session.external_units[0] += self.units
            session.refresh_reasons[self.exact_reason if not self.sites else "training or grad mode"] += 1
            return self.refresh(*args)[: self.num_outputs]
        last = self._last
        if last is not None and last[0] == session.generation:
            signature = self._signature(args)
            if last[1] == signature and all(ref() is args[i] for i, ref in last[4]):  # ids can be recycled
                record.reuses += 1
                outputs = self.reuse(*args, *last[2])
                if self._writes_external:  # the graph bumped the versions of its own cache writes
                    self._remember(args, last[2], last[3], last[4])
                return outputs
        keys, found = self._lookup(args)
        if self.probe:
            return self._probe(args, keys, found)
        if not isinstance(found, str):
            record.reuses += 1
            cached = [t for entry in found for t in entry.tensors]
            step = self.plan_steps[found[0].steps] if self.plan_steps is not None else None
            outputs = (self.reuse if step is None else step.run)(*args, *cached)
            extra = outputs[self.num_outputs:]
            if step is not None:
                session.external_units[0] += step.units
                for i, site in enumerate(step.updated):
                    found[site].tensors[:2] = extra[2 * i:2 * i + 2]
                extra = extra[2 * len(step.updated):]
            if session.config.refresh == "adaptive":  # the query drift, read at the next call
                session.pending_drift = extra[0]
            self._remember(args, cached, found)
            return outputs[: self.num_outputs]
        session.external_units[0] += self.units
        positions = [_positions(site, args) for site in self.sites]  # before the graph advances them
        outputs = self.refresh(*args)
        kept = 3 if session.config.refresh == "adaptive" else 2
        extra = outputs[self.num_outputs:]
        self._refreshed(args, keys, found, [extra[kept * i:kept * i + kept] for i in range(len(self.sites))],
                        positions)
        self._last = None
        return outputs[: self.num_outputs]

    def _signature(self, args) -> tuple:
        return tuple((id(a), a._version, a.shape) if isinstance(a, torch.Tensor) else a
                     for a in map(args.__getitem__, self._watched))

    def _remember(self, args, cached: list, entries: list, refs: list | None = None) -> None:
        """After a reuse: count the step, note versions the graph itself bumped, arm the fast path."""
        for site, entry in zip(self.sites, entries):
            entry.steps += 1
            entry.versions = [args[j]._version for j in site.external]
        # the fast path's proof (nothing changed since this call) fails when the graph itself moves a
        # written buffer's positions (HF StaticCache advances its counter): those compare by value
        if self.session.config.refresh == "block" and self.plan_steps is None and not self._compares_values:
            if refs is None:
                refs = [(i, weakref.ref(args[i])) for i in self._watched if isinstance(args[i], torch.Tensor)]
            self._last = (self.session.generation, self._signature(args), cached, entries, refs)

    def _refreshed(self, args, keys, reason: str, per_site: list, positions: list) -> None:
        """Count a refresh and keep every site's fresh ``(O_e, L_e[, q])``."""
        session = self.session
        self.record.refreshes += 1
        session.refresh_reasons[reason] += 1
        session.pending_drift = None
        log.debug("graph %d: refresh (%s)", self.record.index, reason)
        block = {}
        if session.config.refresh == "tokens":
            block = {i: args[i].clone() for i in {s.block_input for s in self.sites} if i is not None}
        entries = []
        for i, (site, key) in enumerate(zip(self.sites, keys)):
            sources = [args[j] for j in site.external]
            entries.append((key, CacheEntry(sources=[weakref.ref(s) for s in sources],
                                            versions=[s._version for s in sources],
                                            shapes=[s.shape for s in sources],
                                            offsets=site.offset_values(args),
                                            block=block.get(site.block_input),
                                            tensors=list(per_site[i]), positions=positions[i])))
        session.store(entries)

    def _probe(self, args, keys, found):
        """Exact outputs; the policy's refresh/reuse decision is simulated and shown to the observer."""
        positions = [_positions(site, args) for site in self.sites]
        outputs = self.refresh(*args)
        extra = outputs[self.num_outputs:]
        parts = [extra[5 * i:5 * i + 5] for i in range(len(self.sites))]  # O_e, L_e, O_i, L_i, q
        observe = self.session.observer
        if isinstance(found, str):
            self.session.external_units[0] += self.units
            for i, part in enumerate(parts):
                observe(self.record.index, i, 0, part[:4], None, self.kv_heads[i])
            self._refreshed(args, keys, found, [(p[0], p[1], p[4]) for p in parts], positions)
        else:
            self.record.reuses += 1
            step = self.plan_steps[found[0].steps] if self.plan_steps is not None else None
            for i, (site, entry) in enumerate(zip(self.sites, found)):
                if step is not None and step.recompute[i]:  # as the step's reuse graph: fresh heads overwrite
                    for k in range(2):
                        mixed = entry.tensors[k].clone()
                        for start, end in step.recompute[i]:
                            mixed[:, start:end] = parts[i][k][:, start:end]
                        entry.tensors[k] = mixed
                entry.steps += 1
                entry.versions = [args[j]._version for j in site.external]
                observe(self.record.index, i, entry.steps, parts[i][:4], entry.tensors, self.kv_heads[i])
            if self.session.config.refresh == "adaptive":
                self.session.pending_drift = max(_relative_change(p[4], e.tensors[2]) for p, e in zip(parts, found))
        return outputs[: self.num_outputs]


def _positions(site: SiteGuard, args) -> list[torch.Tensor]:
    """Copies of the tensors a written buffer's positions are computed from."""
    return [args[i].clone() for i in site.positions]


def _relative_change(now: torch.Tensor, before: torch.Tensor) -> float:
    return ((now.float() - before.float()).norm() / before.float().norm().clamp_min(1e-30)).item()


def _changed_positions(before: torch.Tensor | None, now: torch.Tensor | None) -> int:
    """Positions (dim 1) of the block's input that differ, the most over the batch (syncs the device)."""
    if before is None or now is None or before.shape != now.shape:
        return 1 << 30
    differs = (before != now).reshape(now.shape[0], now.shape[1], -1).any(-1)
    return int(differs.sum(1).max())


def _stale(entry: CacheEntry | None, sources: list, site: SiteGuard, args, policy) -> str | None:
    """Why ``entry`` cannot serve this call (None: it can)."""
    if entry is None:
        return "new kv"
    for ref, version, shape, src in zip(entry.sources, entry.versions, entry.shapes, sources):
        if ref() is not src:
            return "kv replaced"
        if src._version != version:
            return "kv written in place"
        if src.shape != shape:
            return "kv shape changed"
    if entry.offsets != site.offset_values(args):
        return "kv range changed"
    if not all(a.shape == args[i].shape and torch.equal(a, args[i]) for a, i in zip(entry.positions, site.positions)):
        return "kv positions changed"
    out = entry.tensors[0]
    if out.dtype != site.dtype or out.device != site.device or out.shape != site.expected_shape(args):
        return "block changed"
    if isinstance(policy, int) and entry.steps + 1 >= policy:
        return "policy"
    return None
