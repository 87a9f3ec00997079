"""The proof that a mask built from the cached length is the same at any length
(``fbcompile/passes/length_invariance.py``), against the masks themselves: wherever it proves a mask's
cached part (columns ``[0, n)``) or block part (columns ``L + j``) the same, the mask computed at a
capacity ``C > n`` must equal the mask computed at ``n`` there - over random masks of a small grammar
(the positions HF, SDAR and block-diffusion models compare) and many lengths."""
from __future__ import annotations

import sympy
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import itertools
import operator

from fbcompile.passes import length_invariance
from fbcompile.passes.graph_utils import op_name
from fbcompile.passes.length_invariance import LENGTH, MaskEvaluator, Unproved, prove_same_at_any_length

BLOCK = 8

TERMS = ["kv", "q", "kv // 4", "q // 4", "kv - q", "block_index"]


def _mask_function(source: str):
    """``f(past) -> (cached part, block part)`` of the mask ``source`` over ``L = past.shape[0]`` cached keys
    and a block of BLOCK (a fresh function each time: dynamo traces it anew)."""
    code = f"""
def mask_parts(past):
    length = past.shape[0]
    kv = torch.arange(length + {BLOCK})[None, :]
    q = (torch.arange({BLOCK}) + length)[:, None]
    block_index = torch.arange({BLOCK})[:, None]
    block_key = torch.arange({BLOCK})[None, :]
    mask = ({source}).expand({BLOCK}, length + {BLOCK})
    return mask.narrow(-1, 0, length), mask.narrow(-1, length, {BLOCK})
"""
    scope = {"torch": torch}
    exec(code, scope)  # noqa: S102 - a test's own generated source
    return scope["mask_parts"]


def _traced(function):
    """The dynamo graph of ``function`` with the cached length symbolic."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    compiled = torch.compile(function, backend=backend, dynamic=True, fullgraph=True)
    compiled(torch.zeros(21))
    return graphs[-1]


def _proved(function) -> tuple[bool, bool]:
    """Whether the proof finds the cached part and the block part the same at any length."""
    gm = _traced(function)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    symbols = {s for node in placeholders for value in [node.meta.get("example_value")]
               for s in (value.node.expr.free_symbols if isinstance(value, torch.SymInt) else
                         set().union(*(sympy.sympify(d.node.expr if isinstance(d, torch.SymInt) else d).free_symbols
                                       for d in getattr(value, "shape", ()))))}
    assert len(symbols) == 1, symbols
    cone = {node for node in gm.graph.nodes if node.op == "call_function" or node.op == "call_method"}
    narrows = [node for node in gm.graph.nodes if op_name(node) == "narrow"]
    results = []
    for narrow, cached in zip(narrows, (True, False)):
        try:
            prove_same_at_any_length(MaskEvaluator({next(iter(symbols)): LENGTH}, {}, cone), narrow, cached)
            results.append(True)
        except Unproved:
            results.append(False)
    return tuple(results)


comparisons = st.sampled_from(["<=", "<", ">=", ">", "==", "!="])
offsets = st.integers(-6, 6)


@st.composite
def relations(draw):
    a, b = draw(st.sampled_from(TERMS)), draw(st.sampled_from(TERMS))
    return f"(({a}) {draw(comparisons)} ({b}) + {draw(offsets)})"


@st.composite
def masks(draw):
    mask = draw(relations())
    for _ in range(draw(st.integers(0, 2))):
        mask = f"({mask} {draw(st.sampled_from(['&', '|']))} {draw(relations())})"
    if draw(st.booleans()):
        mask = f"~{mask}"
    form = draw(st.sampled_from(["plain", "additive", "ones then block"]))
    if form == "additive":
        mask = f"torch.where({mask}, 0.0, float('-inf'))"
    elif form == "ones then block":  # a cached part of ones, the block's part from the block's own indices
        inner = mask.replace("kv", "block_key").replace("q", "block_index")
        mask = f"torch.cat([torch.ones({BLOCK}, length, dtype=torch.bool), {inner}.expand({BLOCK}, {BLOCK})], -1)"
    return mask


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=masks())
@example(source="kv <= q")                       # HF's causal mask: both parts proved
@example(source="(kv <= q) & (kv > q - 24)")     # a sliding window: its cached part moves with the length
@example(source="kv // 4 <= q // 4")             # block-causal positions: not proved
@torch.no_grad()
def test_a_proved_part_of_a_mask_is_the_same_at_a_capacity(source):
    function = _mask_function(source)
    cached_same, block_same = _proved(function)
    if source == "kv <= q":
        assert cached_same and block_same
    if "> q - 24" in source:
        assert not cached_same
    for n in (1, 5, 13, 40):
        at_length = function(torch.zeros(n))
        for capacity in (n, n + 1, n + 7, 3 * n + 11):
            at_capacity = function(torch.zeros(capacity))
            if cached_same:
                assert torch.equal(at_capacity[0][..., :n], at_length[0]), (source, n, capacity)
            if block_same:
                assert torch.equal(at_capacity[1], at_length[1]), (source, n, capacity)


@torch.no_grad()
def test_the_proof_decides_the_forms_models_use():
    """HF's causal mask, an additive one and SDAR's ones joined to a sub-block mask are proved in both
    parts; a window over the most recent cached keys is not proved in its cached part (those columns move
    with the length), block-causal positions not in either."""
    proved = {source: _proved(_mask_function(source)) for source in [
        "kv <= q",
        "torch.where(kv <= q, 0.0, float('-inf'))",
        f"torch.cat([torch.ones({BLOCK}, length, dtype=torch.bool), (block_key // 4 <= block_index // 4)"
        f".expand({BLOCK}, {BLOCK})], -1)",
        "kv >= q - 16",
        "kv // 4 <= q // 4"]}
    assert list(proved.values()) == [(True, True), (True, True), (True, True), (False, True), (False, False)], proved


def _from_count(function):
    """Whether the proof in count mode finds each part the same with the length's values from the count,
    and the graph rewritten so (``values_from_count``): ``rewritten(capacity, count)``."""
    gm = _traced(function)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    values = [node.meta.get("example_value") for node in placeholders]
    sized = next(i for i, value in enumerate(values) if isinstance(value, torch.SymInt))  # dynamo passes the length
    symbol = sympy.sympify(values[sized].node.expr)
    cone = {node for node in gm.graph.nodes if node.op == "call_function" or node.op == "call_method"}
    proved = []
    for narrow, cached in zip([node for node in gm.graph.nodes if op_name(node) == "narrow"], (True, False)):
        try:
            prove_same_at_any_length(MaskEvaluator({symbol: LENGTH}, {}, cone, count=True), narrow, cached)
            proved.append(True)
        except Unproved:
            proved.append(False)
    with gm.graph.inserting_after(placeholders[-1]):
        count = gm.graph.placeholder("count")
    length = lambda graph: placeholders[sized]  # noqa: E731
    length_invariance.values_from_count(gm, cone, {symbol}, length, count)
    gm.recompile()

    def rewritten(capacity: int, n: int):
        args = [torch.zeros(capacity) if isinstance(v, torch.Tensor) else capacity for v in values]
        return gm(*args, torch.tensor([n]))
    return tuple(proved), rewritten


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=masks())
@example(source="(kv <= q) & (kv > q - 24)")     # a sliding window: proved from the count
@example(source="kv // 4 <= q // 4")             # block-causal positions: proved from the count
@example(source="kv - q + block_index <= 0")
@torch.no_grad()
def test_a_part_proved_from_the_count_is_the_mask_at_the_length(source):
    """Where the proof in count mode (the length's values read from the count: the block's key positions
    ``C + j`` become ``n + j``) proves a part of a mask, the rewritten graph run at a capacity ``C`` with
    count ``n`` computes the mask at ``n`` there."""
    function = _mask_function(source)
    (cached_same, block_same), rewritten = _from_count(function)
    if source in ("(kv <= q) & (kv > q - 24)", "kv // 4 <= q // 4"):
        assert cached_same and block_same
    for n in (1, 5, 13, 40):
        at_length = function(torch.zeros(n))
        for capacity in (n, n + 1, n + 7, 3 * n + 11):
            at_capacity = rewritten(capacity, n)
            if cached_same:
                assert torch.equal(at_capacity[0][..., :n], at_length[0]), (source, n, capacity)
            if block_same:
                assert torch.equal(at_capacity[1], at_length[1]), (source, n, capacity)


@settings(max_examples=400, deadline=None)
@given(coefficients=st.tuples(*[st.integers(-2, 2)] * 4), constant=st.integers(-4, 4), cached=st.booleans(),
       dynamic=st.booleans(),
       compare=st.sampled_from([operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne]))
def test_a_decided_comparison_holds_or_fails_at_every_length(coefficients, constant, cached, dynamic, compare):
    """Where the proof decides ``a*L + b*column + c*i + d*size + constant`` against 0 over the cached
    columns (``k < n <= L``) or the block's (``L + j``), with the block's length and the index's range
    ``[0, size)`` fixed (4) or dynamic (a symbol), the comparison holds (or fails) at every length,
    column, index and size: checked by enumerating them."""
    index, size = sympy.Symbol("i0", integer=True), sympy.Symbol("s9", integer=True)
    a, b, c, d = coefficients
    column = length_invariance._KEY if cached else LENGTH + length_invariance._BLOCK
    top = size - 1 if dynamic else 3
    region = length_invariance._region(cached, {index: top, **({} if cached else {length_invariance._BLOCK: top})})
    expr = a * LENGTH + b * column + c * index + (d * size if dynamic else 0) + constant
    decided = length_invariance._compare(compare, expr, 0, region)
    if decided not in (sympy.true, sympy.false):
        return
    for n, spare, extent in itertools.product(range(1, 7), range(5), range(1, 5) if dynamic else [4]):
        for i, position in itertools.product(range(extent), range(n) if cached else range(extent)):
            length = n + spare
            value = a * length + b * (position if cached else length + position) + c * i + \
                (d * extent if dynamic else 0) + constant
            assert compare(value, 0) == bool(decided), (n, length, extent, i, position, value)
