"""Split keys/values that reach attention through position-wise ops applied *after* the cat.

OLMo/LLaDA (Fast-dLLM) rotate the concatenated keys; diffusers' AnyFlow FAR rotates them and then
zero-pads the sequence to a multiple of 128::

    k = torch.cat([past_k, k], dim=-2)                        # [B, H, S, D], S = key_len
    cos, sin = cos_table[:, :, :key_len], sin_table[:, :, :key_len]   # or from arange(key_len)
    k = k.float()
    k = k * cos + rotate_half(k) * sin                        # rotate_half: halves of D, cat on D
    k = rms_norm(k)                                           # optional: reductions over D only
    k = torch.cat([k.to(dtype), torch.zeros(B, H, pad, D)], dim=-2)   # optional zero padding
    F.scaled_dot_product_attention(q, k, v)

Every op between the cat and the attention acts on each key position on its own, so rows
``[a, a + n)`` of the result are the same ops applied to the cat operand covering ``[a, a + n)``,
with every other operand that varies along the sequence narrowed to ``[a, a + n)``. That is what
:class:`PositionwisePiece` emits, for the cached pieces (external part) and the block (internal).

Position-wise-ness is proven on the graph, not from op names: :func:`positionwise_pieces` walks
back from the attention operand tracking the sequence dim through every op - elementwise ops
(every tensor operand has size 1 or the key length along that dim, right-aligned), layout ops (the
sequence dim kept whole: the prefix products of the shapes before it match), reductions, ``cat``,
``unbind``/``chunk``/``split``, ``einsum`` and ``matmul`` along other dims only. Operands of the key length
that do not come from the cat are *position tables*. Narrowing a table to a piece's rows is always
exact (:meth:`PositionwiseChain.emit` narrows the table node itself); what must be proven is that
the rows a cached piece reads do not change between a block's steps unless a guard sees it. The
guards see: the graph inputs the piece reads (``external_inputs``: identity, version, shape), the
query's sizes (the ``O_e`` shape check), and the ints of ``AttentionSite.cache_offsets()`` (by
value). A symbolic-int graph input (``s0``) is seen by none of them unless it is listed there, and
may change between two calls of the same graph. So a table is accepted only as:

* graph inputs (guarded), ``get_attr`` constants, ``arange(key_len)`` (row i is i), prefix slices
  ``t[..., :key_len]``, and position-wise ops of those: row i depends on no size at all;
* a *graph constant*: computed from no graph input (no tensor, no symbolic size), no ``get_attr``
  (whose value a fingerprint cannot see) and no random or uninitialised op, through any ops
  (diffusers' AnyFlow pools its per-axis frequencies, slices them at frame offsets and cats them).
  It is the same at every call of the graph. A static size baked into it differs between graphs
  only, and the session shares entries between graphs only where the cached part's fingerprint
  (its ops, constants and shapes, :func:`~.graph_utils.fingerprint`) is the same, so another graph
  with another table does not take this one's entries;
* a ``cat`` along the sequence of accepted tables (``cat([cos[:n1], cos[:n2]])``): row i of the cat
  is row ``i - a`` of the operand covering it, so its rows move with the operands' lengths, which
  join the guarded ints: a static length as itself, a symbolic one as the symbolic-int inputs of
  its symbols (a symbol that is no graph input: :class:`LayoutError`). Such a cat is recognised
  once the walk has met the keys' cat; met before it, it is taken for the keys' cat and the walk
  stops at the real one ("two concatenations"). A graph-constant cat is recognised in any order.

Size-1 operands (``inv_freq``, norm weights) must not depend on symbolic sizes. Any other table -
sliced at an offset that depends on a graph input (``cos[key_len - n:]``), a ``flip``, ``cumsum``
or a matmul over the sequence of an input - raises :class:`LayoutError` with the reason.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fbcompile.passes.graph_utils import METADATA_OPS, arg, example, op_name, same_size, shape


class LayoutError(Exception):
    """The keys/values do not come from a ``cat`` through a layout we can rebuild exactly."""


_ELEMENTWISE = {"neg", "rsqrt", "sqrt", "exp", "cos", "sin", "tanh", "sigmoid", "reciprocal", "abs", "silu",
                "float", "half", "bfloat16", "type", "contiguous", "clone", "detach", "clamp",
                "add", "sub", "mul", "div", "truediv", "pow", "where", "maximum", "minimum", "polar",
                "ones_like", "zeros_like"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}  # (x, dim, keepdim)
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as_complex",
             "view_as_real"}
_SPLITS = {"unbind", "chunk", "split"}
_SIZE_ARGS = {"view", "reshape", "expand"}
_NONDETERMINISTIC = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm", "normal",
                     "bernoulli", "multinomial", "dropout", "empty", "empty_like", "empty_strided", "new_empty"}


def _norm(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def _is_symbolic(value) -> bool:
    return isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _scalar_nodes(node: fx.Node) -> list[fx.Node]:
    """Non-tensor fx.Node arguments of ``node`` (symbolic sizes)."""
    return [a for a in node.all_input_nodes if example(a) is None]


def _prod(sizes):
    return math.prod(sizes) if sizes else 1


def _reshape_dim(src: tuple, d: int, dst: tuple) -> int | None:
    """The dim of ``dst`` that is ``src``'s dim ``d`` kept whole by a row-major reshape, or None."""
    before = _prod(src[:d])
    for j, size in enumerate(dst):
        if same_size(size, src[d]) and same_size(_prod(dst[:j]), before):
            return j
    return None


@dataclass
class _Use:
    """How a region node reads one of its tensor inputs."""

    kind: str           # "region" | "table" (narrowed along dim) | "whole" (size 1 along the sequence)
    dim: int | None = None


@dataclass(eq=False)
class PositionwiseChain:
    """The ops between a ``cat`` along the sequence and ``top``, each with its sequence dim."""

    top: fx.Node
    cat: fx.Node
    cat_dim: int
    pieces: list                                   # the cat's non-empty operands
    region: dict = field(default_factory=dict)     # node -> its sequence dim (tuple ops: each element's)
    order: list = field(default_factory=list)      # the region in graph order
    uses: dict = field(default_factory=dict)       # (node, input) -> _Use
    side_inputs: set = field(default_factory=set)  # placeholders the tables / whole operands read
    guarded_sizes: list = field(default_factory=list)  # ints / symbolic-int inputs the tables' rows move with

    def emit(self, graph: fx.Graph, index: int, start, length) -> fx.Node:
        """Rows ``[start, start + length)`` of ``top``, computed from cat operand ``index`` alone."""
        return self.emit_rows(graph, self.pieces[index],
                              lambda table, dim: graph.call_method("narrow", (table, dim, start, length)), length)

    def emit_rows(self, graph: fx.Graph, rows: fx.Node, table_rows, length) -> fx.Node:
        """``top`` computed from ``rows`` (``length`` rows in place of the cat's) and, for every position
        table, ``table_rows(table, dim)`` (the same rows of it)."""
        env = {self.cat: rows}
        narrowed = {}

        def operand(node, value):
            if not isinstance(value, fx.Node):
                return value
            if value in env:
                return env[value]
            use = self.uses.get((node, value))
            if use is not None and use.kind == "table":
                if value not in narrowed:
                    narrowed[value] = table_rows(value, use.dim)
                return narrowed[value]
            return value

        for node in self.order:
            args = fx.node.map_aggregate(node.args, lambda a, n=node: operand(n, a))
            kwargs = fx.node.map_aggregate(node.kwargs, lambda a, n=node: operand(n, a))
            name = op_name(node)
            if name == "type_as":  # the other tensor only gives the dtype
                env[node] = graph.call_method("to", (args[0], example(node).dtype))
                continue
            if name in _SIZE_ARGS:
                args = self._resized(node, args, length)
            env[node] = graph.create_node(node.op, node.target, tuple(args), kwargs)
        return env[self.top]

    def _resized(self, node: fx.Node, args, length):
        """``view``/``reshape``/``expand`` sizes with the sequence entry set to the piece's length."""
        seq = self.region[node]
        sizes = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        if not (isinstance(sizes[seq], int) and sizes[seq] == -1):
            sizes[seq] = length
        return (args[0], *sizes)


class _Tracer:
    """Walks back from ``top`` along the sequence dim (see the module docstring)."""

    def __init__(self, top: fx.Node, seq_dim: int, source: fx.Node | None = None, stand_in=None):
        self.top, self.length = top, shape(top)[seq_dim]
        self.source = source  # stands for the cat (see positionwise_rows)
        self.stand_in = stand_in  # graph input -> (dim, pieces) where it stands for a cat (see positionwise_pieces)
        self.downstream = _descendants(source) if source is not None else set()
        self.chain: PositionwiseChain | None = None
        self.region: dict = {}
        self.uses: dict = {}
        self.side_inputs: set = set()
        self.guarded_sizes: list = []
        self.slices: list = []  # (getitem / narrow, its input, the input's dim, its dim) along the sequence
        self.visited: dict = {}
        self._constants: set | None = None

    # -- the region (depends on the cat) and position tables (do not) share one walk ------------
    def visit(self, node: fx.Node, dim: int) -> bool:
        """True if ``node`` (sequence along ``dim``) depends on the cat; raises LayoutError."""
        key = (node, dim)
        if key in self.visited:
            return self.visited[key]
        found = self._visit(node, dim)
        self.visited[key] = found
        if found:
            if not same_size(shape(node)[dim], self.length):
                raise LayoutError(f"'{op_name(node)}' cuts the concatenated keys along the sequence")
            self.region[node] = dim
        return found

    def _visit(self, node: fx.Node, dim: int) -> bool:
        name = op_name(node) or node.op
        node_shape = shape(node)
        if self.source is not None:
            if node is self.source:
                if self.chain is not None:
                    raise LayoutError("keys/values read the cached rows along two dims")
                self.chain = PositionwiseChain(top=self.top, cat=node, cat_dim=dim, pieces=[node])
                return True
            if node not in self.downstream:
                return False  # a position table: taken as it is (the split proved its rows)
        if node.op == "placeholder":
            found = self.stand_in(node) if self.stand_in is not None else None
            if found is None:
                self.side_inputs.add(node)
                return False
            if found[0] != dim or self.chain is not None:
                raise LayoutError(f"keys/values read the written buffer {node.name} along another dim, or twice")
            self.chain = PositionwiseChain(top=self.top, cat=node, cat_dim=dim, pieces=list(found[1]))
            return True
        if node.op == "get_attr":
            return False
        if self._graph_constant(node):  # its ops and constants are in the site's fingerprint (passes/guards.py)
            return False
        if name == "getitem" and isinstance(node.args[0], fx.Node) and example(node.args[0]) is None:
            return self._element(node, dim)
        if node_shape is None or dim >= len(node_shape):
            raise LayoutError(f"'{name}' after the concatenation has no sequence dim")
        if name == "cat":
            cat_dim = _norm(arg(node, 1, "dim", 0), len(node_shape))
            tensors = arg(node, 0, "tensors")
            if cat_dim == dim:
                return self._sequence_cat(node, tensors)
            return self._inputs(node, [(t, dim) for t in tensors])
        if name == "arange":
            return self._arange(node)
        self._check_scalars(node, name)
        if name in ("to", "type_as"):  # a tensor argument only gives the dtype / device
            return self._inputs(node, [(node.args[0], dim)])
        if name in _ELEMENTWISE:
            return self._elementwise(node, dim)
        if name in _REDUCTIONS:
            return self._reduction(node, dim)
        if name in _RESHAPES or name in ("transpose", "permute", "expand", "getitem", "narrow"):
            return self._layout(node, name, dim)
        if name == "einsum":
            return self._einsum(node, dim)
        if name in ("matmul", "bmm"):
            return self._matmul(node, dim)
        if name == "outer":  # outer(a, b)[i, j] = a[i] * b[j]
            aligned, whole = node.args[dim], node.args[1 - dim]
            self._whole(node, whole)
            return self._inputs(node, [(aligned, 0)])
        raise LayoutError(self._unsupported(node, name))

    def _unsupported(self, node: fx.Node, name: str) -> str:
        if self.chain is not None or any(self._reaches_sequence_cat(a) for a in node.all_input_nodes):
            return f"'{name}' between the concatenation and the attention is not proven position-wise"
        return f"keys/values are not a concatenation (reached '{name}')"

    def _reaches_sequence_cat(self, node: fx.Node, steps: int = 8) -> bool:
        """``node`` is, a few first-argument steps back, a cat with the key length along its dim (for
        the message only: an op that mixes the positions of a cat, or no cat at all)."""
        for _ in range(steps):
            if op_name(node) == "cat" and shape(node) is not None:
                return same_size(shape(node)[_norm(arg(node, 1, "dim", 0), len(shape(node)))], self.length)
            if not node.args or not isinstance(node.args[0], fx.Node):
                return False
            node = node.args[0]
        return False

    def _graph_constant(self, node: fx.Node) -> bool:
        """``node`` is computed from no graph input and no random or uninitialised op (see the module
        docstring); one pass over the graph in order."""
        if self._constants is None:
            self._constants = set()
            for n in self.top.graph.nodes:
                name = op_name(n) or ("getattr" if n.target is getattr else "")  # getattr: ``t.real``
                if (n.op in ("call_function", "call_method") and name and name not in _NONDETERMINISTIC
                        and not _in_place(name) and all(a in self._constants for a in n.all_input_nodes)):
                    self._constants.add(n)
        return node in self._constants

    def _guard(self, size) -> None:
        """Add an int or a symbolic-int input to what the run-time guards compare by value."""
        if isinstance(size, int) or size not in self.guarded_sizes:
            self.guarded_sizes.append(size)

    def _sequence_cat(self, node: fx.Node, tensors) -> bool:
        if self.source is not None:
            raise LayoutError("keys/values are concatenated along the key sequence after the cache")
        dim = _norm(arg(node, 1, "dim", 0), len(shape(node)))
        if self.chain is not None and self.chain.cat is not node:
            return self._table_cat(node, tensors, dim)
        pieces = [t for t in tensors if not same_size(shape(t)[dim], 0)]
        if len(pieces) < 2:
            raise LayoutError("cat of fewer than two tensors")
        self.chain = PositionwiseChain(top=self.top, cat=node, cat_dim=dim, pieces=pieces)
        return True

    def _table_cat(self, node: fx.Node, tensors, dim: int) -> bool:
        """A cat along the sequence of position tables, met once the keys' cat is known: its rows move
        with its operands' lengths, which are guarded (see the module docstring)."""
        if any(self.visit(t, dim) for t in tensors):
            raise LayoutError("keys/values go through two concatenations along the key sequence")
        inputs = {n.meta["example_value"].node.expr: n for n in self.top.graph.nodes
                  if n.op == "placeholder" and isinstance(n.meta.get("example_value"), torch.SymInt)}
        for t in tensors[:-1]:  # the last operand's length moves no row before it
            length = shape(t)[dim]
            if isinstance(length, int):
                self._guard(length)
                continue
            for symbol in length.node.expr.free_symbols:
                if symbol not in inputs:
                    raise LayoutError("a position table is a cat whose part lengths depend on a size that is no "
                                      "graph input")
                self._guard(inputs[symbol])
        return False

    def _arange(self, node: fx.Node) -> bool:
        """``arange(n)`` / ``arange(0, n)``: row i holds i, whatever n is."""
        args = [a for a in node.args]
        start = args[0] if len(args) > 1 else node.kwargs.get("start", 0)
        step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
        if not (isinstance(start, (int, float)) and start == 0 and isinstance(step, (int, float)) and step == 1):
            raise LayoutError("a position table is an arange that does not start at 0 with step 1")
        return False

    def _element(self, node: fx.Node, dim: int) -> bool:
        """``unbind(x)[i]`` / ``chunk(x)[i]``: the sequence dim of the split op's elements."""
        source = node.args[0]
        name = op_name(source)
        if name not in _SPLITS or not isinstance(node.args[1], int):
            raise LayoutError(f"'{name}' after the concatenation is not proven position-wise")
        src_shape = shape(source.args[0])
        split_dim = _norm(arg(source, 2 if name != "unbind" else 1, "dim", 0), len(src_shape))
        in_dim = dim + (1 if name == "unbind" and split_dim <= dim else 0)
        if split_dim == in_dim:
            raise LayoutError(f"'{name}' along the key sequence")
        if not self.visit(source.args[0], in_dim):
            raise LayoutError(f"'{name}' of a position table")
        self.region[source] = dim
        self.uses[(source, source.args[0])] = self.uses[(node, source)] = _Use("region")
        return True

    def _inputs(self, node: fx.Node, inputs: list) -> bool:
        """Visit tensor inputs that carry the sequence along the given dims."""
        found = [self.visit(t, d) for t, d in inputs]
        for (t, d), f in zip(inputs, found):
            self.uses[(node, t)] = _Use("region") if f else _Use("table", d)
        return any(found)

    def _elementwise(self, node: fx.Node, dim: int) -> bool:
        right = len(shape(node)) - dim
        positions = shape(node)[dim]
        aligned = []
        for t in node.all_input_nodes:
            t_shape = shape(t)
            if t_shape is None:
                continue
            d = len(t_shape) - right
            if d < 0 or same_size(t_shape[d], 1):
                self._whole(node, t)
            elif same_size(t_shape[d], positions):
                aligned.append((t, d))
            else:
                raise LayoutError(f"an operand of '{op_name(node)}' has {t_shape[d]} positions, "
                                  "not 1 or the key length")
        return self._inputs(node, aligned)

    def _whole(self, node: fx.Node, t: fx.Node) -> None:
        """A size-1 (broadcast) operand: used whole, so nothing symbolic may reach it."""
        for a in _ancestors(t) | {t}:
            if a.op == "placeholder" and example(a) is None or op_name(a) in METADATA_OPS:
                raise LayoutError(f"an operand broadcast over the keys of '{op_name(node)}' depends on a "
                                  "symbolic size")
            if a.op == "placeholder":
                self.side_inputs.add(a)
        self.uses[(node, t)] = _Use("whole")

    def _check_scalars(self, node: fx.Node, name: str) -> None:
        if name in _SIZE_ARGS or name in ("getitem", "narrow"):
            return  # sizes and slice bounds: checked by the layout rules
        if any(_is_symbolic(a.meta.get("example_value")) for a in _scalar_nodes(node)):
            raise LayoutError(f"'{name}' after the concatenation takes a symbolic scalar")

    def _reduction(self, node: fx.Node, dim: int) -> bool:
        src_shape = shape(node.args[0])
        dims = arg(node, 1, "dim")
        if dims is None:
            raise LayoutError(f"'{op_name(node)}' reduces over every dim, including the key sequence")
        dims = {_norm(d, len(src_shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        keep = arg(node, 2, "keepdim", False)
        kept = list(range(len(src_shape))) if keep else [d for d in range(len(src_shape)) if d not in dims]
        in_dim = kept[dim]
        if in_dim in dims:
            raise LayoutError(f"'{op_name(node)}' reduces over the key sequence")
        return self._inputs(node, [(node.args[0], in_dim)])

    def _layout(self, node: fx.Node, name: str, dim: int) -> bool:
        source = node.args[0]
        src_shape, out_shape = shape(source), shape(node)
        if name == "transpose":
            a, b = (_norm(d, len(out_shape)) for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1")))
            in_dim = {a: b, b: a}.get(dim, dim)
        elif name == "permute":
            perm = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
            in_dim = _norm(perm[dim], len(out_shape))
        elif name in _RESHAPES:
            in_dim = _reshape_dim(out_shape, dim, src_shape)
        elif name == "expand":
            in_dim = dim + len(src_shape) - len(out_shape)
        elif name == "narrow":
            in_dim = dim
            if _norm(arg(node, 1, "dim"), len(out_shape)) == dim and not _is_zero(arg(node, 2, "start")):
                raise LayoutError("a slice along the key sequence starts at an offset")
        else:
            in_dim = _index_dim(node.args[1], dim, len(src_shape))
        if in_dim is None or in_dim < 0:
            raise LayoutError(f"'{name}' does not keep the key sequence dim whole")
        if name in ("getitem", "narrow"):
            self.slices.append((node, source, in_dim, dim))
        return self._inputs(node, [(source, in_dim)])

    def _matmul(self, node: fx.Node, dim: int) -> bool:
        """``a @ b`` (both at least 2-D): the sequence along the rows of ``a`` (``b`` whole), the columns of
        ``b`` (``a`` whole), or a batch dim (elementwise there); never along the contracted dim. HF's
        rotary tables: ``inv_freq[None, :, None] @ position_ids[:, None, :]``."""
        a, b = node.args[:2]
        nd = len(shape(node))
        if min(len(shape(a)), len(shape(b))) < 2:
            raise LayoutError(f"'{op_name(node)}' of a vector is not proven position-wise")
        if dim == nd - 2:
            self._whole(node, b)
            return self._inputs(node, [(a, len(shape(a)) - 2)])
        if dim == nd - 1:
            self._whole(node, a)
            return self._inputs(node, [(b, len(shape(b)) - 1)])
        aligned = []
        for t in (a, b):  # batch dims broadcast right-aligned, as elementwise operands do
            d = len(shape(t)) - (nd - dim)
            if d < 0 or same_size(shape(t)[d], 1):
                self._whole(node, t)
            else:
                aligned.append((t, d))
        return self._inputs(node, aligned)

    def _einsum(self, node: fx.Node, dim: int) -> bool:
        equation, *operands = node.args
        if not isinstance(equation, str) or "->" not in equation or "." in equation:
            raise LayoutError("einsum without an explicit output")
        ins, out = equation.replace(" ", "").split("->")
        letter = out[dim]
        inputs = []
        for spec, t in zip(ins.split(","), operands):
            if letter in spec:
                inputs.append((t, spec.index(letter)))
            else:
                self._whole(node, t)
        return self._inputs(node, inputs)


def _in_place(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def _is_zero(value) -> bool:
    return value is None or (isinstance(value, int) and value == 0)


def _index_dim(index, dim: int, ndim: int) -> int | None:
    """The input dim that output dim ``dim`` of ``x[index]`` comes from, or None if it is sliced at an
    offset; slices along it must start at 0 (prefix slices keep row i at row i)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (fx.Node, list)) and not _is_symbolic(getattr(i, "meta", {}).get("example_value"))
           for i in index):
        raise LayoutError("tensor indexing after the concatenation")
    out = src = 0
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    for item in index:
        if item is Ellipsis:
            skip = ndim - explicit
            if out <= dim < out + skip:
                return src + dim - out
            out, src = out + skip, src + skip
        elif item is None:
            if out == dim:
                return None
            out += 1
        elif isinstance(item, slice):
            if out == dim:
                if not _is_zero(item.start) or item.step not in (None, 1):
                    raise LayoutError("a position table or the keys are sliced at an offset along the sequence")
                return src
            out, src = out + 1, src + 1
        else:  # an int index removes a dim
            src += 1
    return src + dim - out


def _descendants(node: fx.Node) -> set:
    """The nodes computed from ``node``'s values (not through its sizes alone)."""
    seen, stack = set(), [n for n in node.users if op_name(n) not in METADATA_OPS]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(u for u in n.users if op_name(u) not in METADATA_OPS)
    return seen


def _ancestors(node: fx.Node) -> set:
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


@dataclass(eq=False)
class PositionwisePiece:
    """One cat operand seen through a :class:`PositionwiseChain` (a piece of the chain's output)."""

    chain: PositionwiseChain
    index: int

    @property
    def source(self) -> fx.Node:
        return self.chain.pieces[self.index]

    @property
    def length(self):
        if not isinstance(self.source, fx.Node):  # a stand-in piece
            return self.source.length
        return shape(self.source)[self.chain.cat_dim]

    @property
    def dtype(self) -> torch.dtype:
        return example(self.chain.top).dtype

    @property
    def side_inputs(self) -> set:
        return self.chain.side_inputs

    @property
    def guarded_sizes(self) -> list:
        """Ints and symbolic-int inputs the tables' rows move with: the run-time guards compare them."""
        return self.chain.guarded_sizes

    def describe(self) -> str:
        source = self.source.name if isinstance(self.source, fx.Node) else self.source.describe()
        return f"{source}->{self.chain.top.name}"

    def emit_length(self, graph: fx.Graph):
        if not isinstance(self.source, fx.Node):
            return self.source.emit_length(graph)
        length = self.length
        return length if isinstance(length, int) else graph.call_method("size", (self.source, self.chain.cat_dim))

    def emit(self, graph: fx.Graph) -> fx.Node:
        source = self.source
        if not isinstance(source, fx.Node):  # a stand-in's rows, and its own rows of each table
            return self.chain.emit_rows(graph, source.emit(graph),
                                        lambda table, dim: source.table_rows(graph, table, dim), self.emit_length(graph))
        start = 0
        for i in range(self.index):
            before = PositionwisePiece(self.chain, i).emit_length(graph)
            start = before if _is_zero(start) else graph.call_function(operator.add, (start, before))
        return self.chain.emit(graph, self.index, start, self.emit_length(graph))


def positionwise_pieces(top: fx.Node, seq_dim: int, stand_in=None) -> list[PositionwisePiece]:
    """The pieces of ``top`` (sequence along ``seq_dim``) if it is position-wise of a sequence cat, or of a
    graph input that ``stand_in`` (``input -> (dim, pieces) or None``) finds stands for one: a buffer the
    graph writes at the block's positions (Fast-dLLM's dual cache, rotated after the write), whose pieces
    (:mod:`.buffer_write`) give their own rows of each table (``table_rows``)."""
    chain = _traced(_Tracer(top, seq_dim, stand_in=stand_in), seq_dim)
    return [PositionwisePiece(chain, i) for i in range(len(chain.pieces))]


def positionwise_rows(top: fx.Node, seq_dim: int, source: fx.Node) -> PositionwiseChain:
    """The position-wise ops from ``source`` (its rows: the rows of ``top``) to ``top``, in a split
    graph: the chain has ``source`` as its only piece, and every other operand with the key length is
    a position table, not walked (the split proved its rows). Sparse reuse
    (:mod:`.sparse_external`) emits it over gathered rows of ``source`` and of the tables."""
    return _traced(_Tracer(top, seq_dim, source), seq_dim)


def position_table(node: fx.Node, dim: int) -> tuple[list[tuple], set[fx.Node]]:
    """Prove that row i of ``node`` along ``dim`` is a function of i alone at any size the graph runs at,
    as the tables of a chain are (graph inputs, ``arange(n)``, prefix slices, position-wise ops of those;
    no cat along the sequence); raises :class:`LayoutError` otherwise. Returns the slices its rows pass
    through, ``(slice, its input, the input's dim, the slice's dim)`` (a prefix slice reads only rows its
    input has), and the graph inputs it reads."""
    tracer = _Tracer(node, dim)
    try:
        if tracer.visit(node, dim):
            raise LayoutError("it is computed from a concatenation along the sequence")
    except LayoutError as error:
        raise LayoutError(f"position table {node.name}: {error}") from error
    return tracer.slices, tracer.side_inputs


def _traced(tracer: _Tracer, seq_dim: int) -> PositionwiseChain:
    top = tracer.top
    if not tracer.visit(top, seq_dim) or tracer.chain is None:
        raise LayoutError(f"keys/values are not a concatenation (reached '{op_name(top) or top.op}')")
    chain = tracer.chain
    chain.region, chain.uses, chain.side_inputs = tracer.region, tracer.uses, tracer.side_inputs
    chain.guarded_sizes = tracer.guarded_sizes
    del chain.region[chain.cat]
    chain.order = [n for n in top.graph.nodes if n in chain.region]
    return chain
