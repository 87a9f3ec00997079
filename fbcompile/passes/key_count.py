"""Let a graph run over cached keys/values held in buffers with spare capacity.

A cache grown by ``torch.cat`` at every block between calls (``generate`` loops, a cache extended
outside the model) hands the graph new tensors of a new length each time, so a CUDA graph captured
over one block's cache could never replay. If the length of the cached keys/values reaches nothing
but the external attention (the split of a mask over cache and block, positions after it), the graph
can instead run over buffers of a fixed, larger capacity that the cache is copied into, with the
number of keys that count read on the device. This pass proves that and adds the count as an input.

Pattern (dynamo's graph after the split, the cached length a symbol ``s0``)::

    def forward(self, L_past_k_: "bf16[1, 2, s0, 128]", L_past_v_: "bf16[1, 2, s0, 128]", s0: "Sym(s0)", ...):
        ...
        out_e, lse_e = torch.ops.fbcompile.attention_lse(q, L_past_k_, L_past_v_, None, 0.088)

becomes::

    def forward(self, L_past_k_, L_past_v_, s0, ..., cached_key_count: "i32[1]"):
        ...
        out_e, lse_e = torch.ops.fbcompile.attention_lse(q, L_past_k_, L_past_v_, None, 0.088, cached_key_count)

``attention_lse`` attends to the first ``min(cached_key_count, keys)`` keys. Called with the cached
inputs in buffers of capacity ``C >= s0`` along that dimension (their first ``s0`` rows the cache),
``s0 = C`` and ``cached_key_count = [s0]``, the graph computes what it computed over the cache alone;
called with the cache itself and any count at least its length, it computes the same.

It applies when every cached key/value input with a symbolic size has exactly one, a bare symbol (dynamo
gives each cached tensor its own: the caller checks that they agree before padding), strides that a
dense buffer of the capacity can have (those of a tensor of its own; or of a view of the filled part of
a larger buffer, whose strides dynamo makes other symbols: they then take the buffer's values), and

* is read only as the keys or values of ``attention_lse`` calls, along their key axis, directly or
  through ``permute``/``transpose`` views read only so (a ``[B, S, H, D]`` cache seen as ``[B, H, S, D]``;
  no slice or other use: any of them could see the padding), or through position-wise ops read only so
  (RoPE applied after the cat, split: its padded rows reach only the attention, which the count stops;
  the position tables they read, and the tables' rows read at the cached length, as
  :mod:`fbcompile.passes.position_tables` proves and rewrites them), and none of these calls runs on cuDNN
  (:func:`fbcompile.ops.attention_kernel`), which takes no key count (as a bias over the padding it
  loses its 1.5x lead over the Triton kernel: ``benchmarks/results/attention_backends_h200.md``);
* or is the cache joined with the block by an earlier graph (SDAR's graph break, split where it was
  joined: :func:`_joined_cache`), then padded to ``C + block`` with the block after the capacity;
* its length read (``size``) along that axis only to split an input over the cache and the block (below);
* no other input's sizes, strides or value involve these symbols, except cached inputs the graph does
  not read (they get a buffer of the capacity that nothing reads, one per layout: a compiled graph may
  take a size from them), integer inputs that are one of them (dynamo passes sizes it saw as such
  inputs), read only as those lengths, and inputs *over the
  cache and the block*: a mask ``[..., s0 + c]`` (the shapes tie its size to ``s0 + c``) that the split
  reads only as its first ``s0`` and last ``c`` keys, directly or through element-wise ops (``~mask``,
  the split's ``logical_not``, a scale)::

      size = L_past_k_.size(2)
      attention_lse(q, L_past_k_, L_past_v_, L_mask_.narrow(-1, 0, size), ...)   # the head: external
      attention_merge_lse(q, k, v, L_mask_.narrow(-1, size, 32), ...)           # the tail: the block's

  Such an input goes into a buffer of ``C + c`` along that dimension, its head at ``[0, s0)`` and its tail at
  ``[C, C + c)``: the head, read as ``[0, C)``, reaches only attention with the key count, and the tail is
  where the graph, called with ``s0 = C``, reads it. A graph that reads the cache only for such lengths
  (a reuse graph, which has no external attention) reads them from the mask instead
  (``L_mask_.size(-1) - 32``), so its cache needs no copy;
* or read in a mask the graph computes and splits as above (HF's ``create_causal_mask``: ``arange(s0 + c)
  <= arange(c) + s0``, maybe with a 2-D padding mask indexed by the key positions; a block mask joined to a
  cached part of ones), whose cached and block's parts :mod:`fbcompile.passes.length_invariance` proves
  the same at any length: the graph computes it at the capacity; or (a sliding window, block-causal
  positions) the same with the length's values read from the count, as the graph then reads them
  (:func:`~fbcompile.passes.length_invariance.values_from_count`). A 2-D padding mask of a length of its own
  (dynamo does not tie it to ``s0``) that only such a mask reads is taken to be over the cache and the
  block, padded as above; a call pads it only if its length is the cache's plus ``c``. The block's length
  ``c`` may be a symbol (dynamo made it dynamic): the buffers' layouts then keep it, and each call binds
  it from an input of that length (:meth:`KeyCountInputs.resolve`);
* or read as positions after the cache, ``torch.arange(s0 + a, s0 + b)`` of an integer dtype (HF's
  ``cache_position``, computed from the cache's length when no positions are passed): rewritten to
  ``torch.arange(b - a) + (cached_key_count + a)``, the same positions from the count read on the
  device (so a graph that reads nothing else of the cache - a reuse graph - takes the count too);
* the shape environment ties none of them to another expression than ``s0 + c`` (a replacement such as
  ``s3 = s0 // 16``, from frame positions over the cache, would size something by the capacity).

So no other node can depend on the length. Run after every other pass (``attention_lse`` nodes gain
a sixth argument that the other passes do not expect).
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field, replace

import sympy
import torch
import torch.fx as fx

from fbcompile.passes.graph_utils import NoExample, erase_unused, fill_examples, op_name, recorded, traced_value
from fbcompile.passes.length_invariance import (LENGTH, MaskEvaluator, Unproved, prove_same_at_any_length,
                                                 values_from_count)
from fbcompile.passes.position_tables import CAPACITY, TableReads, read_from_count, table_reads
from fbcompile.passes.positionwise import LayoutError, positionwise_rows

ATTENTION = torch.ops.fbcompile.attention_lse.default
COUNT_NAME = "cached_key_count"



@dataclass
class PaddedInput:
    """A cached key/value input (``extra`` 0) or an input over the cache and ``extra`` block positions: its
    argument index, the dimension of its length and the strides of its buffer as expressions of
    :data:`CAPACITY` (and of the block's length where it is dynamic: ``extra`` a symbol, which
    :meth:`KeyCountInputs.resolve` binds at each call)."""

    index: int
    dim: int
    strides: tuple
    extra: int | sympy.Expr = 0
    unread: bool = False  # a cached input the graph receives but reads nothing of: any memory will do
    joined: bool = False  # keys/values an earlier graph joined with the block (extra: the block's length)
    cached_read: bool = True  # the graph reads the cached part (a reuse graph reads only the block's)

    def layout(self, shape: torch.Size, capacity: int) -> tuple[list[int], list[int]]:
        """Sizes and strides of a buffer of ``capacity + extra`` along :attr:`dim`, laid out as the graph
        expects."""
        sizes = list(shape)
        sizes[self.dim] = capacity + self.extra
        return sizes, [int(sympy.sympify(s).subs(CAPACITY, capacity)) for s in self.strides]

    def length(self, tensor: torch.Tensor) -> int:
        """The cached length ``tensor`` (this input) has."""
        return tensor.shape[self.dim] - self.extra

    def fill(self, buffer: torch.Tensor, tensor: torch.Tensor, capacity: int, cached: bool = True) -> None:
        """Copy ``tensor`` into its buffer of ``capacity``: the cached part first (unless not ``cached``:
        the buffer holds it), the block's after the capacity."""
        length = self.length(tensor)
        for d, stride in enumerate(self.strides):  # dimensions both broadcast: one element each
            if stride == 0:
                buffer, tensor = buffer.narrow(d, 0, 1), tensor.narrow(d, 0, 1)
        if cached:
            buffer.narrow(self.dim, 0, length).copy_(tensor.narrow(self.dim, 0, length))
        if self.extra:
            buffer.narrow(self.dim, capacity, self.extra).copy_(tensor.narrow(self.dim, length, self.extra))


@dataclass
class KeyCountInputs:
    """How to call a graph :func:`add_key_count` rewrote: the inputs that may be padded, the integer
    inputs that carry their sizes or strides (``(index, value as an expression of CAPACITY)``), and the
    key count, appended after all other arguments."""

    padded: list[PaddedInput]
    sizes: list[tuple]
    positions: int = 0  # positions after the cache the graph now computes from the key count
    masks: int = 0  # masks the graph computes from the cached length, proved the same at the capacity
    blocks: dict = field(default_factory=dict)  # dynamic block length -> (argument, its dim or None: an int)
    tables: int = 0  # position-table reads at the cached length the graph now reads from the key count
    limits: list = field(default_factory=list)  # TableLimit: the capacity the tables' prefix slices allow
    masks_from_count: bool = False  # the masks the graph computes read the length's values from the count
    _values: dict = field(default_factory=dict, repr=False)  # capacity -> size_values (sympy is slow)
    _bound: dict = field(default_factory=dict, repr=False)  # block lengths -> resolve()

    def resolve(self, args) -> "KeyCountInputs":
        """These inputs with the dynamic block lengths of this call (``args``) bound: ints, not symbols."""
        if not self.blocks:
            return self
        values = {symbol: int(args[i] if dim is None else args[i].shape[dim]) for symbol, (i, dim) in self.blocks.items()}
        key = tuple(values.values())
        if key not in self._bound:
            bind = lambda expr: sympy.sympify(expr).subs(values)  # noqa: E731
            padded = [replace(p, extra=int(bind(p.extra)), strides=tuple(bind(s) for s in p.strides))
                      for p in self.padded]
            limits = [replace(limit, extra=int(bind(limit.extra))) for limit in self.limits]
            self._bound[key] = KeyCountInputs(padded, [(i, bind(expr)) for i, expr in self.sizes], self.positions,
                                              self.masks, tables=self.tables, limits=limits,
                                              masks_from_count=self.masks_from_count)
        return self._bound[key]

    def most_capacity(self, args) -> int | None:
        """The largest capacity the position tables the graph slices by the cached length have rows for, at
        this call (``args``; bound block lengths: :meth:`resolve`); None where none bounds it."""
        return min((limit.most(args) for limit in self.limits), default=None)

    def size_values(self, capacity: int) -> list[tuple[int, int]]:
        """``(index, value)`` of the integer inputs for buffers of ``capacity``."""
        if capacity not in self._values:
            self._values[capacity] = [(i, int(sympy.sympify(expr).subs(CAPACITY, capacity))) for i, expr in self.sizes]
        return self._values[capacity]


def _expr(value):
    return value.node.expr if isinstance(value, torch.SymInt) else value


def _symbols(value) -> set:
    """Free symbols of a placeholder's value (a tensor's sizes and strides, or a SymInt)."""
    if isinstance(value, torch.Tensor):
        exprs = [_expr(x) for x in (*value.shape, *value.stride())]
    elif isinstance(value, torch.SymInt):
        exprs = [value.node.expr]
    else:
        return set()
    return set().union(*(sympy.sympify(e).free_symbols for e in exprs)) if exprs else set()


def _value(node: fx.Node):
    """The node's traced value; for a size read the split added (no trace of its own), the size."""
    value = recorded(node)
    if value is None and node.op == "call_method" and node.target == "size" and len(node.args) == 2:
        return _value(node.args[0]).shape[node.args[1]]
    return value


def _buffer_layout(value: torch.Tensor, dim: int, symbol, extra: int = 0, joined: bool = False
                   ) -> tuple[tuple, dict] | None:
    """The strides of a dense buffer of ``CAPACITY + extra`` rows along ``dim`` (where ``value`` has
    ``symbol + extra``; ``joined``: ``symbol``, the cache's length and ``extra``), its dimensions in the
    order of ``value``'s strides, as expressions of the capacity, and the value each symbol of ``value``
    then takes - if the graph's strides for ``value`` can be those (a tensor of its own, maybe expanded,
    or a view of the filled part of a larger buffer, whose strides are other symbols); else None."""
    hints = [traced_value(s) for s in value.stride()]
    order = sorted(range(value.dim()), key=lambda i: (hints[i], -i))  # innermost first
    dense, step = [0] * value.dim(), sympy.Integer(1)
    for i in order:
        if _expr(value.stride()[i]) == 0 and i != dim:  # broadcast (an expanded mask): so is the buffer
            continue
        dense[i] = step
        step = step * (CAPACITY + extra if i == dim else _expr(value.shape[i]))
    values = {symbol: CAPACITY + extra if joined else CAPACITY}
    equations = [sympy.Eq(sympy.sympify(_expr(have)).subs(values), want) for have, want in zip(value.stride(), dense)]
    if any(e is sympy.false for e in equations):
        return None
    sized = set().union(*(sympy.sympify(_expr(s)).free_symbols for s in value.shape))
    others = sorted(_symbols(value) - set(values) - sized, key=str)  # a view's strides: symbols of their own
    if others:
        solved = sympy.solve([e for e in equations if e is not sympy.true], others, dict=True)
        if len(solved) != 1 or set(solved[0]) != set(others):
            return None
        values.update(solved[0])
    if any(sympy.simplify(sympy.sympify(_expr(have)).subs(values) - want) != 0 for have, want in zip(value.stride(), dense)):
        return None
    return tuple(dense), values


def _view_axis(view: fx.Node, dim: int, ndim: int) -> int | None:
    """Where dimension ``dim`` of a ``permute``/``transpose`` view's input lands in the view (None: not
    known statically)."""
    if view.kwargs:
        return None
    args = view.args[1:]
    if op_name(view) == "permute":
        order = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
        if not all(isinstance(d, int) for d in order) or sorted(d % ndim for d in order) != list(range(ndim)):
            return None
        return [d % ndim for d in order].index(dim)
    if len(args) != 2 or not all(isinstance(d, int) for d in args):
        return None
    a, b = (d % ndim for d in args)
    return b if dim == a else a if dim == b else dim


def _size_read(node: fx.Node, source: fx.Node, dim: int, ndim: int) -> bool:
    """Whether ``node`` reads the size of ``source`` along ``dim``."""
    if not (node.op == "call_method" and node.target == "size" or node.target is torch.ops.aten.sym_size.int):
        return False
    args = node.args
    return (not node.kwargs and len(args) == 2 and args[0] is source and isinstance(args[1], int)
            and args[1] % ndim == dim)


def _joined_cache(node: fx.Node, dim: int, ndim: int) -> tuple[int, fx.Node | None] | None:
    """``(block, head)`` if cached input ``node`` is the cache an earlier graph joined with the block
    (SDAR's graph break), read only as :mod:`fbcompile.passes.split_joined_inputs` splits it::

        size = K.size(dim); n = sym_max(size - block, 0)
        head, tail = K.narrow(dim, 0, n), K.narrow(dim, n, size - n)

    with the head, if read (a reuse graph reads only the tail), read only as attention keys/values along
    their key axis. In a buffer of ``C + block`` (the cache at ``[0, n)``, the block at ``[C, C + block)``)
    and called with ``size = C + block``, the head is ``[0, C)``, which the key count cuts to the cache,
    and the tail the block."""
    users = list(node.users)
    sizes = [u for u in users if _size_read(u, node, dim, ndim)]
    if len(sizes) != 1 or dim != 2:
        return None
    size = sizes[0]
    narrows = {u.args[2] == 0: u for u in users if op_name(u) == "narrow" and len(u.args) == 4 and not u.kwargs
               and u.args[0] is node and isinstance(u.args[1], int) and u.args[1] % ndim == dim}
    head, tail = narrows.get(True), narrows.get(False)
    if tail is None or len(users) != 1 + len(narrows):
        return None
    start, rest = tail.args[2], tail.args[3]
    less = start.args[0] if isinstance(start, fx.Node) and start.target is torch.sym_max and start.args[1:] == (0,) \
        else None
    if not (isinstance(less, fx.Node) and less.target is operator.sub and less.args[0] is size
            and type(less.args[1]) is int and less.args[1] > 0 and (head is None or head.args[3] is start)
            and isinstance(rest, fx.Node) and rest.target is operator.sub and rest.args == (size, start)):
        return None
    if (set(size.users) != {less, rest} or set(less.users) != {start}
            or set(start.users) != {tail, rest} | ({head} if head else set()) or set(rest.users) != {tail}):
        return None
    if head is not None and not all(
            u.target is ATTENTION and len(u.args) == 5 and (u.args[1] is head or u.args[2] is head)
            and all(a is not head for j, a in enumerate(u.args) if j not in (1, 2)) for u in head.users):
        return None
    return less.args[1], head


def _key_readers(node: fx.Node, dim: int, ndim: int, name: str) -> tuple[list[fx.Node], list[fx.Node], str | None]:
    """The ``attention_lse`` calls that read cached input ``name`` (``node``, or a view of it) as their
    keys or values with its dimension ``dim`` as their key axis, directly or through ``permute`` /
    ``transpose`` views that nothing else reads (a [B, S, H, D] cache seen as [B, H, S, D]), and the reads
    of its length along that axis; else ``([], [], why not)``."""
    readers, lengths = [], []
    for user in node.users:
        if _size_read(user, node, dim, ndim):
            lengths.append(user)
        elif op_name(user) in ("permute", "transpose") and user.args[0] is node:
            axis = _view_axis(user, dim, ndim)
            if axis is None:
                return [], [], f"{user.name} views cached input {name} in a way not known statically"
            inner, inner_lengths, why = _key_readers(user, axis, ndim, name)
            if why is not None:
                return [], [], why
            readers += inner
            lengths += inner_lengths
        elif user.target is ATTENTION and len(user.args) == 5 and all(
                a is not node for j, a in enumerate(user.args) if j not in (1, 2)):
            if dim != 2:
                return [], [], f"{user.name} reads the length of cached input {name} along another axis than its keys'"
            readers.append(user)
        else:
            return [], [], f"{user.name} reads cached input {name} other than as attention keys/values"
    return readers, lengths, None


def _rotated_readers(node: fx.Node, dim: int, ndim: int) -> tuple | None:
    """``(readers, lengths, ops, tables, why not)`` where cached input ``node`` reaches attention keys/values
    through position-wise ops (RoPE after the cat, split by :mod:`fbcompile.passes.positionwise`: the
    cache rotated with its tables' first ``L`` rows): the attention calls, the reads of its length, the ops
    and ``(position table, its dim)`` they read (:mod:`fbcompile.passes.position_tables` proves those);
    ``why`` set where these ops' results reach anything else. None where it reaches no attention so."""
    downstream, pending, calls, lengths = {node}, [node], [], []
    while pending:
        source = pending.pop()
        for user in source.users:
            if source is node and _size_read(user, node, dim, ndim):
                lengths.append(user)
            elif user.target is ATTENTION:
                calls.append((user, source))
            elif user not in downstream:
                downstream.add(user)
                pending.append(user)
    readers, region, tables = [], set(), []
    for call, operand in calls:
        if operand is node or len(call.args) != 5 or [j for j, a in enumerate(call.args) if a is operand] not in ([1], [2]):
            return None
        try:
            fill_examples(operand)
            chain = positionwise_rows(operand, 2, node)
        except (LayoutError, NoExample):
            return None
        if chain.cat_dim != dim:
            return None
        readers.append(call)
        region |= set(chain.region)
        tables += [(table, use.dim) for (_, table), use in chain.uses.items() if use.kind == "table"]
    if not readers:
        return None
    for source in region | {node}:
        for user in source.users:
            if not (user in region or user in readers or source is node and user in lengths):
                return [], [], set(), [], (f"{user.name} reads {source.name}, computed position-wise from cached "
                                           f"input {node.name}, other than on its way to attention keys/values")
    return readers, lengths, region, tables, None


@dataclass
class _SplitInput:
    """An input over the cache and the block, or a mask the graph computes over them (``padded`` None):
    how it is padded, the narrows that read its head (the cached positions) and its tail (the block's),
    and its other reads (an input's: they must compute such a mask, :func:`_computed_masks`)."""

    name: str
    padded: PaddedInput | None
    symbol: object
    heads: list
    tails: list
    others: list = field(default_factory=list)
    from_count: bool = False  # a computed mask proved the same with the length's values from the key count


def _split_input(node: fx.Node, index: int, symbols: set) -> tuple[_SplitInput | None, str | None]:
    """``node`` as an input over the cache and the block (see the module docstring), else why not."""
    value = _value(node)
    refused = f"input {node.name} depends on a cached length (its sizes)"
    dims = [d for d, size in enumerate(value.shape) if sympy.sympify(_expr(size)).free_symbols & symbols]
    if len(dims) != 1:
        return None, refused
    dim, ndim = dims[0], value.dim()
    expr = sympy.sympify(_expr(value.shape[dim]))
    cached = expr.free_symbols & symbols
    if len(cached) != 1:
        return None, refused
    symbol = next(iter(cached))
    extra = _block_length(expr - symbol)
    if extra is None:
        return None, refused
    layout = _buffer_layout(value, dim, symbol, extra)
    if layout is None or len(layout[1]) > 1:  # not a tensor of its own (a view of a larger one)
        return None, (f"input {node.name} over the cache and the block has strides a buffer with spare capacity "
                      "cannot take")
    split = _SplitInput(node.name, PaddedInput(index, dim, layout[0], extra), symbol, [], [])
    pending = [node]
    while pending:
        source = pending.pop()
        for user in source.users:
            name, args = op_name(user), user.args
            if name == "narrow" and len(args) == 4 and not user.kwargs and args[0] is source and (
                    isinstance(args[1], int) and args[1] % ndim == dim):
                if args[2] == 0 and isinstance(args[3], fx.Node) and dim == ndim - 1:
                    split.heads.append(user)
                    continue
                if isinstance(args[2], fx.Node) and _is_block_length(args[3], extra):
                    split.tails.append(user)
                    continue
            if args and args[0] is source and not user.kwargs and (
                    name in ("logical_not", "invert", "bitwise_not", "neg") and len(args) == 1
                    or name in ("mul", "truediv") and len(args) == 2 and isinstance(args[1], (int, float))):
                pending.append(user)  # a mask made ready (``~mask``, the split's logical_not, a scale): per key
                continue
            split.others.append(user)
    why = _heads_refused(split)
    return (None, why) if why else (split, None)


def _block_length(extra) -> int | sympy.Symbol | None:
    """The block's length an input over cache and block has past the cache's (``size - cached length``):
    a positive int, or a symbol where dynamo made the block's length dynamic; else None."""
    extra = sympy.sympify(extra)
    return int(extra) if extra.is_Integer and extra > 0 else extra if extra.is_Symbol else None


def _is_block_length(size, extra) -> bool:
    """Whether ``size`` (a narrow's length: an int or a node) is ``extra``."""
    if isinstance(size, fx.Node):
        value = _value(size)
        return isinstance(value, torch.SymInt) and sympy.sympify(_expr(value)) == extra
    return type(size) is int and size == extra


def _heads_refused(split: _SplitInput) -> str | None:
    """Why the cached part of ``split`` reaches anything but attention masks (which take the key count)."""
    for head in split.heads:
        for user in head.users:
            if not (user.target is ATTENTION and len(user.args) == 5 and user.args[3] is head
                    and all(a is not head for j, a in enumerate(user.args) if j != 3)):
                return f"{user.name} reads the cached part of {split.name} other than as an attention mask"
    return None


def _fresh_inputs(placeholders: list, symbols: set) -> dict:
    """Inputs sized by a symbol of their own along one dimension, which no other tensor input has (HF's 2-D
    padding mask: dynamo does not tie its length to the cache's), and the integer inputs that are that
    symbol: ``input -> (index, dim, symbol, [integer inputs])``. Candidates to be over cache and block."""
    sized = {}
    for i, node in enumerate(placeholders):
        value = _value(node)
        if isinstance(value, torch.Tensor):
            for symbol in _symbols(value) - symbols:
                sized.setdefault(symbol, []).append((i, node))
    fresh = {}
    for symbol, holders in sized.items():
        if len(holders) != 1:
            continue
        i, node = holders[0]
        value = _value(node)
        dims = [d for d, size in enumerate(value.shape) if not isinstance(_expr(size), (int, sympy.Integer))]
        if len(dims) == 1 and _expr(value.shape[dims[0]]) == symbol:
            integers = [n for n in placeholders if isinstance(_value(n), torch.SymInt) and _expr(_value(n)) == symbol]
            fresh[node] = (i, dims[0], symbol, integers)
    return fresh


def _splits_at_the_length(found: "_CachedInputs", claimed: set) -> dict:
    """The narrows of a computed tensor at a cached length - its cached part ``narrow(x, d, 0, L)`` or the
    block's ``narrow(x, d, L, c)`` - other than the split inputs' (``claimed``): ``narrow -> L's symbol``."""
    sinks = {}
    for length, symbol in found.lengths.items():
        for user in length.users:
            if user in claimed or op_name(user) != "narrow" or len(user.args) != 4 or user.kwargs:
                continue
            source, dim, start, size = user.args
            if isinstance(dim, int) and isinstance(source, fx.Node) and source.op != "placeholder" and (
                    start == 0 and size is length or start is length and _block_size(size, set(found.symbol_values))):
                sinks[user] = symbol
    return sinks


def _cone(sinks: dict, sources: list, reads: set) -> set:
    """The nodes the split tensors (``sinks``' inputs) are computed from that depend on ``sources`` (the
    cached lengths, inputs of their own length) or are ``reads`` (of inputs over cache and block)."""
    dependent, pending = set(reads), [*sources, *reads]
    while pending:
        for user in pending.pop().users:
            if user not in dependent and user not in sinks:
                dependent.add(user)
                pending.append(user)
    cone, pending = set(), [sink.args[0] for sink in sinks]
    while pending:
        node = pending.pop()
        if node in dependent and node not in cone:
            cone.add(node)
            pending += node.all_input_nodes
    return cone


def _computed_masks(placeholders: list, found: "_CachedInputs", split_inputs: list[_SplitInput], device,
                    tables: set) -> tuple[list[_SplitInput], set, list, str | None]:
    """The masks the graph computes from the cached length and splits into their cached and block's parts
    (``narrow(mask, -1, 0, L)``, ``narrow(mask, -1, L, c)``) where each part is proved the same at any
    length (:mod:`fbcompile.passes.length_invariance`), as split inputs of no input of their own, plus the
    inputs of their own length these masks read (:func:`_fresh_inputs`), taken to be over cache and block
    (each call pads them only if their length is the cache's plus ``c``); the nodes that compute them
    (only these read what they read of the length; positions after the cache among them are read
    elsewhere from the key count); and the integer inputs of those inputs' lengths, ``(index, value)``.
    Or why one mask is not proved the same."""
    sinks = _splits_at_the_length(found, {n for item in split_inputs for n in (*item.heads, *item.tails)} | tables)
    if not sinks:
        return [], set(), [], None
    at_capacity = {s for s, value in found.symbol_values.items() if value == CAPACITY}
    blocks = {sympy.sympify(_expr(_value(sink.args[0]).shape[sink.args[1]])).subs({s: CAPACITY for s in at_capacity})
              - CAPACITY for sink in sinks}
    block = _block_length(next(iter(blocks))) if len(blocks) == 1 else None
    fresh = _fresh_inputs(placeholders, set(found.symbol_values)) if block is not None else {}
    cone = _cone(sinks, [*found.lengths, *fresh], {user for item in split_inputs for user in item.others})
    for node in cone:
        for user in node.users:
            if user not in cone and user not in sinks and not any(
                    _positions(node, length, device, set(found.symbol_values)) for length in found.lengths):
                return [], cone, [], (f"{user.name} reads {node.name}, computed from a cached length, other than "
                                      "split at that length")
    fresh = {node: item for node, item in fresh.items() if set(node.users) & cone}
    for node, (_, _, _, integers) in fresh.items():
        for user in [*node.users, *(u for n in integers for u in n.users)]:
            if user not in cone:
                return [], cone, [], f"{user.name} reads input {node.name}, read in a mask over cache and block, elsewhere"
    split = {placeholders[item.padded.index]: (item.padded.dim, item.padded.extra) for item in split_inputs}
    split.update({node: (dim, block) for node, (_, dim, _, _) in fresh.items()})
    lengths = {**{s: LENGTH for s in at_capacity}, **{symbol: LENGTH + block for _, _, symbol, _ in fresh.values()}}
    masks = {}
    for sink, symbol in sinks.items():
        source = sink.args[0]
        item = masks.setdefault(source, _SplitInput(source.name, None, symbol, [], []))
        (item.heads if sink.args[2] == 0 else item.tails).append(sink)
    why = _masks_unproved(MaskEvaluator(lengths, split, cone), sinks, at_capacity)
    if why is not None:  # a sliding window, block-causal positions: the same if its positions come from the count
        if _masks_unproved(MaskEvaluator(lengths, split, cone, count=True), sinks, at_capacity) is not None:
            return [], cone, [], why
        for item in masks.values():
            item.from_count = True
    for item in masks.values():
        if (why := _heads_refused(item)) is not None:
            return [], cone, [], why
    adopted, sizes = [], []
    for node, (index, dim, symbol, integers) in fresh.items():
        layout = _buffer_layout(_value(node), dim, symbol, block, joined=True)
        if layout is None or len(layout[1]) > 1 or (why := found.agree(layout[1])) is not None:
            return [], cone, [], (f"input {node.name} over the cache and the block has strides a buffer with spare "
                                  "capacity cannot take")
        adopted.append(_SplitInput(node.name, PaddedInput(index, dim, layout[0], block), next(iter(at_capacity)), [], []))
        sizes += [(placeholders.index(n), CAPACITY + block) for n in integers]
    if fresh and (why := _replacements_refused(found.env, {symbol for _, _, symbol, _ in fresh.values()})):
        return [], cone, [], why
    return list(masks.values()) + adopted, cone, sizes, None


def _masks_unproved(evaluator: MaskEvaluator, sinks: dict, at_capacity: set) -> str | None:
    """Why a mask's part split at the length (``sinks``) may differ over a padded cache, else None."""
    for sink, symbol in sinks.items():
        try:
            if symbol not in at_capacity:
                raise Unproved(f"{sink.name} splits {sink.args[0].name} at a length that is not the cache's")
            prove_same_at_any_length(evaluator, sink, sink.args[2] == 0)
        except Unproved as why:
            return f"{sink.name} may differ over a padded cache: {why}"
        except (TypeError, ValueError, AttributeError) as error:  # a form the symbols cannot carry: unproved
            return f"{sink.name} may differ over a padded cache: not followed ({type(error).__name__})"
    return None


@dataclass
class _CachedInputs:
    """What :func:`add_key_count` found of the cached inputs with a symbolic length."""

    padded: list = field(default_factory=list)         # PaddedInput of each cached input to pad
    length_only: dict = field(default_factory=dict)    # index -> (symbol, PaddedInput): read only for lengths
    unread: dict = field(default_factory=dict)         # index -> (PaddedInput, symbol values) or None
    symbol_values: dict = field(default_factory=dict)  # symbol -> its value in buffers of CAPACITY
    readers: list = field(default_factory=list)        # the attention calls that take the key count
    lengths: dict = field(default_factory=dict)        # node reading a cached length -> its symbol
    region: set = field(default_factory=set)           # position-wise ops from a cached input to attention
    tables: list = field(default_factory=list)         # (position table, its key dim) those ops read
    env: object = None                                  # the shape environment

    def agree(self, values: dict) -> str | None:
        """Take the symbol values of another input's buffer, unless they contradict those taken."""
        for known, expr in values.items():
            if known in self.symbol_values and sympy.simplify(self.symbol_values[known] - expr) != 0:
                return f"cached inputs give {known} two values in buffers with spare capacity"
        self.symbol_values.update(values)
        return None


def _cached_inputs(placeholders: list, kv: set[int], on_cudnn: frozenset[str]) -> tuple[_CachedInputs, str | None]:
    """How the cached inputs of symbolic length are read (see the module docstring), or why one is read
    in a way that a padded buffer would show."""
    found = _CachedInputs()
    for i in sorted(kv):
        node = placeholders[i]
        value = _value(node)
        if not isinstance(value, torch.Tensor):
            continue
        dims = [d for d, size in enumerate(value.shape) if not isinstance(_expr(size), (int, sympy.Integer))]
        if not dims:
            continue
        symbol = _expr(value.shape[dims[0]])
        if not node.users:  # padded where it shares a symbol (a compiled graph may read it from its sizes)
            layout = _buffer_layout(value, dims[0], symbol) if len(dims) == 1 else None
            found.unread[i] = layout and (PaddedInput(i, dims[0], layout[0], unread=True), layout[1])
            found.env = value.shape[dims[0]].node.shape_env
            continue
        if len(dims) > 1:
            return found, f"cached input {node.name} has {len(dims)} symbolic sizes"
        if not isinstance(symbol, sympy.Symbol):
            return found, f"the length of cached input {node.name} is {symbol}, not a symbol of its own"
        joined = _joined_cache(node, dims[0], value.dim())
        block = joined[0] if joined else 0  # keys/values joined with the block: its length
        layout = _buffer_layout(value, dims[0], symbol, block, joined=bool(joined))
        if layout is None:
            return found, f"cached input {node.name} has strides a buffer with spare capacity cannot take"
        if (why := found.agree(layout[1])) is not None:
            return found, why
        found.env = value.shape[dims[0]].node.shape_env
        if joined:
            reads, sizes, why = list(joined[1].users) if joined[1] is not None else [], [], None
        else:
            reads, sizes, why = _key_readers(node, dims[0], value.dim(), node.name)
            if why is not None and (rotated := _rotated_readers(node, dims[0], value.dim())) is not None:
                reads, sizes, region, tables, why = rotated
                found.region |= region
                found.tables += tables
        if why is not None:
            return found, why
        cudnn = [r.name for r in reads if r.name in on_cudnn]
        if cudnn:
            return found, (f"{cudnn[0]} runs on cuDNN, which reads no key count (with one it would take the "
                           "Triton kernel, slower there)")
        found.lengths.update(dict.fromkeys(sizes, symbol))
        found.readers += reads
        if joined:
            found.padded.append(PaddedInput(i, dims[0], layout[0], block, joined=True, cached_read=bool(reads)))
        elif reads:
            found.padded.append(PaddedInput(i, dims[0], layout[0]))
        else:
            found.length_only[i] = (symbol, PaddedInput(i, dims[0], layout[0], unread=True))
    return found, None


def _pad_unread(found: _CachedInputs, placeholders: list) -> str | None:
    """Pad the unread cached inputs that share a symbol with a padded one (or with such an input)."""
    shared = True
    while shared:
        shared = [i for i in found.unread if _symbols(_value(placeholders[i])) & set(found.symbol_values)]
        for i in shared:
            if found.unread[i] is None:
                return f"cached input {placeholders[i].name} has strides a buffer with spare capacity cannot take"
            padded, values = found.unread.pop(i)
            if (why := found.agree(values)) is not None:
                return why
            found.padded.append(padded)
    return None


def _replacements_refused(env, symbols: set) -> str | None:
    """Why the shapes' replacements forbid padding (one ties a cached length to anything but ``s + c``)."""
    for symbol, expr in env.replacements.items():
        expr = sympy.sympify(expr)
        if symbol not in symbols and not symbols & expr.free_symbols:
            continue
        if symbol in symbols or len(expr.free_symbols) != 1 or not (expr - next(iter(expr.free_symbols))).is_Integer:
            return f"the shapes tie a cached length to another size ({symbol} = {expr})"
    return None


def _offset(node, length, symbols: set):
    """``k`` where ``node`` is ``length + k`` (``length`` itself: 0), ``k`` an int or an integer node free of
    the cached lengths ``symbols`` (a block length dynamo made dynamic), else None."""
    if node is length:
        return 0
    if isinstance(node, fx.Node) and node.target is operator.add and not node.kwargs and len(node.args) == 2:
        a, b = node.args
        return b if a is length and _block_size(b, symbols) else a if b is length and _block_size(a, symbols) else None
    return None


def _block_size(value, symbols: set) -> bool:
    """Whether ``value`` is an int, or an integer node whose value involves none of ``symbols``."""
    if type(value) is int:
        return True
    size = _value(value) if isinstance(value, fx.Node) else None
    return isinstance(size, torch.SymInt) and not sympy.sympify(_expr(size)).free_symbols & symbols


def _positions(node: fx.Node, length: fx.Node, device: torch.device, symbols: set) -> tuple | None:
    """``(start, size)`` where ``node`` computes ``size`` positions after ``length + start`` of an integer
    dtype on ``device`` (the cache's: the count is read there) - positions of the block after the cache,
    HF's ``cache_position`` (``length`` may be the cached length in frames) - as
    ``torch.arange(length + a, length + b)`` (``size`` may be a block length node, with ``a`` 0) or
    ``torch.arange(size) + length``; else None."""
    value = _value(node)
    if not (isinstance(value, torch.Tensor) and value.device == device and not value.dtype.is_floating_point
            and not value.dtype.is_complex and value.dtype != torch.bool):
        return None
    if node.target is operator.add and not node.kwargs and len(node.args) == 2 and length in node.args:
        steps = node.args[1 - node.args.index(length)]
        if isinstance(steps, fx.Node) and steps.target is torch.arange and len(steps.args) == 1 and (
                not set(steps.kwargs) - {"device", "dtype"} and _block_size(steps.args[0], symbols)):
            return 0, steps.args[0]
        return None
    if node.target is not torch.arange or len(node.args) != 2 or set(node.kwargs) - {"device", "dtype"}:
        return None
    start, end = (_offset(a, length, symbols) for a in node.args)
    if type(start) is int and type(end) is int and end >= start:
        return start, end - start
    return (0, end) if start == 0 and isinstance(end, fx.Node) else None


def _position_reads(user: fx.Node, length: fx.Node, device: torch.device, symbols: set) -> list[tuple] | None:
    """The positions ``user``, a read of the cached length ``L``, computes - ``(node, base, k, start,
    size)``, ``node`` computing :func:`_positions` after ``base``, ``L`` (``k`` 1) or ``L // k`` (frames of
    ``k`` tokens) - if that is all it computes; else None."""
    base, divisor, reads = length, 1, [user]
    if user.target is operator.floordiv and not user.kwargs and user.args[0] is length and (
            type(user.args[1]) is int and user.args[1] > 0):
        base, divisor, reads = user, user.args[1], list(user.users)
    ends = [end for read in reads
            for end in (read.users if _offset(read, base, symbols) not in (None, 0) else [read])]
    found = [_positions(end, base, device, symbols) for end in ends]
    return None if None in found else [(end, base, divisor, *where) for end, where in zip(ends, found)]


def _length_reads(lengths: dict, split_inputs: list[_SplitInput], device: torch.device, masks: set, symbols: set,
                  tables: TableReads) -> tuple[list[tuple], str | None]:
    """The positions computed from the cached lengths (see :func:`_position_reads`), if the lengths are
    read for nothing else but the splits of the inputs over cache and block at their own cached length
    and the masks computed from them (``masks``: the nodes that compute them); else ``([], why not)``.
    ``symbols``: the symbols of the cached lengths."""
    for item in split_inputs:
        for head in item.heads:
            if lengths.get(head.args[3]) != item.symbol:
                return [], f"{head.name} reads input {item.name} up to another length than its cached one"
        for tail in item.tails:
            if lengths.get(tail.args[2]) != item.symbol:
                return [], f"{tail.name} reads input {item.name} from another position than its cached length"
    splits = {(n, 3) for item in split_inputs for n in item.heads} | \
        {(n, 2) for item in split_inputs for n in item.tails}
    positions = []
    for length in lengths:
        for user in length.users:
            position = next((j for j, a in enumerate(user.args) if a is length), None)
            if (user, position) in splits and user.args.count(length) == 1 or tables.feeds_only(user):
                continue
            computed = _position_reads(user, length, device, symbols)  # (in a mask, may be read elsewhere)
            if computed is None and user not in masks:
                return [], (f"{user.name} reads a cached length other than as positions after it, to split "
                            "an input over the cache and the block or in a mask proved the same at any length")
            positions += computed or []
    return list(dict.fromkeys(positions)), None


def _positions_from_count(gm: fx.GraphModule, positions: list[tuple], count: fx.Node, masks: set) -> None:
    """``arange(L // k + a, L // k + b)`` -> ``arange(b - a) + (count // k + a)`` (``arange(s) + L`` ->
    ``arange(s) + count``): the positions from the count read on the device, the same whether the cache
    is padded or not; the reads of ``L`` left unused go. The masks computed from the length (``masks``)
    keep them as they are: they are proved the same at any length."""
    graph, like = gm.graph, _value(count)
    for node, base, divisor, start, size in positions:
        dtype = _value(node).dtype
        fake = like.fake_mode if getattr(like, "fake_mode", None) else contextlib.nullcontext()
        with graph.inserting_before(node), fake:
            offsets = graph.call_function(torch.arange, (size,), {"device": like.device, "dtype": dtype})
            offsets.meta["example_value"] = torch.arange(_value(size) if isinstance(size, fx.Node) else size,
                                                         dtype=dtype, device=like.device)
            first = count
            if divisor > 1:
                first = graph.call_function(operator.floordiv, (count, divisor))
                first.meta["example_value"] = like // divisor
            shifted = graph.call_function(operator.add, (offsets, first))
            shifted.meta["example_value"] = offsets.meta["example_value"] + like
            if start:
                shifted = graph.call_function(operator.add, (shifted, start))
                shifted.meta["example_value"] = offsets.meta["example_value"] + start
            cast = graph.call_method("to", (shifted, dtype))
            cast.meta["example_value"] = offsets.meta["example_value"]
        node.replace_all_uses_with(cast, delete_user_cb=lambda user: user not in masks)
        erase_unused(graph, node)


def add_key_count(gm: fx.GraphModule, kv: set[int], on_cudnn: frozenset[str] = frozenset()
                  ) -> tuple[KeyCountInputs | None, str | None]:
    """Add the key-count input to ``gm`` if its cached keys/values (placeholder indices ``kv``) may be
    padded (see the module docstring): ``(how to call it, None)``; else ``gm`` is left as it is and
    ``(None, why not)`` where some cached input has a symbolic size, ``(None, None)`` where none has.
    ``on_cudnn``: names of the attention calls that run on cuDNN (:mod:`fbcompile.passes.attention_kernels`),
    which takes no key count: a graph whose cache they read keeps it unpadded."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    found, why = _cached_inputs(placeholders, kv, on_cudnn)
    if why is not None:
        return None, why
    if not found.padded and not found.length_only:  # the cache unread: its length may still reach the graph
        unread = {i: item for i, item in found.unread.items() if item is not None}
        symbols = set().union(*(values for _, values in unread.values()))
        if not any(symbols & _symbols(_value(node)) and node.users
                   for i, node in enumerate(placeholders) if i not in found.unread):
            return None, None
        found.unread = {i: item for i, item in found.unread.items() if i not in unread}
        for padded, values in unread.values():
            if (why := found.agree(values)) is not None:
                return None, why
            found.padded.append(padded)
    if (why := _pad_unread(found, placeholders) or _replacements_refused(found.env, set(found.symbol_values))):
        return None, why
    symbols, sizes, split_inputs = set(found.symbol_values), [], []
    taken = {p.index for p in found.padded} | set(found.length_only)
    for i, node in enumerate(placeholders):
        value = _value(node)
        if i in taken or not symbols & _symbols(value):
            continue
        if isinstance(value, torch.SymInt):
            if _expr(value) not in symbols:
                return None, f"input {node.name} depends on a cached length ({_expr(value)})"
            sizes.append((i, found.symbol_values[_expr(value)]))
            if node.users:
                found.lengths[node] = _expr(value)
            continue
        item, why = _split_input(node, i, symbols)
        if why is not None:
            return None, why
        split_inputs.append(item)
    device = _value(placeholders[next(iter([*(p.index for p in found.padded), *found.length_only]))]).device
    tables, why = table_reads(found.lengths, found.region, found.tables, placeholders, found.symbol_values)
    if why is not None:
        return None, why
    computed, cone, fresh_sizes, why = _computed_masks(placeholders, found, split_inputs, device, tables.claimed)
    if why is not None:
        return None, why
    sizes += fresh_sizes
    for item in split_inputs:
        for user in item.others:
            if user not in cone:
                return None, f"{user.name} reads input {item.name} over the cache and the block other than as its split parts"
    split_inputs += computed
    positions, why = _length_reads(found.lengths, split_inputs, device, cone, set(found.symbol_values), tables)
    if why is not None:
        return None, why
    positions = [p for p in positions if any(user not in cone for user in p[0].users)]  # the others: in masks
    elsewhere = {node for node in cone if any(user not in cone and op_name(user) != "narrow" for user in node.users)}
    if not elsewhere <= {p[0] for p in positions}:  # positions in a mask the count must serve elsewhere
        return None, f"{min(elsewhere, key=str).name} is read in a mask and elsewhere, not as positions after the cache"
    if not (found.readers or split_inputs or positions or tables.reads or any(p.joined for p in found.padded)):
        return None, None  # nothing reads the length
    found.padded += _lengths_from_split_inputs(gm, placeholders, found.length_only, found.lengths, split_inputs)
    padded = [p for p in found.padded if not p.unread] + [item.padded for item in split_inputs if item.padded] + \
        [p for p in found.padded if p.unread]
    blocks, why = _block_sources(placeholders, padded, sizes, tables.limits)
    if why is not None:
        return None, why
    length = None
    if any(item.from_count for item in split_inputs):
        length = _length_read(placeholders, padded, sizes)
        if length is None:
            return None, "no input gives the capacity to compute the masks from the count"
    with gm.graph.inserting_after(placeholders[-1]):
        count = gm.graph.placeholder(COUNT_NAME)
    like = _value(placeholders[padded[0].index])
    with like.fake_mode if getattr(like, "fake_mode", None) else contextlib.nullcontext():
        count.meta["example_value"] = torch.empty(1, dtype=torch.int32, device=like.device)
    readers = found.readers + [user for item in split_inputs for head in item.heads for user in head.users]
    for reader in dict.fromkeys(readers):
        reader.args = (*reader.args, count)
    _positions_from_count(gm, positions, count, cone)
    if length is not None:  # (each cached input has a symbol of its own: all the capacity there)
        values_from_count(gm, cone, {s for s, value in found.symbol_values.items() if value == CAPACITY}, length, count)
    for read in tables.reads:
        read_from_count(gm, read, count)
    gm.recompile()
    return KeyCountInputs(padded, sizes, len(positions), sum(item.padded is None for item in split_inputs),
                          blocks, len(tables.reads), tables.limits,
                          any(item.from_count for item in split_inputs)), None


def _length_read(placeholders: list, padded: list[PaddedInput], sizes: list[tuple]):
    """``graph -> node`` emitting a read of the capacity a padded call runs at (the graph's cached length
    there): an integer input set to it, or the size of a cached input padded to it; None if none is."""
    for index, expr in sizes:
        if sympy.sympify(expr) == CAPACITY:
            return lambda graph: placeholders[index]
    for p in padded:
        if p.extra == 0 and not p.joined:
            return lambda graph: graph.call_method("size", (placeholders[p.index], p.dim))
    return None


def _block_sources(placeholders: list, padded: list[PaddedInput], sizes: list[tuple], limits: list
                   ) -> tuple[dict, str | None]:
    """Where each call gives the dynamic block lengths the padded inputs' layouts, the integer inputs and
    the capacity limits involve: ``symbol -> (argument, its dimension of that length, or None: the
    argument is it)``."""
    exprs = [p.extra for p in padded] + [s for p in padded for s in p.strides] + [expr for _, expr in sizes] + \
        [limit.extra for limit in limits]
    wanted = set().union(*(sympy.sympify(e).free_symbols for e in exprs)) - {CAPACITY}
    sources = {}
    for i, node in enumerate(placeholders):
        value = _value(node)
        if isinstance(value, torch.SymInt) and _expr(value) in wanted:
            sources.setdefault(_expr(value), (i, None))
        elif isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if _expr(size) in wanted:
                    sources.setdefault(_expr(size), (i, dim))
    missing = wanted - set(sources)
    if missing:
        return {}, f"no input gives the block length {min(missing, key=str)} at each call"
    if not any(isinstance(p.extra, int) for p in padded):
        return {}, "every padded input's length involves a dynamic block length"
    return sources, None


def _lengths_from_split_inputs(gm: fx.GraphModule, placeholders: list, length_only: dict, lengths: dict,
                               split_inputs: list[_SplitInput]) -> list[PaddedInput]:
    """Read the lengths of the cached inputs read for nothing else from an input over the cache and the
    block (``size - extra``), so that those inputs are not read at all (nor copied). Either way they are
    passed as buffers of the capacity that nothing reads (returned): a compiled graph checks each input's
    sizes against the capacity its size inputs then carry (Inductor's ``assert_size_stride``)."""
    unread = {placeholders[i]: i for i in length_only}
    for length, symbol in list(lengths.items()):
        read = length.args[0] if length.op != "placeholder" else None
        while read is not None and read.op != "placeholder":  # through views: see _key_readers
            read = read.args[0]
        if read not in unread:
            continue
        item = next((j for j in split_inputs if j.symbol == symbol and j.padded is not None
                     and isinstance(j.padded.extra, int)), None)
        if item is None:  # only its size is read
            continue
        source = placeholders[item.padded.index]
        with gm.graph.inserting_before(length):
            size = gm.graph.call_method("size", (source, item.padded.dim))
            size.meta["example_value"] = _value(source).shape[item.padded.dim]
            rest = gm.graph.call_function(operator.sub, (size, item.padded.extra))
            rest.meta["example_value"] = _value(length)
        length.replace_all_uses_with(rest)
        view = length.args[0]
        gm.graph.erase_node(length)
        while view.op != "placeholder" and not view.users:  # the views read for nothing else
            view, dead = view.args[0], view
            gm.graph.erase_node(dead)
    return [padded for _, padded in length_only.values()]
