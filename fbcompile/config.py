"""The one configuration object of fbcompile (also accepted as ``torch.compile(options=...)``)."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

from tabulate import tabulate

REFRESH_POLICIES = ("block", "always", "tokens", "adaptive")
COMPILERS = ("inductor", "eager")


@dataclass(frozen=True)
class ReusePlan:
    """Which heads may reuse their cached external part, per site and step since the refresh.

    ``reuse[site][step - 1][head]``: sites in graph order (every graph with split sites must have
    as many), steps ``1, 2, ...`` since the site's refresh, query heads. False: the head's external
    part is computed afresh at that step and overwrites the cached one (as the official FlashBlock
    video code does). The KV read is what costs, so heads sharing a KV head are recomputed together:
    a KV head is read whenever any of its query heads is False. A call at a step past the plan
    refreshes. Usually made by :meth:`fbcompile.Calibration.plan`.
    """

    reuse: tuple

    def __post_init__(self):
        reuse = tuple(tuple(tuple(bool(h) for h in step) for step in site) for site in self.reuse)
        steps = {len(site) for site in reuse}
        if not reuse or len(steps) != 1 or 0 in steps or any(not step for site in reuse for step in site):
            raise ValueError("ReusePlan.reuse must be [site][step][head] booleans, the same number of steps "
                             "(>= 1) for every site")
        if any(len(step) != len(site[0]) for site in reuse for step in site):
            raise ValueError("ReusePlan.reuse: every step of a site must list the same number of heads")
        object.__setattr__(self, "reuse", reuse)

    @property
    def sites(self) -> int:
        return len(self.reuse)

    @property
    def steps(self) -> int:
        return len(self.reuse[0])

    def heads(self, site: int) -> int:
        return len(self.reuse[site][0])

    def recompute(self, site: int, step: int, kv_heads: int) -> list[tuple[int, int]]:
        """KV-head ranges ``[start, end)`` of ``site`` read afresh at ``step`` (adjacent ones joined)."""
        heads = self.reuse[site][step - 1]
        group = len(heads) // kv_heads
        ranges = []
        for kv in range(kv_heads):
            if not all(heads[kv * group:(kv + 1) * group]):
                if ranges and ranges[-1][1] == kv:
                    ranges[-1] = (ranges[-1][0], kv + 1)
                else:
                    ranges.append((kv, kv + 1))
        return ranges

    def save(self, path: str) -> None:
        """Write the plan as JSON (``[site][step][head]`` booleans), for :meth:`load`."""
        with open(path, "w") as f:
            json.dump({"reuse": self.reuse}, f)

    @classmethod
    def load(cls, path: str) -> "ReusePlan":
        with open(path) as f:
            return cls(json.load(f)["reuse"])

    @property
    def reused_fraction(self) -> float:
        """Share of (site, step, head) entries that reuse."""
        flat = [h for site in self.reuse for step in site for h in step]
        return sum(flat) / len(flat)

    def __str__(self):
        rows = [[f"site {i}"] + [f"{sum(step)}/{len(step)}" for step in site] for i, site in enumerate(self.reuse)]
        return ("ReusePlan (heads reusing / heads, per step since the refresh)\n"
                + tabulate(rows, headers=["site"] + [f"step {s + 1}" for s in range(self.steps)]))


@dataclass(frozen=True)
class Config:
    """How fbcompile rewrites and runs a model.

    refresh: when the block-external attention ``(O_e, L_e)`` is recomputed.
        ``"block"`` (default, FlashBlock): whenever the cached keys/values change - once per block;
        ``"always"``: at every call (exact mode; the optimized model equals the original);
        an int ``N``: as ``"block"``, and also every ``N``-th call within a block;
        ``"tokens"``: as ``"block"``, and also once ``tokens`` positions of the block's input
        (token ids, or embeddings) changed since the last refresh - FlashBlock's LLM rule (refresh
        after tau committed tokens). It compares the input on the device: one host sync per call.
        ``"adaptive"``: as ``"block"``, and also when a site's query moved by more than ``drift``
        (relative L2) since the refresh - measured in the reuse graph, acted on at the next call.
    reuse_plan: a :class:`ReusePlan` (from a calibration run): at reuse steps, the heads and layers it
        marks are recomputed; it combines with every policy but ``"always"``.
    tokens: tau of the ``"tokens"`` policy.
    drift: threshold of the ``"adaptive"`` policy.
    exact_save_pass: a call whose graph returns the block's own keys/values (the pass that commits
        the block into the cache) is computed exactly, as the official FlashBlock code does;
        otherwise every later block would attend to keys/values computed with the approximation.
    compiler: ``"inductor"`` compiles the rewritten graphs (default); ``"eager"`` runs them as FX
        graphs (fast to start, for debugging and tests).
    max_cache_entries: how many attention sites' external results are kept at most (one per
        attention layer is needed; entries whose KV tensors are freed are dropped at once).
    cuda_graphs: run the compiled graphs (refresh, reuse, exact) as CUDA graphs where they can be
        (:mod:`fbcompile.backends.cuda_graphs`); as ``torch.compile(mode="reduce-overhead")``. Without a
        GPU the graphs run as compiled, with a warning.
    recompile_limit: how many graphs dynamo may compile for one optimized model's forward (its own
        budget, ``torch.compile(recompile_limit=..., isolate_recompiles=True)``); past it dynamo runs
        the forward uncompiled and fbcompile warns. Prefill, denoising and commit steps, dtypes and
        batch sizes each take graphs, hence more than dynamo's default of 8.
    """

    refresh: str | int = "block"
    reuse_plan: ReusePlan | None = None
    tokens: int = 2
    drift: float = 0.3
    exact_save_pass: bool = True
    compiler: str = "inductor"
    max_cache_entries: int = 1024
    recompile_limit: int = 64
    cuda_graphs: bool = False

    def __post_init__(self):
        if isinstance(self.refresh, bool) or not (
            self.refresh in REFRESH_POLICIES or (isinstance(self.refresh, int) and self.refresh >= 1)
        ):
            raise ValueError(f"Config.refresh must be one of {REFRESH_POLICIES} or an int >= 1, got {self.refresh!r}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"Config.tokens must be an int >= 1, got {self.tokens!r}")
        if isinstance(self.drift, bool) or not isinstance(self.drift, (int, float)) or not self.drift > 0:
            raise ValueError(f"Config.drift must be a number > 0, got {self.drift!r}")
        if self.reuse_plan is not None and not isinstance(self.reuse_plan, ReusePlan):
            raise ValueError(f"Config.reuse_plan must be a fbcompile.ReusePlan, got {type(self.reuse_plan).__name__}")
        if self.reuse_plan is not None and self.refresh == "always":
            raise ValueError("Config.reuse_plan has no effect with refresh='always' (nothing is reused)")
        if self.compiler not in COMPILERS:
            raise ValueError(f"Config.compiler must be one of {COMPILERS}, got {self.compiler!r}")
        if not isinstance(self.max_cache_entries, int) or self.max_cache_entries < 1:
            raise ValueError(f"Config.max_cache_entries must be an int >= 1, got {self.max_cache_entries!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"Config.cuda_graphs must be a bool, got {self.cuda_graphs!r}")
        if isinstance(self.recompile_limit, bool) or not isinstance(self.recompile_limit, int) or self.recompile_limit < 1:
            raise ValueError(f"Config.recompile_limit must be an int >= 1, got {self.recompile_limit!r}")

    @classmethod
    def from_options(cls, options: dict | None) -> "Config":
        """Build a Config from ``torch.compile(..., options={...})``; unknown keys are an error."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown fbcompile option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**options)
