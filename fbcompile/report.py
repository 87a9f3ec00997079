"""``fbcompile.explain``'s report: every attention site found, the decision, and the graphs."""
from __future__ import annotations

from dataclasses import dataclass

from tabulate import tabulate

from fbcompile.backends.session import GraphRecord


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
        lines = [f"fbcompile: {len(self.graphs)} graph(s), {len(self.sites)} attention site(s), "
                 f"{len(self.rewritten)} rewritten"]
        if self.sites:
            lines.append(tabulate(self.sites, headers="keys"))
        for g in self.graphs:
            if not g.rewritten:
                continue
            lines.append(f"\n=== graph {g.index}: before ===\n{g.code_before.strip()}")
            lines.append(f"\n=== graph {g.index}: after (refresh: computes the external part) ===\n"
                         f"{g.code_refresh.strip()}")
            if g.code_reuse:
                lines.append(f"\n=== graph {g.index}: reuse (takes the cached external part) ===\n"
                             f"{g.code_reuse.strip()}")
        return "\n".join(lines)
