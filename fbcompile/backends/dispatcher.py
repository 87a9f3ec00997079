"""Per-call choice between a graph's refresh and reuse specialisations.

The dispatcher runs on every model call, so it only compares a few Python attributes of the inputs
that hold the external KV (identity, ``_version``, shape) and of the block's inputs (shape, dtype,
device); it never reads tensor data and never syncs with the device.
"""
from __future__ import annotations

import logging
import weakref
from typing import Callable

from fbcompile.backends.session import CacheEntry, GraphRecord, Session

log = logging.getLogger("fbcompile")


def _describe(value):
    """What a block input's reuse depends on: shape, dtype, device (or the value of an int input)."""
    return (value.shape, value.dtype, value.device) if hasattr(value, "shape") else value


class SplitGraphDispatcher:
    """Callable handed back to dynamo for a graph with split attention sites."""

    def __init__(self, session: Session, record: GraphRecord, refresh: Callable, reuse: Callable | None,
                 num_outputs: int, external_inputs: list[int], block_inputs: list[int]):
        self.session, self.record = session, record
        self.refresh, self.reuse = refresh, reuse
        self.num_outputs = num_outputs
        self.external_inputs, self.block_inputs = external_inputs, block_inputs

    def _stale(self, entry: CacheEntry | None, sources: list) -> str | None:
        """Why the cached external results cannot serve this call (None: they can)."""
        if entry is None:
            return "new kv"
        for ref, version, shape, src in zip(entry.sources, entry.versions, entry.shapes, sources):
            if ref() is not src:
                return "kv replaced"
            if src._version != version:
                return "kv written in place"
            if src.shape != shape:
                return "kv shape changed"
        policy = self.session.config.refresh
        if isinstance(policy, int) and entry.steps + 1 >= policy:
            return "policy"
        return None

    def __call__(self, *args):
        session, record = self.session, self.record
        record.calls += 1
        if self.reuse is None or session.exact_only:
            record.refreshes += 1
            session.refresh_reasons["exact mode" if self.reuse is None else "training or grad mode"] += 1
            return self.refresh(*args)[: self.num_outputs]
        sources = [args[i] for i in self.external_inputs]
        block = [_describe(args[i]) for i in self.block_inputs]
        cache = session.cache(record)
        key = tuple(map(id, sources))
        entry = cache.get(key)
        reason = self._stale(entry, sources)
        if reason is None and entry.block != block:
            reason = "block changed"
        if reason is None:
            entry.steps += 1
            record.reuses += 1
            return self.reuse(*args, *entry.tensors)
        outputs = self.refresh(*args)
        record.refreshes += 1
        session.refresh_reasons[reason] += 1
        log.debug("graph %d: refresh (%s)", record.index, reason)
        cache[key] = CacheEntry(sources=[weakref.ref(s) for s in sources], versions=[s._version for s in sources],
                                shapes=[s.shape for s in sources], block=block,
                                tensors=list(outputs[self.num_outputs:]))
        for old in [k for k, e in cache.items() if any(ref() is None for ref in e.sources)]:
            del cache[old]  # its KV is gone: it can never be reused
        while len(cache) > session.config.max_cache_entries:
            cache.popitem(last=False)
        return outputs[: self.num_outputs]
