"""fbcompile.fidelity: the measurements mean what they say."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import fbcompile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.block_diffusion_lm import make_tiny_model  # noqa: E402

PROMPT = torch.randint(0, 200, (1, 10), generator=torch.Generator().manual_seed(0))


def _steps(changing: bool):
    """A generate-like callable: 4 forwards over one cache; the block changes between them or not."""
    def run(model):
        _, cache = model(PROMPT, use_cache=True)
        x = torch.full((1, 8), model.config.mask_token_id)
        outs = []
        for step in range(4):
            if changing:
                x[0, step] = 7 + step
            outs.append(model(x, past_key_values=cache)[0].argmax(-1))
        return torch.cat(outs, 1)
    return run


def test_unchanged_block_means_perfect_reuse():
    report = fbcompile.fidelity(make_tiny_model(), _steps(changing=False))
    assert report.records and report.refreshes == 1 and report.calls == 4
    assert all(abs(r["cos_external"] - 1) < 1e-6 and abs(r["cos_internal"] - 1) < 1e-6 for r in report.records)
    assert max(r["reuse_rel_error"] for r in report.records) < 1e-6
    assert report.token_agreement == 1.0 and report.first_divergence == 32


def test_changing_block_is_measured(tmp_path):
    report = fbcompile.fidelity(make_tiny_model(), _steps(changing=True), out=str(tmp_path))
    assert len(report.per_site) == 2 and all(row["steps"] == 3 for row in report.per_site)
    assert all(r["reuse_rel_error"] > 1e-4 for r in report.records)  # reuse is an approximation here
    assert all(-1 <= r["cos_external"] <= 1 + 1e-6 for r in report.records)
    assert {p.name for p in tmp_path.iterdir()} >= {"fidelity.md", "fidelity_records.csv", "fidelity.png"}
    assert "token agreement" in (tmp_path / "fidelity.md").read_text()


def test_flashblock_observation_on_the_trained_model():
    """On the committed trained checkpoint the external part stays, the internal part moves."""
    from examples.tiny_trained import encode, load_tiny_trained

    prompt = encode(b"import os\n\ndef read_config(path):\n    ")[None].long()
    report = fbcompile.fidelity(load_tiny_trained(), lambda m: m.generate(prompt, num_blocks=3, steps=8),
                                prompt_length=prompt.shape[1])
    assert (report.refreshes, report.calls) == (6, 27)  # per block: 1 refresh, 7 reuses, 1 exact save pass
    external = [row["mean_cos_external"] for row in report.per_site]
    internal = [row["mean_cos_internal"] for row in report.per_site]
    # measured on CPU (torch 2.13): external 0.76-0.93 per layer, internal 0.25-0.45
    assert sum(external) / len(external) > 0.8
    assert all(e > i + 0.2 for e, i in zip(external, internal)), (external, internal)
    assert all(row["max_reuse_rel_error"] < 1.5 for row in report.per_site)
