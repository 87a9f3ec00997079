"""How good is reuse for *this* model? FlashBlock's observation and its cost, measured
(``fbcompile.fidelity`` and ``fbcompile.calibrate``).

``fbcompile.fidelity(model, generate)`` runs ``generate`` twice on copies of ``model``:

1. exact, with every split site probed: at each call it sees the fresh external ``(O_e, L_e)`` and
   internal ``(O_i, L_i)`` parts, and what the refresh policy would have reused. Per site and step in
   the block it records the cosine similarity of ``O_e`` and of ``O_i`` to their values at the
   block's refresh step (FlashBlock: external stays, internal moves), and the relative error of the
   reused merge ``merge(cached O_e, fresh O_i)`` against the exact merge (the error one layer adds);
2. with the policy for real, to measure token agreement with the exact generation.

``fbcompile.calibrate(model, generate)`` runs the probe alone and measures, per site, step since the
refresh and head, how far the fresh external part moved from the cached one; its
:meth:`Calibration.plan` turns that into a :class:`fbcompile.ReusePlan` (the official FlashBlock
video rule: a head reuses where cos >= 0.85 and mean |LSE drift| <= 0.05).
"""
from __future__ import annotations

import copy
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from tabulate import tabulate

from fbcompile.backends.compiler import compile_forward
from fbcompile.backends.session import Session
from fbcompile.config import Config, ReusePlan
from fbcompile.kernels.reference import merge_lse


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@dataclass
class FidelityReport:
    """Per-site, per-step measurements and the token agreement of a reuse run with the exact one."""

    policy: str
    records: list[dict]             # site, step, cos_external, cos_internal, reuse_rel_error
    token_agreement: float          # fraction of generated positions equal to the exact run
    first_divergence: int           # generated positions before the first one that differs (all: none)
    refreshes: int
    calls: int
    per_site: list[dict] = field(default_factory=list)
    external_fraction: float = 1.0  # KV heads the external parts read, relative to exact mode

    @property
    def refresh_rate(self) -> float:
        return self.refreshes / max(self.calls, 1)

    def __str__(self):
        head = (f"fbcompile fidelity (refresh={self.policy}): token agreement {self.token_agreement:.4f}, "
                f"first divergence after {self.first_divergence} generated positions, "
                f"refresh rate {self.refresh_rate:.3f} ({self.refreshes}/{self.calls} calls), "
                f"external attention computed {self.external_fraction:.3f} of exact")
        return head + "\n" + tabulate(self.per_site, headers="keys", floatfmt=".4f")

    def save(self, folder: str) -> list[str]:
        """Write the table (markdown), the raw records (CSV) and plots; returns the file paths."""
        os.makedirs(folder, exist_ok=True)
        paths = [os.path.join(folder, "fidelity.md"), os.path.join(folder, "fidelity_records.csv")]
        with open(paths[0], "w") as f:
            f.write(str(self).replace("\n", "\n\n", 1) + "\n")
        with open(paths[1], "w") as f:
            f.write("site,step,cos_external,cos_internal,reuse_rel_error\n")
            for r in self.records:
                f.write(f"{r['site']},{r['step']},{r['cos_external']},{r['cos_internal']},{r['reuse_rel_error']}\n")
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # plots are optional
            return paths
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for row in self.per_site:
            steps = sorted({r["step"] for r in self.records if r["site"] == row["site"]})
            mean = lambda key, s: _mean([r[key] for r in self.records if r["site"] == row["site"] and r["step"] == s])  # noqa: E731
            line, = ax1.plot(steps, [mean("cos_external", s) for s in steps], label=f"{row['site']} ext")
            ax1.plot(steps, [mean("cos_internal", s) for s in steps], "--", color=line.get_color())
        ax1.set(xlabel="step since refresh", ylabel="cosine similarity to the refresh step",
                title="external (solid) vs internal (dashed)")
        ax1.legend(fontsize=6)
        ax2.bar(range(len(self.per_site)), [r["mean_reuse_rel_error"] for r in self.per_site])
        ax2.set(xlabel="site (graph order)", ylabel="relative error of the reused merge",
                title=f"per-layer error of reuse (refresh={self.policy})")
        fig.tight_layout()
        paths.append(os.path.join(folder, "fidelity.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
        return paths


def _mean(values):
    return sum(values) / len(values) if values else float("nan")


def fidelity(model: torch.nn.Module, generate: Callable[[torch.nn.Module], torch.Tensor],
             config: Config | None = None, out: str | None = None, prompt_length: int = 0) -> FidelityReport:
    """Measure reuse on ``model``: ``generate(model_copy) -> token ids`` is called twice (see module doc).

    ``config`` selects the refresh policy to evaluate (default ``Config(refresh="block")``); the
    model itself is not modified. ``out``: a folder for the table, records and plots.
    ``prompt_length``: leading positions of the output left out of the token agreement.
    """
    config = config or Config(refresh="block", compiler="eager")
    if config.refresh == "always":
        raise ValueError("fidelity measures a reuse policy; refresh='always' reuses nothing")
    if config.sparse is not None:
        raise ValueError("fidelity simulates plain block reuse; for Config(sparse=...) compare the optimized "
                         "model's generations with the original model's")
    records = []
    first: dict = {}

    def observe(graph, site, step, fresh, cached, kv_heads):
        o_e, l_e, o_i, l_i = fresh.out_ext, fresh.lse_ext, fresh.out_int, fresh.lse_int
        name = f"site {site}"
        if cached is None:
            first[name] = (o_e.clone(), o_i.clone())
            return
        exact, _ = merge_lse(o_e, l_e, o_i, l_i)
        reused, _ = merge_lse(cached.out_ext, cached.lse_ext, o_i, l_i)
        e0, i0 = first[name]
        records.append(dict(site=name, step=step, cos_external=_cos(o_e, e0), cos_internal=_cos(o_i, i0),
                            reuse_rel_error=_rel(reused, exact)))

    probe = Session(config)
    probe.observer = observe
    exact_ids = _run(model, generate, probe)
    runner = Session(config)
    reuse_ids = _run(model, generate, runner)
    same_shape = exact_ids.shape == reuse_ids.shape
    equal = (exact_ids[..., prompt_length:] == reuse_ids[..., prompt_length:]) if same_shape else None
    agreement = equal.float().mean().item() if same_shape else 0.0
    first_divergence = int(equal.reshape(-1, equal.shape[-1]).all(0).long().cumprod(0).sum()) if same_shape else 0
    stats = runner.stats()
    by_site = defaultdict(list)
    for r in records:
        by_site[r["site"]].append(r)
    per_site = [dict(site=s, steps=len(rs), mean_cos_external=_mean([r["cos_external"] for r in rs]),
                     mean_cos_internal=_mean([r["cos_internal"] for r in rs]),
                     mean_reuse_rel_error=_mean([r["reuse_rel_error"] for r in rs]),
                     max_reuse_rel_error=max(r["reuse_rel_error"] for r in rs)) for s, rs in by_site.items()]
    policy = repr(config.refresh) + (" with a reuse plan" if config.reuse_plan is not None else "")
    report = FidelityReport(policy=policy, records=records, token_agreement=agreement,
                            first_divergence=first_divergence, refreshes=stats.refreshes,
                            calls=stats.refreshes + stats.reuses, per_site=per_site,
                            external_fraction=stats.external_fraction)
    if out is not None:
        report.save(out)
    return report


@dataclass
class Calibration:
    """How far each head's external part moves between the steps of a block.

    ``pairs[(site, a, b)]`` (steps ``0 <= a < b``, 0 the refresh): ``calls``, per query head the mean
    cosine similarity ``cos`` of ``O_e`` at step ``b`` to step ``a`` and the mean ``|L_e|`` change
    ``lse_drift``, and the same over the whole site, ``layer_cos`` and ``layer_lse_drift``.
    ``cos``, ``lse_drift``, ``layer_cos``, ``layer_lse_drift`` and ``calls`` give the ones against the
    refresh as ``[site][step - 1]`` lists.
    """

    pairs: dict
    kv_heads: list  # per site

    @property
    def steps(self) -> int:
        return max(b for _, _, b in self.pairs)

    def _from_refresh(self, key: str) -> list:
        return [[self.pairs[(i, 0, s)][key] if (i, 0, s) in self.pairs else None for s in range(1, self.steps + 1)]
                for i in range(len(self.kv_heads))]

    cos = property(lambda self: self._from_refresh("cos"))
    lse_drift = property(lambda self: self._from_refresh("lse_drift"))
    layer_cos = property(lambda self: self._from_refresh("layer_cos"))
    layer_lse_drift = property(lambda self: self._from_refresh("layer_lse_drift"))
    calls = property(lambda self: self._from_refresh("calls"))

    def plan(self, cos: float = 0.85, lse_drift: float = 0.05, granularity: str = "head") -> ReusePlan:
        """Reuse while ``cos >= cos`` and drift ``<= lse_drift`` hold against the last recompute.

        Step by step, as the plan will run: a KV head's query heads (``"head"``; they are recomputed
        together) or a whole site (``"layer"``) reuse if every one of them is within the thresholds
        of the step at which its cached part was last computed (the refresh, or a step that
        recomputed it, which overwrites the cache); otherwise they are recomputed at that step.
        A step never measured against that one recomputes.
        """
        if granularity not in ("head", "layer"):
            raise ValueError(f"granularity must be 'head' or 'layer', got {granularity!r}")
        reuse = []
        for site, kv in enumerate(self.kv_heads):
            heads = len(self.pairs[(site, 0, 1)]["cos"])
            group = heads // kv if granularity == "head" else heads
            last = [0] * (heads // group)
            steps = []
            for step in range(1, self.steps + 1):
                row = []
                for unit in range(len(last)):
                    pair = self.pairs.get((site, last[unit], step))
                    if pair is None:
                        ok = False
                    elif granularity == "layer":
                        ok = pair["layer_cos"] >= cos and pair["layer_lse_drift"] <= lse_drift
                    else:
                        span = range(unit * group, (unit + 1) * group)
                        ok = all(pair["cos"][h] >= cos and pair["lse_drift"][h] <= lse_drift for h in span)
                    if not ok:
                        last[unit] = step
                    row += [ok] * group
                steps.append(row)
            reuse.append(steps)
        return ReusePlan(reuse)

    def __str__(self):
        rows = [dict(site=f"site {i}", step=s + 1, calls=self.calls[i][s], layer_cos=self.layer_cos[i][s],
                     min_head_cos=min(self.cos[i][s]), layer_lse_drift=self.layer_lse_drift[i][s],
                     max_head_lse_drift=max(self.lse_drift[i][s]))
                for i in range(len(self.kv_heads)) for s in range(self.steps) if self.calls[i][s] is not None]
        return ("fbcompile calibration (external part at each step vs the refresh)\n"
                + tabulate(rows, headers="keys", floatfmt=".4f"))


@dataclass
class _PairSums:
    """Running sums of one (site, step a, step b) pair's measurements."""

    calls: int = 0
    layer_cos: float = 0.0
    layer_lse_drift: float = 0.0
    head_cos: torch.Tensor | float = 0.0        # per query head
    head_lse_drift: torch.Tensor | float = 0.0  # per query head

    def add(self, layer_cos: float, layer_lse_drift: float, head_cos: torch.Tensor, head_lse_drift: torch.Tensor):
        self.calls += 1
        self.layer_cos += layer_cos
        self.layer_lse_drift += layer_lse_drift
        self.head_cos = self.head_cos + head_cos
        self.head_lse_drift = self.head_lse_drift + head_lse_drift

    def means(self) -> dict:
        n = self.calls
        return dict(calls=n, cos=(self.head_cos / n).tolist(), lse_drift=(self.head_lse_drift / n).tolist(),
                    layer_cos=self.layer_cos / n, layer_lse_drift=self.layer_lse_drift / n)


def calibrate(model: torch.nn.Module, generate: Callable[[torch.nn.Module], torch.Tensor],
              config: Config | None = None) -> Calibration:
    """Run ``generate`` on a probed copy of ``model`` (exact) and measure, for every pair of steps
    of ``config``'s policy (default ``"block"``: the steps of a block), how far each head's
    external part moved."""
    config = config or Config(refresh="block", compiler="eager")
    if config.refresh == "always" or config.reuse_plan is not None or config.sparse is not None:
        raise ValueError("calibrate measures full reuse: use a reuse policy without a reuse_plan or sparse")
    sums: dict = {}
    history: dict = {}  # site -> fresh (O_e, L_e) of each step since its refresh
    kv_heads: dict = {}

    def observe(graph, site, step, fresh, cached, kv):
        o_e, l_e = fresh.out_ext.float(), fresh.lse_ext.float()
        kv_heads[site] = kv
        if cached is None:
            history[site] = [(o_e, l_e)]
            return
        if len(history.get(site, ())) != step:  # not a step-by-step sequence of this site: no pairs
            return
        heads = o_e.shape[1]
        for a, (o_a, l_a) in enumerate(history[site]):
            head_cos = torch.nn.functional.cosine_similarity(
                o_e.transpose(0, 1).reshape(heads, -1), o_a.transpose(0, 1).reshape(heads, -1), dim=1)
            change = (l_e - l_a).abs()
            sums.setdefault((site, a, step), _PairSums()).add(
                _cos(o_e, o_a), change.mean().item(), head_cos, change.transpose(0, 1).reshape(heads, -1).mean(1))
        history[site].append((o_e, l_e))

    session = Session(config)
    session.observer = observe
    _run(model, generate, session)
    if not sums:
        raise ValueError("calibration saw no reuse step: does generate call the model more than once per block?")
    pairs = {key: p.means() for key, p in sums.items()}
    return Calibration(pairs=pairs, kv_heads=[kv_heads[i] for i in range(1 + max(kv_heads))])


def _run(model, generate, session: Session) -> torch.Tensor:
    """``generate`` on a copy of ``model`` whose forward is compiled into ``session`` (with its own
    compile budget, so nothing else the user compiled is touched)."""
    clone = copy.deepcopy(model).eval()
    clone.forward = compile_forward(clone.forward, session)
    with torch.no_grad():
        return generate(clone)
