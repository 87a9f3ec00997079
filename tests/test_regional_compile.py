"""``Config(scope="blocks")``: compiling a model's repeated blocks, whose RoPE tables the eager code
around them recomputes at every call (diffusers' AnyFlow FAR, see test_anyflow_far.py).

Such a table is a graph input the query does not read (the query has its own): the keys split
through it, and reuse compares it by value - a new tensor with the same values reuses, other values
refresh.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fbcompile
from attention_zoo import rel_error

B, H, M, L, D = 1, 2, 4, 6, 8


class Layer(torch.nn.Module):
    """The keys roped after the cat with a table passed per call; the query with its own rows."""

    def forward(self, x, past_k, past_v, key_table, query_table):
        k = torch.cat([past_k, x], dim=-2) * key_table
        v = torch.cat([past_v, x.sin()], dim=-2)
        return F.scaled_dot_product_attention(x * query_table, k, v)


class Model(torch.nn.Module):
    _repeated_blocks = ["Layer"]

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Layer()])

    def forward(self, x, past_k, past_v, positions: list):
        table = torch.cos(torch.tensor(positions, dtype=torch.float32))[None, None, :, None]  # a new tensor
        for layer in self.layers:
            x = layer(x, past_k, past_v, table, table[:, :, -M:])
        return x


@torch.no_grad()
def test_per_call_tables_are_compared_by_value():
    x, past_k, past_v = torch.randn(B, H, M, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    model = fbcompile.optimize(Model().eval(), fbcompile.Config(compiler="eager", scope="blocks"))
    positions = list(range(L + M))
    model(x, past_k, past_v, positions)
    model(x, past_k, past_v, list(positions))  # same values, new table tensor
    assert fbcompile.stats(model).reuses == 1
    moved = [p + 1 for p in positions]  # another table: the external part must be recomputed
    got = model(x, past_k, past_v, moved)
    assert rel_error(got, Model()(x, past_k, past_v, moved)) < 1e-5
    stats = fbcompile.stats(model)
    assert stats.reuses == 1 and stats.refresh_reasons == {"new kv": 1, "kv positions changed": 1}, stats
    assert [s["decision"] for s in fbcompile.explain(model).sites] == ["rewritten"]


def test_block_scope_needs_named_blocks():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="names no repeated block class"):
        fbcompile.optimize(Plain(), fbcompile.Config(scope="blocks"))
    with pytest.raises(ValueError, match="Config.scope"):
        fbcompile.Config(scope="layers")


def test_flex_key_mask_refuses_a_block_mask_short_of_query_rows():
    """A symbolic query length the pass could not compare with the BlockMask's rows (a length padded
    with ``ceil``) is checked at every call: never a mask read past its last query block."""
    from fbcompile.passes.match_flex import flex_key_mask

    q = torch.randn(1, 1, 200, 16)
    one_block = torch.ones(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="fewer query blocks"):
        flex_key_mask(q, 0, 8, *one_block, None, None, 128, 128, lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, (),
                      None, (), False, False)
