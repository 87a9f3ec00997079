"""The one entry point from a dynamo graph to everything the runtime needs: :func:`specialize`.

It finds the attention sites, splits the splittable ones, derives the reuse guards and builds the
graphs a policy runs - refresh, reuse (one per step of a reuse plan) or probe - each described by
its :class:`~fbcompile.passes.reuse_external.OutputLayout`. Policy settings come in as plain
arguments; nothing here knows runtime state.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch.fx as fx

from fbcompile.ops import MergeArgs
from fbcompile.passes.find_attention import AttentionSite
from fbcompile.passes.guards import SiteGuard, commits_block_kv, site_guards
from fbcompile.passes.reuse_external import (SpecializedGraph, exact_graph, merges, probe_graph, refresh_graph,
                                             reuse_graph, site_heads)
from fbcompile.passes.sparse_external import sparse_reasons, sparse_refresh_graph, sparse_reuse_graph
from fbcompile.passes.split_attention import SiteHeads, split_attention


@dataclass
class ReuseStep:
    """The reuse graph of some steps since the refresh, and what it recomputes."""

    steps: tuple[int, ...]        # steps (1, 2, ...) since the refresh it serves
    graph: SpecializedGraph | None  # None in probe mode (the probe's exact parts are mixed instead)
    recompute: list[list[tuple[int, int]]]  # per site, query-head ranges [start, end) computed afresh
    kv_read: tuple[int, ...]      # per site, KV heads whose external part it reads


@dataclass
class GraphPlan:
    """A split graph, specialised for the runtime."""

    split: fx.GraphModule         # the split graph itself (exact)
    heads: list[SiteHeads]        # per split site, graph order
    no_reuse: str | None          # why this graph never reuses (None: it may)
    guards: list[SiteGuard]       # per split site; empty when it never reuses
    refresh: SpecializedGraph     # computes and returns the external parts (exact graph: no_reuse)
    reuse: list[ReuseStep]        # per step since the refresh (one entry without a reuse plan)
    commits: bool = False         # returns the block's keys/values: the runtime decides per call
    sparse: list[str | None] = field(default_factory=list)  # sparse reuse: per split site, why it keeps
    #                                                          plain block reuse (None: sparse applies)


def specialize(gm: fx.GraphModule, sites: list[AttentionSite], *, exact: bool, exact_save_pass: bool = True,
               commit_per_call: bool = False, with_query: bool = False, probe: bool = False,
               reuse_plan=None, sparse=None) -> GraphPlan | None:
    """Split ``gm`` in place at ``sites`` and build its graphs; None if no site was split.

    ``exact``: no reuse at all; ``exact_save_pass``: a graph returning the block's keys/values (a
    commit) never reuses - unless its calls may be denoising steps (``commit_per_call``: it returns the
    concatenation of an input, see :mod:`.cat_outputs`, which the loop may crop off, or the cache it
    was compiled for is cut from keys/values an earlier call returned), which is marked ``commits``:
    the runtime runs its calls exactly unless the cache they read is such a cut
    (``SplitGraphDispatcher._cropped``); ``with_query``: refresh/reuse graphs carry each site's query (drift); ``probe``: the
    refresh graph is a probe graph and no reuse graph is built; ``reuse_plan``: a
    :class:`fbcompile.ReusePlan` whose steps get one reuse graph each; ``sparse``: a
    :class:`fbcompile.Sparse` (see :mod:`.sparse_external`; not with a plan or a probe).
    """
    split = [s for s in sites if s.splittable]
    commits = exact_save_pass and commits_block_kv(gm, split)
    if not split_attention(gm, sites):
        return None
    heads = site_heads(gm.graph)
    guards = None
    if not exact:
        guards = site_guards(gm, split, [MergeArgs.of(m).out_ext for m in merges(gm.graph)])
    if commits and not commit_per_call:
        guards = None
    if guards is None:
        reason = "exact mode" if exact else "save pass" if commits else "query size not guardable"
        return GraphPlan(gm, heads, reason, [], exact_graph(gm), [])
    if reuse_plan is not None:
        _check_plan(reuse_plan, heads)
    if sparse is not None:
        if probe or reuse_plan is not None:
            raise ValueError("sparse reuse is neither probed (fbcompile.fidelity) nor combined with a reuse plan")
        reasons = sparse_reasons(gm)
        # a sparse site's cache entry holds a residual and tiles, not O_e: never shared with a block-reuse site
        guards = [g if r is not None else replace(g, computation=hash((g.computation, str(sparse))))
                  for g, r in zip(guards, reasons)]
        reuse = sparse_reuse_graph(gm, sparse, reasons, with_query)
        return GraphPlan(gm, heads, None, guards, sparse_refresh_graph(gm, sparse, reasons, with_query),
                         [ReuseStep((1,), reuse, [[] for _ in heads], (0,) * len(heads))],
                         commits=commits, sparse=reasons)
    refresh = probe_graph(gm) if probe else refresh_graph(gm, with_query=with_query)
    return GraphPlan(gm, heads, None, guards, refresh, _reuse_steps(gm, heads, reuse_plan, with_query, not probe),
                     commits=commits)


def _check_plan(plan, heads: list[SiteHeads]) -> None:
    if plan.sites != len(heads):
        raise ValueError(f"Config.reuse_plan covers {plan.sites} attention site(s), but this graph has "
                         f"{len(heads)}; calibrate on the same model and inputs")
    for i, h in enumerate(heads):
        if plan.heads(i) != h.query:
            raise ValueError(f"Config.reuse_plan lists {plan.heads(i)} heads for site {i}, which has {h.query}")


def _reuse_steps(gm, heads: list[SiteHeads], plan, with_query: bool, build: bool) -> list[ReuseStep]:
    """One :class:`ReuseStep` per step since the refresh; steps of a plan that recompute the same KV
    heads share one. ``build``: build the graphs (probe mode only needs what each step recomputes)."""
    if plan is None:
        graph = reuse_graph(gm, with_query=with_query) if build else None
        return [ReuseStep((1,), graph, [[] for _ in heads], (0,) * len(heads))]
    steps_of: dict[tuple, list[int]] = {}  # KV-head ranges per site -> the steps that read them
    for step in range(1, plan.steps + 1):
        ranges = tuple(tuple(plan.recompute(i, step, h.kv)) for i, h in enumerate(heads))
        steps_of.setdefault(ranges, []).append(step)
    by_step = {}
    for ranges, steps in steps_of.items():
        graph = reuse_graph(gm, with_query=with_query, recompute=[list(r) for r in ranges]) if build else None
        reuse = ReuseStep(steps=tuple(steps), graph=graph,
                          recompute=[[(a * h.query // h.kv, b * h.query // h.kv) for a, b in r]
                                     for r, h in zip(ranges, heads)],
                          kv_read=tuple(sum(b - a for a, b in r) for r in ranges))
        by_step.update(dict.fromkeys(steps, reuse))
    return [by_step[step] for step in range(1, plan.steps + 1)]
