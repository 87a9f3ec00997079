"""The split-attention primitives against an independent float64 reference.

Checked for both ``fbcompile.kernels.reference`` and the custom ops ``torch.ops.fbcompile.*``
(which run the reference on CPU): GQA, masks of every form and broadcast, fully masked rows, low
precision, the split identity ``attn(cat(Ke, Ki)) == merge(attn(Ke), attn(Ki))``, the op contracts
(``opcheck``, Inductor with dynamic shapes) and the shape errors.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import fbcompile  # noqa: F401  (registers torch.ops.fbcompile.*)
from fbcompile import ops as fbops
from fbcompile.kernels import reference

OPS = torch.ops.fbcompile
NEG_INF = float("-inf")




# --------------------------------------------------------------------------- the plain reference


def ref_attention(q, k, v, mask, scale):
    """float64 ``(out, lse)``: SDPA on replicated KV for ``out``, logsumexp of explicit scores for ``lse``."""
    group = q.shape[1] // k.shape[1]
    q64 = q.double()
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    if m64 is not None:  # SDPA does not take a 1-D mask: broadcast it ourselves
        m64 = m64.expand(*q.shape[:-1], k.shape[2])
    out = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=m64, scale=scale)
    scores = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, NEG_INF) if mask.dtype == torch.bool else scores + m64
    lse = torch.logsumexp(scores, dim=-1)
    dead = torch.isneginf(lse)
    out = torch.where(dead.unsqueeze(-1), 0.0, out)  # a row attending to nothing is 0 by contract
    return out, lse


def ref_merge(out_a, lse_a, out_b, lse_b):
    """float64 merge written independently: softmax weights over the two lse values."""
    lse = torch.logaddexp(lse_a.double(), lse_b.double())
    w_a = torch.exp(lse_a.double() - lse)
    w_b = torch.exp(lse_b.double() - lse)
    out = w_a.unsqueeze(-1) * out_a.double() + w_b.unsqueeze(-1) * out_b.double()
    dead = torch.isneginf(lse).unsqueeze(-1)
    return torch.where(dead, 0.0, out), lse


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


def check_lse(lse, expected, dtype):
    assert lse.dtype == torch.float32
    assert lse.shape == expected.shape
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected))
    assert not torch.isnan(lse).any()
    finite = torch.isfinite(expected)
    # lse is computed in fp32 from the same (rounded) inputs whatever the dtype
    torch.testing.assert_close(lse[finite].double(), expected[finite], rtol=1e-5, atol=1e-4)


def check_out(out, expected, dtype):
    assert out.dtype == dtype
    assert out.shape == expected.shape
    assert not torch.isnan(out).any()
    assert rel_err(out, expected) < tol(dtype), rel_err(out, expected)


# --------------------------------------------------------------------------- masks


def make_mask(kind, B, Hq, M, N, gen, dtype=torch.float32):
    """A mask over N keys for M queries that sit at the end of the key sequence."""
    if kind == "none":
        return None
    if kind == "bool":  # full shape, random
        return torch.rand(B, Hq, M, N, generator=gen) > 0.3
    if kind == "additive":  # full shape, finite
        return torch.randn(B, Hq, M, N, generator=gen).to(dtype)
    if kind == "window":  # sliding window of width 5 ending at each query's position
        pos_q = torch.arange(N - M, N)[:, None]
        pos_k = torch.arange(N)[None, :]
        return ((pos_k <= pos_q) & (pos_k > pos_q - 5))[None, None]
    if kind == "pad_b11n":  # [B, 1, 1, N] bool left padding, a different length per batch row
        pad = torch.randint(0, max(1, N // 2), (B,), generator=gen)
        return (torch.arange(N)[None, :] >= pad[:, None])[:, None, None, :]
    if kind == "add_11mn":  # [1, 1, M, N] float with -inf entries
        m = torch.randn(1, 1, M, N, generator=gen)
        m = m.masked_fill(torch.rand(1, 1, M, N, generator=gen) < 0.25, NEG_INF)
        m[..., -1] = 0.0  # every query sees its last key: no dead rows here
        return m.to(dtype)
    if kind == "vec_n":  # [N] additive key bias with -inf padding
        m = torch.randn(N, generator=gen)
        m[: N // 3] = NEG_INF
        return m.to(dtype)
    raise ValueError(kind)


# B, Hq, Hkv, M, N, D, Dv, mask
CASES = [
    (1, 4, 4, 1, 1, 16, 16, "none"),          # a single query over a single key
    (2, 8, 4, 7, 33, 16, 16, "bool"),         # GQA 2
    (3, 8, 2, 64, 129, 64, 64, "additive"),   # GQA 4, odd key length
    (1, 8, 1, 16, 57, 128, 128, "window"),    # GQA 8 (MQA), sliding window
    (2, 4, 1, 5, 31, 64, 32, "pad_b11n"),     # Dv != D
    (2, 2, 2, 33, 65, 16, 16, "add_11mn"),
    (3, 16, 2, 3, 17, 16, 16, "vec_n"),       # GQA 8
    (1, 4, 2, 64, 64, 128, 128, "none"),
    (2, 6, 3, 9, 10, 64, 64, "bool"),
]


def case_id(c):
    return "B{}-H{}/{}-M{}-N{}-D{}x{}-{}".format(*c)


def make_qkv(B, Hq, Hkv, M, N, D, Dv, gen, dtype):
    q = torch.randn(B, Hq, M, D, generator=gen).to(dtype)
    k = torch.randn(B, Hkv, N, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, N, Dv, generator=gen).to(dtype)
    return q, k, v


IMPLS = {"reference": reference.attention_lse, "op": OPS.attention_lse}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_attention_lse_matches_reference(case, dtype, impl):
    B, Hq, Hkv, M, N, D, Dv, kind = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    q, k, v = make_qkv(B, Hq, Hkv, M, N, D, Dv, gen, dtype)
    mask = make_mask(kind, B, Hq, M, N, gen, dtype)
    scale = D ** -0.5
    out, lse = IMPLS[impl](q, k, v, mask, scale)
    exp_out, exp_lse = ref_attention(q, k, v, mask, scale)
    check_out(out, exp_out, dtype)
    check_lse(lse, exp_lse, dtype)


def test_non_default_scale_and_noncontiguous_inputs():
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 9, 8, 16, generator=gen).transpose(1, 2)   # [2, 8, 9, 16], strided
    k = torch.randn(2, 11, 2, 16, generator=gen).transpose(1, 2)  # bshd -> bhsd
    v = torch.randn(2, 11, 2, 24, generator=gen).transpose(1, 2)
    keep = torch.rand(2, 1, 1, 11, generator=gen) > 0.2
    keep[..., 0] = True
    mask = keep.expand(2, 8, 9, 11)  # zero strides
    for fn in IMPLS.values():
        out, lse = fn(q, k, v, mask, 0.7)
        exp_out, exp_lse = ref_attention(q, k, v, mask, 0.7)
        check_out(out, exp_out, torch.float32)
        check_lse(lse, exp_lse, torch.float32)


def test_reference_fails_on_a_wrong_answer():
    """The comparison is not vacuous: a wrong GQA grouping (repeat instead of repeat_interleave) is caught."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(1, 4, 2, 5, 9, 16, 16, gen, torch.float32)
    out, _ = OPS.attention_lse(q, k, v, None, 0.25)
    wrong = F.scaled_dot_product_attention(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), scale=0.25)
    assert rel_err(out, wrong) > 1e-2
    assert rel_err(out, ref_attention(q, k, v, None, 0.25)[0]) < 1e-5


# --------------------------------------------------------------------------- fully masked rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("form", ["bool", "float"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fully_masked_rows(impl, form, dtype):
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(2, 4, 2, 6, 13, 16, 16, gen, dtype)
    allowed = torch.rand(2, 4, 6, 13, generator=gen) > 0.5
    allowed[..., 0] = True
    allowed[0, 1, 2] = False        # one dead row
    allowed[1, :, 5] = False        # a dead query position in every head
    allowed[1, 3] = False           # a whole dead head
    mask = allowed if form == "bool" else torch.where(allowed, 0.0, NEG_INF).to(dtype)
    out, lse = IMPLS[impl](q, k, v, mask, 0.25)
    dead = ~allowed.any(-1)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), dead)
    assert (out[dead] == 0).all()
    assert (out[~dead] != 0).any(-1).all()
    exp_out, exp_lse = ref_attention(q, k, v, mask, 0.25)
    check_out(out, exp_out, dtype)
    check_lse(lse, exp_lse, dtype)


def test_no_keys_at_all_is_a_dead_row():
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 8)
    out, lse = OPS.attention_lse(q, k, v, None, 0.25)
    assert out.shape == (1, 2, 3, 8) and (out == 0).all()
    assert torch.isneginf(lse).all()


MERGES = {"reference": reference.merge_lse, "op": OPS.merge_lse}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", list(MERGES))
def test_merge_with_one_dead_side_returns_the_other_exactly(impl, dtype):
    merge = MERGES[impl]
    gen = torch.Generator().manual_seed(5)
    out_a = torch.randn(2, 3, 4, 16, generator=gen).to(dtype)
    out_b = torch.randn(2, 3, 4, 16, generator=gen).to(dtype)
    lse_a = torch.randn(2, 3, 4, generator=gen) * 30
    lse_b = torch.randn(2, 3, 4, generator=gen) * 30
    dead = torch.full_like(lse_a, NEG_INF)
    zeros = torch.zeros_like(out_a)

    out, lse = merge(out_a, lse_a, zeros, dead)
    assert torch.equal(out, out_a) and torch.equal(lse, lse_a)
    out, lse = merge(zeros, dead, out_b, lse_b)
    assert torch.equal(out, out_b) and torch.equal(lse, lse_b)
    out, lse = merge(zeros, dead, zeros, dead)
    assert (out == 0).all() and torch.isneginf(lse).all()

    # row-wise: some rows dead on one side, some on the other, some on both
    sel_a = torch.rand(2, 3, 4, generator=gen) < 0.3
    sel_b = torch.rand(2, 3, 4, generator=gen) < 0.3
    la, lb = lse_a.masked_fill(sel_a, NEG_INF), lse_b.masked_fill(sel_b, NEG_INF)
    oa = out_a.masked_fill(sel_a.unsqueeze(-1), 0)
    ob = out_b.masked_fill(sel_b.unsqueeze(-1), 0)
    out, lse = merge(oa, la, ob, lb)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    only_a, only_b = sel_b & ~sel_a, sel_a & ~sel_b
    assert torch.equal(out[only_a], oa[only_a]) and torch.equal(lse[only_a], la[only_a])
    assert torch.equal(out[only_b], ob[only_b]) and torch.equal(lse[only_b], lb[only_b])
    both = sel_a & sel_b
    assert (out[both] == 0).all() and torch.isneginf(lse[both]).all()
    exp_out, exp_lse = ref_merge(oa, la, ob, lb)
    check_out(out, exp_out, dtype)
    check_lse(lse, exp_lse, dtype)


@pytest.mark.parametrize("impl", list(MERGES))
def test_merge_is_stable_for_far_apart_lse(impl):
    out_a, out_b = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    lse_a = torch.tensor([[[1000.0, -1000.0, 80.0], [0.0, 500.0, -88.0]]])
    lse_b = torch.tensor([[[-1000.0, 1000.0, 90.0], [0.0, 500.0, -100.0]]])
    out, lse = MERGES[impl](out_a, lse_a, out_b, lse_b)
    exp_out, exp_lse = ref_merge(out_a, lse_a, out_b, lse_b)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    check_out(out, exp_out, torch.float32)
    check_lse(lse, exp_lse, torch.float32)


# --------------------------------------------------------------------------- the split identity


def _split_mask(mask, N, cut):
    if mask is None or mask.shape[-1] == 1:
        return mask, mask
    return mask[..., :cut], mask[..., cut:]


def _random_problem(rng: random.Random, gen: torch.Generator):
    Hkv = rng.choice([1, 2, 3])
    ratio = rng.choice([1, 2, 4, 8])
    B, M = rng.randint(1, 3), rng.randint(1, 64)
    D = rng.choice([16, 64, 128])
    Dv = D if rng.random() < 0.8 else rng.choice([16, 32])
    Ne, Ni = rng.randint(1, 70), rng.randint(1, 20)
    kind = rng.choice(["none", "bool", "additive", "window", "pad_b11n", "add_11mn", "vec_n"])
    q, k, v = make_qkv(B, Hkv * ratio, Hkv, M, Ne + Ni, D, Dv, gen, torch.float32)
    mask = make_mask(kind, B, Hkv * ratio, M, Ne + Ni, gen)
    return q, k, v, mask, Ne, D ** -0.5


@pytest.mark.parametrize("seed", range(4))
def test_split_identity(seed):
    """attention(cat(Ke, Ki)) == merge(attention(Ke), attention(Ki)) == attention_merge_lse(.., attention(Ke))."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    for _ in range(8):
        q, k, v, mask, Ne, scale = _random_problem(rng, gen)
        me, mi = _split_mask(mask, k.shape[2], Ne)
        exp_out, exp_lse = ref_attention(q, k, v, mask, scale)

        full_out, full_lse = OPS.attention_lse(q, k, v, mask, scale)
        o_e, l_e = OPS.attention_lse(q, k[:, :, :Ne], v[:, :, :Ne], me, scale)
        o_i, l_i = OPS.attention_lse(q, k[:, :, Ne:], v[:, :, Ne:], mi, scale)
        merged_out, merged_lse = OPS.merge_lse(o_e, l_e, o_i, l_i)
        fused_out, fused_lse = OPS.attention_merge_lse(q, k[:, :, Ne:], v[:, :, Ne:], mi, scale, o_e, l_e)
        ref_out, ref_lse = reference.attention_merge_lse(q, k[:, :, Ne:], v[:, :, Ne:], mi, scale, o_e, l_e)
        for out, lse in [(full_out, full_lse), (merged_out, merged_lse), (fused_out, fused_lse), (ref_out, ref_lse)]:
            check_out(out, exp_out, torch.float32)
            check_lse(lse, exp_lse, torch.float32)


def test_split_identity_three_parts_dual_cache():
    """A dual cache (prefix, block, suffix): the two external parts merge first, then the block."""
    gen = torch.Generator().manual_seed(21)
    q, k, v = make_qkv(2, 8, 2, 6, 40, 64, 64, gen, torch.float32)
    mask = make_mask("bool", 2, 8, 6, 40, gen)
    cuts = [(0, 15), (21, 40), (15, 21)]  # prefix, suffix, block
    parts = [OPS.attention_lse(q, k[:, :, a:b], v[:, :, a:b], mask[..., a:b], 0.125) for a, b in cuts[:2]]
    o_e, l_e = OPS.merge_lse(*parts[0], *parts[1])
    a, b = cuts[2]
    out, lse = OPS.attention_merge_lse(q, k[:, :, a:b], v[:, :, a:b], mask[..., a:b], 0.125, o_e, l_e)
    exp_out, exp_lse = ref_attention(q, k, v, mask, 0.125)
    check_out(out, exp_out, torch.float32)
    check_lse(lse, exp_lse, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_split_identity_low_precision(dtype):
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(2, 8, 4, 16, 45, 64, 64, gen, dtype)
    mask = make_mask("additive", 2, 8, 16, 45, gen, dtype)
    o_e, l_e = OPS.attention_lse(q, k[:, :, :37], v[:, :, :37], mask[..., :37], 0.125)
    out, lse = OPS.attention_merge_lse(q, k[:, :, 37:], v[:, :, 37:], mask[..., 37:], 0.125, o_e, l_e)
    exp_out, exp_lse = ref_attention(q, k, v, mask, 0.125)
    check_out(out, exp_out, dtype)
    check_lse(lse, exp_lse, dtype)


# --------------------------------------------------------------------------- op contracts


def _opcheck(op, args):
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck is not available")
    # the ops have no autograd formula: the gradient subtests do not apply (inputs need no grad)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    result = torch.library.opcheck(op, args, test_utils=tests)
    assert all(v == "SUCCESS" for v in result.values()), result


def _opcheck_inputs():
    gen = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(2, 4, 2, 5, 11, 16, 8, gen, torch.float32)
    mask = make_mask("pad_b11n", 2, 4, 5, 11, gen)
    o_e, l_e = reference.attention_lse(q, k[:, :, :7], v[:, :, :7], mask[..., :7], 0.25)
    return q, k, v, mask, o_e, l_e


@pytest.mark.parametrize("with_mask", [False, True])
def test_opcheck_attention_lse(with_mask):
    q, k, v, mask, _, _ = _opcheck_inputs()
    _opcheck(OPS.attention_lse.default, (q, k, v, mask if with_mask else None, 0.25))


def test_opcheck_attention_merge_lse():
    q, k, v, mask, o_e, l_e = _opcheck_inputs()
    _opcheck(OPS.attention_merge_lse.default, (q, k[:, :, 7:], v[:, :, 7:], mask[..., 7:], 0.25, o_e, l_e))


def test_opcheck_merge_lse():
    _, _, _, _, o_e, l_e = _opcheck_inputs()
    _opcheck(OPS.merge_lse.default, (o_e, l_e, o_e * 2, l_e - 1))


def test_opcheck_merge_lse_noncontiguous_out():
    """The fake impl once kept out_a's strides while the real op returns a contiguous tensor."""
    _, _, _, _, o_e, l_e = _opcheck_inputs()
    strided = o_e.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, M, H, D] memory order
    _opcheck(OPS.merge_lse.default, (strided, l_e, o_e * 2, l_e - 1))


@pytest.mark.parametrize("triton_ops", ["traced", "opaque"])
def test_plain_pytorch_ops_are_traced_where_the_triton_ops_stay_opaque(triton_ops):
    """``merge_lse`` and ``subtract_lse`` are plain PyTorch on CUDA, which Inductor fuses with their
    neighbours: AOT traces into their bodies (here on the CPU: the reference ops they call) also where
    fbcompile keeps the Triton ops opaque (``decompose_custom_triton_ops=False``, under CUDA graphs)."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def step(q, k, v, o, lse):
        out, lse_e = OPS.attention_lse(q, k, v, None, 0.25)
        merged = OPS.merge_lse(out, lse_e, o, lse)
        return OPS.subtract_lse(*merged, out, lse_e)

    q, k, v, _, o_e, l_e = _opcheck_inputs()
    torch._dynamo.reset()
    with torch._functorch.config.patch(decompose_custom_triton_ops=triton_ops == "traced"), torch.no_grad():
        torch.compile(step, backend=aot_autograd(fw_compiler=keep), fullgraph=True)(q, k, v, o_e, l_e)
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert {"fbcompile.reference_merge_lse.default", "fbcompile.reference_subtract_lse.default"} <= targets, targets
    assert not {"fbcompile.merge_lse.default", "fbcompile.subtract_lse.default"} & targets, targets
    assert ("fbcompile.attention_lse.default" in targets) == (triton_ops == "opaque"), targets


def _three_part_attention(q, k, v, mask, n1, n2):
    o1, l1 = OPS.attention_lse(q, k[:, :, :n1], v[:, :, :n1], mask[..., :n1], 0.125)
    o2, l2 = OPS.attention_lse(q, k[:, :, n1:n2], v[:, :, n1:n2], mask[..., n1:n2], 0.125)
    o_e, l_e = OPS.merge_lse(o1, l1, o2, l2)
    out, lse = OPS.attention_merge_lse(q, k[:, :, n2:], v[:, :, n2:], mask[..., n2:], 0.125, o_e, l_e)
    return out, lse  # only views around the ops: Inductor emits no C++ kernel (quick on CPU)


def test_ops_compile_with_inductor_fullgraph_dynamic():
    """Inductor traces through the ops (``triton_op``): on CPU the output code calls only the opaque
    reference ops, never the public ops themselves."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._inductor.utils import run_and_get_code

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(_three_part_attention, backend=counter, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(13)
    # sizes chosen so no two dims are equal (duck sizing would otherwise specialise on the equality)
    for B, M, N, n1, n2 in [(3, 6, 40, 14, 30), (5, 9, 53, 20, 45)]:
        q, k, v = make_qkv(B, 8, 2, M, N, 64, 64, gen, torch.float32)
        mask = make_mask("additive", B, 8, M, N, gen)
        if counter.frame_count == 0:  # run_and_get_code resets dynamo: only for the first compile
            with _no_compile_caches():
                got, code = run_and_get_code(compiled, q, k, v, mask, n1, n2)
            src = "\n".join(code)
            assert "torch.ops.fbcompile.reference_attention_lse" in src
            assert "torch.ops.fbcompile.attention" not in src and "torch.ops.fbcompile.merge" not in src
        else:
            got = compiled(q, k, v, mask, n1, n2)
        expected = _three_part_attention(q, k, v, mask, n1, n2)
        ref_out, ref_lse = ref_attention(q, k, v, mask, 0.125)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
        check_out(got[0], ref_out, torch.float32)
        check_lse(got[1], ref_lse, torch.float32)
    assert counter.frame_count == 1  # dynamic shapes: one graph for both sizes


def _no_compile_caches():
    """The on-disk compile caches key graphs by op name, not by op implementation: a graph compiled
    elsewhere with an older registration of the same ops would be returned as is."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
    stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
    return stack


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the Triton kernels run natively")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_inductor_launches_the_triton_kernels(dtype):
    """On CUDA the compiled graph launches ``_attn_kernel``/``_reduce_kernel`` itself (no Python op
    call in the output code), one graph serves every cache length (symbolic key count), and the
    result matches the float64 reference."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._inductor.utils import run_and_get_code

    counter = CompileCounterWithBackend("inductor")
    def block_step(q, k, v, mask):  # a cache of any length, then the block's own 32 keys
        return _three_part_attention(q, k, v, mask, 1000, k.shape[2] - 32)

    compiled = torch.compile(block_step, backend=counter, fullgraph=True)
    gen = torch.Generator().manual_seed(21)
    for N in (3000, 4100):
        q, k, v = (t.cuda() for t in make_qkv(1, 16, 4, 32, N, 128, 128, gen, dtype))
        mask = make_mask("additive", 1, 16, 32, N, gen).cuda()
        torch._dynamo.mark_dynamic(k, 2)
        torch._dynamo.mark_dynamic(v, 2)
        torch._dynamo.mark_dynamic(mask, 3)
        if counter.frame_count == 0:  # run_and_get_code resets dynamo: only for the first compile
            with _no_compile_caches():
                got, code = run_and_get_code(compiled, q, k, v, mask)
            src = "\n".join(code)
            assert "_attn_kernel" in src and "_reduce_kernel" in src
            assert "torch.ops.fbcompile" not in src
        else:
            got = compiled(q, k, v, mask)
        ref_out, ref_lse = ref_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), 0.125)
        check_out(got[0].cpu(), ref_out, dtype)
        check_lse(got[1].cpu(), ref_lse, dtype)
    assert counter.frame_count == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the Triton kernels run natively")
def test_one_graph_serves_the_query_lengths_of_a_power_of_two():
    """A dynamic query count (Fast-dLLM's prefix cache queries every row after the cache) compiles one
    graph per power-of-two bucket of the packed rows (here 48-64 rows: 12-16 queries of 4 heads per KV
    head), with a launch grid over the rows of each call; the result matches the reference."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda q, k, v, mask: _three_part_attention(q, k, v, mask, 1500, 2500),
                             backend=counter, fullgraph=True)
    gen = torch.Generator().manual_seed(23)
    for M in (16, 13, 15):
        q, k, v = (t.cuda() for t in make_qkv(1, 8, 2, M, 2500 + M, 128, 128, gen, torch.bfloat16))
        mask = make_mask("additive", 1, 8, M, 2500 + M, gen).cuda()
        for t, dim in ((q, 2), (k, 2), (v, 2), (mask, 2), (mask, 3)):
            torch._dynamo.mark_dynamic(t, dim)
        got = compiled(q, k, v, mask)
        ref_out, ref_lse = ref_attention(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), 0.125)
        check_out(got[0].cpu(), ref_out, torch.bfloat16)
        check_lse(got[1].cpu(), ref_lse, torch.bfloat16)
    assert counter.frame_count == 1


# --------------------------------------------------------------------------- cuDNN for parts of many rows


CUDNN_CASES = [  # (q shape, k shape, dtype, masked, key count, capability, takes cuDNN): one change from the first each
    ((1, 12, 4680, 128), (1, 12, 999, 128), torch.bfloat16, False, False, (9, 0), True),
    ((2, 4, 4096, 64), (2, 4, 99, 64), torch.float16, False, False, (9, 0), True),
    ((1, 12, 1024, 128), (1, 12, 999, 128), torch.bfloat16, False, False, (9, 0), True),
    ((1, 12, 1023, 128), (1, 12, 999, 128), torch.bfloat16, False, False, (9, 0), False),   # too few rows
    ((1, 2, 4096, 128), (1, 2, 999, 128), torch.bfloat16, False, False, (9, 0), False),     # 64 programs
    ((2, 2, 3072, 128), (2, 2, 999, 128), torch.bfloat16, False, False, (9, 0), True),      # 96 programs
    ((1, 12, 4680, 128), (1, 4, 999, 128), torch.bfloat16, False, False, (9, 0), False),    # grouped KV heads
    ((1, 12, 4680, 128), (1, 12, 999, 128), torch.bfloat16, True, False, (9, 0), False),    # a mask
    ((1, 12, 4680, 128), (1, 12, 999, 128), torch.bfloat16, False, True, (9, 0), False),    # a key count
    ((1, 12, 4680, 128), (1, 12, 999, 128), torch.float32, False, False, (9, 0), False),    # fp32
    ((1, 12, 4680, 256), (1, 12, 999, 256), torch.bfloat16, False, False, (9, 0), False),   # head dim 256
    ((1, 12, 4680, 128), (1, 12, 999, 128), torch.bfloat16, False, False, (8, 0), False),   # not Hopper
    ((1, 12, 4680, 128), (1, 12, 999, 256), torch.bfloat16, False, False, (9, 0), False),   # keys a strided view
    ((1, 12, 4680, 128), (1, 12, 999, 132), torch.bfloat16, False, False, (9, 0), False),   # rows not 16-byte aligned
]


@pytest.mark.parametrize("qs,ks,dtype,masked,counted,capability,takes", CUDNN_CASES)
def test_cudnn_takes_parts_of_thousands_of_rows_on_hopper(monkeypatch, qs, ks, dtype, masked, counted, capability,
                                                          takes):
    """The selection rule on fake CUDA tensors, and the merged result's layout that the fake
    implementation promises follows it (cuDNN's contiguous, the Triton kernel's block-major)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with FakeTensorMode():
        q = torch.empty(qs, dtype=dtype, device="cuda")
        # the keys' rows are ks[-1] elements apart; where that is twice the head dim, every other element
        step = ks[-1] // qs[-1] if ks[-1] % qs[-1] == 0 else 1
        k = torch.empty_strided((*ks[:3], qs[-1]), (ks[1] * ks[2] * ks[3], ks[2] * ks[3], ks[3], step),
                                dtype=dtype, device="cuda")
        mask = torch.zeros(qs[2], ks[2], dtype=torch.bool, device="cuda") if masked else None
        key_count = torch.tensor([ks[2]], device="cuda") if counted else None
        assert (fbops.attention_kernel(q, k, k, mask, key_count) == "cuDNN") is takes
        if not counted:
            lse_ext = torch.empty(qs[:3], device="cuda")
            out, lse = OPS.attention_merge_lse(q, k, k, mask, 0.1, torch.empty_like(q), lse_ext)
            assert out.is_contiguous() is (takes or not fbops._use_triton(q, k, k, mask))
            assert lse.shape == qs[:3]


def _cudnn_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.skipif(not _cudnn_capable(), reason="needs a Hopper GPU: the cuDNN path")
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_gpu_cudnn_path_matches_the_reference(layout):
    """Parts of 4100 rows (4 heads: 132 programs) on cuDNN, the external part over a cache of any length and the internal part
    merged, eager and compiled with a symbolic key count (one graph, cuDNN in its output code and no
    Triton attention kernel), against float64; in both memory orders of q/k/v."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._inductor.utils import run_and_get_code

    def block_step(q, k, v, k_blk, v_blk):
        o_e, l_e = OPS.attention_lse(q, k, v, None, 0.125)
        return OPS.attention_merge_lse(q, k_blk, v_blk, None, 0.125, o_e, l_e)

    def placed(t):  # bshd: the video DiT's [B, S, H, D] tensors seen as [B, H, S, D]
        return t.cuda() if layout == "bhsd" else t.transpose(1, 2).contiguous().transpose(1, 2).cuda()

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(block_step, backend=counter, fullgraph=True, dynamic=False)
    gen = torch.Generator().manual_seed(5)
    for n in (777, 1500):
        q, k, v = make_qkv(1, 4, 4, 4100, n + 64, 64, 64, gen, torch.bfloat16)
        ref_out, ref_lse = ref_attention(q, k, v, None, 0.125)
        args = tuple(map(placed, (q, k[:, :, :n], v[:, :, :n], k[:, :, n:], v[:, :, n:])))
        torch._dynamo.mark_dynamic(args[1], 2)
        torch._dynamo.mark_dynamic(args[2], 2)
        if counter.frame_count == 0:  # run_and_get_code resets dynamo: only for the first compile
            with _no_compile_caches():
                from_graph, code = run_and_get_code(compiled, *args)
            src = "\n".join(code)
            assert "_scaled_dot_product_cudnn_attention" in src and "_attn_kernel" not in src
        else:
            from_graph = compiled(*args)
        for got in (block_step(*args), from_graph):
            assert got[0].is_contiguous()
            check_out(got[0].cpu(), ref_out, torch.bfloat16)
            check_lse(got[1].cpu(), ref_lse, torch.bfloat16)
    assert counter.frame_count == 1


# --------------------------------------------------------------------------- shape errors


SHAPE_ERRORS = [
    ((1, 4, 3, 16), (1, 2, 7, 16), (1, 2, 6, 16), r"keys \(7\) and values \(6\) differ in length"),
    ((1, 6, 3, 16), (1, 4, 7, 16), (1, 4, 7, 16), r"6 query heads cannot be grouped over 4 KV heads"),
    ((1, 4, 3, 16), (1, 2, 7, 16), (1, 4, 7, 16), r"cannot be grouped"),   # k and v head counts differ
    ((1, 4, 3, 16), (1, 2, 7, 32), (1, 2, 7, 16), r"head dims differ"),
    ((4, 3, 16), (2, 7, 16), (2, 7, 16), r"must be 4-D"),
]


@pytest.mark.parametrize("qs,ks,vs,msg", SHAPE_ERRORS, ids=["kv_len", "grouping", "kv_heads", "head_dim", "3d"])
def test_shape_errors(qs, ks, vs, msg):
    q, k, v = torch.randn(qs), torch.randn(ks), torch.randn(vs)
    with pytest.raises(RuntimeError, match=msg):
        fbops._check_shapes(q, k, v)
    with pytest.raises(RuntimeError, match=msg):
        OPS.attention_lse(q, k, v, None, 0.25)
    o_e, l_e = torch.zeros(*qs[:-1], vs[-1]), torch.zeros(qs[:-1])
    with pytest.raises(RuntimeError, match=msg):
        OPS.attention_merge_lse(q, k, v, None, 0.25, o_e, l_e)
    # the fake implementation checks too (at trace time)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=msg):
        OPS.attention_lse(mode.from_tensor(q), mode.from_tensor(k), mode.from_tensor(v), None, 0.25)


def test_valid_shapes_pass_the_check():
    q, k, v = torch.randn(1, 8, 3, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 40)
    fbops._check_shapes(q, k, v)
    out, lse = OPS.attention_lse(q, k, v, None, 0.25)
    assert out.shape == (1, 8, 3, 40) and lse.shape == (1, 8, 3)
