"""The one configuration object of fbcompile (also accepted as ``torch.compile(options=...)``)."""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

from tabulate import tabulate

REFRESH_POLICIES = ("block", "always", "tokens", "adaptive")
COMPILERS = ("inductor", "eager")
SCOPES = ("model", "blocks")


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
class Sparse:
    """Sparse external attention guided by the refresh step (MAGE), with FlashBlock residual reuse.

    At a site's refresh the external attention also scores its KV tiles (``tile`` keys each; the
    attention mass of the KV head's query heads and rows) and selects tiles per KV head: the top
    ``ceil(budget / tile)``, or with ``mass`` the fewest reaching that share of the mass (at most
    as many). At reuse steps the block attends afresh to the selected tiles of the current external
    keys/values and to itself; with ``residual`` the part over the other tiles, computed at the
    refresh, is taken from the cache and merged in (budget 0: ``"block"`` mode; all tiles: exact),
    without it that part is dropped (plain MAGE-style sparse attention). Shapes are static: a reuse
    step gathers ``ceil(budget / tile) * tile`` entries per KV head even past the context's length.
    Sites whose external keys/values are computed in the graph, or merged from a dual cache, keep
    plain block reuse (``explain`` says why).
    """

    budget: int = 512
    mass: float | None = None
    tile: int = 64
    residual: bool = True

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 0:
            raise ValueError(f"Sparse.budget (KV entries per KV head) must be an int >= 0, got {self.budget!r}")
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"Sparse.tile (keys per tile) must be an int >= 1, got {self.tile!r}")
        if self.mass is not None and (isinstance(self.mass, bool) or not isinstance(self.mass, (int, float))
                                      or not 0 < self.mass < 1):
            raise ValueError(f"Sparse.mass (attention mass to keep) must be None or a number in (0, 1), got {self.mass!r}")
        if not isinstance(self.residual, bool):
            raise ValueError(f"Sparse.residual must be a bool, got {self.residual!r}")

    @property
    def max_tiles(self) -> int:
        """Tiles selected per KV head at most."""
        return -(-self.budget // self.tile)

    def __str__(self):
        rule = f"budget {self.budget}" + (f", mass {self.mass}" if self.mass is not None else "")
        return f"sparse ({rule}, tiles of {self.tile}, residual {'on' if self.residual else 'off'})"


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
    sparse: a :class:`Sparse`: at reuse steps the block attends afresh to the external KV tiles its
        refresh step attended to most (plus, with residual reuse, the cached rest); combines with
        every policy but ``"always"``, not with ``reuse_plan``.
    tokens: tau of the ``"tokens"`` policy.
    drift: threshold of the ``"adaptive"`` policy.
    exact_save_pass: a call whose graph returns the block's own keys/values (the pass that commits
        the block into the cache) is computed exactly, as the official FlashBlock code does;
        otherwise every later block would attend to keys/values computed with the approximation.
        Exception: when the cache such a call reads is cut from keys/values an earlier call
        returned - a crop of a returned concatenation (HF ``DynamicCache``: each denoising step
        appends the block, then ``crop`` s it off), or a slice of returned keys/values (Fast-dLLM's
        LLaDA and Dream return ``present`` at every step and keep ``k[:, :, :s]`` of the block's
        full pass) - the loop is appending blocks it throws away, and the call is taken as a
        denoising step (it may reuse); such loops mark their real commit with
        ``with fbcompile.commit(model):``, as must commits that no graph shows (a ``cat`` handed
        across a graph break).
    compiler: ``"inductor"`` compiles the rewritten graphs (default); ``"eager"`` runs them as FX
        graphs (fast to start, for debugging and tests).
    max_cache_entries: how many attention sites' external results are kept at most (one per
        attention layer is needed; entries whose KV tensors are freed are dropped at once).
    cuda_graphs: run the compiled graphs (refresh, reuse, exact) as CUDA graphs where they can be
        (:mod:`fbcompile.backends.cuda_graphs`); as ``torch.compile(mode="reduce-overhead")``. Without a
        GPU the graphs run as compiled, with a warning.
    recompile_limit: how many graphs dynamo may compile for one optimized model's forward (its own
        budget, ``torch.compile(recompile_limit=..., isolate_recompiles=True)``), plus 8 per layer
        (the model's longest ``ModuleList``); past it dynamo runs the frame uncompiled and fbcompile
        warns. Prefill, denoising and commit steps, dtypes and batch sizes each take graphs, hence
        more than dynamo's default of 8. The per-layer part is for graph breaks inside a layer
        (SDAR-style remote code): dynamo counts per code object, and the layer's frames after the
        break are compiled per layer (about 7 graphs per layer there).
    group_linears: run the linears that read one input (q/k/v, gate/up) in one launch of fbcompile's
        skinny-GEMM kernel, where that was measured faster (CUDA on Hopper, at most 32 rows, or beyond
        for a launch over several weights whose GEMM is small: :mod:`fbcompile.passes.group_linears`);
        ``False`` leaves every linear to Inductor (cuBLAS).
    gated_linears: run a gated MLP's input projections and gate, ``act(gate(h)) * up(h)`` (SiLU or
        tanh-GELU), as one launch of that kernel that applies the gate as it stores, where
        ``group_linears`` applies (:mod:`fbcompile.passes.gated_linears`); ``False`` leaves the gate to
        Inductor (the projections are then grouped as any others).
    residual_linears: where ``group_linears`` applies, add a residual stream as the linear before it
        stores (``h + o_proj(a)``, ``h + down(m)``: :mod:`fbcompile.passes.residual_linears`), so those
        projections run on that kernel; ``False`` leaves the add to Inductor (with the RMSNorm after it)
        and the projections to cuBLAS.
    linear_partials: where ``group_linears`` applies, split the reduction of those launches (not the
        gated one) over more programs and leave the sum of their fp32 partials to the kernel that reads
        the result (Inductor fuses it into the RoPE or the add + RMSNorm after it:
        :mod:`fbcompile.passes.linear_partials`); ``False`` keeps one launch per GEMM with the sum in it.
    joint_attention: compute a step's two attention parts and their merge, where the step computes the
        external part (refresh and exact steps), as one op, ``attention_refresh_lse``: where both parts
        run on the Triton kernels, one launch pair instead of three (:mod:`fbcompile.passes.refresh_attention`;
        exact mode at 32K on the H100: 18.91 against 19.77 ms per block,
        ``benchmarks/results/session36_h100.md``). ``False`` keeps ``attention_lse`` and
        ``attention_merge_lse`` apart.
    combo_kernels: on CUDA, have Inductor launch independent kernels of a compiled graph as one (its
        ``combo_kernels`` option): the RoPE of a layer's queries and that of its keys, which differ in
        shape, become one launch (measured on the H200: ``benchmarks/results/combo_kernels_h200.md``);
        a graph Inductor fails to compile with them is compiled without. ``False`` keeps Inductor's
        default (off).
    scope: what :func:`fbcompile.optimize` compiles. ``"model"``: the model's forward, one graph over
        all layers. ``"blocks"``: the forward of each repeated block (regional compilation: the classes
        in the model's ``_repeated_blocks``, diffusers', else ``_no_split_modules``, transformers'), the
        rest runs eagerly. For forwards that take Python containers changing at every call: dynamo
        guards on a list's length, so diffusers' AnyFlow FAR (``chunk_partition``, one int per chunk)
        recompiles its forward at every chunk, while its blocks see only tensors and ints.
    """

    refresh: str | int = "block"
    reuse_plan: ReusePlan | None = None
    sparse: Sparse | None = None
    tokens: int = 2
    drift: float = 0.3
    exact_save_pass: bool = True
    compiler: str = "inductor"
    max_cache_entries: int = 1024
    recompile_limit: int = 64
    scope: str = "model"
    cuda_graphs: bool = False
    group_linears: bool = True
    gated_linears: bool = True
    residual_linears: bool = True
    linear_partials: bool = True
    joint_attention: bool = True
    combo_kernels: bool = True

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
        if self.sparse is not None and not isinstance(self.sparse, Sparse):
            raise ValueError(f"Config.sparse must be a fbcompile.Sparse, got {type(self.sparse).__name__}")
        if self.sparse is not None and self.refresh == "always":
            raise ValueError("Config.sparse has no effect with refresh='always' (nothing is reused)")
        if self.sparse is not None and self.reuse_plan is not None:
            raise ValueError("Config.sparse and Config.reuse_plan cannot be combined: both decide what a reuse "
                             "step reads afresh; choose one")
        if self.compiler not in COMPILERS:
            raise ValueError(f"Config.compiler must be one of {COMPILERS}, got {self.compiler!r}")
        if not isinstance(self.max_cache_entries, int) or self.max_cache_entries < 1:
            raise ValueError(f"Config.max_cache_entries must be an int >= 1, got {self.max_cache_entries!r}")
        for flag in ("cuda_graphs", "group_linears", "gated_linears", "residual_linears", "linear_partials",
                     "joint_attention", "combo_kernels"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"Config.{flag} must be a bool, got {getattr(self, flag)!r}")
        if isinstance(self.recompile_limit, bool) or not isinstance(self.recompile_limit, int) or self.recompile_limit < 1:
            raise ValueError(f"Config.recompile_limit must be an int >= 1, got {self.recompile_limit!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"Config.scope must be one of {SCOPES}, got {self.scope!r}")

    @classmethod
    def from_options(cls, options: dict | None) -> "Config":
        """Build a Config from ``torch.compile(..., options={...})``; unknown keys are an error."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(f"unknown fbcompile option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**options)
