"""How good is reuse for *this* model? FlashBlock's observation and its cost, measured.

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

from fbcompile.backends.compiler import make_backend
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
    records = []
    first: dict = {}

    def observe(graph, site, step, fresh, cached):
        o_e, l_e, o_i, l_i = fresh
        name = f"site {site}"
        if cached is None:
            first[name] = (o_e.clone(), o_i.clone())
            return
        exact, _ = merge_lse(o_e, l_e, o_i, l_i)
        reused, _ = merge_lse(cached[0], cached[1], o_i, l_i)
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
    """How far each head's fresh external part moved from the cached one, per site and step.

    ``cos[site][step - 1][head]``: cosine similarity of the fresh ``O_e`` to the cached one (the
    block's refresh step); ``lse_drift``: mean ``|L_e - cached L_e|``; ``layer_cos`` and
    ``layer_lse_drift`` (``[site][step - 1]``): the same over all heads of the site. Means over the
    calibration calls; ``calls[site][step - 1]`` says how many.
    """

    cos: list
    lse_drift: list
    layer_cos: list
    layer_lse_drift: list
    calls: list

    def plan(self, cos: float = 0.85, lse_drift: float = 0.05, granularity: str = "head") -> ReusePlan:
        """Reuse where ``cos >= cos`` and drift ``<= lse_drift``: per head, or per site (``"layer"``)."""
        if granularity == "head":
            reuse = [[[c >= cos and d <= lse_drift for c, d in zip(cs, ds)] for cs, ds in zip(site_c, site_d)]
                     for site_c, site_d in zip(self.cos, self.lse_drift)]
        elif granularity == "layer":
            reuse = [[[c >= cos and d <= lse_drift] * len(heads) for c, d, heads in zip(lc, ld, site_c)]
                     for lc, ld, site_c in zip(self.layer_cos, self.layer_lse_drift, self.cos)]
        else:
            raise ValueError(f"granularity must be 'head' or 'layer', got {granularity!r}")
        return ReusePlan(reuse)

    def __str__(self):
        rows = [dict(site=f"site {i}", step=s + 1, calls=self.calls[i][s], layer_cos=self.layer_cos[i][s],
                     min_head_cos=min(self.cos[i][s]), layer_lse_drift=self.layer_lse_drift[i][s],
                     max_head_lse_drift=max(self.lse_drift[i][s]))
                for i in range(len(self.cos)) for s in range(len(self.cos[i]))]
        return "fbcompile calibration (fresh vs cached external part)\n" + tabulate(rows, headers="keys", floatfmt=".4f")


def calibrate(model: torch.nn.Module, generate: Callable[[torch.nn.Module], torch.Tensor],
              config: Config | None = None) -> Calibration:
    """Run ``generate`` on a probed copy of ``model`` (exact) and measure, at every reuse step of
    ``config``'s policy (default ``"block"``), each head's fresh external part against the cached one."""
    config = config or Config(refresh="block", compiler="eager")
    if config.refresh == "always" or config.reuse_plan is not None:
        raise ValueError("calibrate measures full reuse: use a reuse policy without a reuse_plan")
    sums: dict = defaultdict(lambda: [0, 0.0, 0.0, None, None])  # (site, step) -> calls, layer cos/drift, head sums

    def observe(graph, site, step, fresh, cached):
        if cached is None:
            return
        o_e, l_e = fresh[0].float(), fresh[1].float()
        c_o, c_l = cached[0].float(), cached[1].float()
        heads = o_e.shape[1]
        head_cos = torch.nn.functional.cosine_similarity(
            o_e.transpose(0, 1).reshape(heads, -1), c_o.transpose(0, 1).reshape(heads, -1), dim=1)
        head_drift = (l_e - c_l).abs().transpose(0, 1).reshape(heads, -1).mean(1)
        entry = sums[(site, step)]
        entry[0] += 1
        entry[1] += _cos(o_e, c_o)
        entry[2] += (l_e - c_l).abs().mean().item()
        entry[3] = head_cos if entry[3] is None else entry[3] + head_cos
        entry[4] = head_drift if entry[4] is None else entry[4] + head_drift

    session = Session(config)
    session.observer = observe
    _run(model, generate, session)
    if not sums:
        raise ValueError("calibration saw no reuse step: does generate call the model more than once per block?")
    sites = 1 + max(site for site, _ in sums)
    steps = max(step for _, step in sums)
    missing = [(i, s) for i in range(sites) for s in range(1, steps + 1) if (i, s) not in sums]
    if missing:
        raise ValueError(f"calibration saw no call at (site, step) {missing[:4]}: every step up to {steps} "
                         "must be observed for every site")
    table = [[sums[(i, s)] for s in range(1, steps + 1)] for i in range(sites)]
    return Calibration(cos=[[(e[3] / e[0]).tolist() for e in row] for row in table],
                       lse_drift=[[(e[4] / e[0]).tolist() for e in row] for row in table],
                       layer_cos=[[e[1] / e[0] for e in row] for row in table],
                       layer_lse_drift=[[e[2] / e[0] for e in row] for row in table],
                       calls=[[e[0] for e in row] for row in table])


def _run(model, generate, session: Session) -> torch.Tensor:
    """``generate`` on a copy of ``model`` whose forward is compiled into ``session``."""
    clone = copy.deepcopy(model).eval()
    clone.forward = torch.compile(clone.forward, backend=make_backend(session), dynamic=None)
    torch._dynamo.reset()
    with torch.no_grad():
        return generate(clone)
