"""The linear passes keep what a program computes (hypothesis): random programs of linears over shared
inputs, activations, products, residual adds and writes in place, traced by dynamo and rewritten by
``gated_linears``, ``group_linears`` and ``residual_linears`` in the backend's order, forced on.

Each pass moves a linear's work to one op at another node (the first of a group, the sum after a
linear), so an input written in place in between would be read at the wrong time: a write scales its
tensor by 1.5, and a value read before or after it is off by a third. On the CPU the ops run the
model's own linears, but a grouped linear's output becomes a column slice of one tensor, which a linear
reading it may round otherwise (another bf16 kernel for a strided input): every output must agree to
bf16 rounding, 2e-2. Profiles as ``test_fuzz.py`` (``FBCOMPILE_FUZZ=long`` for 500 random examples).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from fbcompile.passes import gated_linears as gt
from fbcompile.passes import group_linears as gl
from fbcompile.passes import residual_linears as rl
from test_group_linears import ALWAYS, BF16, _traced

WIDTH, WEIGHTS = 64, 4
ACTS = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu}
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("linear-passes-ci", max_examples=60, derandomize=True, database=None, **_COMMON)
settings.register_profile("linear-passes-long", max_examples=500, **_COMMON)
PROFILE = "linear-passes-long" if os.environ.get("FBCOMPILE_FUZZ") == "long" else "linear-passes-ci"


@st.composite
def programs(draw) -> list[tuple]:
    """Steps over a list of values (value 0: the input times 2, so a write never reaches the caller's
    tensor); each step but ``write`` appends a value. Sources lean to the first values, so that several
    linears read one input."""
    steps, count = [], 1
    for _ in range(draw(st.integers(3, 10))):
        kind = draw(st.sampled_from(["linear", "linear", "linear", "act", "mul", "add", "write"]))
        src = draw(st.integers(0, count - 1) | st.integers(0, min(1, count - 1)))
        if kind == "linear":
            steps.append((kind, src, draw(st.integers(0, WEIGHTS - 1)), draw(st.booleans())))
        elif kind == "act":
            steps.append((kind, src, draw(st.sampled_from(sorted(ACTS)))))
        elif kind in ("mul", "add"):
            steps.append((kind, src, draw(st.integers(0, count - 1))))
        else:
            steps.append((kind, src))
        count += kind != "write"
    return steps


class Program(nn.Module):
    def __init__(self, steps: list[tuple]):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.steps = steps
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(WIDTH, WIDTH, generator=g) / 8)
                                        for _ in range(WEIGHTS))
        self.biases = nn.ParameterList(nn.Parameter(torch.randn(WIDTH, generator=g)) for _ in range(WEIGHTS))

    def forward(self, x):
        values = [x * 2]
        for step in self.steps:
            kind, src = step[:2]
            if kind == "linear":
                values.append(F.linear(values[src], self.weights[step[2]], self.biases[step[2]] if step[3] else None))
            elif kind == "act":
                values.append(ACTS[step[2]](values[src]))
            elif kind == "mul":
                values.append(values[src] * values[step[2]])
            elif kind == "add":
                values.append(values[src] + values[step[2]])
            else:
                values[src].mul_(1.5)
        return tuple(values)


@settings.get_profile(PROFILE)
@given(steps=programs())
# the three forms the passes once moved across a write (each computed the second linear of the unwritten input)
@example(steps=[("linear", 0, 0, False), ("write", 0), ("linear", 0, 1, False)])                    # group
@example(steps=[("linear", 0, 0, False), ("act", 1, "silu"), ("write", 0), ("linear", 0, 1, False),
                ("mul", 2, 3)])                                                                        # gated
@example(steps=[("linear", 0, 0, True), ("write", 0), ("add", 0, 1)])                                # residual
# a group over another group's output: the pass built the second over the replaced node (a lint error)
@example(steps=[("linear", 0, 0, False), ("linear", 0, 1, False), ("linear", 1, 2, False), ("linear", 1, 3, False)])
def test_linear_passes_keep_what_the_program_computes(steps):
    note(repr(steps))
    torch._dynamo.reset()
    gm, inputs = _traced(Program(steps).to(BF16), torch.randn(2, 8, WIDTH, dtype=BF16))
    with torch.no_grad():
        expected = gm(*inputs)
        lines = gt.gated_linears(gm, ALWAYS) + gl.group_linears(gm, ALWAYS) + rl.residual_linears(gm, ALWAYS)
        got = gm(*inputs)
    note(repr(lines))
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        error = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()
        assert error < 2e-2, (i, error, lines)
