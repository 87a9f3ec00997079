"""The write log: graphs that write an input only at slices log the rows each call wrote (and the rows a
copy of the tensor's own rows read: a roll); ``logged_writes`` returns them only when logged calls, one
after the other, explain a version change, and ``same_rows_outside`` tells whether two sequences of
writes leave the rows outside a block alike. Anything else (a write of another form, an aliasing input, a
write outside any logged graph, a log too old) leaves the change unexplained."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fbcompile
from fbcompile.backends import provenance
from fbcompile.passes.slice_writes import slice_writes

SIZE = 16


def written_only_within(cache, since: int, now: int, dim: int, start: int, stop: int) -> bool:
    """Did logged calls take ``cache`` from version ``since`` to ``now`` leaving every row outside
    ``[start, stop)`` along ``dim`` as it was?"""
    logged = provenance.logged_writes(cache, since, now)
    return logged is not None and provenance.same_rows_outside((), logged, dim, start, stop, cache.shape[dim])


def _compiled(fn):
    return torch.compile(fn, backend=fbcompile.backend(compiler="eager"), dynamic=True, fullgraph=True)


def _writes_rows(fn, *args, rows: tuple) -> bool:
    """Run the compiled ``fn(cache, *args)`` on a fresh cache: did it log exactly its writes, inside ``rows``
    (``(start, stop)`` along dim 1) and not inside a range one row shorter at either end?"""
    cache = torch.zeros(2, SIZE, 3)
    before = cache._version
    _compiled(fn)(cache, *args)
    start, stop = rows
    inside = written_only_within(cache, before, cache._version, 1, start, stop)
    tighter = any(written_only_within(cache, before, cache._version, 1, a, b)
                  for a, b in ((start + 1, stop), (start, stop - 1)))
    return inside and not tighter


def _block(cache, x, start: int):
    cache[:, start:start + x.shape[1]] = x


def _from_end(cache, x):
    cache[:, -x.shape[1]:] = x


def _clamped(cache, x, start: int):
    cache[:, start:start + 100] = x[:, :SIZE - start]


def _two_rows(cache, x, a: int, b: int):
    cache[:, a:a + 1] = x[:, :1]
    cache[:, b:b + 1] = x[:, 1:2]


def _roll(cache, x, start: int):
    cache[:, 1:5] = cache[:, 3:7].clone()
    cache[:, start:start + x.shape[1]] = x


@pytest.mark.parametrize("fn,args,rows", [
    (_block, (torch.ones(2, 4, 3), 5), (5, 9)),
    (_block, (torch.ones(2, 3, 3), 0), (0, 3)),
    (_from_end, (torch.ones(2, 4, 3),), (SIZE - 4, SIZE)),                  # a negative bound counts from the end
    (_clamped, (torch.ones(2, SIZE, 3), 10), (10, SIZE)),                   # a bound past the end is clamped
    (_two_rows, (torch.ones(2, 2, 3), 3, 9), (3, 10)),
    (_roll, (torch.ones(2, 2, 3), 12), (1, 14)),                            # a roll writes rows [1, 5)
], ids=["block", "at-zero", "from-end", "clamped", "two-writes", "roll"])
def test_logged_rows_are_the_rows_written(fn, args, rows):
    assert _writes_rows(fn, *args, rows=rows)


def test_a_roll_is_logged_with_the_rows_it_copied():
    cache = torch.zeros(2, SIZE, 3)
    before = cache._version
    _compiled(_roll)(cache, torch.ones(2, 2, 3), 12)
    assert provenance.logged_writes(cache, before, cache._version) == [(1, 1, 5, 3), (1, 12, 14, None)]


def _copy_without_clone(cache, x):
    cache[:, 1:5] = cache[:, 3:7]


def _copy_written_between(cache, x):
    rows = cache[:, 3:7].clone()
    cache[:, 5:6] = x[:, :1]
    cache[:, 1:5] = rows


def _copy_broadcast(cache, x):
    cache[:, 1:5] = cache[:, 3:4].clone()


def _copy_of_another_tensor(cache, x):
    cache[:, 1:3] = x.clone()


def _copy_along_another_dim(cache, x):
    cache[:, 1:3] = cache[:, 1:3, 0:1].clone().expand(-1, -1, 3)


@pytest.mark.parametrize("fn", [_copy_without_clone, _copy_written_between, _copy_broadcast, _copy_of_another_tensor,
                                _copy_along_another_dim],
                         ids=["no-clone", "written-between", "broadcast", "another-tensor", "another-dim"])
def test_only_a_clone_of_the_tensors_own_rows_read_right_before_is_a_copy(fn):
    """A view copied without ``clone()`` may overlap the rows written; a clone taken before another write
    holds rows the write changed; a broadcast row is no one-to-one copy: each is logged as written anew."""
    cache = torch.zeros(2, SIZE, 3)
    before = cache._version
    _compiled(fn)(cache, torch.ones(2, 2, 3))
    logged = provenance.logged_writes(cache, before, cache._version)
    assert logged and all(copied is None for *_, copied in logged), logged


def _apply(rows: torch.Tensor, writes) -> torch.Tensor:
    """Reference: each row holds the number of the first row it came from, -1 once written anew."""
    rows = rows.clone()
    for _, a, b, copied in writes:
        rows[a:b] = -1 if copied is None else rows[copied:copied + b - a].clone()
    return rows


def _writes(size: int):
    def write(draw):
        a = draw(st.integers(0, size))
        b = draw(st.integers(a, size))
        copied = draw(st.one_of(st.none(), st.integers(0, size - (b - a))))
        return (1, a, b, copied)
    return st.lists(st.composite(lambda draw: write(draw))(), max_size=4)


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_same_rows_outside_agrees_with_applying_the_writes(data):
    size = data.draw(st.integers(1, 6))
    first, second = data.draw(_writes(size)), data.draw(_writes(size))
    start = data.draw(st.integers(0, size))
    stop = data.draw(st.integers(start, size))
    if data.draw(st.booleans()):
        second = first + second  # a roll both make, then more writes
    rows = torch.arange(size)
    a, b = _apply(rows, first), _apply(rows, second)
    outside = torch.ones(size, dtype=torch.bool)
    outside[start:stop] = False
    expected = bool(((a == b) & (a >= 0))[outside].all())
    assert provenance.same_rows_outside(first, second, 1, start, stop, size) == expected


def test_a_write_along_another_dim_is_never_alike():
    write = (0, 0, 1, None)
    assert not provenance.same_rows_outside((write,), (write,), 1, 0, 0, SIZE)
    assert provenance.same_rows_outside((), ((1, 4, 8, None),), 1, 4, 8, SIZE)


def _view_copy(cache, x, start: int):
    cache[:, start:start + x.shape[1]].copy_(x)


def _index_copy(cache, x, index):
    cache.index_copy_(1, index, x)


def _strided(cache, x):
    cache[:, 0:8:2] = x


def _two_dims(cache, x):
    cache[0:1, 2:6] = x[:1]


def _elementwise(cache, x):
    cache.add_(1.0)


@torch.library.custom_op("fbcompile_test::fill_rows", mutates_args=("cache",))
def _fill_rows(cache: torch.Tensor, start: int) -> None:
    cache[:, start:start + 2] = 1.0


def _custom_op_and_slice(cache, x, start: int):
    cache[:, start:start + x.shape[1]] = x
    _fill_rows(cache, 0)


@pytest.mark.parametrize("fn,args", [
    (_view_copy, (torch.ones(2, 4, 3), 5)),
    (_index_copy, (torch.ones(2, 2, 3), torch.tensor([1, 7]))),
    (_strided, (torch.ones(2, 4, 3),)),
    (_two_dims, (torch.ones(2, 4, 3),)),
    (_elementwise, (torch.ones(2, 4, 3),)),
    (_custom_op_and_slice, (torch.ones(2, 4, 3), 5)),
], ids=["view-copy", "index-copy", "strided", "two-dims", "elementwise", "custom-op"])
def test_other_writes_are_not_logged(fn, args):
    cache = torch.zeros(2, SIZE, 3)
    before = cache._version
    _compiled(fn)(cache, *args)
    assert cache._version != before
    assert not written_only_within(cache, before, cache._version, 1, 0, SIZE)


def test_the_pass_finds_only_slice_written_inputs():
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def fn(cache, other, x, start: int):
        cache[:, start:start + 2] = x
        other.mul_(2)
        return cache.sum()

    torch.compile(fn, backend=capture, dynamic=True)(torch.zeros(2, SIZE, 3), torch.zeros(3), torch.ones(2, 2, 3), 4)
    (found,) = slice_writes(graphs[0])
    placeholders = [n.name for n in graphs[0].graph.find_nodes(op="placeholder")]
    assert "cache" in placeholders[found.input] and len(found.rows) == 1 and found.rows[0][0] == 1
    assert [placeholders[i] for i in found.others] == [p for p in placeholders if "other" in p]


def test_an_aliasing_input_leaves_the_writes_unlogged():
    """The graph writes a view of the cache passed as another input: its writes bump the cache's version
    too, at rows the cache's own log would not show."""
    def fn(cache, view, x):
        cache[:, 10:12] = x
        view[:, 0:2] = x

    cache = torch.zeros(2, SIZE, 3)
    before = cache._version
    _compiled(fn)(cache, cache[:, :4], torch.ones(2, 2, 3))
    assert not written_only_within(cache, before, cache._version, 1, 0, SIZE)


def test_the_chain_of_versions_must_be_unbroken():
    write = _compiled(_block)
    cache = torch.zeros(2, SIZE, 3)
    v0 = cache._version
    write(cache, torch.ones(2, 2, 3), 4)
    write(cache, torch.ones(2, 2, 3), 6)
    v2 = cache._version
    assert written_only_within(cache, v0, v2, 1, 4, 8)
    assert not written_only_within(cache, v0, v2, 1, 4, 7)
    assert not written_only_within(cache, v0, v2, 0, 4, 8)   # another dim
    cache[:, 5] = 2.0                                                    # an eager write between logged calls
    write(cache, torch.ones(2, 2, 3), 4)
    assert not written_only_within(cache, v0, cache._version, 1, 0, SIZE)
    assert written_only_within(cache, v2 + 1, cache._version, 1, 4, 6)
    assert written_only_within(cache, v0, v0, 1, 0, 0)        # no change at all


def test_an_old_log_is_forgotten():
    write = _compiled(_block)
    cache = torch.zeros(2, SIZE, 3)
    v0 = cache._version
    for _ in range(provenance.LOGGED_CALLS + 1):
        write(cache, torch.ones(2, 2, 3), 4)
    assert not written_only_within(cache, v0, cache._version, 1, 4, 6)
    assert written_only_within(cache, v0 + 1, cache._version, 1, 4, 6)
