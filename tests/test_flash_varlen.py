"""flash-attn's varlen forward over sequences of equal lengths (Wan's ``flash_attention``): unpacked into
the batched forward, split exactly and reused; unequal or unproven lengths are left packed, and reported.

flash-attn runs on the GPU only; :mod:`flash_attn_standin` registers ops of the same schemas on the CPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fbcompile
import flash_attn_standin
from attention_zoo import compile_exact, rel_error

flash_attn_standin.register_varlen()
flash_attn_standin.register_fa3()
EAGER = fbcompile.Config(refresh="always", compiler="eager")
BLOCK = fbcompile.Config(refresh="block", compiler="eager")
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def _running(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros([1]), lengths]).cumsum(0, dtype=torch.int32)


class PackedAttention(nn.Module):
    """Appends the block's keys/values to the cache and attends through the varlen kernel, the batch packed
    into the tokens as Wan packs it (``lengths`` picks how ``cu_seqlens`` are made)."""

    def __init__(self, lengths="wan", causal=False, return_lse=False, dim=32, version=2):
        super().__init__()
        self.lengths, self.causal, self.return_lse, self.version = lengths, causal, return_lse, version
        self.q = nn.Linear(dim, HEADS * HEAD_DIM)
        self.k = nn.Linear(dim, KV_HEADS * HEAD_DIM)
        self.v = nn.Linear(dim, KV_HEADS * HEAD_DIM)

    def _cu_seqlens(self, b: int, length: int, lengths=None):
        if self.lengths in ("wan", "reshaped", "longer_max"):
            return _running(torch.tensor([length] * b, dtype=torch.int32).to(device="cpu", non_blocking=True))
        if self.lengths == "arange":
            return torch.arange(0, (b + 1) * length, length, dtype=torch.int32)
        if self.lengths == "full":
            return _running(torch.full((b,), length, dtype=torch.int32))
        if self.lengths == "unequal":  # the first sequence one shorter, the last one longer
            return _running(torch.tensor([length - 1] + [length] * (b - 2) + [length + 1], dtype=torch.int32))
        return _running(lengths)  # "input": computed from a tensor

    def forward(self, x, past_k, past_v, lengths=None):
        b, m, _ = x.shape
        q = self.q(x).view(b, m, HEADS, HEAD_DIM)
        k = torch.cat([past_k, self.k(x).view(b, m, KV_HEADS, HEAD_DIM)], dim=1)
        v = torch.cat([past_v, self.v(x).view(b, m, KV_HEADS, HEAD_DIM)], dim=1)
        n = k.shape[1]
        packed = [t.flatten(0, 1) for t in (q, k, v)]
        if self.lengths == "reshaped":  # packed without flatten: not proven
            packed[1] = k.reshape(b * n, KV_HEADS, HEAD_DIM)
        cu_q = self._cu_seqlens(b, m, None if lengths is None else lengths[0])
        cu_k = self._cu_seqlens(b, n, None if lengths is None else lengths[1])
        max_k = n + 1 if self.lengths == "longer_max" else n
        if self.version == 2:
            out, lse, _, _ = torch.ops.flash_attn._flash_attn_varlen_forward(
                *packed, cu_q, cu_k, m, max_k, 0.0, HEAD_DIM ** -0.5, causal=self.causal, window_size_left=-1,
                window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False, block_table=None)
        else:
            out, lse = flash_attn_standin.flash_attn_3_varlen_func(*packed, cu_q, cu_k, m, max_k, causal=self.causal,
                                                                   return_attn_probs=True)
        out = out.unflatten(0, (b, m)).flatten(2)
        return (out, lse) if self.return_lse else out


def _pair(config=EAGER, **kw):
    torch.manual_seed(0)
    plain = PackedAttention(**kw).eval()
    optimized = PackedAttention(**kw).eval()
    optimized.load_state_dict(plain.state_dict())
    return plain, fbcompile.optimize(optimized, config)


def _inputs(batch=3, block=8, past=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, block, 32, generator=gen)
    return x, *(torch.randn(batch, past, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _sites(model) -> list[tuple[str, str]]:
    return [(s["form"], s["decision"]) for s in fbcompile.explain(model).sites]


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("lengths", ["wan", "arange", "full"])
@pytest.mark.parametrize("causal,return_lse", [(False, False), (True, True)])
@pytest.mark.parametrize("batch,block,past", [(1, 8, 24), (3, 8, 5), (2, 5, 40)])
@torch.no_grad()
def test_equal_lengths_are_unpacked_and_split_exactly(version, lengths, causal, return_lse, batch, block, past):
    plain, model = _pair(lengths=lengths, causal=causal, return_lse=return_lse, version=version)
    inputs = _inputs(batch, block, past, seed=batch * 100 + past)
    for got, expected in zip(_outputs(model(*inputs)), _outputs(plain(*inputs)), strict=True):
        assert got.shape == expected.shape and rel_error(got, expected) < 1e-5
    assert _sites(model) == [("flash varlen", "rewritten")]


@pytest.mark.parametrize("version", [2, 3])
@torch.no_grad()
def test_unpacked_attention_reuses_within_a_block_and_follows_a_growing_cache(version):
    """Block mode reuses at a block's later steps; the next block (a longer cache, dynamic shapes from the
    second length on) refreshes and equals the model at its first step."""
    plain, model = _pair(config=BLOCK, version=version)
    for past in (16, 24, 32):
        x, past_k, past_v = _inputs(batch=2, past=past, seed=past)
        assert rel_error(model(x, past_k, past_v), plain(x, past_k, past_v)) < 1e-5
        for _ in range(2):
            model(torch.randn_like(x), past_k, past_v)
    stats = fbcompile.stats(model)
    assert (stats.refreshes, stats.reuses) == (3, 6), stats
    assert {site for site in _sites(model)} == {("flash varlen", "rewritten")}


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("lengths,reason", [
    ("unequal", "cu_seqlens_q are not 3 sequences of 8"),
    ("input", "cu_seqlens_q are not 3 sequences of 8"),
    ("reshaped", "k is not a 4-D tensor flattened at its first two dims"),
    ("longer_max", "max_seqlen_k is not the sequences' length"),
])
@torch.no_grad()
def test_unproven_lengths_are_left_packed_and_reported(version, lengths, reason):
    """Lengths the graph does not show equal (another length per sequence, or lengths from a tensor, whose
    values only the run knows), keys packed otherwise, or a longer ``max_seqlen``: the call stays as the
    model wrote it, and the report says why."""
    plain, model = _pair(lengths=lengths, version=version)
    x, past_k, past_v = _inputs()
    extra = ((torch.full((3,), 8, dtype=torch.int32), torch.full((3,), 32, dtype=torch.int32)),) \
        if lengths == "input" else ()
    assert rel_error(model(x, past_k, past_v, *extra), plain(x, past_k, past_v, *extra)) < 1e-5
    assert _sites(model) == [("flash varlen", f"skipped: flash-attn's varlen forward: {reason}")]


@torch.no_grad()
def test_flash_attn_3_with_used_key_counts_is_left_packed_and_reported():
    """flash-attn 3's ``seqused_k`` (keys each sequence uses, from a tensor) does not carry over to the
    batched call: the call stays packed."""
    def attend(q, k, v):
        b, m, n = q.shape[0], q.shape[1], k.shape[1]
        cu_q, cu_k = (torch.arange(0, (b + 1) * length, length, dtype=torch.int32) for length in (m, n))
        used = torch.full((b,), n - 1, dtype=torch.int32)
        return torch.ops.flash_attn_3._flash_attn_forward(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                                          cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=used,
                                                          max_seqlen_q=m, max_seqlen_k=n)[0]

    compiled, session = compile_exact(attend)
    q, k = torch.randn(2, 8, HEADS, HEAD_DIM), torch.randn(2, 24, KV_HEADS, HEAD_DIM)
    with pytest.raises(NotImplementedError):  # the stand-in computes no seqused_k; the decision came first
        compiled(q, k, k)
    assert [s["decision"] for s in session.graphs[0].sites] == [
        "skipped: flash-attn's varlen forward: seqused_k is given"]
