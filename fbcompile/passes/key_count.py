"""Let a graph run over cached keys/values held in buffers with spare capacity.

A cache grown by ``torch.cat`` at every block between calls (``generate`` loops, a cache extended
outside the model) hands the graph new tensors of a new length each time, so a CUDA graph captured over one block's cache could never replay. If the length of
the cached keys/values reaches nothing but the external attention, the graph can instead run over
buffers of a fixed, larger capacity that the cache is copied into, with the number of keys that count
read on the device. This pass proves that and adds the count as an input.

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
  no slice, size or other use: any of them could see the padding), and none of these calls runs on cuDNN
  (:func:`fbcompile.ops.attention_kernel`), which takes no key count (as a bias over the padding it
  loses its 1.5x lead over the Triton kernel: ``benchmarks/results/attention_backends_h200.md``);
* no other input's sizes, strides or value involve these symbols, except integer inputs that are one of
  them and have no users (dynamo passes sizes it saw as such inputs);
* the shape environment ties none of them to another expression (a replacement such as ``s3 = s0 + 32``
  from a mask over the cache and the block would size that mask by the capacity).

So no other node can depend on the length. Run after every other pass (``attention_lse`` nodes gain
a sixth argument that the other passes do not expect).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from fbcompile.passes.graph_utils import op_name, traced_value

ATTENTION = torch.ops.fbcompile.attention_lse.default
COUNT_NAME = "cached_key_count"


CAPACITY = sympy.Symbol("capacity", integer=True, positive=True)


@dataclass
class PaddedInput:
    """A cached key/value input: its argument index, the dimension of its length and the strides of its
    buffer as expressions of :data:`CAPACITY`."""

    index: int
    dim: int
    strides: tuple

    def layout(self, shape: torch.Size, capacity: int) -> tuple[list[int], list[int]]:
        """Sizes and strides of a buffer of ``capacity`` along :attr:`dim`, laid out as the graph expects."""
        sizes = list(shape)
        sizes[self.dim] = capacity
        return sizes, [int(sympy.sympify(s).subs(CAPACITY, capacity)) for s in self.strides]


@dataclass
class KeyCountInputs:
    """How to call a graph :func:`add_key_count` rewrote: the inputs that may be padded, the integer
    inputs that carry their sizes or strides (``(index, value as an expression of CAPACITY)``), and the
    key count, appended after all other arguments."""

    padded: list[PaddedInput]
    sizes: list[tuple]
    _values: dict = field(default_factory=dict, repr=False)  # capacity -> size_values (sympy is slow)

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
    return node.meta.get("example_value", node.meta.get("val"))


def _buffer_layout(value: torch.Tensor, dim: int) -> tuple[tuple, dict] | None:
    """The strides of a dense buffer of :data:`CAPACITY` rows along ``dim``, its dimensions in the order
    of ``value``'s strides, as expressions of the capacity, and the value each symbol of ``value`` then
    takes - if the graph's strides for ``value`` can be those (a cache of its own, or a view of the
    filled part of a larger buffer, whose strides are other symbols); else None."""
    hints = [traced_value(s) for s in value.stride()]
    order = sorted(range(value.dim()), key=lambda i: (hints[i], -i))  # innermost first
    dense, step = [0] * value.dim(), sympy.Integer(1)
    for i in order:
        dense[i] = step
        step = step * (CAPACITY if i == dim else _expr(value.shape[i]))
    values = {_expr(value.shape[dim]): CAPACITY}
    equations = [sympy.Eq(sympy.sympify(_expr(have)).subs(values), want) for have, want in zip(value.stride(), dense)]
    if any(e is sympy.false for e in equations):
        return None
    others = sorted(_symbols(value) - set(values), key=str)
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


def _key_readers(node: fx.Node, dim: int, ndim: int, name: str) -> tuple[list[fx.Node], str | None]:
    """The ``attention_lse`` calls that read cached input ``name`` (``node``, or a view of it) as their
    keys or values with its dimension ``dim`` as their key axis, directly or through ``permute`` /
    ``transpose`` views that nothing else reads (a [B, S, H, D] cache seen as [B, H, S, D]); else
    ``([], why not)``."""
    readers = []
    for user in node.users:
        if op_name(user) in ("permute", "transpose") and user.args[0] is node:
            axis = _view_axis(user, dim, ndim)
            if axis is None:
                return [], f"{user.name} views cached input {name} in a way not known statically"
            inner, why = _key_readers(user, axis, ndim, name)
            if why is not None:
                return [], why
            readers += inner
        elif user.target is ATTENTION and len(user.args) == 5 and all(
                a is not node for j, a in enumerate(user.args) if j not in (1, 2)):
            if dim != 2:
                return [], f"{user.name} reads the length of cached input {name} along another axis than its keys'"
            readers.append(user)
        else:
            return [], f"{user.name} reads cached input {name} other than as attention keys/values"
    return readers, None


def add_key_count(gm: fx.GraphModule, kv: set[int], on_cudnn: frozenset[str] = frozenset()
                  ) -> tuple[KeyCountInputs | None, str | None]:
    """Add the key-count input to ``gm`` if its cached keys/values (placeholder indices ``kv``) may be
    padded (see the module docstring): ``(how to call it, None)``; else ``gm`` is left as it is and
    ``(None, why not)`` where some cached input has a symbolic size, ``(None, None)`` where none has.
    ``on_cudnn``: names of the attention calls that run on cuDNN (:mod:`fbcompile.passes.attention_kernels`),
    which takes no key count: a graph whose cache they read keeps it unpadded."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    padded, symbol_values, readers = [], {}, []
    for i in sorted(kv):
        node = placeholders[i]
        value = _value(node)
        if not node.users or not isinstance(value, torch.Tensor):
            continue
        dims = [d for d, size in enumerate(value.shape) if not isinstance(_expr(size), (int, sympy.Integer))]
        if not dims:
            continue
        if len(dims) > 1:
            return None, f"cached input {node.name} has {len(dims)} symbolic sizes"
        symbol = _expr(value.shape[dims[0]])
        if not isinstance(symbol, sympy.Symbol):
            return None, f"the length of cached input {node.name} is {symbol}, not a symbol of its own"
        layout = _buffer_layout(value, dims[0])
        if layout is None:
            return None, f"cached input {node.name} has strides a buffer with spare capacity cannot take"
        strides, values = layout
        for known, expr in values.items():
            if known in symbol_values and sympy.simplify(symbol_values[known] - expr) != 0:
                return None, f"cached inputs give {known} two values in buffers with spare capacity"
        symbol_values.update(values)
        reads, why = _key_readers(node, dims[0], value.dim(), node.name)
        if why is not None:
            return None, why
        cudnn = [r.name for r in reads if r.name in on_cudnn]
        if cudnn:
            return None, (f"{cudnn[0]} runs on cuDNN, which reads no key count (with one it would take the "
                          "Triton kernel, slower there)")
        readers += reads
        padded.append(PaddedInput(i, dims[0], strides))
    if not padded:
        return None, None
    padded_indices, symbols = {p.index for p in padded}, set(symbol_values)
    env = next(iter(_value(placeholders[p.index]).shape[p.dim] for p in padded)).node.shape_env
    for symbol, expr in env.replacements.items():
        if symbol in symbols or symbols & sympy.sympify(expr).free_symbols:
            return None, f"the shapes tie a cached length to another size ({symbol} = {expr})"
    sizes = []
    for i, node in enumerate(placeholders):
        if i in padded_indices or not symbols & _symbols(_value(node)):
            continue
        if isinstance(_value(node), torch.SymInt) and _expr(_value(node)) in symbols and not node.users:
            sizes.append((i, symbol_values[_expr(_value(node))]))
            continue
        return None, f"input {node.name} depends on a cached length ({_expr(_value(node)) if isinstance(_value(node), torch.SymInt) else 'its sizes'})"
    with gm.graph.inserting_after(placeholders[-1]):
        count = gm.graph.placeholder(COUNT_NAME)
    like = _value(placeholders[padded[0].index])
    with like.fake_mode if getattr(like, "fake_mode", None) else contextlib.nullcontext():
        count.meta["example_value"] = torch.empty(1, dtype=torch.int32, device=like.device)
    for reader in dict.fromkeys(readers):
        reader.args = (*reader.args, count)
    gm.recompile()
    return KeyCountInputs(padded, sizes), None
