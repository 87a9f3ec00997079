"""CUDA-graph capture and replay of fbcompile's compiled graphs.

On with ``Config(cuda_graphs=True)`` or ``torch.compile(..., backend="fbcompile", mode="reduce-overhead")``
(any mode whose Inductor options have ``triton.cudagraphs``). Every compiled graph - refresh, reuse,
exact, a graph without attention - is wrapped in a :class:`CapturedGraph`; the dispatcher's guards run
first and pick the graph, then that graph replays.

Why not Inductor's cudagraph trees: they copy every input that is not a parameter into static memory at
each replay (a KV cache passed as an argument: a full read and write of it per call), re-record for
every new value of a symbolic size (a growing cache: one recording per block), and free a generation's
outputs when the next call starts, while the dispatcher keeps the external parts ``(O_e, L_e)`` of a
refresh across calls. Here, per graph:

* **Inputs.** A tensor input is taken *by address* - not copied, its address part of the replay key -
  if it is a parameter, a buffer dynamo marks static, a tensor an attention site reads its cached
  keys/values from (so a replay reads the current cache, never a copy), a tensor the graph writes in
  place (seen at its first call from ``_version``; an inference tensor, whose writes cannot be seen,
  counts as one). Every other tensor the graph reads (the block's
  tokens, positions, the cached ``(O_e, L_e)`` of a reuse graph) is *copied* into the capture's own
  buffers before each replay (:func:`_copy_all`: foreach launches, or a ``copy_`` each): its address may change at every
  call. Inputs the graph does not read, or reads only the sizes of (a reuse graph's cached keys/values)
  are neither. A cached input of fixed size that comes as a new tensor at every block while the graph's
  other inputs by address stay (the SANA-WM refiner's sink RoPE table, rebuilt per block) is copied
  from then on into a buffer of the graph's own, once per new tensor or write, after
  :data:`NEW_TENSORS_BEFORE_COPY` calls in a row that found no capture for it and a new tensor: by
  address, each block would cost a capture (or an uncaptured run) wherever the allocator does not hand
  back an earlier block's memory. Caches that come back in turn (the same tensors: classifier-free
  guidance's two, a graph called for each layer) stay by address, and so does one the graph writes or
  may return a view of.
  A graph that returns ``cat(cached input, block)`` (an HF ``DynamicCache`` updated in
  the model) is captured returning the block, and the concatenation is made after each run, from the
  caller's cached input (:mod:`fbcompile.passes.hoist_cache_cats`): so a reuse graph in a loop that
  crops the cache after each step does not read the cache, whose tensors are new at every step.
* **Key.** Addresses of the by-address inputs; sizes, strides and dtypes of the inputs whose sizes
  dynamo's guards leave free (symbolic sizes, the cached ``(O_e, L_e)``); values of the other
  arguments (ints). A key is captured the second time it is seen (a
  key seen once - the refresh over a cache that grows by a ``torch.cat`` at each block - would never
  replay), and at most :data:`MAX_CAPTURES` captures are kept per graph (least recently used dropped),
  more when a dropped key comes back: the bound doubles, up to :data:`MAX_CAPTURES_GROWN`, for a graph
  that meets more keys in turn (one graph called for each layer, its weights and cache by address: a
  graph break in every layer), and past that bound such a key runs uncaptured rather than being
  captured again at every call.
  So a reuse graph, which does not read the cache, is captured once for all blocks; a refresh graph
  over a static cache (HF ``StaticCache``, a preallocated buffer) or the same cache is captured once;
  a refresh graph over tensors that are new at every block (a cache grown by ``torch.cat``, as HF
  ``DynamicCache`` does) would never replay: see *Spare capacity*.
  A write offset passed as a Python int (``cache[:, start:start + n] = k``) is baked into a capture, so
  such a graph is captured once per block, at its second step; passed as a tensor (HF ``StaticCache``'s
  ``cache_position``) it is copied in like the tokens, and the graph is captured once.
* **Spare capacity.** When the cached keys/values are other tensors than at the last call, or longer
  views of the same memory (a preallocated buffer's filled part), and the graph reads their (symbolic)
  length nowhere but in its external attention, not on cuDNN, where it splits a mask over cache and
  block, and in positions after it (:mod:`fbcompile.passes.key_count` proves it and gives the attention
  and the positions a key count read on the device), the graph switches to buffers with spare
  capacity: from then on each call copies the cache into buffers of :func:`spare_capacity` rows (one
  copy per new cache: a call over the same tensors, unwritten since, copies nothing; a mask, or
  keys/values an earlier graph joined with the block (SDAR's graph break), go into a buffer of the
  capacity plus the block, the block's part after the capacity, copied at every call, the cached part
  only where the buffer holds another) and runs over them with the key count, so that one capture
  serves every length up to the capacity. The capacities are 8 sizes per doubling of the length, at most
  1/8 spare: a cache grown by one block per block is captured again every ~length/8 keys (every 128
  blocks of 32 at 32K keys). Graphs over caches of the same layout share the buffers (an extra
  ~1.1x the cache), freed with the last graph's move to a larger capacity, which also drops the
  captures that read them. A graph that reads several caches in turn - one called for each layer, a
  graph break in every layer - gets a set of buffers for each once they come back (up to
  :data:`MAX_SPARE_SETS` per layout), so each layer's cache is copied once per move, not at every call.
  RoPE applied to the cached keys in the graph (after the cat: OLMo/LLaDA) reads its tables' rows at
  the cached length from the count too; a table sliced from fewer rows than a capacity takes bounds
  the capacity. A graph keeps the buffers of its last capacity, and of up to
  :data:`MAX_SPARE_LAYOUTS` once capacities come back (a loop of ``generate`` calls, each growing its
  cache from the prompt's length again), so their captures replay at the next call.
  Graphs whose length reaches anything else (frame indices computed from it
  otherwise than as ``arange``, a mask read elsewhere, a RoPE table read otherwise than by rows)
  run uncaptured over new caches, counted in ``Stats.cuda_graphs`` as
  ``"uncaptured (new cached keys/values)"``.
* **Outputs.** Every tensor a replay returns is copied out of the capture's memory
  (:func:`_copy_all`), so neither the caller nor the dispatcher's cache holds memory a later
  replay overwrites. A graph that returns a view of one of its inputs is not captured. The user's
  outputs go to fresh tensors, except one that another graph then meets as its cache and takes by
  address (Fast-dLLM's dual cache: the full pass's K/V, written in place by the block's later steps):
  from then on it goes to recycled buffers, as below, so that graph meets the same few addresses in
  turn (:meth:`CapturedGraph._pool_sources`). The parts the dispatcher keeps (a refresh's ``(O_e, L_e)``) go to
  *recycled* buffers: the first of this output's buffers that nothing holds any more (no tensor, no
  view: the storage's use count), else a new one (at most :data:`MAX_RECYCLED`, then fresh tensors).
  The dispatcher drops a site's stale entry before it refreshes, so a site refreshed once per block
  gets the same buffer back every block, and the reuse graph takes its cached parts *by address*:
  captured once, it reads them in place, where each replay would otherwise copy ~2 tensors per site
  in (56 small copies per step for a 28-layer model). A buffer still held (an entry of another
  request, as classifier-free guidance keeps two) is never written: the refresh takes another. A reuse
  graph that meets its kept parts at more than :data:`MAX_KEPT_ADDRESSES` addresses (entries kept alive
  elsewhere) copies them in from then on, as every other input.
* **Host inputs**: a graph that reads CPU tensors beside CUDA ones (Wan's ``grid_sizes``) has its ops on
  them moved out when they only feed graph outputs (:mod:`fbcompile.passes.host_island`): they run
  eagerly, the rest is captured (:class:`WithHostIsland`). A graph that reads CPU tensors only, in a model
  whose other graphs read CUDA ones, runs as it is ("host tensors only": nothing to capture).
* **No tensor ops**: a graph none of whose ops takes or makes a tensor (dynamo's graph between two breaks
  computing ints from its int inputs, ``current_start // frame_seqlen`` in Wan; the rest of a graph whose
  ops all read host inputs) is not wrapped: it runs as it is, where a replay of an empty CUDA graph would
  only cost host time.
* **Fallbacks** (the graph runs uncaptured, counted in ``Stats.cuda_graphs``): inputs not on a CUDA
  device otherwise (the CPU: a warning, once per session, at a graph's second call if its first came
  before any graph read CUDA tensors), grad mode, a capture that fails (e.g. a host
  sync inside the graph: a warning with the error).

A replay bumps the version counters of the inputs the graph writes (``increment_version``), as the
uncaptured graph does, so whatever reads versions after the call (the dispatcher's guards, the
provenance records, another graph's guards) sees the same as without CUDA graphs.
"""
from __future__ import annotations

import operator
import warnings
import weakref
from collections import OrderedDict
from typing import Callable

import torch
import torch.fx as fx

from fbcompile.backends import provenance
from fbcompile.backends.session import Session
from fbcompile.passes.graph_utils import op_name, reads_data, view_base
from fbcompile.passes.hoist_cache_cats import Join
from fbcompile.passes.host_island import HostIsland
from fbcompile.passes.key_count import KeyCountInputs, PaddedInput

MAX_CAPTURES = 8       # captured variants (keys) kept per compiled graph, at first: a prefix cache's 8 query lengths
MAX_CAPTURES_GROWN = 128  # ... at most, once dropped keys come back
MAX_SPARE_SETS = 64    # sets of spare-capacity buffers per layout, for caches read in turn
MAX_SPARE_LAYOUTS = 8  # layouts (capacities) of spare buffers a graph keeps, once dropped ones come back
MAX_RECYCLED = 8       # recycled buffers per kept or pooled output
MAX_KEPT_ADDRESSES = 2  # addresses of a reuse graph's kept parts before it copies them in instead
NEW_TENSORS_BEFORE_COPY = 3  # calls in a row without a capture for a new tensor of a cached input before it is copied in
_RECENT_TENSORS = 8  # tensors remembered per cached input (weakly): one of them is not new (caches in turn)
_SEEN_KEYS = 64        # keys remembered as seen once, per graph
FOREACH_MIN_TENSORS = 3  # tensors of a dtype copied by one foreach launch from this many (fewer: a copy_ each)
OWN_COPY_BYTES = 1 << 20  # tensors from this size copied by a copy_ of their own
DEVICE_TYPE = "cuda"   # inputs on other devices run uncaptured
NEW_KV = "new cached keys/values"
NEW_LENGTH = "cached keys/values of a new length"


def spare_capacity(length: int) -> int:
    """The smallest ``m * 2^k >= length`` with ``8 <= m <= 16``: 8 sizes per doubling, at most 1/8 spare."""
    if length <= 16:
        return 16
    shift = (length - 1).bit_length() - 4
    return -(-length // (1 << shift)) << shift


def record(run: Callable, args: list, session: Session) -> tuple[Callable[[tuple], None], list]:
    """Capture ``run(*args)`` in a CUDA graph (in the session's pool): its replay and its outputs. The
    replay is called with each call's arguments, which the graph does not need (it reads its own
    buffers, where the copied inputs were copied, and the memory of the by-address ones); a capture
    keeps no reference to ``args``, so buffers it read by address can be freed and recycled."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=session.cuda_graph_pool(), capture_error_mode="thread_local"):
        outputs = run(*args)
    return lambda call_args: graph.replay(), outputs


class Capture:
    """One captured variant of a graph: its replay, input buffers and outputs."""

    def __init__(self, replay: Callable[[tuple], None], buffers: list[torch.Tensor], outputs):
        self.replay, self.buffers, self.outputs = replay, buffers, outputs


class SpareBuffers:
    """Buffers with spare capacity for a cache's keys/values and the inputs over cache and block (one
    per padded input, in the graph's order) and what they hold: the provenance content of the tensors
    last copied in."""

    def __init__(self, layout: tuple, buffers: list[torch.Tensor]):
        self.layout, self.buffers = layout, buffers
        self.sources: list = [None] * len(buffers)  # the provenance content of each tensor copied in
        self.used = 0  # the session's spare-buffer call count at its last use

    def holds(self, i: int, now: provenance.Content) -> bool:
        """Whether buffer ``i`` holds the content ``now`` (of a tensor, or of its cached part): the same
        content (:mod:`.provenance`: the same tensor unwritten since the copy, a view that a
        ``DynamicCache.crop`` made of its concatenation with a block, the cached part of such a
        concatenation); an inference tensor, without versions: never."""
        held = self.sources[i]
        return held is not None and held.version is not None and (held.token, held.version) == (now.token, now.version)

    def held_by(self, now: dict) -> bool:
        """Whether it holds an earlier content of the same tensors as ``now`` (index -> content): tensors
        written in place since."""
        return bool(now) and all(self.sources[i] is not None and self.sources[i].token is content.token
                                 for i, content in now.items())


class WithHostIsland:
    """A captured graph whose ops on host inputs were moved out (:mod:`fbcompile.passes.host_island`): they
    run eagerly, then the replay (or the rest as it is, where no tensor op is left), and the outputs are
    put back in order."""

    def __init__(self, island: HostIsland, captured: CapturedGraph | Callable):
        self.island, self.captured = island, captured

    def __call__(self, *args):
        on_host = self.island.gm(*args)
        rest = self.captured(*args)
        return type(rest)(self.island.merge(on_host, rest))


class CapturedGraph:
    """A compiled graph run through CUDA graphs where it can be (see the module docstring).

    ``by_address``: argument indices known to hold cached keys/values (taken by address).
    ``key_count``: set when ``gm`` takes a key count after its arguments (:mod:`fbcompile.passes.key_count`).
    ``joins``: outputs ``gm`` returns as the block alone, to join to the cached input
    (:mod:`fbcompile.passes.hoist_cache_cats`).
    ``kept_inputs``: argument indices of the cached parts the dispatcher passes in (taken by address);
    ``kept_outputs``: output indices of the parts it keeps (copied out into recycled buffers).
    ``pooled_outputs``: output indices that another graph of the session took by address as its cached
    keys/values (copied out into recycled buffers too, from then on).
    """

    def __init__(self, run: Callable, gm: fx.GraphModule, session: Session, by_address: set[int],
                 key_count: KeyCountInputs | None = None, joins: list[Join] = (),
                 kept_inputs: set[int] = frozenset(), kept_outputs: set[int] = frozenset()):
        self.run, self.session = run, session
        self.kept_outputs = set(kept_outputs)
        self.pooled_outputs: set[int] = set()
        self._recycled: dict[int, list[RecycledBuffer]] = {}  # per kept or pooled output, its buffers
        self._fresh: tuple[list[int], list[int]] = ([], [])  # the last replay's fresh outputs: indices, addresses
        session.captured_graphs.add(self)
        self.key_count, self.joins = key_count, list(joins)
        self._count: tuple | None = None  # ((length, device), the key count tensor of that length)
        self.spare = False  # the cached keys/values run from buffers with spare capacity
        self._spares: OrderedDict = OrderedDict()  # layout -> the sets of buffers of it it ran over (LRU first)
        self._max_layouts = 1
        self._dropped_layouts: OrderedDict = OrderedDict()
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self._read = [i for i, node in enumerate(placeholders) if reads_data(node)]
        self._size_only = [i for i, node in enumerate(placeholders) if node.users and not reads_data(node)]
        # inputs whose sizes dynamo does not guard (symbolic ones, our cached inputs): sizes in the key
        self._unguarded = {i for i, node in enumerate(placeholders)
                           if not _static_sizes(node.meta.get("example_value"))}
        self._kept_inputs = set(kept_inputs)
        self._kept_addresses: set[tuple] = set()  # the kept parts' addresses seen, while taken by address
        self._static = set(by_address) | self._kept_inputs | {
            i for i, node in enumerate(placeholders) if _marked_static(node)}
        self._kv = set(by_address)
        self._returned = _returned_inputs(gm)  # inputs an output may be a view of
        self._kv_copies: dict[int, InputCopy] = {}  # cached inputs new at every block, copied in
        self._kv_recent: dict[int, list[weakref.ref]] = {}  # per cached input, its last tensors
        self._kv_new_in_a_row: dict[int, int] = {}
        self._by_address: list[int] | None = None  # decided at the first call
        self._kv_slots: list[int] = []  # positions of the cached keys/values among the key's addresses
        self._kept_slots: list[int] = []  # positions of the kept parts among them
        self._last_key: tuple | None = None
        self._copied: list[int] = []
        self._sized: list[int] = []
        self._others: list[int] = []
        self.captures: OrderedDict = OrderedDict()
        self._max_captures = MAX_CAPTURES
        self._dropped: OrderedDict = OrderedDict()  # keys whose capture was dropped to keep the bound
        self._seen: OrderedDict = OrderedDict()
        self.uncapturable: str | None = None
        self._host_first_call = False  # a first call read host tensors only, before any graph read device ones

    def __call__(self, *raw):
        outputs = self._call(raw)
        if not self.joins:
            return outputs
        joined = list(outputs)
        for join in self.joins:
            joined[join.output] = torch.cat([raw[join.input], joined[join.output]], dim=join.dim)
        return type(outputs)(joined)

    def _call(self, raw: tuple):
        args, padded = self._counted(raw)
        if self.uncapturable is not None:
            return self._uncaptured(args, self.uncapturable)
        if torch.is_grad_enabled():
            return self._uncaptured(args, "grad mode")
        if self._by_address is None:
            return self._recycle(self._first_call(args))
        if self._kv_copies:
            args = self._copied_in(args)
        key = self._key(args)
        last, self._last_key = self._last_key, key
        capture = self.captures.get(key)
        if capture is not None:
            self.captures.move_to_end(key)
            return self._replay(capture, args)
        if last is not None and self._new_at_every_block(key, last, args):
            return self._call(raw)
        if self._kept_slots and self._kept_moved(key, args):
            key = self._last_key
        if key not in self._seen and not padded:  # spare-capacity keys recur by design: captured at once
            reason = self._why_new(key, last)
            if reason == NEW_KV:
                self._pool_sources(args)
            if reason in (NEW_KV, NEW_LENGTH) and self.key_count is not None and self._may_pad(raw):
                self.spare = True
                self.session.cuda_graph_counts["switched to spare capacity"] += 1
                return self._call(raw)
            self._seen[key] = None
            if len(self._seen) > _SEEN_KEYS:
                self._seen.popitem(last=False)
            return self._recycle(self._uncaptured(args, reason))
        if key in self._dropped:  # the keys come back in turn: keep more captures, or stop capturing them
            if self._max_captures >= MAX_CAPTURES_GROWN:
                return self._recycle(self._uncaptured(args, "more keys in turn than captures kept"))
            self._max_captures *= 2
            self._dropped.clear()
            self.session.cuda_graph_counts["capture bound doubled (dropped keys came back)"] += 1
        return self._recycle(self._capture(key, args))

    def _may_pad(self, args) -> bool:
        """Whether the cached keys/values may be read from copies: the pass proved that the graph only
        reads them; no input it writes (or may write: an inference tensor) shares their memory."""
        padded = {p.index for p in self.key_count.padded}
        memory = {args[i].untyped_storage().data_ptr() for i in padded}
        return not any(args[i].untyped_storage().data_ptr() in memory for i in self._writes if i not in padded)

    def _counted(self, args) -> tuple[tuple, bool]:
        """The arguments of the compiled graph - with a key count, appended (the cached length as a
        device tensor), and in spare mode the cached keys/values replaced by their spare buffers - and
        whether they were."""
        if self.key_count is None:
            return args, False
        key_count = self.key_count.resolve(args)
        lengths = {p.length(args[p.index]) for p in key_count.padded}
        length = max(max(lengths), 0)  # any count >= the lengths: every key counts
        padded = (self.spare and len(lengths) == 1 and min(lengths) >= 0 and self.uncapturable is None
                  and not torch.is_grad_enabled())  # (a joined input shorter than its block: no cache)
        if padded:
            capacity, most = spare_capacity(length), key_count.most_capacity(args)
            capacity = capacity if most is None else max(length, min(capacity, most))  # a table's rows bound it
            args = self._into_spare(args, key_count, length, capacity)
        device = args[key_count.padded[0].index].device
        if self._count is None or self._count[0] != (length, device):  # the graphs only read it
            self._count = ((length, device), torch.full((1,), length, dtype=torch.int32, device=device))
        return (*args, self._count[1]), padded

    def _into_spare(self, args, key_count, length: int, capacity: int) -> tuple:
        """``args`` with the cached keys/values and the inputs over cache and block in buffers of
        ``capacity`` (each copied unless its buffer holds its content already) and the integer inputs of
        their sizes and strides set for it.

        One ``copy_`` per tensor: on the H200 it copies at 3.8-4.2 TB/s where one ``_foreach_copy_`` into
        the (strided) narrowed buffers reached 2.7-2.9 (``benchmarks/results/spare_copy_h200.md``)."""
        padded = key_count.padded
        sources = [args[p.index] for p in padded]
        layout = (capacity, tuple((p.dim, p.extra, p.unread, t.shape[:p.dim], t.shape[p.dim + 1:], t.dtype, t.device)
                                  for p, t in zip(padded, sources)))  # buffer strides follow from these
        self._keep_layout(layout)
        cached = [(p.dim, length) if p.extra else None for p in padded]  # inputs over cache and block: their cached part
        needed = [i for i, p in enumerate(padded) if not p.unread and p.cached_read]
        now = {i: provenance.content(sources[i], cached[i]) for i in needed}
        spare = self._spare_set(layout, padded, sources, capacity, now)
        copied = []  # one copy_ per part: see below
        for i, (p, source) in enumerate(zip(padded, sources)):
            if i not in now or spare.holds(i, now[i]):
                if p.extra and not p.unread:
                    p.fill(spare.buffers[i], source, capacity, cached=False)  # the block's part
                continue
            p.fill(spare.buffers[i], source, capacity)
            spare.sources[i] = now[i]
            copied.append(p.index)
        if any(i in self._kv for i in copied):
            self.session.cuda_graph_counts["cache copies into spare capacity"] += 1
        if any(i not in self._kv for i in copied):
            self.session.cuda_graph_counts["inputs over cache and block copied into spare capacity"] += 1
        args = list(args)
        for p, buffer in zip(padded, spare.buffers):
            args[p.index] = buffer
        for i, value in key_count.size_values(capacity):
            args[i] = value
        return tuple(args)

    def _keep_layout(self, layout) -> None:
        """Keep the buffers of ``layout`` and of the last layouts before it: one, twice as many each time a
        dropped layout comes back (a loop that grows its cache again from a prompt's length at each
        request meets the same capacities in turn), up to :data:`MAX_SPARE_LAYOUTS`, and one for good
        where that is not enough (``_max_layouts`` 0). A cache that only grows keeps one: each move to a
        larger capacity frees the buffers of the last, and drops the captures that read them."""
        if layout in self._spares:
            self._spares.move_to_end(layout)
            return
        if layout in self._dropped_layouts and self._max_layouts:
            self._dropped_layouts.clear()
            if self._max_layouts < MAX_SPARE_LAYOUTS:
                self._max_layouts *= 2
                self.session.cuda_graph_counts["spare layouts kept doubled (capacities came back)"] += 1
            else:  # more in turn than it may keep: each would be dropped before it comes back
                self._max_layouts = 0
                self.session.cuda_graph_counts["spare layouts kept: back to one (more in turn than kept)"] += 1
        self._spares[layout] = []
        while len(self._spares) > max(self._max_layouts, 1):
            old, spares = self._spares.popitem(last=False)
            self._dropped_layouts[old] = None
            if len(self._dropped_layouts) > _SEEN_KEYS:
                self._dropped_layouts.popitem(last=False)
            pointers = {b.data_ptr() for spare in spares for b in spare.buffers}  # their captures never replay
            for key in [key for key in self.captures if pointers & set(key[0])]:
                del self.captures[key]

    def _spare_set(self, layout, padded, sources, capacity: int, now: dict) -> SpareBuffers:
        """The session's set of buffers of ``layout`` for this call: one that holds what it reads, else one
        that holds what the same tensors held before a write, else the least recently used one - or a new
        one, up to :data:`MAX_SPARE_SETS`, if the cache was in a set this way taken before: a graph called
        for each layer (a graph break in every layer) meets the layers' caches in turn, and gets a set for
        each in its second round, where a cache grown by ``torch.cat`` never comes back."""
        sets = [spare for key, spare in list(self.session.spare_buffers.items()) if key[0] == layout]
        # told apart by the cached keys/values (an input over cache and block, a mask, may be new at every call)
        kv = {i: content for i, content in now.items() if padded[i].index in self._kv} or now
        spare = (next((s for s in sets if all(s.holds(i, content) for i, content in now.items())), None)
                 or next((s for s in sets if all(s.holds(i, content) for i, content in kv.items())), None)
                 or next((s for s in sets if s.held_by(kv)), None))
        evicted = self.session.evicted_contents
        if spare is None and sets and (len(sets) >= MAX_SPARE_SETS or not any(c.token in evicted for c in kv.values())):
            spare = min(sets, key=lambda s: s.used)
            evicted.update(c.token for c in spare.sources if c is not None)
        elif spare is None:
            spare = SpareBuffers(layout, [self._buffer(p, t, capacity) for p, t in zip(padded, sources)])
            slots = {key[1] for key in self.session.spare_buffers.keys() if key[0] == layout}
            self.session.spare_buffers[(layout, min(set(range(len(slots) + 1)) - slots))] = spare
            if sets:
                self.session.cuda_graph_counts["spare buffer sets added (caches read in turn)"] += 1
        self.session.spare_calls += 1
        spare.used = self.session.spare_calls
        if spare not in self._spares[layout]:
            self._spares[layout].append(spare)
        return spare

    def _buffer(self, padded: PaddedInput, tensor: torch.Tensor, capacity: int) -> torch.Tensor:
        """A buffer of ``capacity`` for ``tensor``; for an input the graph does not read, any buffer of
        its layout the session holds (only its sizes count: nothing reads or writes it through this
        graph), else one kept for all such inputs."""
        sizes, strides = padded.layout(tensor.shape, capacity)
        layout = (tuple(sizes), tuple(strides), tensor.dtype, tensor.device)
        if not padded.unread:
            return torch.empty_strided(sizes, strides, dtype=tensor.dtype, device=tensor.device)
        for held in list(self.session.spare_buffers.values()):
            for buffer in getattr(held, "buffers", [held]):
                if (tuple(buffer.shape), buffer.stride(), buffer.dtype, buffer.device) == layout:
                    return buffer
        buffer = self.session.spare_buffers[("unread", *layout)] = torch.empty_strided(
            sizes, strides, dtype=tensor.dtype, device=tensor.device)
        return buffer

    def _why_new(self, key: tuple, last: tuple | None) -> str:
        """Why ``key`` has not been seen: the cached keys/values are other tensors than at the last call
        (a cache grown by ``torch.cat``: such a graph never replays; a preallocated cache, such as HF
        ``StaticCache``, does) or longer views of the same memory (a preallocated buffer, a view of its
        filled part passed in), or anything else (shapes, other inputs, a first call)."""
        if last is not None and any(key[0][j] != last[0][j] for j in self._kv_slots):
            return NEW_KV
        if last is not None and any(key[1][j] != last[1][j] for j in self._kv_sized_slots):
            return NEW_LENGTH
        return "first call with these shapes or addresses"

    def _pool_sources(self, args) -> None:
        """Have the outputs of other graphs' replays that this graph meets as its cached keys/values copied
        out into recycled buffers from now on. A loop that drops each block's cache before it makes the
        block after next (Fast-dLLM's dual cache: each block's full pass makes the buffers that the block's
        later steps write in place) then hands this graph a few addresses in turn, and its captures over
        them replay, where fresh outputs would give it new addresses, and a capture, at every block."""
        pointers = {args[i].untyped_storage().data_ptr() for i in self._by_address if i in self._kv}
        for graph in list(self.session.captured_graphs):
            indices, addresses = graph._fresh
            for index, address in zip(indices, addresses):
                if address in pointers and index not in graph.pooled_outputs:
                    graph.pooled_outputs.add(index)
                    self.session.cuda_graph_counts["outputs recycled (another graph reads them by address)"] += 1

    def _first_call(self, args):
        """Run uncaptured, and learn which inputs the graph writes (they are taken by address)."""
        tensors = [i for i in self._read if isinstance(args[i], torch.Tensor)]
        devices = {args[i].device.type for i in tensors}
        self.session.device_inputs_seen |= DEVICE_TYPE in devices
        if devices and DEVICE_TYPE not in devices and self.session.device_inputs_seen:
            self.uncapturable = "host tensors only"  # nothing to capture
            return self._uncaptured(args, self.uncapturable)
        if devices and DEVICE_TYPE not in devices and not self._host_first_call:
            # before any graph read device tensors: a host graph ahead of the model's device ones, or a model
            # on the host; told apart at its next call, when the model's other graphs have run once
            self._host_first_call = True
            return self._uncaptured(args, "first call")
        if devices - {DEVICE_TYPE}:
            self.uncapturable = f"inputs on {', '.join(sorted(devices - {DEVICE_TYPE}))}"
            if "cuda graphs" not in self.session.warned:
                self.session.warned.add("cuda graphs")
                warnings.warn(f"fbcompile: CUDA graphs were asked for, but the inputs are on "
                              f"{', '.join(sorted(devices))}: running without CUDA graphs", stacklevel=4)
            return self._uncaptured(args, self.uncapturable)
        before = [provenance.version(args[i]) for i in tensors]
        outputs = self._uncaptured(args, "first call")
        self._written_inputs = {i for i, v in zip(tensors, before) if v is None or provenance.version(args[i]) != v}
        self._lay_out(args)
        return outputs

    def _lay_out(self, args) -> None:
        """Decide which inputs are taken by address and which copied (from the first call's arguments)."""
        tensors = [i for i in self._read if isinstance(args[i], torch.Tensor)]
        written = self._written_inputs
        self._by_address = [i for i in tensors
                            if i in self._static or i in written or isinstance(args[i], torch.nn.Parameter)]
        self._written = [i for i in sorted(written) if provenance.version(args[i]) is not None]
        self._writes = sorted(written)
        self._kv_slots = [j for j, i in enumerate(self._by_address) if i in self._kv]
        self._kept_slots = [j for j, i in enumerate(self._by_address) if i in self._kept_inputs]
        self._copied = [i for i in tensors if i not in self._by_address]
        self._sized = [i for i in tensors + self._size_only if i in self._unguarded and isinstance(args[i], torch.Tensor)]
        padded = {p.index for p in self.key_count.padded} if self.key_count is not None else set()
        self._kv_sized_slots = [j for j, i in enumerate(self._sized) if i in self._kv | padded]
        self._others = [i for i in self._read if not isinstance(args[i], torch.Tensor)]
        self._pick = tuple(map(_picker, (self._by_address, self._sized, self._others)))
        self._last_key = self._key(args)
        self._seen[self._last_key] = None

    def _new_at_every_block(self, key: tuple, last: tuple, args) -> bool:
        """At a call that found no capture, note which cached inputs moved since the last call and
        whether each is a new tensor (none of its last :data:`_RECENT_TENSORS`); copy in from now on those
        new at :data:`NEW_TENSORS_BEFORE_COPY` such calls in a row while every other input by address
        stayed (the captures keyed on them are dropped). Whether any is copied now."""
        changed = {j for j, (a, b) in enumerate(zip(key[0], last[0])) if a != b}
        if not changed:
            return False
        movable = {j for j in changed if self._may_copy(self._by_address[j], args)}
        alone = movable == changed
        copied = False
        for j in movable:
            i, tensor = self._by_address[j], args[self._by_address[j]]
            recent = self._kv_recent.setdefault(i, [])
            new = not any(ref() is tensor for ref in recent)
            if new:
                recent.append(weakref.ref(tensor))
                del recent[:-_RECENT_TENSORS]
            self._kv_new_in_a_row[i] = self._kv_new_in_a_row.get(i, 0) + 1 if new and alone else 0
            if self._kv_new_in_a_row[i] >= NEW_TENSORS_BEFORE_COPY:
                self._kv_copies[i] = InputCopy()
                copied = True
        if copied:
            self.captures.clear()
            self._seen.clear()
            self._dropped.clear()
            self._last_key = None
            self.session.cuda_graph_counts["cached inputs copied in from then on (new at every block)"] += 1
        return copied

    def _may_copy(self, i: int, args) -> bool:
        """Whether cached input ``i`` may be read from a copy (and is not yet): of sizes dynamo guards (a
        cache of changing length has spare capacity, or runs uncaptured over each new one), not written by
        the graph nor sharing memory with an input it writes, not returned as a view, not broadcast."""
        if (i not in self._kv or i in self._kv_copies or i in self._unguarded or i in self._kept_inputs
                or i in self._returned or i in self._written_inputs):
            return False
        tensor = args[i]
        if isinstance(tensor, torch.nn.Parameter) or 0 in tensor.stride():
            return False
        memory = tensor.untyped_storage().data_ptr()
        return not any(args[w].untyped_storage().data_ptr() == memory for w in self._writes)

    def _copied_in(self, args) -> tuple:
        """``args`` with the cached inputs new at every block replaced by their buffers."""
        args = list(args)
        for i, copy in self._kv_copies.items():
            args[i] = copy.holding(args[i], self.session)
        return tuple(args)

    def _kept_moved(self, key: tuple, args) -> bool:
        """Count the addresses of the kept parts in ``key``; past :data:`MAX_KEPT_ADDRESSES`, take them by
        copy from now on (the captures, keyed on them, are dropped): whatever holds their buffers, a reuse
        graph then never captures more than it did with copies."""
        self._kept_addresses.add(tuple(key[0][j] for j in self._kept_slots))
        if len(self._kept_addresses) <= MAX_KEPT_ADDRESSES:
            return False
        self._static -= self._kept_inputs
        self._kept_inputs, self._kept_addresses = set(), set()
        self.captures.clear()
        self._seen.clear()
        self._lay_out(args)
        self.session.cuda_graph_counts["kept parts copied in (their buffers moved too often)"] += 1
        return True

    def _key(self, args) -> tuple:
        """Addresses of the by-address inputs, sizes of those dynamo's guards leave free, other arguments."""
        by_address, sized, others = self._pick
        return (tuple(map(torch.Tensor.data_ptr, by_address(args))),
                tuple((a.shape, a.stride(), a.dtype) for a in sized(args)),
                others(args))

    def _uncaptured(self, args, reason: str):
        self.session.cuda_graph_counts[f"uncaptured ({reason})"] += 1
        return self.run(*args)

    def _capture(self, key: tuple, args):
        """Run ``args`` uncaptured (this call's result), then capture the graph over its own input buffers."""
        outputs = self.run(*args)
        buffers = [_buffer_like(args[i]) for i in self._copied]
        _copy_all(buffers, [_stored(args[i]) for i in self._copied])
        static = list(args)
        for i, buffer in zip(self._copied, buffers):
            static[i] = buffer.expand(args[i].shape)
        try:
            replay, captured = record(self.run, static, self.session)
        except Exception as error:  # a host sync, a CPU tensor made inside, an op CUDA graphs cannot record
            self.uncapturable = f"capture failed: {type(error).__name__}"
            warnings.warn(f"fbcompile: a compiled graph could not be captured in a CUDA graph ({error}); "
                          "it runs without one", stacklevel=3)
            return outputs
        inputs = {t.untyped_storage().data_ptr() for t in static if isinstance(t, torch.Tensor)}
        if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in inputs for t in captured):
            self.uncapturable = "returns a view of an input"
            return outputs
        self.captures[key] = Capture(replay, buffers, captured)
        self.session.cuda_graph_counts["captures"] += 1
        if len(self.captures) > self._max_captures:
            self._dropped[self.captures.popitem(last=False)[0]] = None
            if len(self._dropped) > _SEEN_KEYS:
                self._dropped.popitem(last=False)
        return outputs

    def _replay(self, capture: Capture, args):
        _copy_all(capture.buffers, [_stored(args[i]) for i in self._copied])
        capture.replay(args)
        for i in self._written:  # as the uncaptured graph would: guards and provenance read versions
            torch.autograd.graph.increment_version(args[i])
        self.session.cuda_graph_counts["replays"] += 1
        return self._copy_out(capture.outputs)

    def _copy_out(self, outputs):
        """``outputs`` copied (:func:`_copy_all`): the kept and pooled ones into recycled buffers, the
        rest into fresh tensors, whose addresses are noted for :meth:`_pool_sources`."""
        recycled = self.kept_outputs | self.pooled_outputs
        destinations = [(self._recycled_buffer(i, t) if i in recycled else torch.empty_like(t))
                        if isinstance(t, torch.Tensor) else t for i, t in enumerate(outputs)]
        tensors = [i for i, t in enumerate(outputs) if isinstance(t, torch.Tensor)]
        _copy_all([destinations[i] for i in tensors], [outputs[i] for i in tensors])
        fresh = [i for i in tensors if i not in recycled]
        self._fresh = (fresh, [destinations[i].data_ptr() for i in fresh])
        return type(outputs)(destinations)

    def _recycle(self, outputs):
        """Outputs of a call that did not replay, with the kept parts moved into recycled buffers (so a
        reuse graph captured after it sees the addresses later replays give)."""
        kept = [i for i, t in enumerate(outputs)
                if i in self.kept_outputs and isinstance(t, torch.Tensor) and t.device.type == DEVICE_TYPE]
        if not kept:
            return outputs
        buffers = [self._recycled_buffer(i, outputs[i]) for i in kept]
        _copy_all(buffers, [outputs[i] for i in kept])
        moved = list(outputs)
        for i, buffer in zip(kept, buffers):
            moved[i] = buffer
        return type(outputs)(moved)

    def _recycled_buffer(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """A tensor for kept or pooled output ``index``: an alias of the first of its buffers with ``like``'s layout
        that nothing else holds, or of a new one (a fresh tensor once there are :data:`MAX_RECYCLED`)."""
        pool = self._recycled.setdefault(index, [])
        layout = (like.shape, like.stride(), like.dtype, like.device)
        for recycled in pool:
            if recycled.layout == layout and recycled.unheld():
                return recycled.buffer.detach()
        buffer = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=like.device)
        if len(pool) >= MAX_RECYCLED:
            return buffer
        pool.append(RecycledBuffer(layout, buffer))
        self.session.cuda_graph_counts["recycled buffers" if index in self.kept_outputs else
                                       "recycled output buffers"] += 1
        return buffer.detach()


class InputCopy:
    """A graph's buffer for one input, and which tensor (at which version) it holds a copy of."""

    __slots__ = ("buffer", "_source", "_version")

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self._source, self._version = None, None

    def holding(self, source: torch.Tensor, session: Session) -> torch.Tensor:
        """The buffer, holding ``source``'s values: copied unless it holds them already (the same tensor,
        unwritten since; an inference tensor, without versions: always copied). Its sizes, strides, dtype
        and device are the first source's: dynamo's guards keep them (only such inputs are copied in)."""
        version = provenance.version(source)
        if self.buffer is None:
            self.buffer = torch.empty_strided(source.shape, source.stride(), dtype=source.dtype, device=source.device)
        held = self._source() if self._source is not None else None
        if held is not source or version is None or version != self._version:
            self.buffer.copy_(source)
            self._source, self._version = weakref.ref(source), version
            session.cuda_graph_counts["cached inputs copied in"] += 1
        return self.buffer


class RecycledBuffer:
    """A buffer for a kept output, handed out as aliases (``detach()``) while nothing else holds it."""

    __slots__ = ("layout", "buffer", "_storage", "_alone")

    def __init__(self, layout: tuple, buffer: torch.Tensor):
        self.layout, self.buffer = layout, buffer
        self._storage = buffer.untyped_storage()._cdata  # valid while ``buffer`` lives
        # the storage's use count with nothing but the buffer (and, where torch keeps it, the storage's
        # Python object made just now) holding it
        self._alone = torch._C._storage_Use_Count(self._storage)

    def unheld(self) -> bool:
        """Whether nothing but the buffer holds its memory: no alias, view or storage object of it (the
        storage's use count, read by address: making a storage object to ask costs more than the rest)."""
        return torch._C._storage_Use_Count(self._storage) == self._alone


def _picker(indices: list[int]) -> Callable[[tuple], tuple]:
    """``lambda args: tuple(args[i] for i in indices)``, iterating in C (the key reads ~340 arguments of a
    28-layer model per call)."""
    if len(indices) == 1:
        index = indices[0]
        return lambda args: (args[index],)
    return operator.itemgetter(*indices) if indices else (lambda args: ())


def _copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``d.copy_(s)`` for each pair: one ``torch._foreach_copy_`` per dtype with at least
    :data:`FOREACH_MIN_TENSORS` tensors below :data:`OWN_COPY_BYTES`, one ``copy_`` for each other.
    The foreach kernel takes a list in one launch only if it shares a dtype; a mixed list falls back to
    one copy per tensor, each a driver call (a 28-layer model's refresh on the H200, its kept ``O_e`` in
    bf16 and ``L_e`` in fp32: 56 copies, ~400 µs of host time, against ~100 µs for two foreach launches;
    ``benchmarks/results/host_lm_32k_b1_h200.md``: ~7 µs a copy). But one foreach launch costs more host
    time than a ``copy_`` or two (~17 µs a launch in Wan's replays on the H100,
    ``benchmarks/results/host_wan_32k_h100_s28.md``), and a large tensor copies faster alone (into spare
    buffers on the H200, ``spare_copy_h200.md``); both rules together made Wan's chunk 3.5-4.5% faster in
    exact mode (``session28_h100.md``)."""
    groups: dict[torch.dtype, tuple[list, list]] = {}
    for destination, source in zip(destinations, sources):
        if source.nbytes >= OWN_COPY_BYTES:
            destination.copy_(source)
            continue
        group = groups.setdefault(source.dtype, ([], []))
        group[0].append(destination)
        group[1].append(source)
    for group in groups.values():
        if len(group[0]) >= FOREACH_MIN_TENSORS:
            torch._foreach_copy_(*group)
        else:
            for destination, source in zip(*group):
                destination.copy_(source)


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without its broadcast dimensions (stride 0, e.g. positions ``arange(n).expand(b, -1)``):
    the elements it stores, each once."""
    if 0 not in tensor.stride():
        return tensor
    return tensor[tuple(slice(0, 1) if st == 0 else slice(None) for st in tensor.stride())]


def _buffer_like(tensor: torch.Tensor) -> torch.Tensor:
    """A buffer for ``_stored(tensor)`` with its strides; ``buffer.expand(tensor.shape)`` then has the
    sizes and strides the graph was compiled for."""
    stored = _stored(tensor)
    return torch.empty_strided(stored.shape, tensor.stride(), dtype=tensor.dtype, device=tensor.device)


def _returned_inputs(gm: fx.GraphModule) -> set[int]:
    """Indices of the inputs an output of ``gm`` is, or may be a view of (through views, and casts, which
    return their input when there is nothing to cast)."""
    casts = {"to", "type", "type_as", "float", "half", "bfloat16", "expand_as"}  # and a view VIEW_OPS lacks
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    found = set()
    for node in gm.graph.output_node().all_input_nodes:
        node = view_base(node)
        while op_name(node) in casts and node.args and isinstance(node.args[0], fx.Node):
            node = view_base(node.args[0])
        if node.op == "placeholder":
            found.add(placeholders.index(node))
    return found


def _marked_static(node: fx.Node) -> bool:
    """Dynamo marks parameters and buffers of modules (and ``torch._dynamo.mark_static_address``) static."""
    return bool(node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type"))


def _static_sizes(example) -> bool:
    """Whether ``example`` (a placeholder's example value) is a tensor of static sizes and strides, which
    dynamo's guards check before the graph runs."""
    return isinstance(example, torch.Tensor) and all(
        isinstance(n, int) for n in (*example.shape, *example.stride()))
