"""The one configuration object of fbcompile (also accepted as ``torch.compile(options=...)``)."""
from __future__ import annotations

from dataclasses import dataclass, fields

REFRESH_POLICIES = ("block", "always", "tokens", "adaptive")
COMPILERS = ("inductor", "eager")


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
    tokens: tau of the ``"tokens"`` policy.
    drift: threshold of the ``"adaptive"`` policy.
    exact_save_pass: a call whose graph returns the block's own keys/values (the pass that commits
        the block into the cache) is computed exactly, as the official FlashBlock code does;
        otherwise every later block would attend to keys/values computed with the approximation.
    compiler: ``"inductor"`` compiles the rewritten graphs (default); ``"eager"`` runs them as FX
        graphs (fast to start, for debugging and tests).
    max_cache_entries: how many attention sites' external results are kept at most (one per
        attention layer is needed; entries whose KV tensors are freed are dropped at once).
    """

    refresh: str | int = "block"
    tokens: int = 2
    drift: float = 0.3
    exact_save_pass: bool = True
    compiler: str = "inductor"
    max_cache_entries: int = 1024

    def __post_init__(self):
        if isinstance(self.refresh, bool) or not (
            self.refresh in REFRESH_POLICIES or (isinstance(self.refresh, int) and self.refresh >= 1)
        ):
            raise ValueError(f"Config.refresh must be one of {REFRESH_POLICIES} or an int >= 1, got {self.refresh!r}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"Config.tokens must be an int >= 1, got {self.tokens!r}")
        if isinstance(self.drift, bool) or not isinstance(self.drift, (int, float)) or not self.drift > 0:
            raise ValueError(f"Config.drift must be a number > 0, got {self.drift!r}")
        if self.compiler not in COMPILERS:
            raise ValueError(f"Config.compiler must be one of {COMPILERS}, got {self.compiler!r}")
        if not isinstance(self.max_cache_entries, int) or self.max_cache_entries < 1:
            raise ValueError(f"Config.max_cache_entries must be an int >= 1, got {self.max_cache_entries!r}")

    @classmethod
    def from_options(cls, options: dict | None) -> "Config":
        """Build a Config from ``torch.compile(..., options={...})``; unknown keys are an error."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown fbcompile option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**options)
