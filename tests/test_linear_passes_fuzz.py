"""The linear passes keep what a program computes (hypothesis): random programs of linears over shared
inputs, activations, products, residual adds and writes in place, traced by dynamo and rewritten by
``gated_linears``, ``group_linears``, ``residual_linears`` and ``linear_partials`` (two partial sums) in
the backend's order, forced on.

Each pass moves a linear's work to one op at another node (the first of a group, the sum after a
linear), so an input written in place in between would be read at the wrong time: a write scales its
tensor by 1.5, and a value read before or after it is off by a third. On the CPU the ops run the
model's own linears, but a grouped linear's output becomes a column slice of one tensor, which a linear
reading it may round otherwise (another bf16 kernel for a strided input), and partial sums in fp32 are
rounded once more: every output must agree to bf16 rounding, 2e-2. Profiles as ``test_fuzz.py``
(``FBCOMPILE_FUZZ=long`` for 500 random examples).
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st

from fbcompile.passes import gated_linears as gt
from fbcompile.passes import group_linears as gl
from fbcompile.passes import linear_partials as lp
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
        kind = draw(st.sampled_from(["linear", "linear", "linear", "gated", "act", "mul", "add", "add", "write"]))
        src = draw(st.integers(0, count - 1) | st.integers(0, min(1, count - 1)))
        if kind == "linear":
            steps.append((kind, src, draw(st.integers(0, WEIGHTS - 1)), draw(st.booleans())))
        elif kind == "act":
            steps.append((kind, src, draw(st.sampled_from(sorted(ACTS)))))
        elif kind == "gated":  # act(linear(v)) * linear(v) in one step (written apart, the pattern is rare)
            steps.append((kind, src, draw(st.sampled_from(sorted(ACTS))), *draw(st.permutations(range(WEIGHTS)))[:2]))
        elif kind in ("mul", "add"):  # often with the last value (a residual add after a linear)
            steps.append((kind, src, draw(st.just(count - 1) | st.integers(0, count - 1))))
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
        read = {i for step in steps if step[0] != "write"
                for i in (step[1:3] if step[0] in ("mul", "add") else step[1:2])}
        made = 1 + sum(step[0] != "write" for step in steps)
        self.outputs = [i for i in range(made) if i not in read]  # what no step reads: a pass's pattern
        # needs its intermediate values used once (a linear before its residual add, the gate's activation)

    def forward(self, x):
        values = [x * 2]
        for step in self.steps:
            kind, src = step[:2]
            if kind == "linear":
                values.append(F.linear(values[src], self.weights[step[2]], self.biases[step[2]] if step[3] else None))
            elif kind == "act":
                values.append(ACTS[step[2]](values[src]))
            elif kind == "gated":
                values.append(ACTS[step[2]](F.linear(values[src], self.weights[step[3]]))
                              * F.linear(values[src], self.weights[step[4]]))
            elif kind == "mul":
                values.append(values[src] * values[step[2]])
            elif kind == "add":
                values.append(values[src] + values[step[2]])
            else:
                values[src].mul_(1.5)
        return tuple(values[i] for i in self.outputs)


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
        made = {"gated": gt.gated_linears(gm, ALWAYS), "grouped": gl.group_linears(gm, ALWAYS),
                "residual": rl.residual_linears(gm, ALWAYS),
                "partials": lp.linear_partials(gm, ALWAYS, lambda x, weights: 2)}
        got = gm(*inputs)
    lines = [line for rewrites in made.values() for line in rewrites]
    note(repr(lines))
    for name, rewrites in made.items():
        event(f"{name}: {'rewritten' if rewrites else 'none'}")  # --hypothesis-show-statistics
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected)):
        error = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()
        assert error < 2e-2, (i, error, lines)
