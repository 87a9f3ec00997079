"""fbcompile's change to Inductor's heuristics: persistent row reductions over few rows (a block step's
residual add and RMSNorm), everything else as Inductor decides."""
from types import SimpleNamespace

import pytest
import sympy
import torch

import fbcompile
from fbcompile.backends.inductor_choices import FEW_ROWS, PERSISTENT_NUMEL, block_step_choices, persistent_row_reduction
from torch._inductor.runtime.hints import ReductionHint


@pytest.mark.parametrize("inner, rows, numel, want", [
    (True, 32, 1536, True),               # Qwen2-1.5B's RMSNorm at a block of 32: Inductor would loop twice
    (True, 256, 4096, True),              # batch 8, an 8B model's hidden size
    (True, FEW_ROWS, PERSISTENT_NUMEL, True),
    (True, FEW_ROWS + 1, 1536, False),    # a prefill's many rows: Inductor's rule
    (True, 32, PERSISTENT_NUMEL + 1, False),
    (False, 32, 1536, False),             # not over the contiguous dim
    (True, None, 1536, False),            # symbolic sizes
    (True, 32, None, False),
])
def test_persistent_row_reduction_rule(inner, rows, numel, want):
    assert persistent_row_reduction(inner, rows, numel) is want


def _features(hint, rows, numel):
    return SimpleNamespace(get_reduction_hint=lambda: hint, numel=rows, reduction_numel=numel)


def test_block_step_choices_make_few_row_reductions_persistent(monkeypatch):
    """Sizes come as sympy expressions: numbers count, symbols do not (those go to Inductor's rule)."""
    from torch._inductor.choices import InductorChoices

    choices = block_step_choices()
    assert choices is block_step_choices()  # one instance: Inductor's cache key reads its uuid
    assert "fbcompile" in choices.uuid()
    assert choices.should_use_persistent_reduction(_features(ReductionHint.INNER, sympy.Integer(32),
                                                             sympy.Integer(1536)), False)
    calls = []

    def inductor_rule(features, cooperative_reduction):
        calls.append((features.numel, cooperative_reduction))
        return "inductor's"
    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction", staticmethod(inductor_rule))
    s = sympy.Symbol("s0", positive=True, integer=True)
    assert choices.should_use_persistent_reduction(_features(ReductionHint.INNER, s, 1536), False) == "inductor's"
    assert choices.should_use_persistent_reduction(_features(ReductionHint.OUTER, 32, 1536), False) == "inductor's"
    assert choices.should_use_persistent_reduction(_features(ReductionHint.INNER, 32, 1536), True) == "inductor's"
    assert calls == [(s, False), (32, False), (32, True)]


def test_the_choices_are_installed_while_inductor_compiles_a_cuda_graph_only(monkeypatch):
    """While ``compile_fx`` runs on a graph with CUDA inputs, ``V.choices`` is fbcompile's; a CPU graph's
    compile sees Inductor's own, and after either the handler is what it was."""
    from torch._inductor.virtualized import V
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fbcompile.backends import compiler
    from fbcompile.backends.session import Session

    seen = []

    def compile_fx(gm, example_inputs, config_patches=None):
        seen.append(V.choices)
        return gm.forward

    before = V.choices
    with FakeTensorMode():
        on_cuda = [torch.empty(2, device="cuda")]
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    compiler._inductor(compile_fx, gm, on_cuda, Session(fbcompile.Config()))
    compiler._inductor(compile_fx, gm, [torch.ones(2)], Session(fbcompile.Config()))
    assert seen[0] is block_step_choices() and seen[1] is before
    assert V.choices is before
