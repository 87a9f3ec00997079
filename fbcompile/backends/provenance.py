"""Provenance of keys/values between calls and graphs: which tensors are ``cat(cached, block)``.

Graphs that return the concatenation of a cached tensor ``P`` (an input) and this call's block,
along a dim (see :mod:`fbcompile.passes.cat_outputs`), have their outputs *recorded* after each call:
"this tensor's first ``n`` positions along ``dim`` hold ``P``'s content". Two things read that record:

* the *content* of the keys/values a split site caches (:func:`content`), which keys and guards the
  cached external part instead of the tensor's identity. A plain tensor's content is itself (a
  token per tensor object) at its current ``_version``. A view of a recorded ``C = cat(P, B)`` over
  exactly ``P``'s range (HF ``DynamicCache.crop`` after a denoising step appended the block), or
  ``C``'s first ``n`` positions (a graph after a graph break that splits ``C`` there), has ``P``'s
  content, as long as ``C`` was not written since (its ``_version``). Records chain: ``P`` may itself
  be such a view, so one content survives all the steps of a block although each step makes a new
  tensor. A content token lives as long as a tensor that holds it (a cache entry over a dead token
  is dropped);
* the split of a graph whose attention reads a recorded ``C`` as an *input* (a graph break between
  the cat and the attention): :func:`split_hint` gives, at compile time, where ``C`` was joined.

Graphs that return the keys/values an attention of theirs reads (:func:`~fbcompile.passes.cat_outputs.
kv_outputs`) have those outputs *noted*: :func:`cut_of_returned` tells a cache cut from them (a slice
along one dim, as Fast-dLLM's Dream and LLaDA keep ``k[:, :s]`` of a block's full pass).

Graphs that write an input only at slices (:func:`~fbcompile.passes.slice_writes.slice_writes`) have
each call's writes *logged*: "from version ``v`` to ``w`` this tensor was written at these rows, these
copied from those". :func:`logged_writes` returns every write between two versions if each was logged,
and :func:`same_rows_outside` tells whether two sequences of writes leave the same rows outside a block
(LongLive writes the real cache, rolling it, after the attention read a clone written the same way).

Runtime state, global because it describes tensors, not sessions; every entry dies with its tensor.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch


class ContentToken:
    """The identity of some keys'/values' content (compared by identity, held weakly by cache entries)."""

    __slots__ = ("__weakref__",)


class Content(NamedTuple):
    """A content token at a version (None: an inference tensor, which has no version counter); a
    named tuple, as one is made per cached tensor per call."""

    token: ContentToken
    version: int | None
    inherited: bool = False  # from a recorded concatenation (not the tensor's own identity)


@dataclass(frozen=True, slots=True)
class _CatRecord:
    """``C = cat(P, block)``: ``C``'s geometry in its storage root, and ``P``'s content at the cat."""

    source: Content
    dim: int
    offset: int              # P's length along dim
    version: int             # C's _version after the call
    storage_offset: int
    size: tuple
    stride: tuple


@dataclass(frozen=True, slots=True)
class _Geometry:
    """Where a tensor lies in its storage root."""

    storage_offset: int
    size: tuple
    stride: tuple


_tokens: dict[int, tuple[weakref.ref, ContentToken]] = {}   # id(tensor) -> its own token
_records: dict[int, tuple[weakref.ref, _CatRecord]] = {}    # id(storage root) -> the cat it holds
_returned: dict[int, tuple[weakref.ref, _Geometry]] = {}    # id(storage root) -> keys/values a graph returned
_written: dict[int, tuple[weakref.ref, list]] = {}          # id(tensor) -> its last logged writes


class _LoggedWrite(NamedTuple):
    """One call's writes of a tensor: its version before and after, and ``(dim, start, stop, copied)`` per
    write (``copied``: the first row of the tensor's own rows it copied, None for any other value)."""

    before: int
    after: int
    rows: tuple


LOGGED_CALLS = 8  # per tensor, the last calls' writes kept


def _remember(table: dict, tensor: torch.Tensor, value) -> None:
    key = id(tensor)
    table[key] = (weakref.ref(tensor, lambda _, key=key: table.pop(key, None)), value)


def _lookup(table: dict, tensor: torch.Tensor):
    found = table.get(id(tensor))
    return found[1] if found is not None and found[0]() is tensor else None


def _own_token(tensor: torch.Tensor) -> ContentToken:
    token = _lookup(_tokens, tensor)
    if token is None:
        token = ContentToken()
        _remember(_tokens, tensor, token)
    return token


def version(tensor: torch.Tensor) -> int | None:
    """``tensor._version``; None for an inference tensor, which has no version counter."""
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _root(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._base if tensor._base is not None else tensor


def _record_of(tensor: torch.Tensor) -> tuple[_CatRecord, int] | None:
    """The live record of the concatenation ``tensor`` is a leading range of, and the dim of ``tensor`` it
    was joined along (None: none, or written since). ``tensor`` may see the concatenation's dims in another
    order (transformers' flash integration passes ``key.transpose(1, 2)`` on, tokens first)."""
    record = _lookup(_records, _root(tensor))
    if record is None or version(tensor) != record.version or tensor.storage_offset() != record.storage_offset:
        return None
    size, stride = tuple(tensor.shape), tensor.stride()
    if len(size) != len(record.size):
        return None
    if stride == record.stride and size[record.dim] <= record.size[record.dim] and all(
            a == b for d, (a, b) in enumerate(zip(size, record.size)) if d != record.dim):
        return record, record.dim  # the usual case: the same order
    # each of tensor's dims is one of the record's, of its stride and size (shorter along the joined dim only)
    free, dim = set(range(len(size))), None
    for d in range(len(size)):
        same = [r for r in sorted(free) if record.stride[r] == stride[d]]
        match = next((r for r in same if record.size[r] == size[d]), None)
        if match is None and record.dim in same and size[d] <= record.size[record.dim]:
            match = record.dim
        if match is None:
            return None
        free.discard(match)
        dim = d if match == record.dim else dim
    return record, dim


def content(tensor: torch.Tensor, prefix: tuple[int, int] | None = None) -> Content:
    """The content of ``tensor`` (``prefix = (dim, length)``: of its first ``length`` positions along ``dim``)."""
    found = _record_of(tensor) if _records else None
    if found is not None:
        record, dim = found
        length = prefix[1] if prefix is not None and prefix[0] % tensor.dim() == dim else tensor.shape[dim]
        if length == record.offset:
            return record.source
    return Content(_own_token(tensor), version(tensor))


def record(output, source, dim: int) -> None:
    """Note that ``output = cat([source, ...], dim)`` (a graph just returned it)."""
    if not (isinstance(output, torch.Tensor) and isinstance(source, torch.Tensor)) or source.dim() != output.dim():
        return
    dim %= output.dim()
    written = version(output)
    if written is None or source.shape[dim] == 0:
        return
    found = content(source)
    _remember(_records, _root(output), _CatRecord(
        source=Content(found.token, found.version, inherited=True), dim=dim, offset=source.shape[dim],
        version=written, storage_offset=output.storage_offset(), size=tuple(output.shape), stride=output.stride()))


def note_returned(tensor) -> None:
    """Note that a graph returned ``tensor`` as keys/values an attention of its read (a replay's static
    output, noted already, costs a lookup)."""
    if isinstance(tensor, torch.Tensor):
        root = _root(tensor)
        geometry = _Geometry(tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if _lookup(_returned, root) != geometry:
            _remember(_returned, root, geometry)


def cut_of_returned(tensor: torch.Tensor) -> bool:
    """Is ``tensor`` a slice, shorter along one dim, of keys/values a graph returned (a prefix ``k[:, :, :s]``,
    a suffix ``k[:, :, e:]``)?"""
    found = _lookup(_returned, _root(tensor)) if _returned else None
    if found is None or tensor.stride() != found.stride or tensor.dim() != len(found.size):
        return False
    cut = [d for d, (a, b) in enumerate(zip(tensor.shape, found.size)) if a != b]
    if len(cut) != 1 or tensor.shape[cut[0]] > found.size[cut[0]]:
        return False
    dim, stride = cut[0], found.stride[cut[0]]
    start, rest = divmod(tensor.storage_offset() - found.storage_offset, stride) if stride else (0, 1)
    return rest == 0 and 0 <= start and start + tensor.shape[dim] <= found.size[dim]


def log_writes(tensor: torch.Tensor, before: int, after: int, rows: tuple) -> None:
    """Note that a call wrote ``tensor`` at ``rows`` (``(dim, start, stop, copied)`` each), its version going
    from ``before`` to ``after``."""
    log = _lookup(_written, tensor)
    if log is None:
        log = []
        _remember(_written, tensor, log)
    log.append(_LoggedWrite(before, after, rows))
    del log[:-LOGGED_CALLS]


def logged_writes(tensor: torch.Tensor, since: int, now: int) -> list | None:
    """The writes (``(dim, start, stop, copied)`` each, in order) by which logged calls took ``tensor``
    from version ``since`` to ``now``, one after the other; None if a write was not logged (the chain of
    versions breaks)."""
    if since == now:
        return []
    log = _lookup(_written, tensor) if _written else None
    if not log or now < since:
        return None
    at, writes = since, []
    for entry in log:
        if entry.before == at != now:
            writes += entry.rows
            at = entry.after
    return writes if at == now else None


def same_rows_outside(first, second, dim: int, start: int, stop: int, size: int) -> bool:
    """Do the writes ``first`` and the writes ``second`` (``(dim, start, stop, copied)`` each), each applied
    to the same tensor of ``size`` rows along ``dim``, leave every row outside ``[start, stop)`` holding
    the same row of that tensor, and no such row written with another value? (A roll that both make.)"""
    if all(a >= b or (d == dim and start <= a and b <= stop) for d, a, b, _ in (*first, *second)):
        return True  # the usual case: only the block's rows written
    origins = [_row_origins(writes, dim, size) for writes in (first, second)]
    if None in origins:
        return False
    cuts = sorted({0, size, start, stop} | {edge for pieces in origins for lo, hi, _ in pieces for edge in (lo, hi)})
    for lo, hi in zip(cuts, cuts[1:]):
        if lo < hi and not start <= lo < stop:
            shifts = [next(shift for a, b, shift in pieces if a <= lo < b) for pieces in origins]
            if shifts[0] is None or shifts[0] != shifts[1]:
                return False
    return True


def _row_origins(writes, dim: int, size: int) -> list | None:
    """After ``writes``, which row each row holds: ``(lo, hi, shift)`` pieces covering ``[0, size)``, rows
    ``r`` in ``[lo, hi)`` holding the tensor's first row ``r + shift``, or a value written (shift None).
    None if a write runs along another dim."""
    pieces = [(0, size, 0)]
    for d, a, b, copied in writes:
        if a >= b:
            continue
        if d != dim:
            return None
        if copied is None:
            moved = [(a, b, None)]
        else:  # row r of [a, b) now holds what row r - a + copied held
            offset = a - copied
            moved = [(max(lo, copied) + offset, min(hi, copied + b - a) + offset, None if s is None else s - offset)
                     for lo, hi, s in pieces if lo < copied + b - a and copied < hi]
        kept = [piece for lo, hi, s in pieces for piece in ((lo, min(hi, a), s), (max(lo, b), hi, s))
                if piece[0] < piece[1]]
        pieces = sorted(kept + moved, key=lambda piece: piece[0])
    return pieces


def split_hint(tensor) -> tuple[int, int] | None:
    """``(dim, block length)`` if ``tensor`` is a whole recorded ``cat(P, block)`` (its dims in any order:
    ``dim`` is ``tensor``'s), not written since."""
    if not isinstance(tensor, torch.Tensor):
        return None
    found = _record_of(tensor)
    if found is None or tensor.shape[found[1]] != found[0].size[found[0].dim]:
        return None
    record, dim = found
    return dim, record.size[record.dim] - record.offset


def external_contents(guard, args) -> list[Content]:
    """The content of each tensor holding a split site's external keys/values (``guard``: its
    :class:`~fbcompile.passes.guards.SiteGuard`); of a joined input, of its cached positions only."""
    contents = []
    for index, joined in zip(guard.external, guard.joined or (None,) * len(guard.external)):
        tensor = args[index]
        prefix = None
        if joined is not None:
            dim, block = joined
            prefix = (dim, max(tensor.shape[dim] - block, 0))
        contents.append(content(tensor, prefix))
    return contents


class RecordingCall:
    """A compiled graph's callable that records the provenance of its ``cat`` outputs, notes its
    keys/values outputs, and logs its slice writes of inputs, after each call."""

    def __init__(self, run, cats: list, returned: list[int], writes: list = ()):
        self.run, self.cats, self.returned, self.writes = run, cats, returned, writes

    def __call__(self, *args):
        before = [version(args[w.input]) for w in self.writes]
        outputs = self.run(*args)
        for cat in self.cats:
            record(outputs[cat.output], args[cat.source], cat.dim)
        for index in self.returned:
            note_returned(outputs[index])
        for writes, was in zip(self.writes, before):
            tensor = args[writes.input]
            now = version(tensor)
            if was is not None and now != was and not _aliased(tensor, [args[i] for i in writes.others]):
                log_writes(tensor, was, now, writes.rows_written(args))
        return outputs


def _aliased(tensor: torch.Tensor, others: list) -> bool:
    """Does one of ``others`` share ``tensor``'s storage (its writes would bump ``tensor``'s version too)?"""
    storage = tensor.untyped_storage().data_ptr()
    return any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == storage for t in others)


def recording(run, cats: list, returned: list[int], writes: list = ()):
    """``run``, recording the provenance of the outputs ``cats`` (:func:`~fbcompile.passes.cat_outputs.cat_outputs`),
    noting the keys/values outputs ``returned`` (:func:`~fbcompile.passes.cat_outputs.kv_outputs`) and logging
    the slice writes ``writes`` (:func:`~fbcompile.passes.slice_writes.slice_writes`)."""
    return RecordingCall(run, cats, returned, writes) if cats or returned or writes else run
