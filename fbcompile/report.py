"""``fbcompile.explain``'s report: every attention site found, the decision, and the graphs."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from tabulate import tabulate

from fbcompile.backends.session import GraphRecord
from fbcompile.passes.attention_kernels import attention_kernels


@dataclass
class Report:
    """What fbcompile did to a model's graphs; ``print(report)`` for people, attributes for code."""

    graphs: list[GraphRecord]

    @property
    def sites(self) -> list[dict]:
        """One row per attention site: graph, node, form, shapes, heads, mask, decision."""
        return [{"graph": g.index, **site} for g in self.graphs for site in g.sites]

    @property
    def rewritten(self) -> list[dict]:
        return [s for s in self.sites if s["decision"] == "rewritten"]

    @property
    def skipped(self) -> list[dict]:
        return [s for s in self.sites if s["decision"] != "rewritten"]

    def __str__(self) -> str:
        if not self.graphs:
            return ("fbcompile: no graph compiled yet - run the model (or its generate) first, or trace it "
                    "with fbcompile.explain(model, *inputs)")
        lines = [f"fbcompile: {len(self.graphs)} graph(s), {len(self.sites)} attention site(s), "
                 f"{len(self.rewritten)} rewritten"]
        if self.sites:
            lines.append(tabulate(self.sites, headers="keys"))
        for g in self.graphs:
            if g.rewritten and g.no_reuse is not None:
                lines.append(f"graph {g.index}: never reuses ({g.no_reuse})")
            elif g.commits:
                lines.append(f"graph {g.index}: returns the block's keys/values: a call runs exactly (save pass) "
                             "unless its cache is cut from keys/values an earlier call returned")
            for role, note in g.cuda_graphs.items():
                lines.append(f"graph {g.index} {role}, CUDA graphs: {note}")
            for role, (gm, mode, inputs) in g.attention_graphs.items():
                lines.append(f"graph {g.index} {role}: attention parts: {_kernels(gm, mode, inputs)}")
            for role, why in g.uncompiled.items():
                lines.append(f"graph {g.index} {role}: runs without Inductor, which could not compile it ({why})")
            for role, groups in g.linear_groups.items():
                lines.append(f"graph {g.index} {role}: {len(groups)} groups of linears in one launch each "
                             f"(first: {groups[0]})")
            for role, gated in g.gated_linears.items():
                lines.append(f"graph {g.index} {role}: {len(gated)} gated MLPs applying act(gate) * up in their "
                             f"gate/up GEMM (first: {gated[0]})")
            for role, residuals in g.residual_linears.items():
                lines.append(f"graph {g.index} {role}: {len(residuals)} residual adds in the GEMM before them "
                             f"(first: {residuals[0]})")
            for role, partials in g.linear_partials.items():
                lines.append(f"graph {g.index} {role}: {len(partials)} GEMMs split, their partial sums added by "
                             f"the kernels that read them (first: {partials[0]})")
            for role, merges in g.joint_attention.items():
                lines.append(f"graph {g.index} {role}: {len(merges)} split attentions with both parts and their "
                             f"merge in one op (first: {merges[0]})")
        for g in self.graphs:
            if not g.rewritten:
                continue
            lines.append(_diff(g.code_before, g.code_refresh, f"graph {g.index} before",
                               f"graph {g.index} refresh (computes the external part)"))
            if g.plan_graphs:
                for label, gm in g.plan_graphs.items():
                    lines.append(_diff(g.code_refresh, gm.code, f"graph {g.index} refresh",
                                       f"graph {g.index} {label} (the reuse plan's recomputed heads)"))
            elif g.code_reuse:
                lines.append(_diff(g.code_refresh, g.code_reuse, f"graph {g.index} refresh",
                                   f"graph {g.index} reuse (takes the cached external part)"))
        lines.append("(full code: report.graphs[i].code_before / code_refresh / code_reuse; "
                     "a reuse plan's graphs: .plan_graphs)")
        return "\n".join(lines)


def _kernels(gm, mode, inputs) -> str:
    """``"4 on Triton, 2 on cuDNN"`` (:func:`fbcompile.passes.attention_kernels.attention_kernels`)."""
    try:
        kernels = attention_kernels(gm, mode, inputs)
    except Exception as error:  # a graph fake tensors cannot run: say so, the rest of the report stands
        return f"on kernels not known ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return ", ".join(f"{count} on {kernel}" for kernel, count in sorted(kernels.items()))


def _diff(a: str, b: str, name_a: str, name_b: str) -> str:
    """The changed lines of two graphs' code; the rest of a model's graph is noise here."""
    return "\n".join(difflib.unified_diff(a.strip().splitlines(), b.strip().splitlines(), name_a, name_b,
                                          n=1, lineterm=""))
