"""Refresh policies: when a site's cached external part is stale beyond what the guards check.

The dispatcher checks the guards (same KV tensors, versions, shapes, range, query block) for every
policy; a policy adds its own rule. Each is one class:

* ``stale(entry, guard, args)``: why ``entry`` must be refreshed at this call (None: it may serve);
* ``at_refresh(entries, guards, args, parts)``: what to keep beside the fresh external parts;
* ``after_reuse(entries, parts, drift)``: what to record after a reuse call.

``with_query``: its graphs must carry each site's query; ``fast_path``: its rule reads nothing but
the guards, so the dispatcher may skip the lookup when nothing the guards read changed.
A new policy is a subclass here with a ``name`` and ``from_config``, listed in ``_NAMED`` (and its
name in ``config.REFRESH_POLICIES``).
"""
from __future__ import annotations

import torch

from fbcompile.backends.session import CacheEntry
from fbcompile.config import Config
from fbcompile.passes.guards import SiteGuard


class RefreshPolicy:
    """``"block"``: refresh when the guards fail, i.e. once per block (FlashBlock)."""

    name = "block"  # the Config.refresh value that selects it
    with_query = False
    fast_path = True

    @classmethod
    def from_config(cls, config: Config) -> "RefreshPolicy":
        return cls()

    def stale(self, entry: CacheEntry, guard: SiteGuard, args) -> str | None:
        return None

    def at_refresh(self, entries: list[CacheEntry], guards: list[SiteGuard], args, parts: list) -> None:
        pass

    def after_reuse(self, entries: list[CacheEntry], parts: list, drift: torch.Tensor | None) -> None:
        """``parts``: each site's parts the reuse graph returned (None: none); ``drift``: its per-site
        query drifts (None: not measured)."""


class EveryNPolicy(RefreshPolicy):
    """An int ``N``: as "block", and also every ``N``-th call within a block."""

    fast_path = False

    def __init__(self, every: int):
        self.every = every

    def stale(self, entry, guard, args):
        return "policy" if entry.steps + 1 >= self.every else None


class TokensPolicy(RefreshPolicy):
    """``"tokens"``: as "block", and also once ``tokens`` positions of the block's input changed
    since the refresh (FlashBlock's LLM rule). Compares on the device: one host sync per site."""

    name = "tokens"
    fast_path = False

    @classmethod
    def from_config(cls, config):
        return cls(config.tokens)

    def __init__(self, tokens: int):
        self.tokens = tokens

    def stale(self, entry, guard, args):
        now = None if guard.block_input is None else args[guard.block_input]
        return "policy" if _changed_positions(entry.block_input, now) >= self.tokens else None

    def at_refresh(self, entries, guards, args, parts):
        copies = {}
        for entry, guard in zip(entries, guards):
            i = guard.block_input
            if i is not None and i not in copies:
                copies[i] = args[i].clone()
            entry.block_input = copies.get(i)


class AdaptivePolicy(RefreshPolicy):
    """``"adaptive"``: as "block", and also when a site's query moved by more than ``drift`` (relative
    L2) since the refresh. The reuse graph measures every site's drift on the device; the next call
    reads them (one host sync per call, one step late)."""

    name = "adaptive"
    with_query = True
    fast_path = False

    @classmethod
    def from_config(cls, config):
        return cls(config.drift)

    def __init__(self, drift: float):
        self.drift = drift

    def stale(self, entry, guard, args):
        if entry.drift is None:
            return None
        vector, site = entry.drift
        return "drift" if vector[site] > self.drift else None

    def at_refresh(self, entries, guards, args, parts):
        for entry, part in zip(entries, parts):
            entry.query = part.query

    def after_reuse(self, entries, parts, drift):
        vector = DriftVector(drift)
        for site, entry in enumerate(entries):
            entry.drift = (vector, site)


class ReusePlanPolicy(RefreshPolicy):
    """A :class:`fbcompile.ReusePlan` of ``steps`` steps: a call past the plan refreshes (the plan's
    per-step recomputation is in the step graphs)."""

    fast_path = False

    def __init__(self, steps: int):
        self.steps = steps

    def stale(self, entry, guard, args):
        return "past the reuse plan" if entry.steps >= self.steps else None


class DriftVector:
    """The per-site drifts one reuse call computed (on the device), read at most once."""

    def __init__(self, values: torch.Tensor):
        self._tensor, self._values = values, None

    def __getitem__(self, site: int) -> float:
        if self._values is None:
            self._values = self._tensor.tolist()
        return self._values[site]


_NAMED = {policy.name: policy for policy in (RefreshPolicy, TokensPolicy, AdaptivePolicy)}


def policies_for(config: Config) -> list[RefreshPolicy]:
    """The policies ``config`` asks for, checked in order (``refresh="always"`` never reaches here)."""
    refresh = config.refresh
    base = EveryNPolicy(refresh) if isinstance(refresh, int) else _NAMED[refresh].from_config(config)
    return [base] + ([ReusePlanPolicy(config.reuse_plan.steps)] if config.reuse_plan is not None else [])


def _changed_positions(before: torch.Tensor | None, now: torch.Tensor | None) -> int:
    """Positions (dim 1) of the block's input that differ, the most over the batch (syncs the device)."""
    if before is None or now is None or before.shape != now.shape:
        return 1 << 30
    differs = (before != now).reshape(now.shape[0], now.shape[1], -1).any(-1)
    return int(differs.sum(1).max())
