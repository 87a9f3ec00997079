"""Per-call choice between a graph's refresh and reuse specialisations.

Cached external results are kept per *site*, keyed by the tensors holding that site's external KV
and the fingerprint of how the cached part is computed from them (so graphs that dynamo compiled
for different steps of one block - e.g. with and without self-conditioning - share them, and a
graph that slices or transforms the cache otherwise does not). A site's entry serves a call only if

* its KV tensors hold the same content, not written in place since (``_version``), of the same shape:
  the same tensor objects, or views of later concatenations over exactly their range (HF
  ``DynamicCache.crop``), or the cached positions of a concatenation an earlier graph returned (a
  graph break between cat and attention) - see :mod:`.provenance`;
  versions are read *after* each call, so a static cache that the graph itself writes (the block's
  own range, proven by the pass) stays valid, while any write from outside forces a refresh, unless
  other graphs logged it and it leaves the rows outside the block as the site read them at the refresh
  (LongLive's deferred write, roll included: :func:`_rows_as_refreshed`).
  Inference tensors (``torch.inference_mode``) have no version counter, so writes to them cannot be
  seen: an entry over them never serves (use ``torch.no_grad()`` to reuse);
* the cached range is where it was (static caches: the window's start and the block's, evaluated
  from the call's int arguments and sizes), and the graph itself writes no cached row (a graph that
  rolls the cache refreshes at every call; what it keeps serves the later calls);
* a buffer the graph writes at data-dependent positions is written at the same positions: the
  tensors the positions are computed from (``SiteGuard.positions``, e.g. HF ``StaticCache``'s
  ``cumulative_length`` or Fast-dLLM's index) equal, by value, a copy kept at the refresh, taken
  before the call since the graph may advance them in place (one host sync per call on a small
  tensor; such sites take no fast path, as the graph itself moves what the memo would compare);
* the query block has the same batch, length, dtype and device (``O_e``'s expected shape, read
  off the inputs' sizes, and its dtype/device);
* no refresh policy (:mod:`.policies`) calls it stale.

With a reuse plan, each step since the refresh runs its own reuse graph, which recomputes the
plan's KV heads and returns their fresh ``(O_e, L_e)``; those overwrite the cached ones.
With sparse reuse (:mod:`fbcompile.passes.sparse_external`) an entry also keeps the KV tiles selected
at the refresh, its ``(O_e, L_e)`` being the residual over the other tiles; each reuse call counts the
share of the external KV it read (``SiteStats.sparse_read``).
Every graph's extra inputs and outputs are named by its
:class:`~fbcompile.passes.reuse_external.OutputLayout`.

The dispatcher reads no tensor data and never syncs with the device, except to compare a written
buffer's positions (above); policies may.
"""
from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from fbcompile.backends.policies import RefreshPolicy
from fbcompile.backends.provenance import (Content, cut_of_returned, external_contents, logged_writes,
                                           same_rows_outside, version)
from fbcompile.backends.session import CacheEntry, GraphRecord, Session
from fbcompile.passes.guards import SiteGuard
from fbcompile.passes.reuse_external import OutputLayout

log = logging.getLogger("fbcompile")


@dataclass
class CompiledGraph:
    """A compiled specialisation and the names of its extra inputs and outputs."""

    run: Callable
    outputs: OutputLayout
    cached_inputs: tuple[tuple[str, ...], ...] = ()  # per site, the CacheEntry fields it takes after the args


@dataclass
class CompiledStep:
    """The reuse graph of some steps since the refresh (see :class:`fbcompile.passes.specialize.ReuseStep`)."""

    graph: CompiledGraph | None   # None in probe mode
    recompute: list[list[tuple[int, int]]]
    kv_read: tuple[int, ...] | None  # per site, KV heads recomputed (None: none)


@dataclass
class FastPathMemo:
    """What the last reuse call saw, for the "block" policy's fast path."""

    generation: int          # the session cache's generation then
    signature: tuple         # (id, version, shape) of the watched tensors, and watched ints
    refs: list               # (argument index, weakref) of the watched tensors: ids can be recycled
    cached: list             # the reuse graph's cached inputs
    entries: list[CacheEntry]
    shares: list | None      # sparse reuse: per site, the share of the external KV tiles read


class ExactDispatcher:
    """A split graph that never reuses (exact mode, a save pass, an unguardable query size)."""

    def __init__(self, session: Session, record: GraphRecord, run: Callable, reason: str):
        self.session, self.record, self.run, self.reason = session, record, run, reason

    def __call__(self, *args):
        self.record.calls += 1
        self.record.refreshes += 1
        self.session.refresh_reasons[self.reason] += 1
        return self.run(*args)


class SplitGraphDispatcher:
    """Callable handed back to dynamo for a graph whose split sites may reuse."""

    def __init__(self, session: Session, record: GraphRecord, guards: list[SiteGuard], refresh: CompiledGraph,
                 steps: list[CompiledStep], policies: list[RefreshPolicy], kv_heads: list[int], commits: bool = False):
        self.session, self.record = session, record
        self.commits = commits  # the graph returns the block's keys/values: a commit, unless cropped (_commit)
        self.guards, self.refresh, self.steps = guards, refresh, steps
        self.kv_heads = kv_heads  # per site
        self._sparse = any("tiles" in names for step in steps if step.graph for names in step.graph.cached_inputs)
        self._watched = sorted({i for g in guards for i in g.external} | {i for g in guards for i in g.size_sources})
        self._compares_positions = any(g.positions for g in guards)  # buffers written at data-dependent positions
        self._writes_external = any(g.offsets for g in guards)  # static caches the graph writes
        self.policies = policies  # also sets up the fast path (reads the fields above)

    @property
    def policies(self) -> list[RefreshPolicy]:
        return self._policies

    @policies.setter
    def policies(self, policies: list[RefreshPolicy]) -> None:
        self._policies = policies
        # per hook, the policies that override it (the per-call path skips the no-ops)
        self._stale_rules, self._at_refresh, self._after_reuse = (
            [p for p in policies if getattr(type(p), hook) is not getattr(RefreshPolicy, hook)]
            for hook in ("stale", "at_refresh", "after_reuse"))
        # fast path: if nothing the guards read changed since the last reuse (same tensors, versions,
        # shapes, ints) and the session cache did not change, reuse again without a lookup
        only = self.steps[0].graph if len(self.steps) == 1 else None
        self._fast = (all(p.fast_path for p in policies) and only is not None and only.outputs.user_only
                      and not self._compares_positions and not self.commits)
        self._memo = None

    def __call__(self, *args):
        session, record = self.session, self.record
        record.calls += 1
        if session.exact_only:
            record.refreshes += 1
            session.refresh_reasons["training or grad mode"] += 1
            return self.refresh.outputs.user_outputs(self.refresh.run(*args))
        if session.committing:
            keys, _, _, seen = self._lookup(args)
            return self._refresh(args, keys, "commit", seen)
        memo = self._memo
        if memo is not None and memo.generation == session.generation and \
                all(ref() is args[i] for i, ref in memo.refs) and memo.signature == self._signature(args):
            record.reuses += 1
            if memo.shares:
                record.count_tiles(memo.shares)
            outputs = self.steps[0].graph.run(*args, *memo.cached)
            if self._writes_external:  # the graph bumped the versions of its own cache writes
                self._count_step(args, memo.entries)
                memo.signature = self._signature(args)
            return outputs
        memo = None  # what it holds may be stale: free for a refresh
        keys, entries, reason, seen = self._lookup(args)
        if self.commits and not self._cropped(args, seen):
            reason = "save pass"
        if reason is None:
            return self._reuse(args, entries)
        del entries  # stale: the memory they hold is free for the refresh's results
        return self._refresh(args, keys, reason, seen)

    def _cropped(self, args, seen: list) -> bool:
        """Is every cached tensor cut from keys/values an earlier call returned: a crop of a returned
        concatenation (HF ``DynamicCache``: append the block, then ``crop`` it off), or a slice of
        returned keys/values (Fast-dLLM's LLaDA and Dream: ``k[:, :, :s]`` of the block's full pass)? Then the
        loop cuts its cache from what calls return, this call's block is cut off again, and returning
        the concatenation is no commit, unless the caller marks it with :func:`fbcompile.commit`.
        Otherwise returning the block's keys/values commits it. ``seen``: the contents :meth:`_lookup` read."""
        return all(c.inherited or i in guard.module_state or cut_of_returned(args[i])
                   for n, guard in enumerate(self.guards)
                   for c, i in zip(seen[n][0] if n < len(seen) else external_contents(guard, args), guard.external))

    def _lookup(self, args) -> tuple[list, list[CacheEntry], str | None, list]:
        """The sites' cache keys and entries, why a refresh is needed (None: every entry serves), and
        what was seen: per site, the contents of its KV tensors and their versions (:meth:`_keep`).

        A refresh drops the stale entries before it runs (their buffers are then free for its results),
        so the keys of every site are read here; but once a site's KV has no entry at all (new keys and
        values: a new block, a new request), the later sites' keys are left to :meth:`_keep`, after the
        graph was launched: the GPU waits for this host work, and their entries, if any, are not these."""
        cache = self.session.cache
        keys, entries, seen = [], [], []
        reason = None
        for guard in self.guards:
            contents = external_contents(guard, args)
            seen.append((contents, [version(args[j]) for j in guard.external]))
            key = _site_key(guard, contents)
            keys.append(key)
            if reason is not None:
                continue
            entry = cache.get(key)
            reason = _stale(entry, contents, guard, args)
            for policy in self._stale_rules if reason is None else ():
                reason = policy.stale(entry, guard, args)
                if reason is not None:
                    break
            entries.append(entry)
            if reason == NEW_KV:
                break
        return keys, entries, reason, seen

    def _step(self, entries: list[CacheEntry]) -> CompiledStep:
        return self.steps[min(entries[0].steps, len(self.steps) - 1)]

    def _reuse(self, args, entries: list[CacheEntry]):
        step = self._step(entries)
        graph = step.graph
        cached = [getattr(entry, name) for entry, names in zip(entries, graph.cached_inputs) for name in names]
        outputs = graph.run(*args, *cached)
        layout = graph.outputs
        parts = None
        if not layout.user_only:
            parts = layout.parts(outputs)
            for entry, part in zip(entries, parts):
                if part.out_ext is not None:  # a reuse plan's recomputed heads overwrite the cached ones
                    entry.out_ext, entry.lse_ext = part.out_ext, part.lse_ext
        self.record.count_reuse(step.kv_read)
        shares = [entry.tiles_read for entry in entries] if self._sparse else None
        if shares:
            self.record.count_tiles(shares)
        drift = outputs[layout.drift] if layout.drift is not None else None
        for policy in self._after_reuse:
            policy.after_reuse(entries, parts, drift)
        self._count_step(args, entries)
        if self._fast:
            refs = [(i, weakref.ref(args[i])) for i in self._watched if isinstance(args[i], torch.Tensor)]
            self._memo = FastPathMemo(self.session.generation, self._signature(args), refs, cached, entries, shares)
        return layout.user_outputs(outputs)

    def _refresh(self, args, keys: list, reason: str, seen: list):
        positions = [_positions(guard, args) for guard in self.guards]  # before the graph advances them
        self._memo = None
        self.session.drop(keys)  # their buffers free: a captured refresh writes its results there again
        outputs = self.refresh.run(*args)
        self._keep(args, keys, reason, self.refresh.outputs.parts(outputs), positions, seen)
        return self.refresh.outputs.user_outputs(outputs)

    def _signature(self, args) -> tuple:
        return tuple((id(a), a._version, a.shape) if isinstance(a, torch.Tensor) else a
                     for a in map(args.__getitem__, self._watched))

    def _count_step(self, args, entries: list[CacheEntry]) -> None:
        """After a reuse: count the step and note the versions the graph itself bumped."""
        for guard, entry in zip(self.guards, entries):
            entry.steps += 1
            entry.versions = [c.version for c in external_contents(guard, args)]
            entry.cloned = []  # the reuse found the rows a clone wrote at the refresh where the tensor has them

    def _keep(self, args, keys: list, reason: str, parts: list, positions: list, seen: list) -> list[CacheEntry]:
        """Count a refresh and keep every site's fresh external part, under the contents of its KV tensors
        after the call: those ``seen`` by :meth:`_lookup` if their versions did not change since (a
        content is a function of the tensor's identity and version), else read again."""
        session = self.session
        self.record.refreshes += 1
        session.refresh_reasons[reason] += 1
        log.debug("graph %d: refresh (%s)", self.record.index, reason)
        entries, unversioned, keys = [], False, list(keys)
        for i, (guard, part, written_at) in enumerate(zip(self.guards, parts, positions)):
            if i < len(seen) and all(version(args[j]) == v for j, v in zip(guard.external, seen[i][1])):
                contents = seen[i][0]
            else:
                contents = external_contents(guard, args)
            if i == len(keys):  # left by the lookup (a new KV before it)
                keys.append(_site_key(guard, contents))
            versions = [c.version for c in contents]
            unversioned = unversioned or None in versions  # inference tensors have no version counter
            entries.append(CacheEntry(sources=[weakref.ref(c.token) for c in contents], versions=versions,
                                      shapes=[args[j].shape for j in guard.external], offsets=guard.offset_values(args),
                                      out_ext=part.out_ext, lse_ext=part.lse_ext, tiles=part.tiles,
                                      tiles_read=part.tiles_read, positions=written_at,
                                      cloned=guard.clone_rows_of(args) if guard.clone_writes else []))
        for policy in self._at_refresh:
            policy.at_refresh(entries, self.guards, args, parts)
        if unversioned and "inference" not in session.warned:
            session.warned.add("inference")
            warnings.warn("fbcompile: the cached keys/values are inference tensors (torch.inference_mode), which "
                          "have no version counter, so in-place writes to them cannot be detected: every call "
                          "computes the external attention afresh. Run the model under torch.no_grad() to reuse.",
                          stacklevel=3)
        session.store(list(zip(keys, entries)))
        self._memo = None
        return entries


class ProbeDispatcher(SplitGraphDispatcher):
    """Fidelity measurements: exact outputs (the refresh graph is a probe graph); the policy's
    refresh/reuse decision is simulated and every site's parts are shown to ``session.observer``."""

    def _refresh(self, args, keys, reason, seen):
        positions = [_positions(guard, args) for guard in self.guards]
        outputs = self.refresh.run(*args)
        parts = self.refresh.outputs.parts(outputs)
        for i, part in enumerate(parts):
            self.session.observer(self.record.index, i, 0, part, None, self.kv_heads[i])
        self._keep(args, keys, reason, parts, positions, seen)
        return self.refresh.outputs.user_outputs(outputs)

    def _reuse(self, args, entries):
        outputs = self.refresh.run(*args)
        parts = self.refresh.outputs.parts(outputs)
        step = self._step(entries)
        self.record.count_reuse(step.kv_read)
        for entry, part, recompute in zip(entries, parts, step.recompute):
            if recompute:  # as the step's reuse graph: the fresh heads overwrite the cached ones
                entry.out_ext, entry.lse_ext = (_mix(old, new, recompute) for old, new in
                                                ((entry.out_ext, part.out_ext), (entry.lse_ext, part.lse_ext)))
        self._count_step(args, entries)
        for i, (entry, part) in enumerate(zip(entries, parts)):
            self.session.observer(self.record.index, i, entry.steps, part, entry, self.kv_heads[i])
        drift = None
        if any(p.with_query for p in self.policies):
            drift = torch.stack([_relative_change(p.query, e.query) for p, e in zip(parts, entries)])
        for policy in self._after_reuse:
            policy.after_reuse(entries, parts, drift)
        return self.refresh.outputs.user_outputs(outputs)


def _rows_as_refreshed(args, guard: SiteGuard, entry: CacheEntry, position: int, now: int | None) -> bool:
    """Does the site's external tensor ``position`` hold, outside its block's rows, what the site read at the
    refresh? Its version is the refresh's, and the site read it as it was; or it is a static cache that
    the writes other graphs logged since (LongLive's deferred write of the real cache, see
    :mod:`fbcompile.passes.static_cache`) leave as the clone the refresh read held it: both wrote only the
    block's rows, or both rolled it alike."""
    kept = entry.versions[position]
    cloned = entry.cloned[position] if entry.cloned else ()
    if now == kept and cloned == ():
        return True
    rows = guard.block_rows_of(position, args) if now is not None and guard.block_rows else None
    if rows is None or cloned is None:
        return False
    tensor = args[guard.external[position]]
    logged = logged_writes(tensor, kept, now)
    return logged is not None and same_rows_outside(cloned, logged, *rows, tensor.shape[rows[0]])


def _positions(guard: SiteGuard, args) -> list[torch.Tensor]:
    """Copies of the tensors a written buffer's positions are computed from."""
    return [args[i].clone() for i in guard.positions]


def _mix(cached: torch.Tensor, fresh: torch.Tensor, heads: list[tuple[int, int]]) -> torch.Tensor:
    mixed = cached.clone()
    for start, end in heads:
        mixed[:, start:end] = fresh[:, start:end]
    return mixed


def _relative_change(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    return (now.float() - before.float()).norm() / before.float().norm().clamp_min(1e-30)


NEW_KV = "new kv"


def _site_key(guard: SiteGuard, contents: list[Content]) -> tuple:
    """A site's key in the session cache: its KV's contents and how the cached part is computed."""
    return tuple(id(c.token) for c in contents), guard.occurrence, guard.computation


def _stale(entry: CacheEntry | None, contents: list[Content], guard: SiteGuard, args) -> str | None:
    """Why ``entry`` cannot serve this call by the guards (None: it can)."""
    if guard.rewrites is not None:
        return guard.rewrites
    if entry is None:
        return NEW_KV
    for ref, kept, now in zip(entry.sources, entry.versions, contents):
        if ref() is not now.token:  # the entry's content died and its token's id was recycled
            return NEW_KV
        if kept is None:
            return "kv is an inference tensor"
    if entry.offsets != guard.offset_values(args):  # (before the writes: a new block's rows are written)
        return "kv range changed"
    for position, (shape, now, index) in enumerate(zip(entry.shapes, contents, guard.external)):
        if not _rows_as_refreshed(args, guard, entry, position, now.version):
            return "kv written in place"
        if args[index].shape != shape:
            return "kv shape changed"
    if not all(kept.shape == args[i].shape and torch.equal(kept, args[i]) for kept, i in zip(entry.positions, guard.positions)):
        return "kv positions changed"
    out = entry.out_ext
    if out.dtype != guard.dtype or out.device != guard.device or out.shape != guard.expected_shape(args):
        return "block changed"
    return None
